"""`lerobot-wm-fit-encoder`: fit a small self-supervised world encoder on the frames of LeRobotDatasets.

    lerobot-wm-fit-encoder --dataset.repo_id=local/drawer --dataset.root=/data/drawer --output_dir=enc/drawer
    lerobot-wm-precompute --dataset.repo_id=local/drawer --dataset.root=/data/drawer --encoder=enc/drawer

Objectives (`--objective`, see docs/encoders.md for why):
- `infonce` (default): time-contrastive InfoNCE. A frame and a frame of the same episode at most
  `--max_offset` steps away, each randomly shifted and colour-jittered, must pick each other out of the
  batch; the other frames of the batch (other episodes, or the same episode further in time) are the
  negatives. What separates frames of one task across episodes and times is where the objects and the
  gripper are, which is what the latent must carry.
- `jepa`: temporal latent prediction with an EMA target (JEPA / BYOL style). From a frame's latent and
  the signed offset to a frame of the same episode at most `--max_offset` steps away, a predictor
  outputs that frame's latent under a target encoder, the exponential moving average (`--ema`) of the
  encoder itself; the loss is one minus their cosine. No negatives: the predictor and the slowly moving
  target keep the latents from collapsing, and the fit logs their spread so a collapse shows.

Frames are decoded once through LeRobot's own decoder (as `lerobot-wm-precompute` reads them),
shrunk to the encoder's input size and kept as uint8 in `<output_dir>/fit_state/frames.npy`.
Training checkpoints go to `<output_dir>/fit_state/checkpoint.pt` (atomic writes) every
`--save_every` steps; a killed run resumes from the last one and ends with the same weights as an
uninterrupted run, because each step's batch and augmentations are drawn from a generator seeded by
(seed, step). The finished encoder is `<output_dir>/model.safetensors` + `wm_encoder.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..fileio import atomic_write_bytes
from ..latents.cache import DatasetIdentity
from ..latents.encoder_base import preprocess_frames
from ..latents.fitted import (
    FITTED_MEAN,
    FITTED_STD,
    MARKER_FILE,
    STATE_DIR,
    WEIGHTS_FILE,
    ConvEncoderNet,
    FittedEncoderError,
    build_net,
    default_arch,
    latent_dim,
    read_marker,
    save_fitted_encoder,
)
from ..latents.precompute import FrameSource
from .precompute import select_cameras

# Name of each objective in the marker (part of the encoder identity).
OBJECTIVES = {"infonce": "temporal-infonce-v1", "jepa": "temporal-jepa-v1"}
FRAMES_FILE = "frames.npy"
CHECKPOINT_FILE = "checkpoint.pt"
# Frames decoded per LeRobot decoder call: contiguous runs, bounded memory at 480x480 float32.
DECODE_CHUNK = 32


class FitEncoderError(RuntimeError):
    """A fit that cannot run as asked; the message names the fix."""


# ------------------------------------------------------------------------------------------- frames
def _split_list(text: str | None) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else []


def open_datasets(repo_ids: list[str], roots: list[str], camera_arg: str | None, video_backend: str) -> list[tuple]:
    """(dataset, cameras) for each dataset; clear errors for missing cameras or mismatched flags."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if not repo_ids:
        raise FitEncoderError("No dataset given: pass --dataset.repo_id=<id>[,<id>...] (and --dataset.root).")
    if roots and len(roots) != len(repo_ids):
        raise FitEncoderError(
            f"--dataset.root lists {len(roots)} roots for {len(repo_ids)} repo ids; give one root per repo id, "
            "comma-separated in the same order, or none."
        )
    out = []
    for i, repo_id in enumerate(repo_ids):
        dataset = LeRobotDataset(repo_id, root=roots[i] if roots else None, video_backend=video_backend)
        available = list(dataset.meta.camera_keys)
        if not available:
            raise FitEncoderError(
                f"Dataset '{repo_id}' has no camera (image or video) features: a world encoder is fitted on camera "
                "frames. Use a dataset recorded with a camera (its meta/info.json lists observation.image or "
                "observation.images.* features), or keep the built-in --encoder=pixels."
            )
        cameras, unknown = select_cameras(camera_arg, available)
        if unknown:
            raise FitEncoderError(
                f"Unknown camera {unknown} in dataset '{repo_id}'. Available camera keys: {available}. "
                f"Pass --camera={available[0]}"
            )
        out.append((dataset, cameras))
    return out


