"""`lerobot-wm-fit-codebook`: fit the world-token codebook of `world_token_c` on a dataset's latent cache.

    lerobot-wm-fit-codebook --dataset.repo_id=local/drawer --dataset.root=/data/drawer --codes=1024

Finds the caches exactly as `lerobot-wm-precompute` wrote them (same --dataset.*, --encoder,
--pooling, --window, --dtype, --camera and --cache_root flags; a training view's root works too),
concatenates the cameras' latents like the world-latent step does, fits the codebook (see
`world/codebook.py`), prints usage and perplexity, and writes it atomically next to the first
camera's cache:

    <cache dir>/codebooks/<name>.safetensors   centroids + metadata (read by the policy)
    <cache dir>/codebooks/<name>.json          the same metadata, readable

The name encodes the options, so a rerun with the same options finds the finished file and stops
(unless --overwrite); the last line printed is the lerobot-train flag that uses the codebook.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from ..latents.binding import open_latent_cache
from ..latents.cache import LatentCacheError, default_cache_root
from ..latents.encoders import resolve_encoder_identity
from ..latents.precompute import CODEBOOK_DIR
from ..latents.train_view import default_view_root, source_of_view
from ..world.codebook import (
    CodebookError,
    FitOptions,
    fit_codebook,
    load_codebook,
    options_dict,
    save_codebook,
)
from .precompute import add_cache_flags, check_cache_flags, select_cameras, train_flags


def codebook_name(options: FitOptions, cameras: list[str]) -> str:
    """File stem naming the options readably plus a hash of all of them (and the cameras)."""
    digest = hashlib.sha256(
        json.dumps([options_dict(options), cameras], sort_keys=True).encode()
    ).hexdigest()[:8]
    size = f"v{options.codes}" + (f"x{options.factors}" if options.factors > 1 else "")
    return f"kmeans-{options.factorisation}-{size}{'-l2' if options.normalise else ''}-seed{options.seed}-{digest}"


def cache_records(caches: list) -> list[dict]:
    """What the codebook metadata records of each cache: camera, directory and fingerprint."""
    return [
        {"camera": c.meta["camera"], "cache_dir": str(c.cache_dir), "fingerprint": c.meta["fingerprint"]}
        for c in caches
    ]


def build_parser() -> argparse.ArgumentParser:
    """Command-line options: the cache flags of lerobot-wm-precompute plus the fitting options."""
    p = argparse.ArgumentParser(
        prog="lerobot-wm-fit-codebook",
        description="Fit the world-token codebook (k-means / product / residual) on a dataset's cached world latents.",
    )
    add_cache_flags(
        p,
        help_text={
            "root": "Local dataset root or its training view.",
            "encoder": "Encoder the cache was built with (as for lerobot-wm-precompute).",
            "pooling": "Token pooling the cache was built with.",
            "window": "Frames per latent the cache was built with.",
            "dtype": "Encoder dtype the cache was built with.",
            "camera": "Camera key(s), comma-separated, in the policy's order (default: first camera).",
            "cache_root": "Cache root (default: $LEROBOT_WM_CACHE or the user cache).",
        },
    )
    p.add_argument(
        "--codes", type=int, default=1024, help="Codes per codebook (the vocabulary is codes**factors)."
    )
    p.add_argument(
        "--factorisation", default="none", choices=["none", "product", "residual"], help="Codebook layout."
    )
    p.add_argument(
        "--factors", type=int, default=None, help="Number of codebooks (default: 1 for none, 2 otherwise)."
    )
    p.add_argument(
        "--normalise", action="store_true", help="L2-normalise latents before fitting and assigning."
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of every random draw; same seed, same codebook.")
    p.add_argument("--iters", type=int, default=100, help="Mini-batch k-means iterations per codebook.")
    p.add_argument("--batch_size", type=int, default=4096, help="Rows per mini-batch.")
    p.add_argument("--lloyd_iters", type=int, default=0, help="Full Lloyd passes after the mini-batch phase.")
    p.add_argument(
        "--sample_cap", type=int, default=200_000, help="Fit on at most this many latents (0 = all)."
    )
    p.add_argument("--device", default=None, help="Fitting device (default: cuda when available, else cpu).")
    p.add_argument("--output", default=None, help="Codebook file (.safetensors); default: next to the cache.")
    p.add_argument(
        "--overwrite", action="store_true", help="Refit even when the codebook file already exists."
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lerobot-wm-fit-codebook` console script."""
    args = build_parser().parse_args(argv)
    check_cache_flags(args, "lerobot-wm-fit-codebook")
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    meta = LeRobotDatasetMetadata(args.repo_id, root=args.root)
    view = source_of_view(meta.info)
    repo_id, root = (view["repo_id"], view["root"]) if view else (args.repo_id, str(meta.root))
    available = list(view["cameras"]) if view else list(meta.camera_keys)
    cameras, unknown = select_cameras(args.camera, available)
    if not cameras or unknown:
        raise SystemExit(
            f"Unknown camera {unknown or cameras} in dataset '{repo_id}'; available: {available}. Pass --camera=..."
        )
    options = FitOptions(
        codes=args.codes,
        factorisation=args.factorisation,
        factors=args.factors or (1 if args.factorisation == "none" else 2),
        normalise=args.normalise,
        seed=args.seed,
        iters=args.iters,
        batch_size=args.batch_size,
        lloyd_iters=args.lloyd_iters,
        sample_cap=args.sample_cap or None,
    )
    try:
        options.validate()
        identity = resolve_encoder_identity(args.encoder, args.pooling, args.window, args.dtype)
        caches = [open_latent_cache(args.cache_root, repo_id, root, cam, identity) for cam in cameras]
    except (CodebookError, LatentCacheError) as err:
        raise SystemExit(f"lerobot-wm-fit-codebook: {err}") from None
    out = (
        Path(args.output)
        if args.output
        else caches[0].cache_dir / CODEBOOK_DIR / f"{codebook_name(options, cameras)}.safetensors"
    )
    records = cache_records(caches)
    if out.is_file() and not args.overwrite:
        try:
            _, old = load_codebook(out)
        except CodebookError:
            old = {}
        if old.get("caches") == records and old.get("options") == options_dict(options):
            print(f"Codebook already fitted with these options on this cache: {out} (--overwrite to refit).")
            return _report(args, old, out, cameras, view)
    latents = torch.cat([c.latents for c in caches], dim=-1)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"Fitting {options.factors} x {options.codes} codes ({options.factorisation}) on {latents.shape[0]} latents of dim {latents.shape[1]} ({device})..."
    )
    try:
        book, stats = fit_codebook(latents, options, device)
    except CodebookError as err:
        raise SystemExit(f"lerobot-wm-fit-codebook: {err}") from None
    saved = {
        "options": options_dict(options),
        "caches": records,
        "cameras": cameras,
        "encoder": identity.to_dict(),
        "dataset": {"repo_id": repo_id, "root": root},
        "implementation": "torch minibatch k-means (lerobot_policy_world_modality.world.codebook)",
        "device": device,
        **stats,
    }
    save_codebook(out, book, saved)
    return _report(args, saved, out, cameras, view)


def _report(args, meta: dict, out: Path, cameras: list[str], view: dict | None) -> int:
    """Print the codebook's statistics and the lerobot-train flags that use it."""
    print(f"Codebook: {out}")
    print(
        f"  usage {meta['usage']} (fraction of codes used), perplexity {meta['perplexity']}, "
        f"relative quantisation error {meta['relative_error']:.4f} on {meta['rows_fitted']} latents"
    )
    cache_root = args.cache_root or default_cache_root()
    view_dir = (
        Path(args.root)
        if view
        else default_view_root(cache_root, meta["dataset"]["repo_id"], meta["dataset"]["root"])
    )
    flags = train_flags(args, cameras, view_dir if (view_dir / "meta" / "info.json").is_file() else None)
    print(
        f"Train with:\n  lerobot-train --policy.type=world_token_c {flags} --policy.codebook_path={out} ..."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
