"""`lerobot-wm-compare`: spec validation (fast), unit planning and sharding, presets, and one real end-to-end
run in subprocesses (MetaWorld) that is killed during training, resumed, and rerun as a no-op."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.cli import BIN, TINY_WORLD_F
from support.datasets import make_synthetic_dataset

from lerobot_policy_world_modality.tools import compare
from lerobot_policy_world_modality.tools.compare import SpecError

REPO = "local/compare_test"
PRESETS = Path(__file__).resolve().parents[1] / "configs" / "experiments"
COMMON = ["--policy.type=world_f", "--policy.device=cpu", "--policy.push_to_hub=false", "--dataset.video_backend=pyav",
          "--num_workers=0", "--eval_freq=0", "--wandb.enable=false", *TINY_WORLD_F]  # fmt: skip


def tiny_spec(root: Path, out: Path, **over) -> dict:
    """2 arms (A, F) x 2 seeds x 1 MetaWorld task x 2 episodes of 10 steps, tiny models (~10 s of training)."""
    spec = {
        "name": "tiny", "output_dir": str(out),
        "dataset": {"repo_id": REPO, "root": str(root), "encoder": "pixels"},
        "train": {"seeds": [0, 1], "steps": 300, "batch_size": 16, "save_freq": 100, "log_freq": 50,
                  "curve_batches": 1, "flags": COMMON},
        "arms": [{"name": "A", "flags": ["--policy.variant=A"]}, {"name": "F", "flags": ["--policy.variant=F"]}],
        "eval": {"env": "metaworld", "tasks": ["button-press-v3"], "episodes": 2, "seed": 1000, "episode_length": 10},
        "probe": {"batches": 1, "batch_size": 8},
        "comparisons": ["F@pred vs A@pred"],
    }  # fmt: skip
    spec.update(over)
    return spec


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare") / "ds"
    make_synthetic_dataset(root, repo_id=REPO, episode_lengths=(12, 9, 10), image_hw=(48, 48))
    return root


# ------------------------------------------------------------------------------------------ validation
def test_valid_spec_resolves_arms_and_units(dataset_root, tmp_path):
    plan = compare.validate(tiny_spec(dataset_root, tmp_path / "out"))
    a, f = plan.arms["A"], plan.arms["F"]
    assert (a.has_memory, f.has_memory) == (False, True) and a.uses_view and f.uses_latents
    assert a.modes == f.modes == ["pred"] and plan.comparisons == [("F@pred", "A@pred")]
    ids = [u.id for u in compare.plan_units(plan)]
    assert ids[0] == "precompute" and "probe/F/seed1" in ids and not any(i.startswith("probe/A") for i in ids)
    assert len(ids) == 1 + 4 + 4 + 2
    flags = compare.train_flags(plan, f, 1)
    assert "--seed=1" in flags and f"--dataset.root={plan.view_root()}" in flags
    assert f"--policy.latent_cache_root={plan.cache_root}" in flags


def test_an_arm_with_only_a_world_model_is_probed_for_that_model(dataset_root, tmp_path):
    """A + --policy.dynamics: no memory, but its world model's prediction vs the copy baseline is reported."""
    arms = [{"name": "A", "flags": ["--policy.variant=A"]},
            {"name": "A_dyn", "flags": ["--policy.variant=A", "--policy.dynamics=action_conditioned"]}]
    plan = compare.validate(tiny_spec(dataset_root, tmp_path / "out", arms=arms, comparisons=["A_dyn@pred vs A@pred"]))
    assert (plan.arms["A_dyn"].has_memory, plan.arms["A_dyn"].has_world_model, plan.arms["A"].has_world_model) == (
        False, True, False)
    ids = [u.id for u in compare.plan_units(plan)]
    assert "probe/A_dyn/seed0" in ids and not any(i.startswith("probe/A/") for i in ids)
    row = compare.probe_row({"world_model_only": True, "reads_memory": None, "action_loss_change_vs_pred": {},
                             "dynamics_cosine": {"dyn_cos_h1": 0.9999}, "world_copy_cosine": {"world_copy_cos_h1": 0.999}})
    assert row["world"] == {"world_copy_cos_h1": 0.999, "dyn_cos_h1": 0.9999} and "planner" in row["verdict"]
    planning = {"expert_beats_perturbations": 0.5, "expert_is_best": 0.0, "progress_spearman": 0.98,
                "dynamics_action_sensitivity": 0.13, "planner_samples": 16, "expert_between_mirrored": 0.97,
                "planned_distance_ratio": 1.5}  # fmt: skip
    with_check = compare.probe_row({"reads_memory": None, "planning": planning})["world"]
    assert with_check == {"plan_expert_beats_perturbed": 0.5, "plan_expert_is_best": 0.0,
                          "plan_expert_between_mirrored": 0.97, "plan_distance_ratio": 1.5, "plan_progress_spearman": 0.98,
                          "dyn_action_sensitivity": 0.13}  # fmt: skip
    report = {"name": "t", "budget": {"steps": 1, "batch_size": 1, "seeds": [0]},
              "eval": {"env": "metaworld", "episodes": 1, "seed": 0}, "arms": {}, "results": [], "comparisons": [],
              "units": [], "curves": {}, "probes": [{"arm": "A_dyn", "seed": 0, **row}]}
    assert "| A_dyn | 0 | n/a (no memory) |" in compare.results_markdown(report)


