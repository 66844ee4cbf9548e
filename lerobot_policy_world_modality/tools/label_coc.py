"""`lerobot-wm-label-coc`: Chain-of-Causality labels for every episode of a LeRobotDataset.

    lerobot-wm-label-coc --dataset.repo_id=local/pick_place --dataset.root=/data/pick_place --backend=template
    lerobot-wm-label-coc --dataset.repo_id=HuggingFaceVLA/libero --backend=vlm \
        --model=HuggingFaceTB/SmolVLM2-2.2B-Instruct --device=cuda --dtype=bf16 --batch_size=16

Each episode is cut into segments and every segment gets a short text saying what the robot does and
why. Backends:

- `template` needs no model: for MetaWorld recordings made with `lerobot-wm-record-metaworld
  --store_sim_state true` it reads the simulator's raw observation (column `sim.metaworld_obs`) and
  cuts the episode into phases (reach, grasp, move, place, release, push/press, retreat) from the
  hand-object distance, the gripper opening and the object's motion. Datasets without such signals
  (LIBERO carries no BDDL predicates) get one segment per episode with the task instruction
  (phase "instruction"), and the tool says so.
- `vlm` asks any transformers image-text-to-text model (AutoProcessor + AutoModelForImageTextToText,
  Hub id or local directory). Keyframes are the frames where the world latents change most (from the
  latent cache of `--encoder`/`--camera` when it exists, else evenly spaced frames, and the tool says
  so); each segment between two consecutive keyframes is described from its two boundary images and
  the instruction, through a replaceable prompt template. Output that is empty, too long or not text
  is recorded in the meta file as rejected and counted, never written as a label.

Output (default `<dataset root>/meta/coc_labels.jsonl`, `--out` to move it), see docs/coc.md:

    coc_labels.jsonl      one JSON object per segment: episode_index, from_index, to_index (global frame
                          indices, to exclusive), text, phase, labeller
    coc_labels.meta.json  fingerprint of the dataset and the labeller settings, episodes done,
                          rejected outputs and counts

Both files are rewritten atomically after each group of episodes (the labels first), so a killed run
resumes with the episodes the meta file lists; a run with another dataset or other settings is refused
unless `--overwrite`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write_json, atomic_write_text, files_revision
from .record_metaworld import SIM_STATE_KEY  # the column `--store_sim_state` writes

TOOL = "lerobot-wm-label-coc"
# Bumped when the record or meta layout changes; files of another version are refused (--overwrite).
FORMAT_VERSION = 1
DEFAULT_OUT = "meta/coc_labels.jsonl"  # relative to the dataset root
RECORD_KEYS = ("episode_index", "from_index", "to_index", "text", "phase", "labeller")
# Keep at most this much of a rejected output in the meta file: enough to see what went wrong.
REJECTED_RAW_CHARS = 200

# The default prompt of the `vlm` backend. Placeholders: {instruction}, {segment} (1-based),
# {num_segments}, {num_images}, {seconds} (segment duration).
DEFAULT_PROMPT = (
    "The images are two moments of a robot episode, {seconds:.1f} seconds apart (part {segment} of "
    "{num_segments}). The robot's task: {instruction}. In one short sentence, say what the robot "
    "gripper does between the two images and why, naming the object it acts on."
)
PROMPT_FIELDS = {"instruction": "pick up the cube", "segment": 1, "num_segments": 3, "num_images": 2, "seconds": 1.0}


class LabelError(RuntimeError):
    """A labelling request that cannot be carried out; the message names the fix."""


# ----------------------------------------------------------------------------------------------------------
# Instructions: the object and the verb the template texts use.

# Nouns of MetaWorld instructions that are obstacles or targets, never the object acted on.
_NOT_OBJECTS = {"wall", "goal", "gripper", "position", "top"}
# Instruction verbs and the third-person form the texts use (anything else: "pushes").
_VERBS = {
    "press": "presses", "push": "pushes", "pull": "pulls", "rotate": "turns", "turn": "turns",
    "slide": "slides", "open": "opens", "close": "closes", "sweep": "sweeps", "kick": "kicks",
    "lock": "locks", "unlock": "unlocks", "hammer": "hammers", "insert": "inserts", "dunk": "dunks",
}  # fmt: skip


def object_name(instruction: str) -> str:
    """The object an instruction acts on: the first noun after an article that is not an obstacle.

    "Pick and place a puck to a goal" -> "puck"; "Bypass a wall and press a button" -> "button";
    "object" when there is none.
    """
    words = re.findall(r"[a-z]+", instruction.lower())
    for article, word in zip(words, words[1:]):
        if article in ("a", "an", "the") and word not in _NOT_OBJECTS:
            return word
    return "object"


def instruction_verb(instruction: str) -> tuple[str, str]:
    """(phase, third-person verb) of a non-grasping contact: ("press", "presses") for "Press a button"."""
    for word in re.findall(r"[a-z]+", instruction.lower()):
        if word in _VERBS:
            return ("press", "presses") if word == "press" else ("push", _VERBS[word])
    return "push", "pushes"


# ----------------------------------------------------------------------------------------------------------
# The template backend.


@dataclass(frozen=True)
class TemplateSettings:
    """Thresholds that cut a MetaWorld episode into phases (recorded in the fingerprint)."""

    # Hand-object distance (m) under which the gripper is at the object (a held puck sits ~4 cm away).
    near_m: float = 0.06
    # The gripper counts as closed below this fraction of its opening at the episode's first frame.
    closed_fraction: float = 0.9
    # Object speed (m per frame, centred over `speed_window` frames) above which it moves.
    moving_m_per_frame: float = 0.001
    speed_window: int = 2
    # Displacement from its first position (m) after which the object has been moved at all.
    moved_m: float = 0.005
    # Shorter runs are absorbed by their neighbour: a flicker of a signal is not a phase.
    min_frames: int = 3
    # Rise of the object (m) over a "move" after which the text says it was lifted.
    lifted_m: float = 0.02


# Phase of each frame, then runs. Order of a well-executed grasping episode, for the docs and tests.
PHASE_ORDER = ("reach", "grasp", "move", "place", "release", "push", "press", "retreat")


def metaworld_phases(obs: np.ndarray, instruction: str, settings: TemplateSettings) -> list[tuple[int, int, str]]:
    """Phases of one episode from MetaWorld's raw observations `obs` [T, 39]: [(start, end, phase)], local
    frame indices, end exclusive, covering 0..T in time order.

    Per frame: the hand is `near` the object (distance < near_m), the gripper is `closed`, the object
    `moving`; `held` = closed and near. Before the object first moves the frame is "grasp" when held,
    else "reach". After: held and moving "move", held and still "place"; not held after having held
    "release"; moving without a hold the instruction's push/press; otherwise "retreat".
    """
    obs = np.asarray(obs, dtype=np.float64)
    hand, grip, obj = obs[:, 0:3], obs[:, 3], obs[:, 4:7]
    T = len(obs)
    near = np.linalg.norm(hand - obj, axis=1) < settings.near_m
    closed = grip < settings.closed_fraction * max(float(grip[0]), 1e-6)
    held = near & closed
    w = max(1, settings.speed_window)
    lo, hi = np.clip(np.arange(T) - w, 0, T - 1), np.clip(np.arange(T) + w, 0, T - 1)
    speed = np.linalg.norm(obj[hi] - obj[lo], axis=1) / np.maximum(hi - lo, 1)
    moving = speed > settings.moving_m_per_frame
    moved = np.linalg.norm(obj - obj[0], axis=1) > settings.moved_m
    first_move = int(np.argmax(moved)) if moved.any() else T
    contact = instruction_verb(instruction)[0]
    labels, ever_held = [], False
    for t in range(T):
        if t < first_move:
            phase = "grasp" if held[t] else "reach"
        elif held[t]:
            phase = "move" if moving[t] else "place"
        elif ever_held:
            phase = "release"
        else:
            phase = contact if moving[t] else "retreat"
        ever_held |= bool(held[t]) and t >= first_move
        labels.append(phase)
    return _runs(labels, settings.min_frames)


def _runs(labels: list[str], min_frames: int) -> list[tuple[int, int, str]]:
    """Runs of equal labels; runs shorter than `min_frames` are merged into the previous one (the first
    into the next), then equal neighbours are joined."""
    runs: list[list] = []
    for t, lab in enumerate(labels):
        if runs and runs[-1][2] == lab:
            runs[-1][1] = t + 1
        else:
            runs.append([t, t + 1, lab])
    merged: list[list] = []
    for run in runs:
        if merged and (run[1] - run[0] < min_frames or merged[-1][2] == run[2]):
            merged[-1][1] = run[1]
        else:
            merged.append(run)
    if len(merged) > 1 and merged[0][1] - merged[0][0] < min_frames:
        merged[1][0] = 0
        merged.pop(0)
    return [(a, b, lab) for a, b, lab in merged]


def phase_text(phase: str, instruction: str, phases: list[str], lifted: bool = False) -> str:
    """The Chain-of-Causality sentence of one phase: what the gripper does and why (`lifted`: the object
    rose during a "move")."""
    obj = object_name(instruction)
    verb = instruction_verb(instruction)[1]
    grasping = "grasp" in phases or "move" in phases
    texts = {
        "reach": f"the gripper moves above the {obj} so that it can grasp it" if grasping
        else f"the gripper moves toward the {obj} to reach it",
        "grasp": f"the gripper closes on the {obj} to grasp it so that it can carry it",
        "move": f"the gripper {'lifts the ' + obj + ' and carries it' if lifted else 'carries the ' + obj} toward the goal",
        "place": f"the gripper holds the {obj} still at the goal",
        "release": f"the gripper opens to release the {obj} now that it is placed",
        "push": f"the gripper {verb} the {obj} toward the goal",
        "press": f"the gripper {verb} the {obj} down to activate it",
        "retreat": f"the gripper stays clear of the {obj} once the task is done",
    }
    return texts[phase]


class TemplateLabeller:
    """No model: phases from the simulator's recorded signals, or the instruction when there are none."""

    name = "template"

    def __init__(self, dataset: Any, settings: TemplateSettings | None = None):
        """`dataset` is an opened LeRobotDataset; its sim column (if any) is read once, without videos."""
        self.settings = settings or TemplateSettings()
        self.sim = None
        if SIM_STATE_KEY in dataset.hf_dataset.column_names:
            table = dataset.hf_dataset.data
            # Episodes are sliced by global index, so row i must be frame i.
            if not np.array_equal(table.column("index").to_numpy(), np.arange(table.num_rows)):
                raise LabelError(
                    f"Dataset '{dataset.repo_id}' rows are not ordered by global index 0..N-1, so its "
                    f"'{SIM_STATE_KEY}' rows cannot be cut into episodes. Fix: re-save the dataset with rows "
                    "sorted by `index` (as lerobot-wm-record-metaworld writes them)."
                )
            self.sim = np.stack(table.column(SIM_STATE_KEY).to_numpy(zero_copy_only=False)).astype(np.float32)
        else:
            print(
                f"{TOOL}: dataset '{dataset.repo_id}' has no '{SIM_STATE_KEY}' column, so the template backend has "
                "no phase signals (LIBERO datasets carry no BDDL predicates; MetaWorld recordings have them "
                "only with `lerobot-wm-record-metaworld --store_sim_state true`). Each episode gets one "
                "segment with its instruction (phase 'instruction'); use --backend=vlm for descriptive labels."
            )

    def settings_dict(self) -> dict:
        """What decides the labels (fingerprinted)."""
        return {"backend": self.name, "signals": SIM_STATE_KEY if self.sim is not None else None, **asdict(self.settings)}

    def label(self, episodes: list[dict]) -> tuple[list[dict], list[dict]]:
        """(label records, rejected records) of `episodes` (dicts with index, from, to, instruction)."""
        records, rejected = [], []
        for ep in episodes:
            if self.sim is None and not ep["instruction"].strip():
                # No signals and no instruction: nothing true to say, and a made-up label would be trained on.
                rejected.append({"episode_index": ep["index"], "from_index": ep["from"], "to_index": ep["to"],
                                 "reason": "empty instruction (no signals either)", "raw": ""})  # fmt: skip
                continue
            if self.sim is None:
                spans = [(0, ep["to"] - ep["from"], "instruction")]
            else:
                spans = metaworld_phases(self.sim[ep["from"] : ep["to"]], ep["instruction"], self.settings)
            phases = [p for _, _, p in spans]
            for a, b, phase in spans:
                if phase == "instruction":
                    text = ep["instruction"]
                else:
                    z = self.sim[ep["from"] + a : ep["from"] + b, 6]  # object height
                    lifted = float(z.max() - z[0]) > self.settings.lifted_m
                    text = phase_text(phase, ep["instruction"], phases, lifted)
                records.append(_record(ep, ep["from"] + a, ep["from"] + b, text, phase, self.name))
        return records, rejected


