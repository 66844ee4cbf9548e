"""Benchmark: fitting a world-token codebook, this plugin's torch k-means against scikit-learn and faiss.

    ~/wmvenv/bin/python benchmarks/codebook_bench.py                      # torch only (no extra deps)
    pip install --target /tmp/sk scikit-learn faiss-cpu narwhals joblib threadpoolctl
    PYTHONPATH=/tmp/sk ~/wmvenv/bin/python benchmarks/codebook_bench.py   # all implementations

Data: `--rows` x `--dim` float32 latents (default 200,000 x 768) drawn from a Gaussian mixture of
4,096 centres in a random 64-d subspace plus isotropic noise (clustered, low intrinsic dimension,
like encoder latents; seeded). Each implementation fits `--codes` codes (default 1024) with the
same thread count; the fit time is wall clock of the fit call only. Quantisation error is measured
identically for all of them afterwards: mean squared distance of every row to its nearest code
(`mse`, summed over dimensions) and that over the total variance (`relative`).

Implementations (a library that is not importable is reported as skipped):
- torch-minibatch: `world.codebook.fit_codebook` (k-means++ on 4 * codes rows, `--iters` mini-batches
  of `--batch_size`), the plugin's implementation; also with each `--lloyd_iters`
  count of full Lloyd passes.
- sklearn-minibatch: `sklearn.cluster.MiniBatchKMeans` (greedy k-means++ on 3 * batch rows, the same
  batch size, as many mini-batch steps as torch-minibatch).
- faiss-lloyd: `faiss.Kmeans` (Lloyd, `--faiss_iters` passes, random init, its default sampling).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_io import write_result  # sibling module: benchmarks run as scripts from this folder

from lerobot_policy_world_modality.world.codebook import FitOptions, fit_codebook, nearest  # noqa: E402


def make_latents(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Clustered synthetic latents [rows, dim] (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, 64, generator=g))[0]  # [dim, 64] orthonormal
    centres = torch.randn(4096, 64, generator=g) * 3.0
    labels = torch.randint(4096, (rows,), generator=g)
    coarse = (centres[labels] + torch.randn(rows, 64, generator=g)) @ basis.T
    return (coarse + 0.3 * torch.randn(rows, dim, generator=g)).float()


def quantisation_error(x: torch.Tensor, centroids: torch.Tensor) -> dict:
    """mse (squared distance per row) and relative error (over the total variance) of the nearest code."""
    assign, dist = nearest(x, centroids.float())
    total = float(((x - x.mean(0)) ** 2).sum(1).mean())
    usage = torch.bincount(assign, minlength=centroids.shape[0]) > 0
    return {
        "mse": float(dist.mean()),
        "relative": float(dist.mean()) / total,
        "usage": float(usage.float().mean()),
    }


def run_torch(x, args, lloyd):
    options = FitOptions(
        codes=args.codes,
        iters=args.iters,
        batch_size=args.batch_size,
        lloyd_iters=lloyd,
        seed=0,
        sample_cap=None,
    )
    book, stats = fit_codebook(x, options, "cpu")
    return stats["fit_seconds"], book.centroids[0]  # the fit alone, without its usage statistics


def run_sklearn(x, args):
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    steps_per_epoch = x.shape[0] / args.batch_size
    km = MiniBatchKMeans(
        n_clusters=args.codes,
        batch_size=args.batch_size,
        max_iter=max(1, round(args.iters / steps_per_epoch)),
        n_init=1,
        random_state=0,
        max_no_improvement=None,
    )
    with threadpool_limits(args.threads):
        start = time.perf_counter()
        km.fit(x.numpy())
    return time.perf_counter() - start, torch.from_numpy(km.cluster_centers_)


def run_faiss(x, args):
    import faiss

    faiss.omp_set_num_threads(args.threads)
    km = faiss.Kmeans(x.shape[1], args.codes, niter=args.faiss_iters, seed=0, verbose=False)
    start = time.perf_counter()
    km.train(x.numpy())
    return time.perf_counter() - start, torch.from_numpy(km.centroids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--codes", type=int, default=1024)
    p.add_argument("--iters", type=int, default=100, help="Mini-batch steps (torch and sklearn).")
    p.add_argument("--batch_size", type=int, default=4096)
    p.add_argument("--lloyd_iters", default="2,10", help="Comma-separated Lloyd passes: one torch run each.")
    p.add_argument("--faiss_iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--only", default="torch,torch_lloyd,sklearn,faiss", help="Comma-separated implementations."
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "codebook_bench.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    x = make_latents(args.rows, args.dim)
    runners = {
        "torch-minibatch": ("torch", lambda: run_torch(x, args, 0)),
        **{
            f"torch-minibatch+{n}lloyd": ("torch_lloyd", lambda n=n: run_torch(x, args, n))
            for n in (int(v) for v in args.lloyd_iters.split(","))
        },
        "sklearn-minibatch": ("sklearn", lambda: run_sklearn(x, args)),
        f"faiss-lloyd-{args.faiss_iters}": ("faiss", lambda: run_faiss(x, args)),
    }
    versions = {"torch": torch.__version__}
    for mod in ("sklearn", "faiss"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    wanted = set(args.only.split(","))
    results: list[dict] = []
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "versions": versions,
        "load_average_1_5_15_before": os.getloadavg(),
        "data": {
            "rows": args.rows,
            "dim": args.dim,
            "codes": args.codes,
            "kind": "gaussian mixture, 4096 centres, 64-d subspace",
        },
        "settings": {
            "iters": args.iters,
            "batch_size": args.batch_size,
            "lloyd_iters": args.lloyd_iters,
            "faiss_iters": args.faiss_iters,
        },
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name, (key, run) in runners.items():
        if key not in wanted:
            continue
        try:
            seconds, centroids = run()
        except ImportError as err:
            results.append({"implementation": name, "skipped": f"not installed ({err})"})
            print(f"{name:28s} skipped: {err}")
            continue
        err = quantisation_error(x, centroids)
        results.append(
            {"implementation": name, "fit_s": round(seconds, 2), **{k: round(v, 5) for k, v in err.items()}}
        )
        print(
            f"{name:28s} fit {seconds:8.2f} s   mse {err['mse']:.3f}   relative {err['relative']:.4f}   usage {err['usage']:.3f}"
        )
        # Written after every implementation, so a run cut short keeps what it measured.
        out["load_average_1_5_15_after"] = os.getloadavg()
        write_result(args.out, out)


if __name__ == "__main__":
    main()