def test_unknown_arm_in_a_comparison(dataset_root, tmp_path):
    with pytest.raises(SpecError, match=r"names arm 'Z'.*\['A', 'F'\].*add the arm"):
        compare.validate(tiny_spec(dataset_root, tmp_path, comparisons=["Z@pred vs A@pred"]))
    with pytest.raises(SpecError, match=r"arm 'F' is not evaluated with rollout mode 'zero'"):
        compare.validate(tiny_spec(dataset_root, tmp_path, comparisons=["F@zero vs A@pred"]))


def test_missing_dataset_names_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(SpecError, match=r"no_such_dataset is not a LeRobotDataset.*lerobot-wm-record-metaworld.*dataset\.record"):
        compare.validate(tiny_spec(missing, tmp_path / "out"))


def test_flags_lerobot_train_would_reject(dataset_root, tmp_path):
    bad_name = tiny_spec(dataset_root, tmp_path, arms=[{"name": "A", "flags": ["--policy.varient=A"]},
                                                        {"name": "F", "flags": ["--policy.variant=F"]}])  # fmt: skip
    with pytest.raises(SpecError, match=r"Arm 'A'.*--policy\.varient"):
        compare.validate(bad_name)
    bad_value = tiny_spec(dataset_root, tmp_path, arms=[{"name": "A", "flags": ["--policy.variant=A"]},
                                                         {"name": "F", "flags": ["--policy.variant=Q"]}])  # fmt: skip
    with pytest.raises(SpecError, match=r"Arm 'F'.*variant"):
        compare.validate(bad_value)
    owned = tiny_spec(dataset_root, tmp_path, arms=[{"name": "A", "flags": ["--policy.variant=A", "--steps=10"]},
                                                     {"name": "F", "flags": ["--policy.variant=F"]}])  # fmt: skip
    with pytest.raises(SpecError, match=r"Arm 'A' sets \['--steps=10'\].*share data and budget"):
        compare.validate(owned)


