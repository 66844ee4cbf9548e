"""`lerobot-wm-plan-check`: counterfactual outcomes of candidate chunks in MetaWorld (issue 16).

The end-to-end run on a trained checkpoint is in tests/test_planning.py's stock-CLI test (one shared
training); here the pieces it rests on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lerobot_policy_world_modality.tools.plan_check import main, reward_steps, summarise


def test_reward_steps_match_the_imagined_frames_the_reward_head_reads():
    # Imagined frame k lies k * stride steps ahead; the head predicts the reward of the step taken from it.
    assert reward_steps(horizon=4, stride=2, length=9) == [2, 4, 6, 8]
    assert reward_steps(horizon=3, stride=1, length=5) == [1, 2, 3]
    assert reward_steps(horizon=4, stride=2, length=6) == [2, 4, 5, 5]  # capped at the chunk's actions


def test_summary_counts_successes_and_ranking_over_decisions():
    def decision(rho, model, proposal, best):
        return {"spearman": rho, "model_pick_true_rank": 0 if model == best else 1, "true_model_pick": model,
                "true_proposal": proposal, "true_best": best, "true_mean": 1.0, "true_spread": best - model}  # fmt: skip

    records = [
        {"task": "a", "success": True, "replay_max_abs_diff": 0.0,
         "decisions": [decision(0.5, 2.0, 1.0, 2.0), decision(math.nan, 1.0, 1.0, 1.0)]},
        {"task": "a", "success": False, "replay_max_abs_diff": 1e-3, "decisions": [decision(-0.5, 0.0, 1.0, 3.0)]},
        {"task": "b", "success": False, "replay_max_abs_diff": 0.0, "decisions": [decision(1.0, 3.0, 1.0, 3.0)]},
    ]  # fmt: skip
    s = summarise(records)
    a = s["tasks"]["a"]
    assert (a["episodes"], a["successes"], a["decisions"]) == (2, 1, 3)
    assert a["wilson95"][0] < 0.5 < a["wilson95"][1]
    assert a["spearman_median"] == 0.0 and a["decisions_with_flat_true_score"] == 1
    assert a["model_pick_beats_proposal"] == pytest.approx(1 / 3) and a["model_pick_worse_than_proposal"] == pytest.approx(1 / 3)
    assert a["true_gain_model_pick_mean"] == pytest.approx(0.0) and a["true_gain_best_mean"] == pytest.approx(1.0)
    assert a["true_spread_median"] == 0.0 and a["true_level_median"] == 1.0
    assert a["replay_max_abs_diff"] == 1e-3 and s["all"]["episodes"] == 3 and s["all"]["successes"] == 1


def test_a_directory_without_a_checkpoint_is_refused_by_name(tmp_path, capsys):
    rc = main([f"--policy.path={tmp_path}", "--tasks=button-press-v3", f"--out_dir={tmp_path / 'out'}"])
    assert rc == 2 and "has no config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["assembly-v3", "pick-place-v3"])
def test_a_restored_snapshot_repeats_the_simulator_exactly(task, monkeypatch):
    """Counterfactual outcomes are only the candidates' if restoring the state repeats the world: the
    same actions from a restored snapshot give bit-identical observations and rewards."""
    monkeypatch.setenv("MUJOCO_GL", "egl")
    from lerobot.envs.metaworld import MetaworldEnv

    from lerobot_policy_world_modality.tools.plan_check import SimSnapshot, outcomes

    env = MetaworldEnv(task=task, obs_type="pixels_agent_pos")
    try:
        sim = env._env
        sim.reset(seed=3)
        rng = np.random.default_rng(0)
        for a in rng.uniform(-1, 1, size=(15, 4)):  # somewhere mid-episode, the arm moving
            sim.step(a.astype(np.float32))
        actions = rng.uniform(-1, 1, size=(12, 4))

        def run():
            obs, rew = [], []
            for a in actions:
                o, r, *_ = sim.step(a.astype(np.float32))
                obs.append(o)
                rew.append(r)
            return np.array(obs), np.array(rew)

        snap = SimSnapshot(sim)
        first = run()
        snap.restore(sim)
        again = run()
        np.testing.assert_array_equal(first[0], again[0])
        np.testing.assert_array_equal(first[1], again[1])
        # outcomes() leaves the env where it was, and predicts exactly what executing the actions then gives.
        snap.restore(sim)
        predicted, _ = outcomes(sim, actions, len(actions))
        np.testing.assert_array_equal(predicted, run()[1])
        assert sim.curr_path_length == 15 + len(actions)
    finally:
        env.close()


@pytest.mark.slow
def test_the_expert_truth_is_the_scripted_experts_steps_to_success_after_a_candidate(monkeypatch):
    """`--truth=expert`: a candidate's true score is minus the steps to success when the scripted expert
    takes over after its executed actions; the env is left where it was, a candidate that undoes the
    expert's progress scores lower, and every failure within the horizon ties below every success."""
    monkeypatch.setenv("MUJOCO_GL", "egl")
    from lerobot.envs.metaworld import MetaworldEnv

    from lerobot_policy_world_modality.tools.plan_check import SimSnapshot, expert_steps_to_success, expert_truth

    env = MetaworldEnv(task="pick-place-v3", obs_type="pixels_agent_pos")
    try:
        sim, expert = env._env, env.expert_policy
        np.random.seed(1000)
        obs, _ = sim.reset()
        # The expert alone, executed for real: the count the truth must reproduce for the expert's own actions.
        snap = SimSnapshot(sim)
        own, o = [], obs
        for step in range(1, 200):
            a = np.clip(expert.get_action(o), -1, 1).astype(np.float32)
            own.append(a)
            o, _r, _t, _tr, info = sim.step(a)
            if info["success"]:
                break
        assert info["success"] and step > 10
        snap.restore(sim)
        path_length, tcp = sim.curr_path_length, sim.tcp_center.copy()
        assert expert_steps_to_success(sim, expert, np.array(own[:5]), horizon=190) == step
        # The env is back where it was: the same call gives the same count, and the arm has not moved.
        assert expert_steps_to_success(sim, expert, np.array(own[:5]), horizon=190) == step
        assert sim.curr_path_length == path_length and np.array_equal(sim.tcp_center, tcp)
        # Five steps up and away with the gripper open undo progress: the expert needs longer after them.
        away = np.tile(np.array([0.0, -1.0, 1.0, -1.0], dtype=np.float32), (5, 1))
        slower = expert_steps_to_success(sim, expert, away, horizon=190)
        assert slower is not None and slower > step
        assert expert_steps_to_success(sim, expert, away, horizon=slower - 6) is None  # one expert step short
        # As true scores: higher is better, a failure sits one step below the slowest success.
        true = expert_truth(sim, expert, np.stack([np.array(own[:5]), away]), executed=5, horizon=190)
        assert list(true) == [-step, -slower]
        short = expert_truth(sim, expert, np.stack([np.array(own[:5]), away]), executed=5, horizon=step - 5)
        assert list(short) == [-step, -(5 + (step - 5) + 1)]
    finally:
        env.close()


