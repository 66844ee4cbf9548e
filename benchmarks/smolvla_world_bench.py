"""Benchmark: smolvla_world vs smolvla, same backbone and weights, side by side in one process.

    ~/wmvenv/bin/python benchmarks/smolvla_world_bench.py                  # ~3-5 min on 2 CPU cores
    ~/wmvenv/bin/python benchmarks/smolvla_world_bench.py --vlm_model_name=HuggingFaceTB/SmolVLM2-500M-Video-Instruct \
        --num_vlm_layers=16 --resize=512 --device=cuda                    # the real backbone, when available

Without `--vlm_model_name` a random SmolVLM stand-in is written to a temp dir with the test helper
(`tests/support/vlm.py`; by default text width 256 x 4 layers, vision width 128 x 2 layers, 128x128
images), so the benchmark runs offline. Both policies are built from the same config values and the
smolvla_world SmolVLA part holds exactly the smolvla weights; smolvla_world uses its defaults for the
world path (Prophet width 128 x 2 blocks, T = K = 4, 768-d `pixels` latents, late injection).

Measured on preprocessed batches (tokenised instruction, world latents: what the policy receives
from its preprocessor), alternating the two policies on every repetition (order swapped each time)
so machine noise hits both alike; medians are reported with the ratio smolvla_world / smolvla
(target <= 1.10 for both):
- training step: forward + backward + SmolVLA's AdamW step (with grad clipping) at `--batch_size`;
- select_action at batch 1: the inference call (the queue is empty: a chunk is sampled with
  `num_steps` denoising steps) and the mean per env step over whole chunks of `n_action_steps`.

Prints a table and writes JSON (`--out`) atomically, with the load average before and after: other
processes may share the machine, so compare the ratios of one run, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from bench_io import write_result  # sibling module: benchmarks run as scripts from this folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny SmolVLM writer lives with the tests

A, S = 4, 4  # action and state dimensions (MetaWorld's)


def backbone_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The backbone, SmolVLA and device options (shared with smolvla_world_planning_bench.py)."""
    p.add_argument(
        "--vlm_model_name", default=None, help="Real VLM (Hub id or path); default: a random stand-in."
    )
    p.add_argument("--text_width", type=int, default=256, help="Stand-in VLM: text hidden size.")
    p.add_argument("--text_layers", type=int, default=4, help="Stand-in VLM: text layers (all used).")
    p.add_argument("--vision_width", type=int, default=128, help="Stand-in VLM: vision hidden size.")
    p.add_argument("--vision_layers", type=int, default=2, help="Stand-in VLM: vision layers.")
    p.add_argument("--resize", type=int, default=128, help="Image side after resize with padding.")
    p.add_argument(
        "--num_vlm_layers", type=int, default=None, help="VLM layers used (default: all of the stand-in)."
    )
    p.add_argument("--chunk_size", type=int, default=50, help="Action chunk length (SmolVLA's default).")
    p.add_argument("--n_action_steps", type=int, default=50, help="Actions executed per chunk.")
    p.add_argument(
        "--num_steps", type=int, default=10, help="Denoising steps per inference (SmolVLA's default)."
    )
    p.add_argument("--device", default="cpu", help="Torch device.")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    return p


def vlm_dir_of(args, tmp: str) -> str:
    """The VLM to load: `--vlm_model_name`, or a random stand-in written under `tmp`."""
    if args.vlm_model_name is not None:
        return args.vlm_model_name
    from support.vlm import make_tiny_smolvlm

    return str(make_tiny_smolvlm(Path(tmp) / "vlm", text_width=args.text_width, text_layers=args.text_layers,
                                 vision_width=args.vision_width, vision_layers=args.vision_layers,
                                 image_size=args.resize))  # fmt: skip


def backbone_record(args) -> dict:
    """What the result JSON says about the backbone."""
    return args.vlm_model_name or {
        "stand_in": "random SmolVLM (tests/support/vlm.py)",
        "text_width": args.text_width,
        "text_layers": args.text_layers,
        "vision_width": args.vision_width,
        "vision_layers": args.vision_layers,
    }