def test_cli_rejects_a_bad_spec_before_running_anything(dataset_root, tmp_path):
    out = tmp_path / "out"
    spec = tiny_spec(dataset_root, out, arms=[{"name": "A", "flags": ["--policy.variant=A"]},
                                              {"name": "F", "flags": ["--policy.bogus=1"]}])  # fmt: skip
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    res = subprocess.run([str(BIN / "lerobot-wm-compare"), str(path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Arm 'F'" in res.stderr and "--policy.bogus" in res.stderr and "Fix or remove" in res.stderr
    assert not out.exists()  # nothing trained, nothing written


# --------------------------------------------------------------------------------------------- shards
def test_shards_split_units_deterministically_and_keep_evals_with_their_training(dataset_root, tmp_path):
    spec = tiny_spec(dataset_root, tmp_path, train={**tiny_spec(dataset_root, tmp_path)["train"], "seeds": [0, 1, 2]})
    units = compare.plan_units(compare.validate(spec, check_flags=False))
    for n in (1, 2, 4):
        shards = [[u.id for u in units if compare.shard_of(u, n) == i] for i in range(n)]
        assert sorted(sum(shards, [])) == sorted(u.id for u in units)  # every unit once
        assert compare.shard_of(units[0], n) == 0  # the shared precompute is shard 0's
        for u in units:
            if u.kind in ("eval", "probe"):
                train = next(t for t in units if t.id == u.deps[0])
                assert compare.shard_of(u, n) == compare.shard_of(train, n)
    assert [u.id for u in compare.plan_units(compare.validate(spec, check_flags=False))] == [u.id for u in units]


def test_units_are_seed_major_so_a_partial_run_stays_paired(dataset_root, tmp_path):
    spec = tiny_spec(dataset_root, tmp_path, train={**tiny_spec(dataset_root, tmp_path)["train"], "seeds": [0, 1, 2]})
    trains = [(u.arm, u.seed) for u in compare.plan_units(compare.validate(spec, check_flags=False)) if u.kind == "train"]
    assert trains == [("A", 0), ("F", 0), ("A", 1), ("F", 1), ("A", 2), ("F", 2)]


def test_encoder_fit_is_a_unit_before_precompute_and_every_arm_reads_it(dataset_root, tmp_path):
    spec = tiny_spec(dataset_root, tmp_path / "out")
    spec["dataset"] = {**spec["dataset"], "encoder": "fit", "fit": {"steps": 30, "flags": ["--dim=16"]}}
    plan = compare.validate(spec)
    units = compare.plan_units(plan)
    assert [u.id for u in units[:2]] == ["fit_encoder", "precompute"] and units[1].deps == ["fit_encoder"]
    enc = str(tmp_path / "out" / "encoder")
    fit_cmd = compare.unit_commands(plan, units[0])[0]
    assert f"--output_dir={enc}" in fit_cmd and "--steps=30" in fit_cmd and fit_cmd[-1] == "--dim=16"
    assert f"--encoder={enc}" in compare.unit_commands(plan, units[1])[0]
    assert f"--policy.encoder={enc}" in compare.train_flags(plan, plan.arms["F"], 0)
    spec["dataset"]["fit"] = {"stepz": 3}
    with pytest.raises(SpecError, match=r"dataset\.fit has unknown keys \['stepz'\]"):
        compare.validate(spec, check_flags=False)


def test_named_fits_are_one_unit_and_one_directory_each(dataset_root, tmp_path):
    """dataset.fits: several encoders fitted with other settings in one experiment (e.g. a longer fit next to
    the plain one), each arm reading the one it names as fit:<name>."""
    spec = tiny_spec(dataset_root, tmp_path / "out", arms=[
        {"name": "A", "encoder": "fit", "flags": ["--policy.variant=A"]},
        {"name": "A_big", "encoder": "fit:big", "flags": ["--policy.variant=A"]},
        {"name": "A_px", "encoder": "pixels", "flags": ["--policy.variant=A"]}])  # fmt: skip
    spec["dataset"] = {**spec["dataset"], "fit": {"steps": 30}, "fits": {"big": {"steps": 90, "seed": 3,
                                                                              "flags": ["--dim=16"]}}}  # fmt: skip
    spec["comparisons"] = ["A_big vs A"]
    plan = compare.validate(spec)
    units = {u.id: u for u in compare.plan_units(plan)}
    plain, big = str(tmp_path / "out" / "encoder"), str(tmp_path / "out" / "encoders" / "big")
    assert plan.arms["A_big"].encoder == big and compare.encoder_label(plan, big) == "fit:big"
    assert list(units)[:5] == ["fit_encoder", "fit_encoder/big", "precompute/pixels", "precompute/fit",
                               "precompute/fit-big"]  # fmt: skip
    assert units["precompute/fit-big"].deps == ["fit_encoder/big", "precompute/fit"]
    assert units["train/A_big/seed0"].deps == ["precompute/fit-big"]
    (plain_cmd,), (big_cmd,) = (compare.unit_commands(plan, units[u]) for u in ("fit_encoder", "fit_encoder/big"))
    assert f"--output_dir={plain}" in plain_cmd and "--steps=30" in plain_cmd and "--dim=16" not in plain_cmd
    assert f"--output_dir={big}" in big_cmd and "--steps=90" in big_cmd and "--seed=3" in big_cmd
    assert big_cmd[-1] == "--dim=16"
    from lerobot_policy_world_modality.tools import fit_encoder

    fit_encoder.build_parser().parse_args(big_cmd[1:])  # exits (fails the test) on an unknown flag
    assert f"--encoder={big}" in compare.unit_commands(plan, units["precompute/fit-big"])[0]
    assert f"--policy.encoder={big}" in compare.train_flags(plan, plan.arms["A_big"], 0)
    md = compare.results_markdown(compare.collect(plan, list(units.values())))
    assert "| A_big | world_f | fit:big | pred |" in md

    spec["arms"][1]["encoder"] = "fit:bigg"
    with pytest.raises(SpecError, match=r"Arm 'A_big': encoder 'fit:bigg' names no entry of dataset\.fits .*\['big'\]"):
        compare.validate(spec, check_flags=False)
    spec["arms"][1]["encoder"] = "fit"
    with pytest.raises(SpecError, match=r"dataset\.fits\.big is set but no arm uses encoder 'fit:big'"):
        compare.validate(spec, check_flags=False)
    spec["arms"][1]["encoder"] = "fit:big"
    spec["dataset"]["fits"] = {"big": {"stepz": 1}}
    with pytest.raises(SpecError, match=r"dataset\.fits\.big has unknown keys \['stepz'\]"):
        compare.validate(spec, check_flags=False)
    spec["dataset"]["fits"] = {"a b": {}}
    with pytest.raises(SpecError, match=r"dataset\.fits must map names"):
        compare.validate(spec, check_flags=False)


def _unit_deps(plan) -> list[tuple[str, list[str]]]:
    return [(u.id, u.deps) for u in compare.plan_units(plan)]


def test_single_encoder_plans_keep_their_unit_ids_and_deps(dataset_root, tmp_path):
    """Output folders of earlier runs resume: one encoder (default or named per arm) keeps the plain 'precompute'."""
    plan = compare.validate(tiny_spec(dataset_root, tmp_path / "out"))
    expected = [("precompute", []), ("train/A/seed0", ["precompute"]),
                ("eval/A/seed0/button-press-v3/pred", ["train/A/seed0"]), ("train/F/seed0", ["precompute"]),
                ("probe/F/seed0", ["train/F/seed0"]), ("eval/F/seed0/button-press-v3/pred", ["train/F/seed0"])]  # fmt: skip
    assert _unit_deps(plan)[:6] == expected
    named = tiny_spec(dataset_root, tmp_path / "out",
                      arms=[{"name": "A", "encoder": "pixels", "flags": ["--policy.variant=A"]},
                            {"name": "F", "encoder": "pixels", "flags": ["--policy.variant=F"]}])  # fmt: skip
    assert _unit_deps(compare.validate(named)) == _unit_deps(plan)


def test_each_arm_reads_the_latents_of_its_own_encoder(dataset_root, tmp_path):
    spec = tiny_spec(dataset_root, tmp_path / "out", arms=[
        {"name": "A", "flags": ["--policy.variant=A"]},  # dataset.encoder: pixels
        {"name": "A8", "encoder": "pixels-8", "flags": ["--policy.variant=A"]},
        {"name": "F", "encoder": "fit", "flags": ["--policy.variant=F"]}])  # fmt: skip
    spec["dataset"]["fit"] = {"steps": 30}
    plan = compare.validate(spec)
    units = {u.id: u for u in compare.plan_units(plan)}
    enc = str(tmp_path / "out" / "encoder")
    # the fitted encoder's precompute last: it waits for the fit, the others need not; one at a time (shared view)
    assert list(units)[:4] == ["fit_encoder", "precompute/pixels", "precompute/pixels-8", "precompute/fit"]
    assert units["precompute/pixels-8"].deps == ["precompute/pixels"]
    assert units["precompute/fit"].deps == ["fit_encoder", "precompute/pixels-8"]
    expected = (("A", "precompute/pixels", "pixels"), ("A8", "precompute/pixels-8", "pixels-8"),
                ("F", "precompute/fit", enc))  # fmt: skip
    for arm, pre, value in expected:
        assert units[f"train/{arm}/seed1"].deps == [pre]
        assert f"--encoder={value}" in compare.unit_commands(plan, units[pre])[0]
        flags = compare.train_flags(plan, plan.arms[arm], 1)
        assert f"--policy.encoder={value}" in flags and f"--dataset.root={plan.view_root()}" in flags
    assert f"--output_dir={enc}" in compare.unit_commands(plan, units["fit_encoder"])[0]
    md = compare.results_markdown(compare.collect(plan, list(units.values())))
    assert "| A8 | world_f | pixels-8 | pred |" in md and "| F | world_f | fit | pred |" in md
    assert "| precompute/fit | missing |" in md


def test_an_unknown_encoder_names_the_arm_and_the_fix(dataset_root, tmp_path):
    def arms(encoder):
        return [{"name": "A", "flags": ["--policy.variant=A"]},
                {"name": "F", "encoder": encoder, "flags": ["--policy.variant=F"]}]

    with pytest.raises(SpecError, match=r"Arm 'F': encoder 'pixles' is not a built-in .*Fix the value"):
        compare.validate(tiny_spec(dataset_root, tmp_path, arms=arms("pixles")), check_flags=False)
    with pytest.raises(SpecError, match=r"Arm 'F': encoder .*\(there is none at .*no_encoder_here"):
        missing = tiny_spec(dataset_root, tmp_path, arms=arms(str(tmp_path / "no_encoder_here")))
        compare.validate(missing, check_flags=False)
    with pytest.raises(SpecError, match=r"Arm 'F': encoder 'pixels-0'"):
        compare.validate(tiny_spec(dataset_root, tmp_path, arms=arms("pixels-0")), check_flags=False)
    bad_default = tiny_spec(dataset_root, tmp_path)
    bad_default["dataset"]["encoder"] = "dinov2"
    with pytest.raises(SpecError, match=r"dataset\.encoder: encoder 'dinov2' is not a built-in"):
        compare.validate(bad_default, check_flags=False)
    (tmp_path / "enc").mkdir()  # a local directory and a Hub id are accepted as written
    plan = compare.validate(tiny_spec(dataset_root, tmp_path, arms=arms(str(tmp_path / "enc"))), check_flags=False)
    assert plan.arms["F"].encoder == str(tmp_path / "enc") and plan.arms["A"].encoder == "pixels"
    assert compare.validate(tiny_spec(dataset_root, tmp_path, arms=arms("facebook/dinov2-small")), check_flags=False)
    direct = tiny_spec(dataset_root, tmp_path, arms=[{"name": "A", "flags": ["--policy.variant=A", "--policy.encoder=pixels-8"]},
                                                      {"name": "F", "flags": ["--policy.variant=F"]}])  # fmt: skip
    with pytest.raises(SpecError, match=r"--policy\.encoder=pixels-8.*`encoder:` key"):
        compare.validate(direct, check_flags=False)
    unused_fit = tiny_spec(dataset_root, tmp_path)
    unused_fit["dataset"]["fit"] = {"steps": 3}
    with pytest.raises(SpecError, match=r"dataset\.fit is set but no arm uses encoder 'fit'"):
        compare.validate(unused_fit, check_flags=False)


def test_a_done_unit_whose_arm_changed_is_reported_not_silently_reused(dataset_root, tmp_path, capsys):
    """Editing an arm's flags after it ran keeps its records (nothing is redone), but the rerun names the units
    and the differing arguments instead of reporting old results as the new arm's."""
    spec = tiny_spec(dataset_root, tmp_path / "out")
    plan = compare.validate(spec)
    units = compare.plan_units(plan)
    for u in units:  # each unit's record as run_unit writes it: its commands first
        path = compare.record_path(plan, u.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"id": u.id, "kind": u.kind,
                                    "commands": [shlex.join(c) for c in compare.unit_commands(plan, u)]}))
    assert not any(compare.changed_since_done(plan, u) for u in units)
    spec["arms"][1]["flags"] = ["--policy.variant=F", "--policy.lambda_world=0.5"]
    plan = compare.validate(spec)
    assert compare.execute(plan, compare.plan_units(plan)) == []  # nothing to run: every unit is done
    out = capsys.readouterr().out
    assert "WARNING train/F/seed0: done - skipped, but it ran with other arguments" in out
    assert "'--policy.lambda_world=0.5'" in out and "delete " in out
    assert "WARNING train/A" not in out and "train/A/seed0: done - skipped" in out


def test_evals_last_runs_every_training_and_probe_before_any_evaluation(dataset_root, tmp_path, monkeypatch):
    """Scheduler order only: the units' work is replaced by a stub that records the order."""
    plan = compare.validate(tiny_spec(dataset_root, tmp_path / "out"), check_flags=False)
    units = compare.plan_units(plan)
    for evals_last in (False, True):
        shutil.rmtree(plan.out, ignore_errors=True)
        order: list[str] = []
        monkeypatch.setattr(compare, "run_unit", lambda _plan, u: order.append(u.id) or {"seconds": 0})
        assert compare.execute(plan, units, jobs=1, poll_s=0.01, evals_last=evals_last) == []
        kinds = [i.split("/")[0] for i in order]
        assert sorted(order) == sorted(u.id for u in units)
        first_eval = kinds.index("eval")
        assert ("train" in kinds[first_eval:]) is not evals_last  # plan order interleaves; evals_last does not


def test_children_get_one_share_of_the_cores_each():
    """N jobs x torch's one-thread-per-core oversubscribes the machine; the children split the cores."""
    assert compare.threads_per_job(2, None, environ={}, cpus=2) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert compare.threads_per_job(3, None, environ={}, cpus=16)["OMP_NUM_THREADS"] == "5"
    assert compare.threads_per_job(4, None, environ={"OMP_NUM_THREADS": "2"}, cpus=16) == {}  # the caller's value
    assert compare.threads_per_job(4, 3, environ={"OMP_NUM_THREADS": "2"}, cpus=16)["OMP_NUM_THREADS"] == "3"
    res = subprocess.run([str(BIN / "lerobot-wm-compare"), "x.yaml", "--threads_per_job=0"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and "--threads_per_job must be >= 1" in res.stderr


# -------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize(
    "name",
    sorted(p.stem for p in PRESETS.glob("metaworld_*.yaml")),
)
def test_metaworld_presets_validate_with_lerobots_parser(name, tmp_path):
    """Every arm's full flag list parses. Needs world_f's A_hist / world_path flags and the probe's --episodes."""
    spec = compare.load_spec(PRESETS / f"{name}.yaml")
    spec["dataset"]["root"] = str(tmp_path / "not_recorded_yet")  # not the preset's real (maybe recorded) one
    plan = compare.validate(spec, output_dir=str(tmp_path))
    units = compare.plan_units(plan)
    fits = [u.id for u in units if u.kind == "fit_encoder"]
    assert units[0].id == "record" and [u.id for u in units[1 : 1 + len(fits)]] == fits  # fits come first
    assert units[1 + len(fits)].kind == "precompute"
    assert all(compare.unit_commands(plan, u) for u in units)


@pytest.mark.parametrize(("name", "fit_arms", "fit_flags"), [
    ("metaworld_encoder_fit_vs_pixels", {"A_fit": "fit"}, []),
    ("metaworld_encoder_fit_thumbnail", {"A_fit_thumb": "fit", "A_fit6000": "fit:steps6000",
                                         "A_fit6000_s1": "fit:steps6000_s1"}, ["--thumbnail=16"])])
def test_encoder_fit_vs_pixels_presets_pair_the_two_encoders(tmp_path, name, fit_arms, fit_flags):
    """Issue 19's rollout comparisons: A with a fitted encoder vs A with pixels, >= 3 multi-stage tasks and seeds;
    the fit's own flags reach lerobot-wm-fit-encoder and parse there."""
    spec = compare.load_spec(PRESETS / f"{name}.yaml")
    spec["dataset"]["root"] = str(tmp_path / "not_recorded_yet")
    plan = compare.validate(spec, output_dir=str(tmp_path))
    labels = {a.name: compare.encoder_label(plan, a.encoder) for a in plan.arms.values()}
    assert labels == {"A_pixels": "pixels", **fit_arms}
    assert len(plan.seeds) >= 3 and len(plan.tasks) >= 3 and "pick-place-v3" in plan.tasks
    assert plan.comparisons == [(f"{arm}@pred", "A_pixels@pred") for arm in fit_arms]
    units = compare.plan_units(plan)
    fits = [u for u in units if u.kind == "fit_encoder"]
    assert [u.id for u in units[:2]] == ["record", "fit_encoder"] and len(fits) == len(fit_arms)
    (fit_cmd,) = compare.unit_commands(plan, units[1])
    assert fit_cmd[len(fit_cmd) - len(fit_flags) :] == fit_flags
    from lerobot_policy_world_modality.tools import fit_encoder

    for unit in fits:  # exits (fails the test) on an unknown flag
        fit_encoder.build_parser().parse_args(compare.unit_commands(plan, unit)[0][1:])


def test_world_vs_baselines_preset_is_the_issues_grid():
    spec = compare.load_spec(PRESETS / "metaworld_world_vs_baselines.yaml")
    assert len(spec["train"]["seeds"]) >= 3 and len(spec["eval"]["tasks"]) == 3 and spec["eval"]["episodes"] >= 10
    assert "pick-place-v3" in spec["eval"]["tasks"] and spec["dataset"]["record"]["episodes_per_task"] >= 30
    arms = {a["name"]: a for a in spec["arms"]}
    assert {"A", "A_hist", "B_cont", "F_default", "F_cross_attn", "F_in_trunk", "F_oracle"} <= set(arms)
    assert all(arms[n]["rollout_modes"] == ["pred", "zero"] for n in arms if n.startswith("F"))


def test_libero_preset_structure(tmp_path):
    """Offline there is no LIBERO data nor SmolVLA weights: check everything but the flags and the dataset."""
    plan = compare.validate(compare.load_spec(PRESETS / "libero_smolvla_E0_E2.yaml"), str(tmp_path),
                            check_flags=False, require_data=False)  # fmt: skip
    assert plan.arms["E0"].init_from == plan.arms["E2"].init_from  # same init weights
    assert plan.comparisons[0] == ("E2@pred", "E0@none")


def test_explaining_evaluations_write_their_texts_where_the_report_reads_them(dataset_root, tmp_path):
    """An arm evaluated with --policy.explain=true gets --policy.explain_path inside its eval unit's folder
    (lerobot-eval cannot save texts); the report groups the texts per episode with the episode's outcome."""
    vla = {"name": "V", "flags": ["--policy.type=smolvla_world"], "rollout_modes": ["pred", "explain"],
           "rollout_flags": {"explain": ["--policy.explain=true"]}}  # fmt: skip
    spec = tiny_spec(dataset_root, tmp_path / "out", arms=[{"name": "A", "flags": ["--policy.variant=A"]}, vla],
                     comparisons=["V@explain vs A@pred"])  # fmt: skip
    spec["train"]["flags"] = [f for f in COMMON if f != "--policy.type=world_f"]
    spec["arms"][0]["flags"].insert(0, "--policy.type=world_f")
    plan = compare.validate(spec, check_flags=False, require_data=False)
    units = {u.id: u for u in compare.plan_units(plan)}
    cmd = compare.unit_commands(plan, units["eval/V/seed0/button-press-v3/explain"])[0]
    out = next(f for f in cmd if f.startswith("--output_dir=")).split("=", 1)[1]
    assert f"--policy.explain_path={Path(out) / compare.EXPLANATIONS_FILE}" in cmd
    for plain in ("eval/V/seed0/button-press-v3/pred", "eval/A/seed0/button-press-v3/pred"):
        assert not any(f.startswith("--policy.explain") for f in compare.unit_commands(plan, units[plain])[0])

    # What the policy writes (two vectorised envs: episode k of the policy holds evaluated episodes 2k, 2k+1).
    texts = tmp_path / "explanations.jsonl"
    rows = [(0, 0, 0, "reach the button"), (0, 0, 1, "reach"), (0, 5, 0, "reach the button"), (0, 10, 0, "press it"),
            (1, 0, 1, "look around")]  # fmt: skip
    texts.write_text("".join(json.dumps({"episode": e, "step": s, "env": v, "text": t}) + "\n" for e, s, v, t in rows))
    episodes = compare.read_explanations(texts, [True, False, True, False], batch_size=2, eval_seed=1000)
    assert [(e["episode"], e["seed"], e["success"]) for e in episodes] == [(0, 1000, True), (1, 1001, False), (3, 1003, False)]
    assert episodes[0]["texts"] == [[0, "reach the button"], [5, "reach the button"], [10, "press it"]]

    record = {"id": "eval/V/seed0/button-press-v3/explain", "kind": "eval", "seconds": 1.0, "commands": [],
              "successes": [True, False, True, False], "explanations_file": str(texts), "explanations": episodes}  # fmt: skip
    compare._atomic_write(compare.record_path(plan, record["id"]), json.dumps(record))
    compare.write_reports(plan, list(units.values()))
    md = (plan.out / "results.md").read_text()
    assert "## Explanations at rollout" in md and "### V@explain, seed 0, button-press-v3" in md
    assert "- episode 0 (env seed 1000, success): steps 0-5: reach the button; step 10: press it" in md
    assert "- episode 1 (env seed 1001, failure): step 0: reach" in md
    assert "<h3>V@explain, seed 0, button-press-v3</h3>" in (plan.out / "report.html").read_text()


def test_comparisons_are_also_reported_per_task(dataset_root, tmp_path):
    """A task both arms solve dilutes the pooled test: the report splits each comparison per task too."""
    spec = tiny_spec(dataset_root, tmp_path / "out")
    spec["eval"] = dict(spec["eval"], tasks=["button-press-v3", "drawer-open-v3"], episodes=3)
    plan = compare.validate(spec, check_flags=False, require_data=False)
    units = compare.plan_units(plan)
    for u in units:
        if u.kind == "eval":  # both arms solve button-press; only F solves drawer-open
            won = u.task == "button-press-v3" or u.arm == "F"
            compare._atomic_write(compare.record_path(plan, u.id), json.dumps(
                {"id": u.id, "kind": "eval", "seconds": 1.0, "commands": [], "successes": [won] * 3}))
    report = compare.write_reports(plan, units)
    comp = report["comparisons"][0]
    assert (comp["pairs"], comp["x_only"], comp["y_only"]) == (12, 6, 0)
    per = comp["per_task"]
    assert (per["drawer-open-v3"]["pairs"], per["drawer-open-v3"]["x_only"]) == (6, 6)
    assert per["button-press-v3"]["p_value"] == 1.0 and per["drawer-open-v3"]["p_value"] == pytest.approx(0.03125)
    md = (plan.out / "results.md").read_text()
    assert "## Comparisons per task" in md
    assert "| F@pred vs A@pred | drawer-open-v3 | 6 | 100.0% | 0.0% | +100.0 pts" in md
    # The per-task success chart, in the page and as a file for docs.
    assert (plan.out / "success_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'alt="Success rate per task: A@pred, F@pred"' in (plan.out / "report.html").read_text()


# ----------------------------------------------------------------------------------------- end to end
def _compare(spec_path: Path, *extra, wait=True):
    env = {**os.environ, "MUJOCO_GL": "egl"}
    cmd = [str(BIN / "lerobot-wm-compare"), str(spec_path), "--jobs=2", *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_end_to_end_killed_rerun_resumed_and_noop(dataset_root, tmp_path):
    out = tmp_path / "out"
    spec_path = tmp_path / "tiny.yaml"
    # One seed per arm: the report's pairing across seeds is checked without subprocesses (seed-major test).
    spec = tiny_spec(dataset_root, out)
    spec["train"]["seeds"] = [0]
    spec_path.write_text(yaml.safe_dump(spec))

    # Kill the tool (SIGKILL: no clean-up) as soon as it starts a training: its children die with it. The
    # trigger is the tool's own progress line, read from its pipe (pollers that sleep were seen to lag by
    # ~20 s on this shared machine, longer than a tiny training).
    proc = _compare(spec_path, wait=False)
    for line in proc.stdout:
        if "train/A/seed0: started" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not list(out.glob("units/train*"))
    pid_file = out / "train/A/.seed0.pid"  # the training child, if the tool got to start it, died with it
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    for _ in range(100):
        stat = Path(f"/proc/{pid}/stat")
        if pid is None or not stat.exists() or stat.read_text().split(") ", 1)[1].startswith("Z"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"lerobot-train (pid {pid}) outlived the killed tool")

    res = _compare(spec_path)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    units = {u["id"]: u for u in report["units"]}
    assert len(units) == 6 and report["complete"] and all(u["status"] == "done" for u in units.values())
    for run in out.glob("train/*/seed*"):  # every run, resumed or not, reached the shared budget
        assert json.loads((run / "checkpoints/last/training_state/training_step.json").read_text())["step"] == 300
    rows = {(r["arm"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {("A", "pred"), ("F", "pred")} and all(r["episodes"] == 2 for r in rows.values())
    comp = report["comparisons"][0]
    assert comp["pairs"] == 2 and comp["verdict"] in ("F@pred better", "A@pred better",
                                                       "no detectable difference at this sample size")  # fmt: skip
    assert [(p["arm"], p["seed"]) for p in report["probes"]] == [("F", 0)]
    assert all(isinstance(p["reads_memory"], bool) and "world_cos_h1" in p["world"] for p in report["probes"])
    assert all(c["checkpoints"] and c["console_loss"] for c in report["curves"].values())
    md = (out / "results.md").read_text()
    change = report["probes"][0]["action_loss_change_vs_pred"]
    assert f"| F | 0 | {'yes' if report['probes'][0]['reads_memory'] else 'NO'} | {100 * change['shuffle']:+.1f}% | " in md
    for uid in units:
        assert f"| {uid} | done |" in md
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') >= 4 and "McNemar" in page and "lerobot-train" in page

    # A training killed after its first checkpoint (made from a finished run: its later checkpoints, its
    # record and its evaluations' records removed) resumes from that checkpoint and ends the same way.
    run = out / "train/F/seed0"
    ckpts = run / "checkpoints"
    for step in ("000200", "000300"):
        shutil.rmtree(ckpts / step)
    (ckpts / "last").unlink()
    (ckpts / "last").symlink_to("000100")
    for rec in [*out.glob("units/train__F__seed0.json"), *out.glob("units/eval__F__seed0__*.json"),
                *out.glob("units/probe__F__seed0.json")]:  # fmt: skip
        rec.unlink()
    res = _compare(spec_path)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    assert "train/F/seed0: resuming from its checkpoint at step 100" in res.stdout
    assert res.stdout.count(": started") == 3  # the training, its evaluation and its probe, nothing else
    assert json.loads((ckpts / "last/training_state/training_step.json").read_text())["step"] == 300
    rec = json.loads((out / "units/train__F__seed0.json").read_text())
    assert rec["commands"][-1].endswith("--resume=true") and "--config_path=" in rec["commands"][-1]
    md = (out / "results.md").read_text()
    report = json.loads((out / "report.json").read_text())  # the resumed run's probe replaced the first one
    change = report["probes"][0]["action_loss_change_vs_pred"]
    assert f"| F | 0 | {'yes' if report['probes'][0]['reads_memory'] else 'NO'} | {100 * change['shuffle']:+.1f}% | " in md
    for uid in units:
        assert f"| {uid} | done |" in md

    # A rerun runs nothing and writes the same tables.
    res2 = _compare(spec_path)
    assert res2.returncode == 0, res2.stderr[-3000:]
    assert "nothing to do" in res2.stdout and "started" not in res2.stdout
    assert (out / "results.md").read_text() == md


@pytest.mark.slow
def test_end_to_end_arms_with_their_own_encoders(dataset_root, tmp_path):
    """Two arms, `pixels` and `pixels-8`: two precomputes, each training records (and reads) its own encoder."""
    out = tmp_path / "out"
    spec = tiny_spec(dataset_root, out, arms=[{"name": "P16", "flags": ["--policy.variant=A"]},
                                              {"name": "P8", "encoder": "pixels-8", "flags": ["--policy.variant=A"]}],
                     comparisons=["P8@pred vs P16@pred"])  # fmt: skip
    spec["train"] = {**spec["train"], "seeds": [0], "steps": 20, "save_freq": 20, "log_freq": 10}
    spec["eval"] = {**spec["eval"], "episodes": 1, "episode_length": 5, "videos": 0}
    spec_path = tmp_path / "two_encoders.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    # --no_evals: the trainings (and the precomputes they need) run, no evaluation does; the report says so.
    res = _compare(spec_path, "--no_evals")
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    assert sorted(p.name for p in (out / "units").glob("train__*")) == ["train__P16__seed0.json", "train__P8__seed0.json"]
    assert not list((out / "units").glob("eval__*")) and not re.search(r"eval/\S+: started", res.stdout)
    assert not json.loads((out / "report.json").read_text())["complete"]
    # The same command without it adds the evaluations and nothing else.
    res = _compare(spec_path)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    assert res.stdout.count(": started") == 2 and "eval/P16/seed0" in res.stdout and "train/P16/seed0: done - skipped" in res.stdout
    for arm, encoder, dim in (("P16", "pixels", 16), ("P8", "pixels-8", 8)):
        model = out / "train" / arm / "seed0/checkpoints/last/pretrained_model"
        assert json.loads((model / "train_config.json").read_text())["policy"]["encoder"] == encoder
        rec = json.loads((out / "units" / f"precompute__{encoder}.json").read_text())
        assert f"--encoder={encoder}" in rec["commands"][0]
        cache = [json.loads(m.read_text()) for m in (out / "cache").rglob("meta.json")]
        assert any(m.get("encoder", {}).get("name") == f"pixels-{dim}" and m.get("dim") == dim * dim * 3 for m in cache)
    report = json.loads((out / "report.json").read_text())
    assert report["complete"]
    assert {a: v["encoder"] for a, v in report["arms"].items()} == {"P16": "pixels", "P8": "pixels-8"}


def test_rollout_flags_name_variants_of_one_checkpoint(dataset_root, tmp_path):
    """`rollout_flags` adds named rollout variants (e.g. planning on) evaluated on the same checkpoints and env
    seeds; their flags reach lerobot-eval, and a variant LeRobot would reject stops the spec before it runs."""
    planner = {"name": "P", "flags": ["--policy.variant=A", "--policy.dynamics=action_conditioned",
                                      "--policy.progress_head=true"],
               "rollout_modes": ["pred", "cem"], "rollout_flags": {"cem": ["--policy.planner=cem", "--policy.planner_samples=4"]}}  # fmt: skip
    spec = tiny_spec(dataset_root, tmp_path / "out", arms=[{"name": "A", "flags": ["--policy.variant=A"]}, planner],
                     comparisons=["P@cem vs P@pred", "P@cem vs A@pred"])  # fmt: skip
    plan = compare.validate(spec)
    assert plan.arms["P"].modes == ["pred", "cem"] and plan.comparisons[0] == ("P@cem", "P@pred")
    units = {u.id: u for u in compare.plan_units(plan)}
    cem = compare.unit_commands(plan, units["eval/P/seed0/button-press-v3/cem"])[0]
    pred = compare.unit_commands(plan, units["eval/P/seed0/button-press-v3/pred"])[0]
    assert "--policy.planner=cem" in cem and "--policy.planner_samples=4" in cem
    assert not any(f.startswith("--policy.memory_mode_rollout") for f in cem)
    assert "--policy.memory_mode_rollout=pred" in pred and "--policy.planner=cem" not in pred
    assert [f for f in cem if f.startswith("--seed=")] == [f for f in pred if f.startswith("--seed=")]

    no_model = dict(planner, flags=["--policy.variant=A"])  # a planner without a world model: rejected up front
    with pytest.raises(SpecError, match=r"Arm 'P': rollout_flags 'cem'.*dynamics"):
        compare.validate(tiny_spec(dataset_root, tmp_path, arms=[no_model], comparisons=["P@cem vs P@pred"]))
    for bad, match in [({"zero": ["--policy.planner=cem"]}, "not a memory mode"), ({"cem": ["--steps=3"]}, "--policy"),
                       ({"cem": []}, "--policy")]:  # fmt: skip
        with pytest.raises(SpecError, match=match):
            compare.validate(tiny_spec(dataset_root, tmp_path, arms=[dict(planner, rollout_flags=bad)],
                                             comparisons=["P@pred vs P@pred"]))
