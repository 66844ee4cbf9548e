"""`lerobot-wm-label-coc`: Chain-of-Causality labels from a real MetaWorld recording (template backend) and
from a tiny offline SmolVLM (vlm backend) on real LeRobotDatasets, with resume after SIGKILL, rejected
model output and fingerprint refusal.

The tool runs as `python -m lerobot_policy_world_modality.tools.label_coc` in subprocesses (the module the
console script points at), or through its `main` in-process where only the outcome on disk matters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support.cli import BIN
from support.datasets import make_synthetic_dataset
from support.vlm import tiny_vlm  # noqa: F401 - session fixture

from lerobot_policy_world_modality.tools import label_coc
from lerobot_policy_world_modality.tools.label_coc import (
    TemplateSettings,
    check_output,
    keyframes,
    meta_path,
    metaworld_phases,
    object_name,
)

MODULE = [sys.executable, "-m", "lerobot_policy_world_modality.tools.label_coc"]
TASK = "pick up the red cube"


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*MODULE, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
                          check=False)  # fmt: skip


def _read(out: Path) -> tuple[list[dict], dict]:
    """The labels (every line parsed as JSON) and the meta file."""
    lines = out.read_text().splitlines()
    return [json.loads(line) for line in lines], json.loads(meta_path(out).read_text())


def _check_records(records: list[dict], episodes: dict[int, tuple[int, int]]) -> None:
    """Every record has exactly the documented keys, and each episode's segments tile [from, to) in order."""
    for r in records:
        assert list(r) == list(label_coc.RECORD_KEYS) and isinstance(r["text"], str) and r["text"].strip()
    _check_tiling(records, episodes)


def _check_tiling(spans: list[dict], episodes: dict[int, tuple[int, int]]) -> None:
    """The spans of each episode cover its frames [from, to) in time order, without gaps or overlaps."""
    for ep, (a, b) in episodes.items():
        segs = sorted((r["from_index"], r["to_index"]) for r in spans if r["episode_index"] == ep)
        assert segs and segs[0][0] == a and segs[-1][1] == b, (ep, segs)
        assert all(s[1] == t[0] and s[0] < s[1] for s, t in zip(segs, segs[1:])), segs


# ---------------------------------------------------------------------------------------------- unit level


def test_object_and_output_checks():
    """Object names skip obstacles; empty, too long and symbol output is rejected with its reason."""
    assert object_name("Pick and place a puck to a goal") == "puck"
    assert object_name("Bypass a wall and press a button") == "button"
    assert object_name("Reach a goal position") == "object"
    assert check_output("  the gripper  closes\n", 50) == ("the gripper closes", None)
    assert check_output("   ", 50)[1] == "empty"
    assert check_output("x" * 51, 50)[1].startswith("too long (51 chars")
    assert check_output("}{ 0 ] ) ... 12 ab", 50)[1].startswith("not text")
    assert check_output(None, 50)[1] == "not text (NoneType)"


def test_prompt_template_from_text_or_file(tmp_path):
    """A template is a file or the text itself; an unknown placeholder is refused naming the valid ones."""
    assert label_coc.load_prompt(None) == label_coc.DEFAULT_PROMPT
    (tmp_path / "p.txt").write_text("Task {instruction}: {{step}} {segment}/{num_segments}")
    text = label_coc.load_prompt(str(tmp_path / "p.txt"))
    assert text.format(**label_coc.PROMPT_FIELDS) == "Task pick up the cube: {step} 1/3"
    with pytest.raises(label_coc.LabelError, match=r"\{instruction\}, \{segment\}"):
        label_coc.load_prompt("Describe {object}")


def test_keyframes_follow_the_largest_latent_changes():
    """First and last frame, plus the frames where the latent jumps most, in time order; even without latents."""
    z = np.zeros((10, 3))
    z[4:] += 1.0  # jump into frame 4
    z[7:] += 3.0  # bigger jump into frame 7
    assert keyframes(10, 4, z) == [0, 4, 7, 9]
    assert keyframes(10, 3, z) == [0, 7, 9]
    assert keyframes(10, 4) == [0, 3, 6, 9]
    assert keyframes(2, 4, z[:2]) == [0, 1]


def test_press_episode_phases_without_grasp():
    """A hand that reaches a button, pushes it with the gripper open, then backs off: reach, press, retreat."""
    T = 30
    obs = np.zeros((T, 39))
    obs[:, 3] = 1.0  # gripper open throughout
    obs[:, 4:7] = [0.0, 0.8, 0.1]
    obs[12:20, 5] = np.linspace(0.8, 0.85, 8)  # the button moves while pressed
    obs[20:, 5] = 0.85
    obs[:, 0:3] = obs[:, 4:7] - [0, 0.03, 0]  # the hand touches it while pressing
    obs[:12, 1] = np.linspace(0.5, 0.77, 12)  # after reaching it
    obs[20:, 1] = np.linspace(0.82, 0.6, 10)  # and backs off
    spans = metaworld_phases(obs, "Press a button", TemplateSettings())
    assert [p for _, _, p in spans] == ["reach", "press", "retreat"]
    assert spans[0][0] == 0 and spans[-1][1] == T and spans[1][0] in range(9, 14) and spans[2][0] in range(19, 24)


