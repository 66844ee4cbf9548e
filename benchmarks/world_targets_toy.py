"""A toy in which the action needs the motion between frames: which world-target options open the gate?

    python benchmarks/world_targets_toy.py [--steps 600] [--seeds 0,1,2] [--out benchmarks/results/world_targets_toy.json]

Each sample's world latent moves at a constant velocity v: z_{t+j} = base + j * v, with |v| small next
to |base| (so copying z_t already scores a cosine near 1, as with real frames at a high fps). The
action chunk is a fixed linear map of v. The trunk reads only z_t and a state that carries no
information; v is visible only in the history the Prophet reads, so the action path can only do
better than chance through the world memory. The script trains `world_f` variant F (the real policy
class, on synthetic batches) under several world-target settings and reports, on held-out samples:
the gate, the action loss with predicted vs zero memory (the probe's question), and the world cosine
next to the copy baseline and the motion cosine.

This is a learning check on a toy, not a result about robots; it runs in about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from lerobot.configs.types import FeatureType, PolicyFeature

from lerobot_policy_world_modality.constants import (
    OBS_WORLD_FUTURE,
    OBS_WORLD_FUTURE_VALID,
    OBS_WORLD_HISTORY,
    OBS_WORLD_LATENT,
)
from lerobot_policy_world_modality.world.memory import world_targets
from lerobot_policy_world_modality.world_f.configuration_world_f import WorldFConfig
from lerobot_policy_world_modality.world_f.modeling_world_f import WorldFPolicy

D, S, A, T, K, H = 16, 4, 4, 4, 4, 8

DYNAMICS = dict(world_target="delta", standardise_targets=True, world_loss_type="smooth_l1")
SETTINGS = {
    "absolute, cosine, layer (old default)": {},
    "delta, cosine, layer (delta_prediction)": dict(world_target="delta"),
    "delta std, smooth_l1, layer": DYNAMICS,
    "delta std, smooth_l1, none": dict(DYNAMICS, fusion_memory_norm="none"),
    "delta std, smooth_l1, none, motion in": dict(DYNAMICS, fusion_memory_norm="none", prophet_input="motion"),
    "delta std, smooth_l1, rms, motion in": dict(DYNAMICS, fusion_memory_norm="rms", prophet_input="motion"),
    "delta std, smooth_l1, none, motion in, gate x10": dict(
        DYNAMICS, fusion_memory_norm="none", prophet_input="motion", gate_lr_mult=10.0
    ),
}


def make_batch(n: int, g: torch.Generator, action_map: torch.Tensor) -> dict:
    """n samples of the toy (see the module docstring)."""
    base = torch.randn(n, 1, D, generator=g) * 3.0 + 5.0
    v = torch.randn(n, 1, D, generator=g) * 0.1
    steps = torch.arange(-T + 1, K + 1, dtype=torch.float32).view(1, -1, 1)
    z = base + steps * v  # frames t-T+1 .. t+K
    action = (v[:, 0] @ action_map).unsqueeze(1).expand(n, H, A) * 10.0
    return {
        OBS_WORLD_LATENT: z[:, T - 1].clone(),
        OBS_WORLD_HISTORY: z[:, :T].clone(),
        OBS_WORLD_FUTURE: z[:, T:].clone(),
        OBS_WORLD_FUTURE_VALID: torch.ones(n, K, dtype=torch.bool),
        "observation.state": torch.randn(n, S, generator=g),
        "action": action.contiguous(),
        "action_is_pad": torch.zeros(n, H, dtype=torch.bool),
    }


def toy_stats(batch: dict, delta: bool) -> dict:
    """Standardisation statistics over a large batch (what the latent cache gives a real policy)."""
    z = torch.cat([batch[OBS_WORLD_HISTORY], batch[OBS_WORLD_FUTURE]], dim=1)
    target = world_targets(batch[OBS_WORLD_FUTURE], batch[OBS_WORLD_LATENT], delta)
    step = (z[:, 1:] - z[:, :-1]).flatten(0, 1)
    z = z.flatten(0, 1)
    return {"latent_mean": z.mean(0), "latent_std": z.std(0), "target_mean": target.mean(0),
            "target_std": target.std(0), "step_mean": step.mean(0), "step_std": step.std(0)}  # fmt: skip


def run(setting: dict, seed: int, steps: int, batch_size: int) -> dict:
    """Train one F policy on the toy and measure it on held-out samples."""
    torch.manual_seed(seed)
    cfg = WorldFConfig(
        device="cpu", world_latent_dim=D, width=64, depth=2, heads=4, fusion_heads=4, prophet_width=64,
        prophet_depth=2, prophet_heads=4, chunk_size=H, n_action_steps=H, history_frames=T, future_frames=K,
        dropout=0.0, optimizer_lr=1e-3, prophet_reads_trunk=False, push_to_hub=False,
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (S,)),
                        "observation.image": PolicyFeature(FeatureType.VISUAL, (3, 8, 8))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (A,))},
        **setting,
    )  # fmt: skip
    policy = WorldFPolicy(cfg)
    g = torch.Generator().manual_seed(1000 + seed)
    action_map = torch.randn(D, A, generator=g)
    if cfg.standardise_targets:
        policy.world.set_target_stats(toy_stats(make_batch(8192, g, action_map), cfg.world_target == "delta"))
    optimizer = cfg.get_optimizer_preset().build(policy.get_optim_params())
    policy.train()
    for _ in range(steps):
        loss, _ = policy.forward(make_batch(batch_size, g, action_map))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optimizer_grad_clip_norm)
        optimizer.step()
    held_out = make_batch(1024, torch.Generator().manual_seed(99), action_map)
    policy.eval()
    result = {}
    with torch.no_grad():
        for mode in ("pred", "zero", "shuffle", "oracle"):
            cfg.memory_mode_train = mode
            torch.manual_seed(0)
            _, info = policy.forward(held_out)
            result[f"action_loss_{mode}"] = info["action_loss"]
        cfg.memory_mode_train = "pred"
    for key in ("gate", f"world_cos_h{K}", f"world_copy_cos_h{K}", f"world_motion_cos_h{K}", "attn_entropy"):
        result[key] = info[key] if key in info else None
    result["zero_vs_pred"] = (result["action_loss_zero"] - result["action_loss_pred"]) / result["action_loss_pred"]
    return result


def main(argv=None) -> None:
    """Train every setting for every seed and print (and optionally write) the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, setting in SETTINGS.items():
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            r = run(setting, seed, args.steps, args.batch_size)
            rows.append({"setting": name, "seed": seed, **r, "seconds": time.perf_counter() - start})
            print(
                f"{name:48s} seed {seed}  gate {r['gate']:+.3f}  action loss pred {r['action_loss_pred']:.3f}"
                f"  zero {r['action_loss_zero']:.3f} ({100 * r['zero_vs_pred']:+.0f}%)"
                f"  cos_h{K} {r[f'world_cos_h{K}']:.4f} copy {r[f'world_copy_cos_h{K}']:.4f}"
                f"  motion {r[f'world_motion_cos_h{K}']:.3f}",
                flush=True,
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