def _record(ep: dict, start: int, end: int, text: str, phase: str, labeller: str) -> dict:
    """One JSONL record (keys in RECORD_KEYS order)."""
    return {"episode_index": ep["index"], "from_index": int(start), "to_index": int(end), "text": text,
            "phase": phase, "labeller": labeller}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The vlm backend.


def keyframes(num_frames: int, count: int, latents: Any = None) -> list[int]:
    """Local indices of an episode's keyframes: its first and last frame plus the `count` - 2 frames where
    the world latents change most (largest |z_t - z_{t-1}|), or evenly spaced frames without latents."""
    count = max(2, min(count, num_frames))
    if num_frames <= 2:
        return list(range(num_frames))
    if latents is None:
        return sorted({int(round(x)) for x in np.linspace(0, num_frames - 1, count)})
    z = np.asarray(latents, dtype=np.float64)
    change = np.linalg.norm(np.diff(z, axis=0), axis=1)  # change[i]: frame i -> i + 1
    inner = np.argsort(-change[:-1], kind="stable") + 1  # frame i + 1 starts a change; the last is kept anyway
    chosen = {0, num_frames - 1}
    for t in inner:
        if len(chosen) >= count:
            break
        chosen.add(int(t))
    return sorted(chosen)


def check_output(text: Any, max_chars: int) -> tuple[str | None, str | None]:
    """(clean text, None) for a usable label, else (None, reason): empty, too long or not text."""
    if not isinstance(text, str):
        return None, f"not text ({type(text).__name__})"
    clean = " ".join(text.split())
    if not clean:
        return None, "empty"
    if len(clean) > max_chars:
        return None, f"too long ({len(clean)} chars > --max_chars={max_chars})"
    visible = [c for c in clean if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    if "\ufffd" in clean or any(not c.isprintable() for c in clean) or letters < 0.5 * len(visible) or letters < 2:
        return None, "not text (mostly symbols or unprintable characters)"
    return clean, None


DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}  # fmt: skip