@pytest.mark.slow
def test_the_eval_launcher_makes_a_metaworld_start_depend_on_its_seed_alone(monkeypatch):
    """MetaWorld draws its starts from NumPy's global generator (and LeRobot's env resets once more on
    success), so without `seed_metaworld_resets` episode i of two arms would start alike only until their
    successes differ."""
    monkeypatch.setenv("MUJOCO_GL", "egl")
    from lerobot.envs import metaworld

    from lerobot_policy_world_modality.tools.demo import seed_metaworld_resets

    monkeypatch.setattr(metaworld.MetaworldEnv, "reset", metaworld.MetaworldEnv.reset)  # undone after the test
    seed_metaworld_resets()
    seed_metaworld_resets()  # idempotent: one seeding layer
    env = metaworld.MetaworldEnv(task="pick-place-v3", obs_type="pixels_agent_pos")
    try:
        start = lambda: env._env._last_rand_vec.copy()  # noqa: E731  (the object and goal positions drawn)
        env.reset(seed=7)
        first = start()
        env.reset()  # what LeRobot's step does when the task succeeds
        np.random.uniform(size=5)
        env.reset(seed=7)
        np.testing.assert_array_equal(start(), first)
        env.reset(seed=8)
        assert not np.array_equal(start(), first)
    finally:
        env.close()


