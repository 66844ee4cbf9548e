"""Chain-of-Causality text in `smolvla_world`: the labels of a training dataset and the text pass.

`CocLabels` reads the JSONL of `lerobot-wm-label-coc` (checked against the training dataset's
fingerprint) and maps every frame's global `index` to its segment's text, or to none. `CocText`
tokenises those texts once and computes the next-token loss on them through SmolVLA's own VLM in a
pass of its own: prefix (images, instruction, state, as SmolVLA embeds them) followed by the CoC
tokens with causal attention, the VLM layers SmolVLA keeps, its final norm and its LM head. The
action pass never sees these tokens, so the actions are computed exactly as without the text loss.
Frames without a label are left out of the text pass (masked), never given a made-up text.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lerobot.utils.constants import OBS_STATE
from torch import Tensor

logger = logging.getLogger(__name__)

# The labelling command the errors give as the fix.
LABEL_COMMAND = "lerobot-wm-label-coc --dataset.repo_id={repo_id} --dataset.root={root}"


def _label_command(dataset_meta, out: Path | None = None, overwrite: bool = False) -> str:
    cmd = LABEL_COMMAND.format(repo_id=dataset_meta.repo_id, root=Path(dataset_meta.root).resolve())
    if out is not None:
        cmd += f" --out={out}"
    return cmd + (" --overwrite" if overwrite else "")


class CocLabels:
    """CoC texts of a training dataset's frames: `segment[i]` is the text index of global frame i, or -1."""

    def __init__(self, texts: list[str], segment: Tensor, path: str = ""):
        """`texts`: one per labelled segment; `segment` [num_frames] long (-1: no label)."""
        self.texts = texts
        self.segment = segment
        self.path = path

    @classmethod
    def load(cls, path: str | Path, dataset_meta) -> CocLabels:
        """Read `path` (and its meta file) for the dataset `dataset_meta` describes.

        Raises FileNotFoundError / ValueError naming the fix when the file is missing, has no meta file,
        was made for another dataset (fingerprint), or holds records that do not fit the dataset.
        """
        from ..latents.cache import DatasetIdentity, _digest
        from ..tools.label_coc import FORMAT_VERSION, RECORD_KEYS, describe_changes, meta_path

        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"--policy.coc_path={path} is not a file. Label the training dataset first: "
                f"{_label_command(dataset_meta)} (writes <dataset root>/meta/coc_labels.jsonl)."
            )
        meta_file = meta_path(path)
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            raise ValueError(
                f"--policy.coc_path={path} has no readable meta file {meta_file.name} next to it, so nothing "
                "ties these labels to the training dataset. Fix: write them with "
                f"{_label_command(dataset_meta, path)} (for texts of your own, run it once with "
                "--backend=template and replace the JSONL records, same keys)."
            ) from None
        # The fingerprint the labeller would write for this dataset with the file's labeller settings.
        identity = DatasetIdentity.from_meta(dataset_meta).to_dict()
        header = {"dataset": identity, "labeller": meta.get("labeller") or {}}
        if meta.get("fingerprint") != _digest({"format_version": FORMAT_VERSION, **header}):
            raise ValueError(
                f"--policy.coc_path={path} was labelled for other data than the training dataset "
                f"'{dataset_meta.repo_id}' ({describe_changes(meta, header)}). Fix: relabel the training "
                f"dataset: {_label_command(dataset_meta, path, overwrite=True)}"
            )
        if not meta.get("complete", False):
            logger.warning("%s: the labelling run did not finish; episodes it did not reach get no text loss.", path)
        num_frames = int(dataset_meta.total_frames)
        episodes = dataset_meta.episodes
        bounds = {int(e): (int(a), int(b)) for e, a, b in zip(
            episodes["episode_index"], episodes["dataset_from_index"], episodes["dataset_to_index"])}  # fmt: skip
        segment = np.full(num_frames, -1, dtype=np.int64)
        texts: list[str] = []
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"--policy.coc_path={path} line {line_no}"
            try:
                rec = json.loads(line)
                ep, a, b = int(rec["episode_index"]), int(rec["from_index"]), int(rec["to_index"])
                text = rec["text"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{where} is not a label record with keys {list(RECORD_KEYS)}.") from None
            # Global frame indices, `to` exclusive (see label_coc.py), inside the record's own episode.
            lo, hi = bounds.get(ep, (0, -1))
            if not (lo <= a < b <= hi):
                raise ValueError(
                    f"{where}: frames [{a}, {b}) are not inside episode {ep} ([{lo}, {hi}) of the training "
                    f"dataset). Fix: relabel: {_label_command(dataset_meta, path, overwrite=True)}"
                )
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where} has an empty text; drop the record (its frames then get no text loss).")
            if (segment[a:b] >= 0).any():
                raise ValueError(f"{where}: frames [{a}, {b}) overlap another record; each frame takes one text.")
            segment[a:b] = len(texts)
            texts.append(text.strip())
        labelled = int((segment >= 0).sum())
        logger.info("CoC labels %s: %d texts, %d/%d frames labelled (the rest get no text loss).",
                    path, len(texts), labelled, num_frames)  # fmt: skip
        return cls(texts, torch.from_numpy(segment), str(path))

    def segments_of(self, index: Tensor) -> Tensor:
        """Text index [B] (-1: no label) of the frames with global indices `index` [B]."""
        index = torch.as_tensor(index).long().flatten().cpu()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self.segment)):
            raise ValueError(
                f"Frame index {int(index.max())} is outside the {len(self.segment)} frames the CoC labels were "
                f"bound to ({self.path}): train on the dataset they were made for."
            )
        return self.segment[index]