def model_revision(source: str, is_local: bool, config: Any) -> str:
    """Revision of a VLM: sha256 over a local directory's files, or the Hub commit of its config."""
    if is_local:
        return files_revision(p for p in sorted(Path(source).iterdir(), key=lambda p: p.name) if p.is_file())
    return str(getattr(config, "_commit_hash", None) or "unknown")


def load_prompt(template: str | None) -> str:
    """The prompt template: DEFAULT_PROMPT, the text of a file, or the string itself; checked once here."""
    if template is None:
        return DEFAULT_PROMPT
    path = Path(template).expanduser()
    text = path.read_text() if path.is_file() else template
    try:
        text.format(**PROMPT_FIELDS)
    except (KeyError, IndexError, ValueError) as err:
        raise LabelError(
            f"--prompt_template has an unknown or malformed placeholder ({err!r}). Fix: use only "
            f"{', '.join('{' + k + '}' for k in PROMPT_FIELDS)} and write literal braces as {{{{ }}}}."
        ) from None
    return text


class VlmLabeller:
    """A transformers image-text-to-text model describing each segment between two keyframes."""

    name = "vlm"

    def __init__(self, args: argparse.Namespace, dataset: Any, camera: str, latents: Any, prompt: str):
        """Load the model and processor (`args.model`, `args.device`, `args.dtype`); `latents` [N, D] of the
        dataset's frames pick the keyframes (None: evenly spaced)."""
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        from ..sources import resolve_source

        source, is_local = resolve_source(
            args.model, "--model", "a directory written by `save_pretrained` (model and processor) or a Hub id "
            "such as HuggingFaceTB/SmolVLM2-2.2B-Instruct", LabelError,
        )  # fmt: skip
        try:
            config = AutoConfig.from_pretrained(source)
            self.processor = AutoProcessor.from_pretrained(source)
            self.model = AutoModelForImageTextToText.from_pretrained(source, dtype=getattr(torch, DTYPES[args.dtype]))
        except (OSError, ValueError, KeyError) as err:
            raise LabelError(
                f"Cannot load the VLM '{args.model}' ({err}). Fix: pass an image-text-to-text model "
                "(AutoModelForImageTextToText: SmolVLM, Qwen2.5-VL, Qwen3-VL, ...) as a local directory "
                f"holding its weights and processor, or download it first (`huggingface-cli download {args.model}`)."
            ) from err
        self.model.to(args.device).eval()
        # Decoder-only generation of a batch needs the prompts aligned on the right.
        self.processor.tokenizer.padding_side = "left"
        self.identity = {"model": str(Path(source).resolve()) if is_local else source,
                         "revision": model_revision(source, is_local, config)}  # fmt: skip
        self.args, self.dataset, self.camera, self.latents, self.prompt = args, dataset, camera, latents, prompt
        self.fps = float(dataset.fps)

    def settings_dict(self) -> dict:
        """What decides the labels (fingerprinted); device and batch size do not."""
        a = self.args
        return {
            "backend": self.name, **self.identity, "dtype": DTYPES[a.dtype], "camera": self.camera,
            "keyframes": a.keyframes, "keyframe_source": "latents" if self.latents is not None else "even",
            "prompt_template": self.prompt, "max_new_tokens": a.max_new_tokens, "max_chars": a.max_chars,
        }  # fmt: skip

    def segments(self, ep: dict) -> list[tuple[int, int]]:
        """[start, end) global ranges between consecutive keyframes (the last one reaches the episode's end)."""
        n = ep["to"] - ep["from"]
        z = None if self.latents is None else self.latents[ep["from"] : ep["to"]]
        keys = keyframes(n, self.args.keyframes, z)
        if len(keys) == 1:
            return [(ep["from"], ep["to"])]
        bounds = [ep["from"] + k for k in keys[:-1]] + [ep["to"]]
        return list(zip(bounds[:-1], bounds[1:]))

    def _image(self, index: int):
        """The `camera` frame of global frame `index` as a PIL image (decoded by LeRobot)."""
        from PIL import Image

        frame = self.dataset[index][self.camera]  # float CHW in [0, 1]
        return Image.fromarray((frame.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())

    def _text(self, prompt: str, num_images: int) -> str:
        """The model's chat-formatted input for `num_images` images and `prompt`."""
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
        # A processor saved without a chat template: image placeholders, then the prompt.
        return getattr(self.processor, "image_token", "<image>") * num_images + prompt

    def label(self, episodes: list[dict]) -> tuple[list[dict], list[dict]]:
        """(label records, rejected records) of `episodes`, generated in batches of `--batch_size`."""
        import torch

        jobs = []
        for ep in episodes:
            spans = self.segments(ep)
            for i, (a, b) in enumerate(spans):
                last = min(b, ep["to"] - 1)  # the next keyframe (the episode's last frame for the last segment)
                fields = {"instruction": ep["instruction"], "segment": i + 1, "num_segments": len(spans),
                          "num_images": 2, "seconds": (last - a) / self.fps}  # fmt: skip
                jobs.append((ep, a, b, last, self.prompt.format(**fields)))
        records, rejected = [], []
        for i in range(0, len(jobs), self.args.batch_size):
            batch = jobs[i : i + self.args.batch_size]
            texts = [self._text(prompt, 2) for *_, prompt in batch]
            images = [[self._image(a), self._image(last)] for _, a, _, last, _ in batch]
            inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
            inputs.pop("token_type_ids", None)  # some tokenizers return them; generate refuses unused inputs
            inputs = inputs.to(self.model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.args.max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            for (ep, a, b, _, _), raw in zip(batch, self.processor.batch_decode(new, skip_special_tokens=True)):
                text, reason = check_output(raw, self.args.max_chars)
                if text is None:
                    rejected.append({"episode_index": ep["index"], "from_index": a, "to_index": b,
                                     "reason": reason, "raw": str(raw)[:REJECTED_RAW_CHARS]})  # fmt: skip
                else:
                    records.append(_record(ep, a, b, text, "segment", f"vlm:{self.identity['model']}"))
        return records, rejected


def keyframe_latents(args: argparse.Namespace, repo_id: str, root: str, camera: str) -> Any:
    """The latent cache's latents [N, D] of `camera` for `--encoder`, or None (evenly spaced keyframes)."""
    from ..latents.cache import LatentCacheError
    from ..latents.encoders import resolve_encoder_identity
    from ..latents.binding import open_latent_cache

    try:
        identity = resolve_encoder_identity(args.encoder, args.pooling, args.window, args.encoder_dtype)
        cache = open_latent_cache(args.cache_root, repo_id, root, camera, identity)
    except (LatentCacheError, OSError, ValueError) as err:
        print(f"{TOOL}: no usable latent cache for keyframes, so {args.keyframes} evenly spaced keyframes per "
              f"episode are used instead of those where the world changes most. {' '.join(str(err).split())}")  # fmt: skip
        return None
    print(f"{TOOL}: keyframes where the world latents of '{args.encoder}' change most ({cache.cache_dir}).")
    return cache.latents.numpy()


# ----------------------------------------------------------------------------------------------------------
# The side file: labels, meta, fingerprint, resume.


def meta_path(out: Path) -> Path:
    """The meta file that goes with labels file `out` (coc_labels.jsonl -> coc_labels.meta.json)."""
    return out.with_name(out.stem + ".meta.json")


@dataclass
class LabelStore:
    """The labels file and its meta file: what is done, what was rejected; saved atomically."""

    out: Path
    fingerprint: str
    header: dict  # format version, dataset identity and labeller settings (stored in the meta file)
    records: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    done: set[int] = field(default_factory=set)

    @classmethod
    def open(cls, out: Path, fingerprint: str, header: dict, overwrite: bool) -> LabelStore:
        """Start fresh (no files, or --overwrite) or resume a run with the same fingerprint; refuse the rest."""
        store = cls(out, fingerprint, header)
        meta_file = meta_path(out)
        if overwrite or not (out.exists() or meta_file.exists()):
            return store
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            raise LabelError(
                f"{out} exists but its meta file {meta_file} is missing or unreadable, so it is unknown what "
                f"labelled it. Fix: pass --overwrite to relabel, or --out=<another file>."
            ) from None
        if meta.get("fingerprint") != fingerprint or meta.get("format_version") != FORMAT_VERSION:
            raise LabelError(
                f"{out} holds labels of other inputs ({describe_changes(meta, header)}). Fix: pass --overwrite "
                "to relabel, or --out=<another file> to keep both."
            )
        store.done = {int(e) for e in meta.get("episodes_done", [])}
        # Labels written before a kill but after the last meta save belong to unfinished episodes: redone.
        lines = out.read_text().splitlines() if out.exists() else []
        store.records = [r for r in map(json.loads, filter(None, lines)) if r["episode_index"] in store.done]
        store.rejected = [r for r in meta.get("rejected", []) if r["episode_index"] in store.done]
        return store

    def add(self, episodes: list[int], records: list[dict], rejected: list[dict]) -> None:
        """Record finished episodes (not yet saved)."""
        self.records += records
        self.rejected += rejected
        self.done.update(episodes)

    def save(self, complete: bool) -> None:
        """Labels first, then the meta file that declares them done: a kill between leaves them redone."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.records.sort(key=lambda r: (r["episode_index"], r["from_index"]))
        atomic_write_text(self.out, "".join(json.dumps(r) + "\n" for r in self.records))
        reasons: dict[str, int] = {}
        for r in self.rejected:
            key = r["reason"].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        atomic_write_json(meta_path(self.out), {
            "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, **self.header,
            "complete": complete, "episodes_done": sorted(self.done),
            "counts": {"labels": len(self.records), "rejected": len(self.rejected), "rejected_by_reason": reasons},
            "rejected": sorted(self.rejected, key=lambda r: (r["episode_index"], r["from_index"])),
        })  # fmt: skip


def describe_changes(meta: dict, header: dict) -> str:
    """What differs between a stored meta file and this run: dataset fields and labeller settings."""
    changes = []
    if meta.get("format_version") != FORMAT_VERSION:
        changes.append(f"format version {meta.get('format_version')} -> {FORMAT_VERSION}")
    for part in ("dataset", "labeller"):
        old, new = meta.get(part) or {}, header[part]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                detail = "" if key in ("content", "episode_from", "episode_to", "prompt_template") else \
                    f" {old.get(key)!r} -> {new.get(key)!r}"
                changes.append(f"{part} {key}{detail}")
    return "; ".join(changes) or "fingerprint differs"


# ----------------------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(prog=TOOL, description="Label every episode of a LeRobotDataset with Chain-of-Causality texts.")
    p.add_argument("--dataset.repo_id", dest="repo_id", required=True, help="Dataset repo id.")
    p.add_argument("--dataset.root", dest="root", default=None, help="Local dataset root (default: HF_LEROBOT_HOME/repo_id).")
    p.add_argument("--backend", choices=["template", "vlm"], default="template", help="template: simulator signals, no model; vlm: a VLM describes keyframes.")
    p.add_argument("--out", default=None, help=f"Labels file (JSONL; default <dataset root>/{DEFAULT_OUT}); its meta file goes next to it.")
    p.add_argument("--overwrite", action="store_true", help="Relabel from scratch even if the labels file holds other labels.")
    p.add_argument("--save_every", type=float, default=30.0, help="Seconds between saves (0: after every group of episodes).")
    p.add_argument("--no_progress", action="store_true", help="No progress bar.")
    v = p.add_argument_group("vlm backend")
    v.add_argument("--model", default=None, help="Image-text-to-text model: Hub id or local directory.")
    v.add_argument("--device", default="cpu", help="Torch device of the model (cpu, cuda, cuda:1, ...).")
    v.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="Model weight dtype.")
    v.add_argument("--batch_size", type=int, default=8, help="Segments per generate call.")
    v.add_argument("--keyframes", type=int, default=4, help="Keyframes per episode (first, last and where the world changes most); segments lie between them.")
    v.add_argument("--camera", default=None, help="Camera the VLM sees (default: the dataset's first camera).")
    v.add_argument("--prompt_template", default=None, help="Prompt template: a file or the text itself; placeholders " + ", ".join("{" + k + "}" for k in PROMPT_FIELDS) + ".")
    v.add_argument("--max_new_tokens", type=int, default=64, help="Tokens generated per segment.")
    v.add_argument("--max_chars", type=int, default=300, help="Longer outputs are rejected, not truncated.")
    k = p.add_argument_group("keyframes from the latent cache (as for lerobot-wm-precompute)")
    k.add_argument("--encoder", default="pixels", help="Encoder of the latent cache that picks the keyframes.")
    k.add_argument("--pooling", default=None, help="Token pooling the cache was built with.")
    k.add_argument("--window", type=int, default=None, help="Frames per latent the cache was built with.")
    k.add_argument("--encoder_dtype", default=None, help="Encoder dtype the cache was built with.")
    k.add_argument("--cache_root", default=None, help="Cache root (default: $LEROBOT_WM_CACHE or the user cache).")
    return p


def _check(args: argparse.Namespace) -> None:
    """Refuse, before anything is loaded, flags that cannot work."""
    if args.root is not None and not Path(args.root).is_dir():
        raise LabelError(f"--dataset.root={args.root} is not a directory. Give the folder that holds the dataset's meta/ and data/.")
    if args.backend == "vlm":
        if not args.model:
            raise LabelError("--backend=vlm needs --model=<Hub id or local directory>, e.g. HuggingFaceTB/SmolVLM2-2.2B-Instruct.")
        for name in ("batch_size", "max_new_tokens", "max_chars"):
            if getattr(args, name) < 1:
                raise LabelError(f"--{name} must be >= 1, got {getattr(args, name)}.")
        if args.keyframes < 2:
            raise LabelError(f"--keyframes must be >= 2 (the first and last frame), got {args.keyframes}.")
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise LabelError(f"--device={args.device} but CUDA is not available here. Fix: pass --device=cpu.")


def episode_table(meta: Any) -> list[dict]:
    """Per episode: index, global [from, to) and instruction (the episode's first task)."""
    eps = meta.episodes
    return [
        {"index": int(i), "from": int(a), "to": int(b), "instruction": str((tasks or [""])[0])}
        for i, a, b, tasks in zip(eps["episode_index"], eps["dataset_from_index"], eps["dataset_to_index"], eps["tasks"])
    ]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lerobot-wm-label-coc` console script."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except LabelError as err:
        print(f"{TOOL}: error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Label the dataset `args` names; returns the exit status."""
    _check(args)
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from tqdm import tqdm

    from ..latents.cache import DatasetIdentity, _digest

    dataset = LeRobotDataset(args.repo_id, root=args.root, video_backend="pyav")
    root = Path(dataset.root).resolve()
    identity = DatasetIdentity.from_meta(dataset.meta)
    if args.backend == "template":
        labeller: TemplateLabeller | VlmLabeller = TemplateLabeller(dataset)
    else:
        cameras = list(dataset.meta.camera_keys)
        if not cameras:
            raise LabelError(
                f"Dataset '{args.repo_id}' has no camera (image or video) features for the VLM to see (a "
                "training view written by lerobot-wm-precompute has none). Fix: label the source dataset."
            )
        camera = args.camera or cameras[0]
        if camera not in cameras:
            raise LabelError(f"Unknown camera {camera!r} in dataset '{args.repo_id}'; available: {cameras}. Pass --camera=...")
        prompt = load_prompt(args.prompt_template)  # refused before anything slow runs
        latents = keyframe_latents(args, args.repo_id, str(root), camera)
        labeller = VlmLabeller(args, dataset, camera, latents, prompt)
    header = {"dataset": identity.to_dict(), "labeller": labeller.settings_dict()}
    fingerprint = _digest({"format_version": FORMAT_VERSION, **header})
    out = Path(args.out).expanduser().resolve() if args.out else root / DEFAULT_OUT
    store = LabelStore.open(out, fingerprint, header, args.overwrite)
    episodes = episode_table(dataset.meta)
    todo = [ep for ep in episodes if ep["index"] not in store.done]
    if not todo and meta_path(out).exists() and not args.overwrite:
        print(f"Already labelled (nothing to do): {len(episodes)} episodes, {len(store.records)} labels in {out}")
        return 0
    if store.done:
        print(f"Resuming {out}: {len(store.done)}/{len(episodes)} episodes already labelled.")
    # VLM segments of several episodes share one generate call; the template labels one episode at a time.
    group = 1 if args.backend == "template" else max(1, args.batch_size // max(1, args.keyframes - 1))
    bar = tqdm(total=len(episodes), initial=len(episodes) - len(todo), desc="labelling", unit="episode",
               dynamic_ncols=True, disable=args.no_progress)  # fmt: skip
    last_save = time.monotonic()
    for i in range(0, len(todo), group):
        chunk = todo[i : i + group]
        records, rejected = labeller.label(chunk)
        store.add([ep["index"] for ep in chunk], records, rejected)
        bar.update(len(chunk))
        if time.monotonic() - last_save >= args.save_every:
            store.save(complete=False)
            last_save = time.monotonic()
    bar.close()
    store.save(complete=True)
    counts = f"{len(store.records)} labels"
    if args.backend == "vlm" or store.rejected:
        counts += f", {len(store.rejected)} rejected (no label; listed with their reasons in {meta_path(out).name})"
    print(f"Labelled {len(episodes)} episodes: {counts}.\n  labels: {out}\n  meta:   {meta_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
