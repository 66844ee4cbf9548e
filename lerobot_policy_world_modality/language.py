"""Language instructions (`task`) as frozen text embeddings, shared by every world policy type.

A policy that reads the instruction holds a `FrozenTextEncoder`: a small transformers text encoder
(`AutoTokenizer` + `AutoModel`, Hub id or local `save_pretrained` directory, e.g.
`sentence-transformers/all-MiniLM-L6-v2`) whose token states are mean-pooled over the attention mask
into one float32 vector per instruction. It is frozen and reloadable from its id, so it is never part
of a policy's weights: policies keep it out of their registered submodules (this class is not an
`nn.Module`, so assigning it to a policy attribute cannot register it by accident) and move it to
their device on first use. What a checkpoint records instead is its identity, name + revision (Hub
commit hash, or sha256 of a local directory's weights, config and tokenizer files), so evaluating a
checkpoint with a different text encoder fails with a clear message instead of feeding the policy
embeddings it never saw.

Instructions repeat across a batch and an episode, so embeddings are cached per distinct string and
each one is encoded once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .fileio import files_revision
from .latents.hf_encoders import EncoderLoadError
from .sources import resolve_source

# The documented default choice when the language input is enabled (384-d, 22 M parameters).
DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
# Batch key LeRobot uses for the instruction (dataset column and `add_envs_task` at evaluation).
TASK_KEY = "task"
# Files besides the weights that decide a local text encoder's embeddings (config + tokenizer).
_IDENTITY_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


class TextEncoderLoadError(EncoderLoadError):
    """A text encoder that cannot be loaded or does not match a checkpoint; the message names the fix."""


@dataclass
class LanguageOptions:
    """Mixin dataclass for policy configs: the optional language input, same fields on every policy type."""

    # Frozen text encoder for the instruction (`task`): Hub id or local path, e.g. sentence-transformers/all-MiniLM-L6-v2; None = no language input.
    language_encoder: str | None = None
    # Revision of language_encoder (Hub commit or sha256 of the local files); filled at construction, checked at load.
    language_encoder_revision: str | None = None
    # Tokens kept per instruction (longer instructions are truncated).
    language_max_length: int = 64


@dataclass(frozen=True)
class TextEncoderIdentity:
    """What decides the embeddings: the encoder's name, its revision, and its output dimension."""

    name: str  # Hub id, or the absolute path of a local directory
    revision: str  # Hub commit hash, or "sha256:..." over a local directory's files
    dim: int  # embedding size, read from the model config