def run_record(args, load_before) -> dict:
    """What every result JSON of these benchmarks starts with: when, where, the load, the backbone."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": args.device,
        "load_average_1_5_15_before": list(load_before),
        "load_average_1_5_15_after": list(os.getloadavg()),
        "backbone": backbone_record(args),
    }


def parse_args():
    """Command-line options."""
    p = backbone_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--batch_size", type=int, default=8, help="Training batch size.")
    p.add_argument("--reps", type=int, default=15, help="Alternating training-step repetitions.")
    p.add_argument("--chunks", type=int, default=6, help="Alternating select_action inference calls.")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "smolvla_world_bench.json"))
    return p.parse_args()


def build_policies(args, vlm_dir: str, **world_options):
    """(smolvla, smolvla_world) with identical SmolVLA weights; `world_options` are further
    smolvla_world config fields (e.g. the world model and planner of the planning benchmark)."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from lerobot_policy_world_modality.smolvla_world.configuration_smolvla_world import SmolVLAWorldConfig
    from lerobot_policy_world_modality.smolvla_world.modeling_smolvla_world import SmolVLAWorldPolicy

    options = dict(
        vlm_model_name=vlm_dir,
        load_vlm_weights=True,
        resize_imgs_with_padding=(args.resize, args.resize),
        chunk_size=args.chunk_size,
        n_action_steps=args.n_action_steps,
        num_steps=args.num_steps,
        num_vlm_layers=args.num_vlm_layers or args.text_layers,
    )
    features = dict(
        input_features={
            "observation.image": PolicyFeature(FeatureType.VISUAL, (3, 480, 480)),
            "observation.state": PolicyFeature(FeatureType.STATE, (S,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (A,))},
    )
    torch.manual_seed(0)
    world = SmolVLAWorldPolicy(SmolVLAWorldConfig(device=args.device, **options, **features, **world_options))
    smolvla = SmolVLAPolicy(world.config.smolvla_config())
    smolvla.load_state_dict(world.smolvla.state_dict())
    return smolvla.to(args.device), world.to(args.device)


def make_batch(vlm_dir: str, dim: int, b: int, cfg, device: str, seed: int = 0) -> dict:
    """A preprocessed batch: images, state, tokenised instruction, action chunk and world latents."""
    from transformers import AutoTokenizer

    from lerobot_policy_world_modality.constants import (
        OBS_WORLD_FUTURE,
        OBS_WORLD_FUTURE_VALID,
        OBS_WORLD_HISTORY,
        OBS_WORLD_LATENT,
    )

    g = torch.Generator().manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(vlm_dir)(["press the red button\n"] * b, return_tensors="pt")
    t, k = cfg.history_frames, cfg.future_frames
    history = torch.randn(b, t, dim, generator=g)
    batch = {
        "observation.image": torch.rand(b, 3, 480, 480, generator=g),
        "observation.state": torch.randn(b, S, generator=g),
        "observation.language.tokens": tok["input_ids"],
        "observation.language.attention_mask": tok["attention_mask"].bool(),
        "action": torch.randn(b, cfg.chunk_size, A, generator=g),
        OBS_WORLD_LATENT: history[:, -1].clone(),
        OBS_WORLD_HISTORY: history,
        OBS_WORLD_FUTURE: torch.randn(b, k, dim, generator=g),
        OBS_WORLD_FUTURE_VALID: torch.ones(b, k, dtype=torch.bool),
    }
    return {key: v.to(device) for key, v in batch.items()}


def sync(device: str) -> None:
    """Wait for queued device work, so timings cover it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step_timer(policy, cfg, batch: dict, device: str):
    """A function that runs one timed training step (forward, backward, clip, AdamW) and returns seconds."""
    optimizer = cfg.get_optimizer_preset().build([p for p in policy.parameters() if p.requires_grad])
    clip = cfg.optimizer_grad_clip_norm
    policy.train()

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        loss, _ = policy.forward(dict(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    return step


def select_chunk(policy, batch: dict, n_action_steps: int, device: str) -> tuple[float, float]:
    """(inference call s, mean per env step s) over one whole chunk of select_action calls at batch 1."""
    policy.reset()
    times = []
    for _ in range(n_action_steps):
        sync(device)
        start = time.perf_counter()
        policy.select_action(dict(batch))
        sync(device)
        times.append(time.perf_counter() - start)
    return times[0], sum(times) / len(times)


def alternate(fn_a, fn_b, reps: int) -> tuple[list, list]:
    """Run fn_a and fn_b `reps` times each, alternating and swapping the order every repetition."""
    out_a, out_b = [], []
    for i in range(reps):
        if i % 2 == 0:
            out_a.append(fn_a())
            out_b.append(fn_b())
        else:
            out_b.append(fn_b())
            out_a.append(fn_a())
    return out_a, out_b


def side_by_side(smolvla_s: list, world_s: list) -> dict:
    """Medians and the ratio smolvla_world / smolvla."""
    a, b = statistics.median(smolvla_s), statistics.median(world_s)
    return {"smolvla": a, "smolvla_world": b, "ratio_world_over_smolvla": b / a}


def main() -> None:
    """Build both policies, time them alternately, print the table and write the JSON."""
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    import lerobot_policy_world_modality  # noqa: F401  registers smolvla_world

    load_before = os.getloadavg()
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        vlm_dir = vlm_dir_of(args, tmp)
        smolvla, world = build_policies(args, vlm_dir)
        cfg = world.config
        dim = cfg.world_latent_dim
        train_batch = make_batch(vlm_dir, dim, args.batch_size, cfg, args.device)
        eval_batch = make_batch(vlm_dir, dim, 1, cfg, args.device, seed=1)
        for key in ("action", "observation.world.history", "observation.world.future"):
            eval_batch.pop(key)
        step_smolvla = train_step_timer(smolvla, cfg, train_batch, args.device)
        step_world = train_step_timer(world, cfg, train_batch, args.device)
        alternate(step_smolvla, step_world, 2)  # warm-up
        train_a, train_b = alternate(step_smolvla, step_world, args.reps)

        smolvla.eval(), world.eval()
        with torch.inference_mode():
            alternate(lambda: select_chunk(smolvla, eval_batch, 2, args.device),
                      lambda: select_chunk(world, eval_batch, 2, args.device), 1)  # fmt: skip
            sel_a, sel_b = alternate(
                lambda: select_chunk(smolvla, eval_batch, cfg.n_action_steps, args.device),
                lambda: select_chunk(world, eval_batch, cfg.n_action_steps, args.device),
                args.chunks,
            )
        params_world = sum(p.numel() for p in world.parameters())
        params_smolvla = sum(p.numel() for p in smolvla.parameters())

    result = {
        **run_record(args, load_before),
        "smolvla_options": {
            "num_vlm_layers": cfg.num_vlm_layers,
            "resize_imgs_with_padding": list(cfg.resize_imgs_with_padding),
            "chunk_size": cfg.chunk_size,
            "n_action_steps": cfg.n_action_steps,
            "num_steps": cfg.num_steps,
        },
        "world_options": {
            "world_latent_dim": dim,
            "history_frames": cfg.history_frames,
            "future_frames": cfg.future_frames,
            "prophet_width": cfg.prophet_width,
            "prophet_depth": cfg.prophet_depth,
            "fusion_points": ["expert_output"]
            + (["expert_input"] if cfg.inject_expert_input else [])
            + (["prefix"] if cfg.inject_prefix else []),
        },
        "params": {"smolvla": params_smolvla, "smolvla_world": params_world},
        "batch_size": args.batch_size,
        "repetitions": args.reps,
        "select_action_chunks": args.chunks,
        "train_step_s": side_by_side(train_a, train_b),
        "select_action_inference_call_s": side_by_side([x[0] for x in sel_a], [x[0] for x in sel_b]),
        "select_action_mean_per_step_s": side_by_side([x[1] for x in sel_a], [x[1] for x in sel_b]),
        "wall_s": time.perf_counter() - wall,
    }
    print_table(result)
    write_result(args.out, result)


def print_table(r: dict) -> None:
    """Human-readable summary of the result dict."""
    ms = 1000.0
    print(
        f"\nsmolvla_world vs smolvla  {r['date']}  {r['device']}, {r['cpu_count']} cores, {r['torch_threads']} "
        f"threads, load avg {r['load_average_1_5_15_before'][0]:.2f} -> {r['load_average_1_5_15_after'][0]:.2f}"
    )
    print(f"params: smolvla {r['params']['smolvla']:,}, smolvla_world {r['params']['smolvla_world']:,}")
    print(f"\n{'median (alternating runs)':44s} {'smolvla ms':>11s} {'world ms':>9s} {'ratio':>6s}  target")
    rows = (
        ("train_step_s", f"training step, batch {r['batch_size']} (fwd+bwd+AdamW)"),
        ("select_action_inference_call_s", "select_action, inference call"),
        ("select_action_mean_per_step_s", "select_action, mean per env step"),
    )
    for key, label in rows:
        v = r[key]
        ok = "ok" if v["ratio_world_over_smolvla"] <= 1.10 else "MISSED"
        print(
            f"{label:44s} {v['smolvla'] * ms:11.2f} {v['smolvla_world'] * ms:9.2f} "
            f"{v['ratio_world_over_smolvla']:6.3f}  <=1.10 {ok}"
        )
    print(f"\ntotal wall {r['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