def frame_plan(datasets: list[tuple], max_frames: int) -> tuple[int, list[dict]]:
    """The frame stride that keeps at most `max_frames` frames, and one entry per (dataset, camera, episode)."""
    total = sum(len(cams) * int(ds.meta.total_frames) for ds, cams in datasets)
    stride = max(1, math.ceil(total / max(1, max_frames)))
    entries = []
    for ds, cams in datasets:
        ident = DatasetIdentity.from_meta(ds.meta)
        for cam in cams:
            for ep, (a, b) in enumerate(zip(ident.episode_from, ident.episode_to, strict=True)):
                entries.append({"repo_id": ident.repo_id, "root": ident.root, "camera": cam, "episode": ep,
                                "start": a, "end": b})
    return stride, entries


def extract_frames(datasets: list[tuple], image_size: int, stride: int, video_backend: str, progress: bool):
    """uint8 frames [N, 3, S, S] (every `stride`-th frame of each episode) and their episode ids [N].

    Each frame is decoded once, with the reader `lerobot-wm-precompute` uses, and shrunk with the
    encoder's own `preprocess_frames` resize, so the fit sees what the encoder sees at eval.
    """
    from tqdm import tqdm

    jobs = []
    for ds, cams in datasets:
        ident = DatasetIdentity.from_meta(ds.meta)
        for cam in cams:
            source = FrameSource(ds, cam, video_backend)
            jobs += [(source, a, b) for a, b in zip(ident.episode_from, ident.episode_to, strict=True)]
    frames, episode_ids = [], []
    bar = tqdm(total=sum(b - a for _, a, b in jobs), desc="decode frames", unit="frame", disable=not progress)
    zero, one = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    for ep_id, (source, a, b) in enumerate(jobs):
        for c in range(a, b, DECODE_CHUNK):
            e = min(b, c + DECODE_CHUNK)
            keep = [i - c for i in range(c, e) if (i - a) % stride == 0]
            if keep:
                x = preprocess_frames(source.read(c, e)[keep], (image_size, image_size), zero, one)
                frames.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
                episode_ids += [ep_id] * len(keep)
            bar.update(e - c)
    bar.close()
    return torch.cat(frames), torch.tensor(episode_ids, dtype=torch.long)


# ------------------------------------------------------------------------------------------- training
class ProjectionHead(nn.Module):
    """MLP from latent to the unit sphere where InfoNCE is computed; discarded after the fit."""

    def __init__(self, dim: int, out: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, dim] -> [B, out], L2-normalised."""
        return F.normalize(self.mlp(z), dim=-1)


def episode_spans(episode_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each frame, the first and one-past-last row of its episode (rows of one episode are contiguous)."""
    n = len(episode_ids)
    change = torch.nonzero(episode_ids[1:] != episode_ids[:-1]).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), change])
    ends = torch.cat([change, torch.tensor([n])])
    run = torch.repeat_interleave(torch.arange(len(starts)), ends - starts)
    return starts[run], ends[run]


def sample_pairs(gen: torch.Generator, starts: torch.Tensor, ends: torch.Tensor, batch: int, max_offset: int):
    """Anchor rows and positive rows at most `max_offset` stored frames away inside the same episode."""
    n = len(starts)
    anchor = torch.randint(0, n, (batch,), generator=gen)
    offset = torch.randint(-max_offset, max_offset + 1, (batch,), generator=gen)
    positive = torch.minimum(torch.maximum(anchor + offset, starts[anchor]), ends[anchor] - 1)
    return anchor, positive