def text_local_revision(directory: str | Path) -> str:
    """sha256 over a local text encoder's weights, config and tokenizer files (sorted by name).

    The tokenizer is included, unlike for vision encoders: another vocabulary changes every embedding.
    """
    directory = Path(directory)
    weights = [p for p in directory.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin")]
    if not weights:
        raise TextEncoderLoadError(
            f"Text encoder directory '{directory}' holds no weight files (*.safetensors / *.bin). "
            "Fix: save the model there with `model.save_pretrained(dir)` and its tokenizer with "
            "`tokenizer.save_pretrained(dir)`."
        )
    files = sorted([*weights, *(directory / n for n in _IDENTITY_FILES if (directory / n).is_file())], key=lambda p: p.name)
    return files_revision(files)


def _source(name_or_path: str) -> tuple[str, bool]:
    """Return (what to give from_pretrained, is_local_dir with an absolute path); catch mistyped paths."""
    source, is_local = resolve_source(
        name_or_path, "Text encoder path",
        f"a directory written by `save_pretrained` (config, weights and tokenizer) or a Hub id such as "
        f"'{DEFAULT_TEXT_ENCODER}'", TextEncoderLoadError,
    )  # fmt: skip
    return (str(Path(source).resolve()), True) if is_local else (source, False)


def _embedding_dim(config, name: str) -> int:
    """Hidden size of a text encoder from its config (BERT-style `hidden_size`, T5-style `d_model`)."""
    text = getattr(config, "text_config", None) or config
    dim = getattr(text, "hidden_size", None) or getattr(text, "d_model", None)
    if not dim:
        raise TextEncoderLoadError(
            f"Text encoder '{name}' (model_type '{getattr(config, 'model_type', None)}') has no hidden_size "
            f"in its config. Use a text encoder checkpoint such as '{DEFAULT_TEXT_ENCODER}'."
        )
    return int(dim)


def resolve_text_encoder(name_or_path: str, revision: str | None = None) -> tuple[TextEncoderIdentity, str, object]:
    """Identity of a text encoder from its config and revision, without loading weights or tokenizer.

    Returns (identity, source for from_pretrained, transformers config). With `revision` (e.g. the one
    a checkpoint recorded), a Hub id is pinned to that commit and a local directory must hash to it;
    a mismatch raises `TextEncoderLoadError` naming both revisions and the fix.
    """
    from transformers import AutoConfig

    source, is_local = _source(name_or_path)
    if is_local and not (Path(source) / "config.json").is_file():
        # Checked first: AutoConfig would otherwise guess a model type from the directory name.
        raise TextEncoderLoadError(
            f"Cannot load text encoder config: the directory '{source}' has no config.json. Fix: pass a "
            "directory written by `model.save_pretrained(dir)` and `tokenizer.save_pretrained(dir)`."
        )
    try:
        config = AutoConfig.from_pretrained(source, revision=None if is_local else revision)
    except (OSError, ValueError, KeyError) as err:
        pinned = f" at revision {revision}" if revision and not is_local else ""
        raise TextEncoderLoadError(
            f"Cannot load the config of text encoder '{name_or_path}'{pinned} ({err}). Fix: pass a local "
            f"directory written by `save_pretrained`, or download it first (`huggingface-cli download "
            f"{name_or_path}`) on a machine with internet and point HF_HOME at that cache."
        ) from err
    if is_local:
        current = text_local_revision(source)
    else:
        current = getattr(config, "_commit_hash", None)
        if not current:
            raise TextEncoderLoadError(
                f"Could not determine the Hub revision of text encoder '{name_or_path}'. Fix: download it "
                f"with `huggingface-cli download {name_or_path}` and pass the local snapshot directory instead."
            )
    if revision is not None and current != revision:
        raise TextEncoderLoadError(
            f"Text encoder mismatch: the policy was trained with language_encoder revision {revision}, but "
            f"'{name_or_path}' is revision {current}. Its embeddings would differ from the ones the policy "
            "learned from. Fix: pass the text encoder the policy was trained with (--policy.language_encoder), "
            "or retrain the policy with this one."
        )
    identity = TextEncoderIdentity(name=source, revision=current, dim=_embedding_dim(config, name_or_path))
    return identity, source, config


class FrozenTextEncoder:
    """A frozen transformers text encoder: instructions -> mean-pooled float32 embeddings [B, dim].

    Deliberately not an `nn.Module`: policies hold it in a plain attribute so its weights never enter
    their state dict, optimizer, DDP broadcast or `.to()`. It moves itself to the device asked for by
    `encode`. Embeddings are cached per distinct instruction (least recently used beyond `cache_size`),
    so an instruction repeated across a batch or an episode runs through the model once.
    """

    def __init__(self, name_or_path: str, revision: str | None = None, max_length: int = 64, cache_size: int = 4096):
        """Load tokenizer and model (at `revision` when given; see `resolve_text_encoder`), frozen, eval mode."""
        from transformers import AutoModel, AutoTokenizer

        self.identity, source, config = resolve_text_encoder(name_or_path, revision)
        # Pin the Hub files to the commit the identity names, so config, weights and tokenizer agree.
        pin = {} if Path(source).is_dir() else {"revision": self.identity.revision}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **pin)
            model = AutoModel.from_pretrained(source, dtype=torch.float32, **pin)
        except (OSError, ValueError) as err:
            raise TextEncoderLoadError(
                f"Cannot load the tokenizer or weights of text encoder '{name_or_path}' ({err}). Fix: make "
                "sure the directory or Hub snapshot holds both, written by `model.save_pretrained(dir)` and "
                "`tokenizer.save_pretrained(dir)`."
            ) from err
        # Encoder-decoder checkpoints (T5) are used through their encoder only.
        if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        self.model = model.eval().requires_grad_(False)
        limit = getattr(config, "max_position_embeddings", None) or max_length
        self.max_length = int(min(max_length, limit))
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        # Instructions that actually ran through the model (cache misses); for tests and benchmarks.
        self.num_encoded = 0

    @property
    def dim(self) -> int:
        """Embedding size (from the model config)."""
        return self.identity.dim

    @property
    def device(self) -> torch.device:
        """Device the model's weights are on."""
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> FrozenTextEncoder:
        """Move the model and the cached embeddings to `device` (no-op when already there)."""
        device = torch.device(device)
        if device != self.device:
            # inference_mode(False): moving under lerobot-eval's inference mode would turn the weights
            # into inference tensors that a later training forward could not use.
            with torch.inference_mode(False), torch.no_grad():
                self.model.to(device)
                self._cache = OrderedDict((k, v.to(device)) for k, v in self._cache.items())
        return self

    def encode(self, texts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """float32 embeddings [len(texts), dim] on `device` (default: the model's), one row per text."""
        if device is not None:
            self.to(device)
        # Normal (non-inference) tensors even when called under torch.inference_mode, as lerobot-eval
        # does: cached rows are reused by training forwards, which must be able to save them for backward.
        with torch.inference_mode(False), torch.no_grad():
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                for text, row in zip(missing, self._encode_uncached(missing), strict=True):
                    self._cache[text] = row
                self.num_encoded += len(missing)
            for text in dict.fromkeys(texts):
                self._cache.move_to_end(text)
            rows = [self._cache[t] for t in texts]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return torch.stack(rows)

    def _encode_uncached(self, texts: list[str]) -> torch.Tensor:
        """Run the model on distinct texts; mean of the token states over the attention mask."""
        inputs = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        states = self.model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).to(states.dtype)
        # Padding tokens carry states too; only the instruction's own tokens enter the mean.
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def instructions_from_batch(batch: dict[str, Any], batch_size: int) -> list[str]:
    """The batch's instructions (`task`) as a list of `batch_size` non-empty strings, or a clear error.

    Accepts a list/tuple of strings or one string (broadcast to the batch). An empty instruction is an
    error, not a default: a policy trained on empty instructions learns to ignore its language input.
    """
    if TASK_KEY not in batch or batch[TASK_KEY] is None:
        raise KeyError(
            f"The language input is on (language_encoder is set) but the batch has no '{TASK_KEY}'. "
            "lerobot-train takes it from the dataset's task column and lerobot-eval from the environment's "
            "task description; when calling the policy directly, pass batch['task'] = [instruction, ...]. "
            "To train without language, leave --policy.language_encoder unset."
        )
    tasks = batch[TASK_KEY]
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not all(isinstance(t, str) for t in tasks):
        raise TypeError(f"batch['{TASK_KEY}'] must hold strings, got {[type(t).__name__ for t in tasks]}.")
    if len(tasks) == 1 and batch_size > 1:
        tasks = tasks * batch_size
    if len(tasks) != batch_size:
        raise ValueError(f"batch['{TASK_KEY}'] has {len(tasks)} instructions for a batch of {batch_size}.")
    empty = [i for i, t in enumerate(tasks) if not t.strip()]
    if empty:
        raise ValueError(
            f"Empty language instruction ('{TASK_KEY}') for batch rows {empty[:8]} while the language input is "
            "on: a policy trained on empty instructions learns to ignore them. Fix: give every episode a task "
            "(the dataset's tasks / the environment's task description), or leave --policy.language_encoder "
            "unset for environments without instructions."
        )
    return tasks


def bind_language_encoder(options: LanguageOptions) -> TextEncoderIdentity | None:
    """Resolve the configured text encoder (cheap: config + revision) and record its revision.

    Fills `language_encoder_revision` on first construction; when it is already set (a saved
    checkpoint), checks the encoder against it and raises `TextEncoderLoadError` on a mismatch.
    Returns None when the language input is off.
    """
    if not options.language_encoder:
        if options.language_encoder_revision is not None:
            raise TextEncoderLoadError(
                "language_encoder_revision is set but language_encoder is not: this policy was trained with a "
                "language input. Fix: pass the text encoder it was trained with (--policy.language_encoder=...)."
            )
        return None
    identity, _, _ = resolve_text_encoder(options.language_encoder, options.language_encoder_revision)
    options.language_encoder_revision = identity.revision
    return identity