def test_fallback_refusal_and_rejected_output(tmp_path, tiny_vlm, capsys):  # noqa: F811
    """Without simulator signals the template labels each episode with its instruction; another labeller on
    the same file is refused naming --overwrite; VLM output over --max_chars is counted and never written."""
    root = tmp_path / "ds"
    make_synthetic_dataset(root, episode_lengths=(5, 4), use_videos=False, task=TASK)
    out = tmp_path / "labels.jsonl"
    base = ["--dataset.repo_id=local/synthetic", f"--dataset.root={root}", f"--out={out}", "--no_progress"]
    assert label_coc.main(base) == 0
    assert "has no 'sim.metaworld_obs' column" in capsys.readouterr().out
    records, meta = _read(out)
    assert [(r["phase"], r["text"]) for r in records] == [("instruction", TASK)] * 2
    _check_records(records, {0: (0, 5), 1: (5, 9)})
    assert meta["complete"] and meta["labeller"]["signals"] is None
    # A kill between the labels write and the meta write: episode 1's label is on disk but not declared done.
    meta_path(out).write_text(json.dumps(dict(meta, complete=False, episodes_done=[0])))
    assert label_coc.main(base) == 0
    assert f"Resuming {out.resolve()}: 1/2 episodes already labelled." in capsys.readouterr().out
    assert _read(out)[0] == records  # relabelled once, not appended twice

    vlm = [*base, "--backend=vlm", f"--model={tiny_vlm}", "--max_new_tokens=12", "--max_chars=3", "--keyframes=3"]
    with pytest.raises(label_coc.LabelError, match="--overwrite") as err:
        label_coc.run(label_coc.build_parser().parse_args(vlm))
    assert "labeller backend 'template' -> 'vlm'" in str(err.value)
    assert _read(out)[0] == records  # the refused run changed nothing

    assert label_coc.main([*vlm, "--overwrite"]) == 0
    assert "Labelled 2 episodes: 0 labels, 4 rejected (no label" in capsys.readouterr().out
    records, meta = _read(out)
    assert records == []  # 12 tokens of words never fit in 3 characters: nothing is a label
    assert meta["counts"] == {"labels": 0, "rejected": 4, "rejected_by_reason": {"too long": 4}}
    assert [(r["episode_index"], r["from_index"], r["to_index"]) for r in meta["rejected"]] == [
        (0, 0, 2), (0, 2, 5), (1, 5, 7), (1, 7, 9)]  # fmt: skip
    assert all(r["reason"].startswith("too long") and r["raw"] for r in meta["rejected"])


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_template_labels_of_a_metaworld_recording_follow_its_signals(tmp_path, capsys):
    """A real pick-place-v3 expert episode recorded with --store_sim_state: reach, grasp, move in time order,
    where the recorded gripper closes during grasp, stays closed with the puck in hand while it moves."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = tmp_path / "pp"
    rec = subprocess.run(
        [str(BIN / "lerobot-wm-record-metaworld"), "--dataset.repo_id=local/pp", f"--dataset.root={root}",
         "--env.task=pick-place-v3", "--episodes_per_task=1", "--max_steps=50", "--success_only=false",
         "--use_videos=false", "--store_sim_state=true", "--seed=0"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ), check=False,
    )  # fmt: skip
    assert rec.returncode == 0, rec.stderr[-3000:]
    res = _run(["--dataset.repo_id=local/pp", f"--dataset.root={root}"])
    assert res.returncode == 0, res.stderr[-3000:]
    out = root / label_coc.DEFAULT_OUT
    assert str(out) in res.stdout
    records, meta = _read(out)
    table = LeRobotDataset("local/pp", root=root).hf_dataset.data
    obs, actions = (np.stack(table.column(k).to_numpy(zero_copy_only=False)).astype(np.float64)
                    for k in ("sim.metaworld_obs", "action"))  # fmt: skip
    _check_records(records, {0: (0, len(obs))})
    phases = [r["phase"] for r in records]
    assert phases[:3] == ["reach", "grasp", "move"], phases
    assert all(r["labeller"] == "template" and "puck" in r["text"] for r in records)
    seg = {r["phase"]: (r["from_index"], r["to_index"]) for r in records}
    grip, dist = obs[:, 3], np.linalg.norm(obs[:, 0:3] - obs[:, 4:7], axis=1)
    to_goal = np.linalg.norm(obs[:, 36:39] - obs[:, 4:7], axis=1)
    reach, grasp, move = (range(*seg[p]) for p in ("reach", "grasp", "move"))
    assert grip[reach.start] > 0.95 and dist[reach.start] > 0.1  # starts open, away from the puck
    assert np.abs(obs[grasp.stop - 1, 4:7] - obs[0, 4:7]).max() < 0.01  # the puck rests until it is grasped
    assert grip[grasp.start] - grip[grasp.stop - 1] > 0.2  # the gripper closes during grasp
    closing = int(np.argmax(actions[:, 3] > 0.5))  # the first recorded "close" command
    assert closing <= grasp.start <= closing + 6 and dist[grasp.start] < 0.07, (closing, grasp)
    assert grip[list(move)].max() < 0.8 and dist[list(move)].max() < 0.07  # closed, in contact while moving
    assert to_goal[move.start] - to_goal[move.stop - 1] > 0.05  # and carried toward the goal
    move_text = next(r["text"] for r in records if r["phase"] == "move")
    assert ("lifts the puck" in move_text) == (obs[list(move), 6].max() - obs[move.start, 6] > 0.02), move_text
    assert meta["complete"] and meta["labeller"]["signals"] == "sim.metaworld_obs"

    assert label_coc.main(["--dataset.repo_id=local/pp", f"--dataset.root={root}"]) == 0
    assert "Already labelled (nothing to do)" in capsys.readouterr().out


@pytest.mark.slow
def test_vlm_labels_with_latent_keyframes_and_resume_after_sigkill(tmp_path, tiny_vlm):  # noqa: F811
    """The tiny SmolVLM labels every segment between latent keyframes; a run SIGKILLed after its first saved
    episode resumes, keeps what was saved and labels the rest exactly once."""
    from lerobot_policy_world_modality.tools import precompute
    from lerobot_policy_world_modality.latents.cache import DatasetIdentity
    from lerobot_policy_world_modality.latents.encoders import resolve_encoder_identity
    from lerobot_policy_world_modality.latents.binding import open_latent_cache

    root = tmp_path / "ds"
    lengths = (6,) * 30
    make_synthetic_dataset(root, episode_lengths=lengths, use_videos=False, task=TASK)
    assert precompute.main(["--dataset.repo_id=local/synthetic", f"--dataset.root={root}", "--encoder=pixels"]) == 0
    out = tmp_path / "labels.jsonl"
    args = ["--dataset.repo_id=local/synthetic", f"--dataset.root={root}", f"--out={out}", "--backend=vlm",
            f"--model={tiny_vlm}", "--max_new_tokens=6", "--keyframes=3", "--batch_size=1", "--save_every=0"]  # fmt: skip
    proc = subprocess.Popen([*MODULE, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if meta_path(out).exists() and json.loads(meta_path(out).read_text())["episodes_done"]:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed: " + proc.stdout.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read().decode()
    assert "keyframes where the world latents of 'pixels' change most" in log, log[-3000:]
    before, meta = _read(out)
    done = meta["episodes_done"]
    assert not meta["complete"] and 1 <= len(done) < len(lengths)

    res = _run(args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Resuming {out}: {len(done)}/{len(lengths)} episodes already labelled." in res.stdout
    records, meta = _read(out)
    assert meta["complete"] and meta["episodes_done"] == list(range(len(lengths)))
    assert [r for r in records if r["episode_index"] in done] == [r for r in before if r["episode_index"] in done]
    identity = DatasetIdentity.from_dataset("local/synthetic", root)
    bounds = dict(enumerate(zip(identity.episode_from, identity.episode_to)))
    _check_records(records, {})
    _check_tiling(records + meta["rejected"], bounds)  # every segment labelled or rejected, exactly once
    covered = [(r["episode_index"], r["from_index"], r["to_index"]) for r in records + meta["rejected"]]
    assert len(covered) == 2 * len(lengths)
    assert meta["counts"]["labels"] == len(records) and all(r["labeller"] == f"vlm:{tiny_vlm}" for r in records)
    # Inner keyframes are where the cached latents change most inside each episode.
    cache = open_latent_cache(None, "local/synthetic", str(root), "observation.image", resolve_encoder_identity("pixels"))
    z = cache.latents.numpy()
    for ep, (a, b) in bounds.items():
        inner = {s for e, s, _ in covered if e == ep} - {a}
        change = np.linalg.norm(np.diff(z[a:b], axis=0), axis=1)[:-1]  # change into frames a+1 .. b-2
        assert inner == {a + 1 + int(np.argmax(change))}, (ep, inner, change)
