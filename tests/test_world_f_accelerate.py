"""world_f under multi-process training: `accelerate launch` of the stock `lerobot-train`, two CPU ranks.

Launcher fact (accelerate 1.15 here): `accelerate launch --cpu --num_processes 2` starts ONE process
(multi-CPU through `--cpu` needs `mpirun` and `--mpirun_hostfile`). `--multi_gpu --num_processes 2`
starts two ranks through torchrun whatever the hardware; with `--policy.device=cpu` LeRobot builds its
Accelerator with `cpu=True`, so the ranks run DDP over gloo on the CPU. On GPU machines the same command
with `--policy.device=cuda` runs one rank per GPU.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.cli import TINY_WORLD_F
from support.datasets import make_synthetic_dataset

BIN = Path(sys.executable).parent
REPO = "local/world_f_accelerate"
STEPS = 4
BATCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env_extra=None, timeout=600):
    env = {**os.environ, "MUJOCO_GL": "egl", **(env_extra or {})}
    return subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_accelerate_two_ranks_train_world_f_and_checkpoint_reloads(tmp_path):
    root = tmp_path / "ds"
    # Images, not video: cheaper to write, and training reads only the cached latents.
    make_synthetic_dataset(root, repo_id=REPO, episode_lengths=(12, 1, 9), image_hw=(48, 48), use_videos=False)
    res = _run([BIN / "lerobot-wm-precompute", f"--dataset.repo_id={REPO}", f"--dataset.root={root}", "--no_progress"])
    assert res.returncode == 0, res.stderr
    view = Path(next(line for line in res.stdout.splitlines() if "training view" in line).split(": ", 1)[1].strip())

    out = tmp_path / "train"
    cmd = [
        BIN / "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={_free_port()}",
        BIN / "lerobot-train",
        "--policy.type=world_f",
        "--policy.variant=F",
        "--policy.encoder=pixels",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        *TINY_WORLD_F,
        f"--dataset.repo_id={REPO}",
        f"--dataset.root={view}",
        f"--batch_size={BATCH}",
        f"--steps={STEPS}",
        f"--save_freq={STEPS}",
        "--log_freq=1",
        "--num_workers=0",
        "--eval_freq=0",
        "--wandb.enable=false",
        f"--output_dir={out}",
    ]
    # HF_HOME in tmp: no user-level accelerate default_config.yaml can change the launch.
    # One thread per rank: two ranks share two cores.
    res = _run(cmd, env_extra={"HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"})
    log = res.stdout + res.stderr
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    # Two real ranks: LeRobot reports the world size in the effective batch size.
    assert f"Effective batch size: {BATCH} x 2 = {2 * BATCH}" in log, log[-4000:]
    losses = [float(x) for x in re.findall(r"step:\d+ .*?loss:([0-9.eE+-]+)", log)]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses))), log[-4000:]

    ckpt = out / "checkpoints" / "last" / "pretrained_model"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["type"] == "world_f" and cfg["variant"] == "F" and cfg["inject_memory"] is True
    assert cfg["dataset_repo_id"] == REPO and cfg["world_latent_dim"] is not None

    from lerobot_policy_world_modality.constants import OBS_WORLD_LATENT
    from lerobot_policy_world_modality.world_f.modeling_world_f import WorldFPolicy

    policy = WorldFPolicy.from_pretrained(ckpt)
    # Saved from the unwrapped model: no DDP "module." prefixes, every module of F present.
    assert not any(k.startswith("module.") for k in policy.state_dict())
    assert policy.prophet is not None and policy.fusion is not None
    # The main rank's own step counter: one forward per optimisation step.
    assert int(policy.world_train_step) == STEPS
    # The gate left its initial value: the world path received gradients through DDP.
    assert policy.fusion.gate_value().abs().max().item() > 0

    d = cfg["world_latent_dim"]
    batch = {OBS_WORLD_LATENT: torch.randn(1, d), "observation.state": torch.randn(1, 4)}
    chunk = policy.predict_action_chunk(batch)
    assert chunk.shape == (1, cfg["chunk_size"], 4) and torch.isfinite(chunk).all()
