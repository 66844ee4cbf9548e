"""Benchmark: where a MetaWorld evaluation's time goes on a CPU, and what the compare tool's settings save.

    MUJOCO_GL=egl python benchmarks/eval_cost_bench.py [--task=button-press-v3] [--frames=20] [--train_steps=100]

Part 1 (render): LeRobot's MetaWorld env (`lerobot.envs.metaworld.MetaworldEnv`, 480x480 observation)
- one physics step without rendering;
- one render with the model's own visual settings (what the policies train and evaluate on);
- the same render with the 4096 shadow map off, with multisampling off, and with both off.
The last three only show what the default costs: they change the image, and none is used by this
package. The pixel difference to the default render is printed with them.

Part 2 (threads): two tiny `lerobot-train` runs side by side, first with torch's default thread count,
then with one thread each (what `lerobot-wm-compare --jobs 2` now gives its children on a 2-core
machine). Reported in training steps per second, measured in the same run. Skipped with
`--train_steps=0`.

Prints a table and writes `--out` JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_io import write_result  # sibling module: benchmarks run as scripts from this folder

BIN = Path(sys.executable).parent


def render_costs(task: str, frames: int) -> list[dict]:
    """Milliseconds per physics step and per 480x480 render under four visual settings."""
    from gymnasium.envs.mujoco.mujoco_rendering import MujocoRenderer
    from lerobot.envs.metaworld import MetaworldEnv

    rows, reference = [], None
    settings = [("default (shadows 4096, 4x MSAA)", None, None), ("shadows off", 0, None),
                ("multisampling off", None, 0), ("both off", 0, 0)]  # fmt: skip
    for name, shadow, samples in settings:
        env = MetaworldEnv(task=task)
        inner = env._env
        if shadow is not None or samples is not None:
            if shadow is not None:
                inner.model.vis.quality.shadowsize = shadow
            if samples is not None:
                inner.model.vis.quality.offsamples = samples
            camera = inner.mujoco_renderer.camera_id
            inner.mujoco_renderer.close()
            inner.mujoco_renderer = MujocoRenderer(inner.model, inner.data, None, 480, 480, 1000, camera, None)
        env.reset(seed=0)
        inner.render()  # the first render builds the GL context
        if not rows:
            action = env.action_space.sample() * 0
            t = time.perf_counter()
            for _ in range(frames):
                inner.step(action)
            rows.append({"what": "physics step, no render", "ms": 1e3 * (time.perf_counter() - t) / frames})
        t = time.perf_counter()
        for _ in range(frames):
            image = inner.render()
        ms = 1e3 * (time.perf_counter() - t) / frames
        image = image.astype(np.float32)
        reference = image if reference is None else reference
        rows.append({"what": f"render 480x480, {name}", "ms": ms,
                     "mean_abs_pixel_diff_vs_default": float(np.abs(image - reference).mean())})  # fmt: skip
        env.close()
    return rows


def train_pair(steps: int, work: Path) -> list[dict]:
    """Steps/s of two tiny world_f trainings side by side: default threads, then one thread each."""
    from lerobot_policy_world_modality.tools import precompute

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.datasets import make_synthetic_dataset

    root = work / "ds"
    if not (root / "meta" / "info.json").exists():
        make_synthetic_dataset(root, repo_id="local/eval_cost", episode_lengths=(40, 40, 40), image_hw=(48, 48))
    precompute.main(["--dataset.repo_id=local/eval_cost", f"--dataset.root={root}", "--encoder=pixels",
                     f"--cache_root={work / 'cache'}"])  # fmt: skip
    view = next((work / "cache" / "views").iterdir())
    rows = []
    for label, threads in (("torch default threads", None), ("one thread each", "1")):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        if threads:
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        procs = []
        for i in range(2):
            out = work / f"train_{threads or 'default'}_{i}"
            cmd = [str(BIN / "lerobot-train"), "--policy.type=world_f", "--policy.variant=F", "--policy.device=cpu",
                   "--policy.push_to_hub=false", "--policy.width=32", "--policy.depth=1", "--policy.heads=2",
                   "--policy.fusion_heads=2", "--policy.prophet_width=32", "--policy.prophet_heads=2",
                   "--policy.chunk_size=4", "--policy.n_action_steps=2", "--policy.history_frames=3",
                   "--policy.future_frames=2", f"--policy.latent_cache_root={work / 'cache'}", "--policy.encoder=pixels",
                   "--policy.world_cameras=[observation.image]", "--dataset.repo_id=local/eval_cost",
                   f"--dataset.root={view}", "--dataset.video_backend=pyav", "--num_workers=0", "--eval_freq=0",
                   "--wandb.enable=false", f"--steps={steps}", "--batch_size=16", f"--save_freq={steps * 10}",
                   f"--log_freq={steps}", f"--output_dir={out}"]  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
        rates = []
        for p in procs:
            text = p.communicate(timeout=3600)[0]
            if p.returncode != 0:
                raise RuntimeError(text[-3000:])
            found = re.findall(r"(\d+\.\d+)step/s|(\d+\.\d+)s/step", text)
            last = found[-1]
            rates.append(float(last[0]) if last[0] else 1.0 / float(last[1]))
        rows.append({"what": f"2 tiny trainings side by side, {label}", "steps_per_s": rates})
    return rows


def main() -> None:
    """Run both parts, print the table, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="button-press-v3")
    p.add_argument("--frames", type=int, default=20, help="renders timed per setting")
    p.add_argument("--train_steps", type=int, default=100, help="steps of each tiny training (0 = skip part 2)")
    p.add_argument("--out", default="benchmarks/results/eval_cost_bench.json")
    args = p.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    rows = render_costs(args.task, args.frames)
    if args.train_steps > 0:
        with tempfile.TemporaryDirectory() as tmp:
            rows += train_pair(args.train_steps, Path(tmp))
    print(f"\n{'what':60s} {'result':>24s}")
    for r in rows:
        value = f"{r['ms']:.1f} ms" if "ms" in r else " / ".join(f"{x:.1f}" for x in r["steps_per_s"]) + " steps/s"
        extra = f"  (pixel diff {r['mean_abs_pixel_diff_vs_default']:.1f})" if r.get("mean_abs_pixel_diff_vs_default") else ""
        print(f"{r['what']:60s} {value:>24s}{extra}")
    write_result(args.out, {"benchmark": "eval_cost_bench", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "machine": platform.platform(), "cpus": os.cpu_count(), "task": args.task, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