def augment(x: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """Random shift (replicate-pad, crop back) and brightness/contrast jitter of [B, 3, S, S] in [0, 1].

    Shifts teach invariance to a few pixels of camera jitter without erasing where things are; the
    jitter stops the net from matching frames by global colour statistics alone.
    """
    b, _, s, _ = x.shape
    if shift > 0:
        padded = F.pad(x, (shift,) * 4, mode="replicate")
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen).tolist()
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + s, dx[i] : dx[i] + s] for i in range(b)])
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.4
    bias = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.1
    return (x * gain.to(x.device) + bias.to(x.device)).clamp(0, 1)


def info_nce(a: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` must pick row i of `p` among all rows, and back."""
    logits = a @ p.T / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class OffsetPredictor(nn.Module):
    """JEPA predictor: a frame's latent [B, dim] and the signed offset to another frame [B] (in units of
    `max_offset`) -> that frame's latent under the target encoder [B, dim]; discarded after the fit."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim + 1, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, z: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """[B, dim], [B] -> [B, dim]."""
        return self.mlp(torch.cat([z, offset.to(z).unsqueeze(-1)], dim=-1))


def _normalise(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 255.0


def _standardised(x: torch.Tensor) -> torch.Tensor:
    """Frames [B, 3, S, S] in [0, 1] -> the encoder's input (FITTED_MEAN / FITTED_STD per channel)."""
    mean = torch.tensor(FITTED_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(FITTED_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _views(gen, frames, rows_list, cfg: dict, device) -> list[torch.Tensor]:
    """The augmented, standardised encoder inputs of each row set, drawn from `gen` in order."""
    return [_standardised(augment(_normalise(frames[rows]).to(device), gen, cfg["shift"])) for rows in rows_list]


def train_step(net, head, opt, frames, starts, ends, cfg: dict, step: int, device, target=None) -> float:
    """One optimisation step; its batch and augmentations depend only on (seed, step).

    `head` is the InfoNCE projection head, or with `target` (the EMA encoder) the JEPA predictor.
    """
    gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
    anchor, positive = sample_pairs(gen, starts, ends, cfg["batch_size"], cfg["max_offset"])
    xa, xp = _views(gen, frames, (anchor, positive), cfg, device)
    if target is None:
        loss = info_nce(head(net.embed(xa)), head(net.embed(xp)), cfg["temperature"])
    else:
        with torch.no_grad():
            goal = target.embed(xp)
        offset = (positive - anchor).float().to(device) / cfg["max_offset"]
        loss = (1 - F.cosine_similarity(head(net.embed(xa), offset), goal, dim=-1)).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if target is not None:
        with torch.no_grad():
            for t, o in zip(target.parameters(), net.parameters(), strict=True):
                t.lerp_(o, 1.0 - cfg["ema"])
    return float(loss.detach())


def latent_spread(net, frames, device, rows: int = 256) -> float:
    """Mean per-dimension std of the latents of (up to) `rows` evenly spaced frames, over their mean
    absolute value: near 0 when the encoder has collapsed to one latent."""
    idx = torch.linspace(0, len(frames) - 1, min(rows, len(frames))).long()
    with torch.no_grad():
        z = net.embed(_standardised(_normalise(frames[idx]).to(device))).float()
    return float(z.std(dim=0).mean() / z.abs().mean().clamp_min(1e-12))


def _save_checkpoint(path: Path, step: int, net, head, opt, cfg: dict, losses: list[float], target=None) -> None:
    buf = io.BytesIO()
    state = {"step": step, "net": net.state_dict(), "head": head.state_dict(), "opt": opt.state_dict(),
             "config": cfg, "losses": losses}  # fmt: skip
    if target is not None:
        state["target"] = target.state_dict()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def fit(args) -> Path:
    """Run (or resume, or reuse) one fit; returns the encoder directory."""
    from tqdm import tqdm

    out = Path(args.output_dir).expanduser().resolve()
    state_dir = out / STATE_DIR
    datasets = open_datasets(_split_list(args.repo_id), _split_list(args.root), args.camera, args.video_backend)
    stride, entries = frame_plan(datasets, args.max_frames)
    arch = default_arch(args.image_size, args.dim, tuple(int(c) for c in _split_list(args.channels)), args.thumbnail)
    cfg = {
        "arch": arch, "data": {"entries_digest": _digest(entries), "stride": stride,
                               "datasets": sorted({(e["repo_id"], e["root"], e["camera"]) for e in entries})},
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "max_offset": args.max_offset, "temperature": args.temperature,
        "shift": args.shift,
    }  # fmt: skip
    if args.objective == "jepa":  # only then: an InfoNCE fit keeps the settings (and identity) it always had
        cfg |= {"objective": "jepa", "ema": args.ema}
    jepa = cfg.get("objective") == "jepa"
    cfg = json.loads(json.dumps(cfg))  # tuples -> lists, so it compares equal to what a file gives back

    if (out / MARKER_FILE).exists():
        marker = read_marker(out)
        if marker.get("fit") == cfg and (out / WEIGHTS_FILE).exists() and not args.overwrite:
            print(f"Encoder already fitted with these settings: {out} (nothing to do; --overwrite refits).")
            return out
        if not args.overwrite:
            raise FitEncoderError(
                f"{out} holds an encoder fitted with other settings. Refitting changes its identity and makes the "
                "latent caches built with it stale. Pass --overwrite to refit there, or another --output_dir."
            )
    if args.overwrite:
        for name in (MARKER_FILE, WEIGHTS_FILE, "fit_log.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True, exist_ok=True)

    # Frames: decoded once per (data, size, stride) and kept across resumes.
    frames_key = _digest([cfg["data"], arch["image_size"]])
    frames_path, ids_path = state_dir / f"frames-{frames_key}.npy", state_dir / f"episodes-{frames_key}.npy"
    t0 = time.time()
    if frames_path.exists() and ids_path.exists():
        frames = torch.from_numpy(np.load(frames_path))
        episode_ids = torch.from_numpy(np.load(ids_path))
        print(f"Reusing {len(frames)} decoded frames from {frames_path}")
    else:
        frames, episode_ids = extract_frames(datasets, arch["image_size"], stride, args.video_backend, not args.no_progress)
        for path, arr in ((ids_path, episode_ids), (frames_path, frames)):
            buf = io.BytesIO()
            np.save(buf, arr.numpy(), allow_pickle=False)
            atomic_write_bytes(path, buf.getvalue())
    decode_s = time.time() - t0
    if len(frames) < 2:
        raise FitEncoderError(f"Only {len(frames)} frame(s) to fit on; a fit needs at least 2. Record more episodes.")
    starts, ends = episode_spans(episode_ids)

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    net: ConvEncoderNet = build_net(arch)
    head = OffsetPredictor(arch["dim"]) if jepa else ProjectionHead(arch["dim"])
    net.to(device), head.to(device)
    target = None
    if jepa:  # the EMA target starts as the encoder itself and never gets a gradient
        target = build_net(arch).to(device)
        target.load_state_dict(net.state_dict())
        target.requires_grad_(False)
    opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=args.lr, weight_decay=args.weight_decay)
    ckpt_path = state_dir / CHECKPOINT_FILE
    step, losses = 0, []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if state["config"] != cfg:
            raise FitEncoderError(
                f"{ckpt_path} belongs to a fit with other settings. Rerun with the original flags to resume it, "
                "or pass --overwrite to start over."
            )
        net.load_state_dict(state["net"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        if target is not None:
            target.load_state_dict(state["target"])
        step, losses = int(state["step"]), list(state["losses"])
        print(f"Resuming the fit from step {step}/{args.steps} ({ckpt_path})")
    frames_dev = frames.to(device)
    net.train(), head.train()
    if target is not None:
        target.train()
    t1 = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="fit encoder", unit="step", disable=args.no_progress)
    while step < args.steps:
        losses.append(train_step(net, head, opt, frames_dev, starts, ends, cfg, step, device, target))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if step % args.save_every == 0 or step == args.steps:
            _save_checkpoint(ckpt_path, step, net, head, opt, cfg, losses, target)
    bar.close()
    net.eval()
    spread = latent_spread(net, frames_dev, device)
    net.cpu()
    objective = OBJECTIVES["jepa" if jepa else "infonce"]
    marker = {"arch": arch, "image_mean": list(FITTED_MEAN), "image_std": list(FITTED_STD),
              "objective": objective, "fit": cfg}
    save_fitted_encoder(out, net, marker)
    log = {"objective": objective, "frames": len(frames), "decode_seconds": round(decode_s, 1),
           "train_seconds_this_run": round(time.time() - t1, 1), "device": str(device), "first_loss": losses[0],
           "final_loss": float(np.mean(losses[-10:])), "latent_spread": spread}  # fmt: skip
    if jepa:
        print(f"Fitted encoder ({latent_dim(arch)}-d, {len(frames)} frames, JEPA 1 - cosine {log['first_loss']:.3f} -> "
              f"{log['final_loss']:.3f}, latent spread {spread:.3f}: near 0 means collapsed): {out}")
    else:
        log["chance_loss"] = math.log(args.batch_size)
        print(f"Fitted encoder ({latent_dim(arch)}-d, {len(frames)} frames, InfoNCE {log['first_loss']:.3f} -> "
              f"{log['final_loss']:.3f}, chance {log['chance_loss']:.3f}): {out}")
    atomic_write_bytes(out / "fit_log.json", (json.dumps(log, indent=2) + "\n").encode())
    print(f"Use it with --encoder={out} (lerobot-wm-precompute) and --policy.encoder={out} (lerobot-train).")
    return out


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (LeRobot-style dotted names for the dataset)."""
    p = argparse.ArgumentParser(prog="lerobot-wm-fit-encoder", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset.repo_id", dest="repo_id", required=True, help="dataset repo id(s), comma-separated")
    p.add_argument("--dataset.root", dest="root", default=None, help="local root(s), comma-separated, one per repo id")
    p.add_argument("--camera", default=None, help="camera key(s), comma-separated (default: each dataset's first camera)")
    p.add_argument("--output_dir", required=True, help="encoder directory to write (pass it as --encoder later)")
    p.add_argument("--image_size", type=int, default=64, help="square input size the frames are resized to")
    p.add_argument("--dim", type=int, default=256, help="latent dimension")
    p.add_argument("--channels", default="32,64,64,128", help="conv channels, one stride-2 layer each")
    p.add_argument("--thumbnail", type=int, default=0,
                   help="append an n x n RGB thumbnail (the `pixels-n` encoder's) to the learnt latent; 0: none")
    p.add_argument("--steps", type=int, default=400, help="optimisation steps")
    p.add_argument("--batch_size", type=int, default=64, help="frame pairs per step (the InfoNCE batch)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--max_offset", type=int, default=4, help="positive pairs are at most this many stored frames apart")
    p.add_argument("--objective", choices=tuple(OBJECTIVES), default="infonce",
                   help="infonce: time-contrastive; jepa: predict a nearby frame's latent under an EMA target")
    p.add_argument("--temperature", type=float, default=0.1, help="InfoNCE temperature")
    p.add_argument("--ema", type=float, default=0.99, help="jepa: EMA momentum of the target encoder, in [0, 1)")
    p.add_argument("--shift", type=int, default=4, help="random-shift augmentation, in pixels of the resized frame")
    p.add_argument("--max_frames", type=int, default=20000, help="keep every k-th frame so at most this many are used")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, batches and augmentations")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--save_every", type=int, default=50, help="checkpoint every N steps (a killed fit resumes there)")
    p.add_argument("--video_backend", default="pyav", help="LeRobot video backend used to decode frames")
    p.add_argument("--overwrite", action="store_true", help="refit into a directory that holds another fit")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lerobot-wm-fit-encoder` console script."""
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message="The video decoding and encoding capabilities of torchvision")
    for name in ("image_size", "dim", "steps", "batch_size", "save_every", "max_frames"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1, got {getattr(args, name)}.", file=sys.stderr)
            return 2
    if args.batch_size < 2:
        print("error: --batch_size must be >= 2 (InfoNCE needs negatives; JEPA's spread needs two frames).",
              file=sys.stderr)  # fmt: skip
        return 2
    if not 0.0 <= args.ema < 1.0:
        print(f"error: --ema must lie in [0, 1), got {args.ema}.", file=sys.stderr)
        return 2
    try:
        fit(args)
    except (FitEncoderError, FittedEncoderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
