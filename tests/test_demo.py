"""The README's demo (`lerobot-wm-demo`) end to end in a reduced size, in a subprocess, and its reuse."""

import json
import os
import re
import base64
import html
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# Reduced pipeline: 2 short expert episodes (unfinished ones kept), a tiny model, 10 steps, 1 short eval episode.
SMALL = [
    "--episodes=2", "--max_record_steps=15", "--success_only=false", "--steps=10", "--batch_size=8",
    "--save_freq=5", "--log_freq=2", "--size=tiny", "--eval_episodes=1", "--episode_length=8", "--metric_batches=1",
]  # fmt: skip
FIELDS = {
    "task", "episodes", "frames", "train_steps", "train_seconds", "eval_episodes", "success_rate", "checkpoint",
    "eval_videos", "per_checkpoint_metrics",
}  # fmt: skip


def _demo(work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUJOCO_GL": "egl"}
    cmd = [str(BIN / "lerobot-wm-demo"), f"--work_dir={work}", *SMALL]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_demo_reduced_runs_end_to_end_and_reuses_everything(tmp_path):
    work = tmp_path / "demo"
    res = _demo(work)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    assert FIELDS <= set(report)
    assert report["task"] == "button-press-v3" and report["episodes"] == 2 and report["frames"] == 30
    assert report["train_steps"] == 10 and report["train_seconds"] > 0 and report["eval_episodes"] == 1
    assert 0.0 <= report["success_rate"] <= 1.0
    assert (Path(report["checkpoint"]) / "model.safetensors").exists()
    assert list(Path(report["eval_videos"]).glob("**/*.mp4"))
    # One metric row per saved checkpoint (steps 5 and 10), measured through the real preprocessor.
    per = report["per_checkpoint_metrics"]
    assert [m["step"] for m in per] == [5, 10]
    for m in per:
        assert {"action_loss", "world_loss", "world_cos_h1", "gate"} <= set(m)
        assert all(isinstance(v, (int, float)) and v == v for v in m.values())
    assert per[0]["action_loss"] != per[1]["action_loss"]  # different weights, different losses
    assert len(report["train_loss_curve"]) == 5

    page = (work / "report.html").read_text()
    charts = re.findall(r'<img class="chart" alt="([^"]*)" src="data:image/png;base64,([^"]+)"', page)
    assert len(charts) == 4
    for _, data in charts:
        assert base64.b64decode(data).startswith(b"\x89PNG")  # a real PNG inline: readable offline
    alts = [html.unescape(alt) for alt, _ in charts]
    for alt, title in zip(alts, ("Training losses", "World cosine per horizon", "Gate opening", "Success rate")):
        assert alt.startswith(title)
    assert "action loss (fixed batches)" in alts[0] and "world loss (fixed batches)" in alts[0]
    assert "horizon 1" in alts[1] and "tanh(gate)" in alts[2]
    # The probe's verdict stands next to the success rate, in the page and in the console summary.
    probe = report["probe"]
    assert {"reads_memory", "gate", "action_loss"} <= set(probe)
    verdict = "reads its world memory" if probe["reads_memory"] else "IGNORES its world memory"
    assert verdict in page and f"world memory   {verdict}" in res.stdout

    # Second run: every stage is reused and it says so.
    res2 = _demo(work)
    assert res2.returncode == 0, res2.stdout[-4000:] + res2.stderr[-4000:]
    for stage in ("record", "latents", "train", "eval", "metrics", "probe"):
        assert re.search(rf"\] {stage}: .*skipped", res2.stdout), (stage, res2.stdout)
    assert "lerobot-train" not in res2.stdout and "lerobot-eval" not in res2.stdout and "lerobot-wm-probe" not in res2.stdout
    again = json.loads((work / "report.json").read_text())
    assert again["per_checkpoint_metrics"] == per and again["success_rate"] == report["success_rate"]


def test_demo_rejects_bad_numbers_with_the_flag(tmp_path):
    res = subprocess.run([str(BIN / "lerobot-wm-demo"), f"--work_dir={tmp_path}", "--steps=0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--steps must be >= 1" in res.stderr