def test_report_pairs_picks_by_checkpoint_task_and_seed(tmp_path):
    from lerobot_policy_world_modality.fileio import atomic_write_json
    from lerobot_policy_world_modality.tools.plan_check import report

    def write(ckpt, pick, task, seed, success):
        rec = {"policy_path": ckpt, "pick": pick, "task": task, "seed": seed, "success": success,
               "replay_max_abs_diff": 0.0, "decisions": []}  # fmt: skip
        (tmp_path / ckpt / pick / "episodes").mkdir(parents=True, exist_ok=True)
        atomic_write_json(tmp_path / ckpt / pick / "episodes" / f"{task}__{seed}.json", rec)

    # Oracle wins 4 pairs, loses 1; one proposal episode has no partner (another seed) and is left out.
    for ckpt in ("c0", "c1"):
        for seed in range(3):
            write(ckpt, "proposal", "t", seed, success=(ckpt, seed) == ("c1", 2))
            write(ckpt, "true", "t", seed, success=(ckpt, seed) != ("c1", 2))
    write("c0", "proposal", "t", 99, success=True)
    out = report(tmp_path)
    first = out["comparisons"][0]
    assert (first["task"], first["pairs"], first["checkpoints"]) == ("all", 6, 2)
    assert (first["x_only"], first["y_only"]) == (5, 1) and first["p_value"] == pytest.approx(0.21875)
    assert out["summaries"]["proposal"]["all"]["episodes"] == 7
    assert (tmp_path / "report_success.png").read_bytes()[:4] == b"\x89PNG"
    assert "| true | all | 6 |" in (tmp_path / "report.md").read_text()


def test_report_keeps_fits_of_one_checkpoint_apart_by_label_and_pairs_them_with_its_source(tmp_path):
    from lerobot_policy_world_modality.fileio import atomic_write_json
    from lerobot_policy_world_modality.tools.plan_check import FIT_RECORD, fit_label, pairing_key, report

    # A refit of a fitted checkpoint still pairs with the first source's proposals.
    src, fit1, fit2 = (tmp_path / n for n in ("src", "fit1", "fit2"))
    for d in (src, fit1, fit2):
        d.mkdir()
    atomic_write_json(fit1 / FIT_RECORD, {"source": str(src)})
    atomic_write_json(fit2 / FIT_RECORD, {"source": str(fit1), "label": "round2"})
    assert pairing_key(str(fit2)) == pairing_key(str(fit1)) == pairing_key(str(src)) == str(src.resolve())
    assert (fit_label(str(src)), fit_label(str(fit1)), fit_label(str(fit2))) == (None, "fit", "round2")

    def write(folder, pick, ckpt, seed, success):
        rec = {"policy_path": str(ckpt.resolve()), "policy_key": pairing_key(str(ckpt)), "fit_label": fit_label(str(ckpt)),
               "pick": pick, "task": "t", "seed": seed, "success": success, "replay_max_abs_diff": 0.0, "decisions": []}  # fmt: skip
        (tmp_path / "runs" / folder / "episodes").mkdir(parents=True, exist_ok=True)
        atomic_write_json(tmp_path / "runs" / folder / "episodes" / f"t__{seed}.json", rec)

    for seed in range(4):
        write("off", "proposal", src, seed, success=False)
        write("model", "model", src, seed, success=False)
        write("fit1", "model", fit1, seed, success=seed == 0)
        write("fit2", "model", fit2, seed, success=seed < 3)
    out = report(tmp_path / "runs")
    assert list(out["summaries"]) == ["proposal", "model", "model_fit", "model_fit:round2"]
    wins = {c["x"]: (c["pairs"], c["x_only"]) for c in out["comparisons"] if c["task"] == "all"}
    assert wins == {"model": (4, 0), "model_fit": (4, 1), "model_fit:round2": (4, 3)}
    assert "(round2)" in (tmp_path / "runs" / "report.md").read_text()


def test_report_of_an_empty_directory_says_what_to_run(tmp_path):
    assert main([f"--report={tmp_path}"]) == 2