def text_tokens(tokenizer) -> tuple[int, int, int]:
    """(start, eos, pad) token ids of the CoC texts: start is the tokenizer's BOS, else its EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The VLM's tokenizer has no EOS token, so a CoC text cannot be ended; use another VLM.")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return start, eos, pad


class CocText:
    """The text pass of `smolvla_world`: tokenised CoC texts and their next-token loss through the VLM."""

    def __init__(self, labels: CocLabels, tokenizer):
        """Tokenise every text once as [start, text tokens..., eos] (start: the tokenizer's BOS, else EOS)."""
        start, eos, pad = text_tokens(tokenizer)
        self.labels = labels
        seqs = [[start, *tokenizer(t, add_special_tokens=False)["input_ids"], eos] for t in labels.texts]
        width = max((len(s) for s in seqs), default=2)
        self.tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
        self.lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        for i, s in enumerate(seqs):
            self.tokens[i, : len(s)] = torch.tensor(s)

    def loss(self, smolvla, batch: dict) -> tuple[Tensor | None, dict]:
        """(mean next-token loss over the batch's labelled frames, or None when none is labelled; logs).

        `smolvla` is the held `SmolVLAPolicy`; `batch` the training batch after SmolVLA's forward (its
        state as that forward read it). Unlabelled frames take no part in the pass.
        """
        if "index" not in batch:
            raise KeyError(
                "The CoC text loss needs the frames' global 'index' in the training batch; train through "
                "lerobot-train (its batches carry it) or put the dataset's 'index' column in the batch."
            )
        segments = self.labels.segments_of(batch["index"])
        b = segments.numel()
        info = {"text_labelled": float((segments >= 0).float().mean()) if b else 0.0}
        rows = (segments >= 0).nonzero().flatten()
        if rows.numel() == 0:
            info["text_loss"] = 0.0
            return None, info
        device = batch[OBS_STATE].device
        sub = {k: v[rows.to(v.device)] for k, v in batch.items()
               if isinstance(v, Tensor) and v.ndim and v.shape[0] == b}  # fmt: skip
        seg = segments[rows]
        width = int(self.lengths[seg].max())
        tokens = self.tokens[seg, :width].to(device)
        mask = (torch.arange(width)[None] < self.lengths[seg, None]).to(device)
        logits = text_logits(smolvla, sub, tokens, mask)[:, :-1]
        targets = tokens[:, 1:].masked_fill(~mask[:, 1:], -100)
        ce = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
        per_frame = ce.sum(1) / mask[:, 1:].sum(1)  # each labelled frame weighs the same, whatever its length
        loss = per_frame.mean()
        info["text_loss"] = loss.item()
        return loss, info


def text_logits(smolvla, batch: dict, tokens: Tensor, mask: Tensor) -> Tensor:
    """LM-head logits [R, L, V] at the text positions (position j predicts token j + 1) of a pass
    through SmolVLA's VLM over its prefix followed by `tokens` [R, L] (`mask`: real tokens).

    The prefix is SmolVLA's own (`embed_prefix`: images, instruction, state) with its block attention;
    the text tokens are embedded and scaled as SmolVLA embeds the instruction and attend causally to
    the prefix and to each other; the prefix does not see them.
    """
    from lerobot.policies.smolvla.modeling_smolvla import make_att_2d_masks
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    model = smolvla.model
    vlm = model.vlm_with_expert
    images, img_masks = smolvla.prepare_images(batch)
    state = smolvla.prepare_state(batch)
    prefix, prefix_pad, prefix_att = model.embed_prefix(
        images, img_masks, batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK], state=state
    )
    text = vlm.embed_language_tokens(tokens)
    text = text * math.sqrt(text.shape[-1])  # as embed_prefix scales the instruction's embeddings
    embs = torch.cat([prefix, text.to(prefix.dtype)], dim=1)
    pad = torch.cat([prefix_pad, mask], dim=1)
    att = torch.cat([prefix_att, torch.ones_like(mask)], dim=1)  # every text token starts a block: causal
    (hidden, _), _ = vlm.forward(
        attention_mask=make_att_2d_masks(pad, att),
        position_ids=torch.cumsum(pad, dim=1) - 1,
        past_key_values=None,
        inputs_embeds=[embs, None],
        use_cache=False,
        fill_kv_cache=True,  # the VLM layers only (no expert): plain self-attention in every layer
    )
    head = vlm.vlm.lm_head
    return head(hidden[:, prefix.shape[1] :].to(head.weight.dtype))


@torch.no_grad()
def generate_text(smolvla, batch: dict, max_tokens: int) -> list[str]:
    """The CoC text of every frame of `batch`, decoded greedily (at most `max_tokens` tokens, up to EOS)
    from the same VLM pass as the text loss trains. Draws no random numbers, so the actions that follow
    are those without it."""
    tokenizer = smolvla.model.vlm_with_expert.processor.tokenizer
    start, eos, _ = text_tokens(tokenizer)
    b = batch[OBS_STATE].shape[0]
    device = batch[OBS_STATE].device
    tokens = torch.full((b, 1), start, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    # No key/value cache: SmolVLA's layers keep none for a VLM-only pass, and explanations are short.
    for _ in range(max_tokens):
        logits = text_logits(smolvla, batch, tokens, torch.ones_like(tokens, dtype=torch.bool))
        nxt = logits[:, -1].float().argmax(-1).masked_fill(done, eos)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    texts = []
    for row in tokens[:, 1:].tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts
