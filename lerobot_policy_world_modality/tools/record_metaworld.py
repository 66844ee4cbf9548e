"""Record MetaWorld scripted-expert demonstrations into a LeRobotDataset (`lerobot-wm-record-metaworld`).

Frames come from LeRobot's own `lerobot.envs.metaworld.MetaworldEnv` (obs_type "pixels_agent_pos"), so a
recorded `observation.image` is exactly the frame `lerobot-eval --env.type=metaworld` hands a policy for the
same simulator state (same camera, same flip), and `observation.state` is the same 4-d `agent_pos`.
The task string is LeRobot's instruction for the task (`env.task_description`), the one eval passes as `task`.

Crash safety. LeRobotDataset 0.4.4 appends every episode to shared parquet/video files and only writes the
parquet footers in `finalize()`, so a killed recorder leaves a dataset that cannot be loaded. Instead:
each episode is recorded into its own one-episode LeRobotDataset under `<root>.recording/`, finalized, and
committed by an atomic rename plus a small JSON record. When every episode is in, the episodes are merged
with LeRobot's `aggregate_datasets` into `<root>.recording/merge`, which is renamed to `<root>` in one step.
A rerun after a kill keeps committed episodes, discards partial ones and carries on; `<root>` either does
not exist or is complete.
"""

from __future__ import annotations

import argparse
import difflib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import time
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..constants import EPISODE_SUCCESS, NEXT_REWARD
from ..fileio import TEMP_MARK, atomic_write_json, fsync_dir

STATE_NAMES = ["hand_x", "hand_y", "hand_z", "gripper_distance"]
ACTION_NAMES = ["delta_x", "delta_y", "delta_z", "gripper"]
RECORDING_INFO = "meta/wm_recording.json"  # provenance file written into the finished dataset
STAGING_SUFFIX = ".recording"
# lerobot-eval's MetaWorld fps (`lerobot.envs.configs.MetaworldEnv.fps`; the tests check they agree). A constant
# because importing lerobot.envs costs seconds, which would make `--help` and the "already recorded" path slow.
METAWORLD_FPS = 80
# Settings an interrupted recording may be resumed with changed values: they decide how many attempts are made
# and kept, never what an attempt records (every attempt is seeded on its own).
RESUMABLE_FIELDS = ("episodes_per_task", "max_attempts_per_task")
# Optional column with MetaWorld's raw 39-d observation (hand, gripper, object positions and quaternions, goal).
# Not named observation.*: LeRobot turns observation.* keys into policy inputs, and lerobot-eval's env has no
# such input, so a policy trained on it could not be evaluated. It is ground truth for probes
# (benchmarks/encoder_bench.py), not an observation.
SIM_STATE_KEY = "sim.metaworld_obs"


class RecordError(RuntimeError):
    """A recording request that cannot be carried out; the message says what to do instead."""


@dataclass
class RecordPlan:
    """Everything that determines the recorded content; a resumed run must match it exactly."""

    repo_id: str  # LeRobot repo id of the dataset (also the name used to reload it)
    tasks: list[str]  # MetaWorld task names, e.g. ["drawer-close-v3"]
    episodes_per_task: int  # episodes kept per task
    seed: int  # base seed; each attempt derives its own (see episode_seed)
    action_noise: float  # std of Gaussian noise added to the expert action before clipping
    success_only: bool  # keep only episodes in which the expert succeeded
    max_attempts_per_task: int  # give up on a task after this many attempts (success_only)
    max_steps: int  # hard cap on steps (frames) per episode
    steps_after_success: int  # extra steps recorded after the first success
    fps: int  # dataset fps (MetaWorld env's fps by default)
    use_videos: bool  # store observation.image as video (True) or as PNG images in parquet (False)
    vcodec: str  # LeRobot video codec name when use_videos
    store_sim_state: bool = False  # also store MetaWorld's raw 39-d observation as SIM_STATE_KEY
    actions: str = "expert"  # who acts: "expert" (scripted + action_noise), "random" (uniform in [-1, 1]) or "policy"
    policy_path: str | None = None  # checkpoint (pretrained_model dir) that acts when actions == "policy"
    # Every frame carries next.reward; always on, false only in plans written before it existed, so an
    # interrupted recording of an older version is refused instead of mixing episodes with and without it.
    store_reward: bool = True


def plan_with_defaults(plan: dict) -> dict:
    """A stored plan with the fields added after it was written set to their defaults (so old recordings match)."""
    return {"store_sim_state": False, "actions": "expert", "policy_path": None, "store_reward": False, **plan}


def episode_seed(seed: int, task: str, attempt: int) -> int:
    """Seed of global `np.random` before the reset of attempt `attempt` of `task`.

    MetaWorld's reset ignores `reset(seed=...)` and draws the object/goal positions from global `np.random`.
    Deriving the seed from (seed, task, attempt) makes every attempt reproducible on its own, so a resumed
    recording produces the same episodes as an uninterrupted one (MetaWorld's reset does not depend on the
    previous episode). crc32 gives a task hash that is stable across processes, unlike `hash()`.
    """
    seq = np.random.SeedSequence([seed, zlib.crc32(task.encode()), attempt])
    return int(seq.generate_state(1)[0])


def _noise_rng(seed: int, task: str, attempt: int) -> np.random.Generator:
    """Private generator for the action noise, independent of MetaWorld's use of global np.random."""
    return np.random.default_rng([seed, zlib.crc32(task.encode()), attempt, 1])


def _metaworld_config() -> dict:
    """LeRobot's MetaWorld task table (instructions, difficulty groups), read without importing lerobot.envs."""
    spec = importlib.util.find_spec("lerobot")
    path = Path(next(iter(spec.submodule_search_locations))) / "envs" / "metaworld_config.json"
    if path.exists():
        return json.loads(path.read_text())
    from lerobot.envs.metaworld import (  # if a release moves the file
        DIFFICULTY_TO_TASKS,
        TASK_DESCRIPTIONS,
    )

    return {"TASK_DESCRIPTIONS": TASK_DESCRIPTIONS, "DIFFICULTY_TO_TASKS": DIFFICULTY_TO_TASKS}


def resolve_tasks(spec: str) -> list[str]:
    """Turn "drawer-close-v3,button-press-v3" or a difficulty group ("easy") into LeRobot task names."""
    config = _metaworld_config()
    TASK_DESCRIPTIONS, DIFFICULTY_TO_TASKS = config["TASK_DESCRIPTIONS"], config["DIFFICULTY_TO_TASKS"]
    tasks: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        item = item.removeprefix("metaworld-")  # LeRobot's env accepts the prefixed form too
        names = DIFFICULTY_TO_TASKS.get(item, [item])
        for name in names:
            if name not in TASK_DESCRIPTIONS:
                close = difflib.get_close_matches(name, list(TASK_DESCRIPTIONS), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise RecordError(
                    f"Unknown MetaWorld task '{name}'.{hint} Valid names are LeRobot's MetaWorld tasks "
                    f"(e.g. drawer-close-v3) or a group in {sorted(DIFFICULTY_TO_TASKS)}."
                )
            if name not in tasks:
                tasks.append(name)
    if not tasks:
        raise RecordError("No task given: pass e.g. --env.task drawer-close-v3")
    return tasks


def dataset_features(
    use_videos: bool, store_sim_state: bool = False, mark_success: bool = False, store_reward: bool = True
) -> dict:
    """LeRobot feature spec of the recorded dataset (the layout of LeRobot's MetaWorld env and datasets).

    mark_success: add EPISODE_SUCCESS (1.0 on every frame of an episode that succeeded, else 0.0), for
    recordings that keep failures. Not an `observation.*` key, so it never becomes a policy input.
    Every frame carries `next.reward`, MetaWorld's dense reward for the step its action starts (LeRobot's
    reward key; a policy's reward head learns from it, see docs/planning.md).
    """
    extra = {SIM_STATE_KEY: {"dtype": "float32", "shape": (39,), "names": None}} if store_sim_state else {}
    if store_reward:
        extra[NEXT_REWARD] = {"dtype": "float32", "shape": (1,), "names": None}
    if mark_success:
        extra[EPISODE_SUCCESS] = {"dtype": "float32", "shape": (1,), "names": None}
    return {
        "observation.image": {
            "dtype": "video" if use_videos else "image",
            "shape": (480, 480, 3),  # LeRobot's MetaWorld env always renders 480x480 (see docs/recording.md)
            "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (4,), "names": STATE_NAMES},
        "action": {"dtype": "float32", "shape": (4,), "names": ACTION_NAMES},
        **extra,
    }


class Staging:
    """The `<root>.recording` directory: plan, committed attempts, one-episode datasets, merge target."""

    def __init__(self, root: Path):
        self.root = root
        self.dir = root.parent / (root.name + STAGING_SUFFIX)
        self.attempts_dir = self.dir / "attempts"
        self.episodes_dir = self.dir / "episodes"
        self.merge_dir = self.dir / "merge"
        self._lock_file = None

    def open(self, plan: RecordPlan) -> None:
        """Create or reopen the staging dir for `plan`, lock it and drop anything left half-written."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.dir / ".lock", "w")  # noqa: SIM115 - held for the whole run
        try:
            # A second recorder on the same root would interleave writes; the lock dies with the process.
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise RecordError(
                f"Another recorder is writing {self.dir}; wait for it or pick another --dataset.root."
            ) from err
        plan_path = self.dir / "plan.json"
        if plan_path.exists():
            old = plan_with_defaults(json.loads(plan_path.read_text()))
            diff = {
                k: (old.get(k), v)
                for k, v in asdict(plan).items()
                if old.get(k) != v and k not in RESUMABLE_FIELDS
            }
            if diff:
                changes = "; ".join(f"{k}: recorded {a!r}, now {b!r}" for k, (a, b) in diff.items())
                raise RecordError(
                    f"An interrupted recording in {self.dir} used different settings ({changes}). "
                    f"Rerun with the original flags to resume it, or add --overwrite true to discard it."
                )
        atomic_write_json(plan_path, asdict(plan))  # records new RESUMABLE_FIELDS values
        self.attempts_dir.mkdir(exist_ok=True)
        self.episodes_dir.mkdir(exist_ok=True)
        # Partial state from a killed run: temp episode dirs, an unfinished merge, episodes without a record.
        shutil.rmtree(self.merge_dir, ignore_errors=True)
        for p in self.episodes_dir.iterdir():
            if p.name.startswith(".tmp-") or not (self.attempts_dir / f"{p.name}.json").exists():
                shutil.rmtree(p, ignore_errors=True)
        for rec in self.attempts_dir.glob("*.json"):
            data = json.loads(rec.read_text())
            if data["kept"] and not (self.episodes_dir / rec.stem).is_dir():
                rec.unlink()  # record without its episode: redo that attempt
        for tmp in self.attempts_dir.glob(f".*{TEMP_MARK}*"):
            tmp.unlink()

    def records(self, task: str) -> dict[int, dict]:
        """Committed attempt records of `task`, by attempt number."""
        out = {}
        for rec in self.attempts_dir.glob(f"{task}__*.json"):
            data = json.loads(rec.read_text())
            out[data["attempt"]] = data
        return out

    def commit(self, name: str, tmp_episode: Path | None, record: dict) -> None:
        """Make an attempt durable: move its finished episode into place, then write its record."""
        if tmp_episode is not None:
            final = self.episodes_dir / name
            os.rename(tmp_episode, final)  # atomic: the episode dir is either absent or complete
            fsync_dir(self.episodes_dir)
        atomic_write_json(self.attempts_dir / f"{name}.json", record)  # the commit point

    def remove(self) -> None:
        """Delete the staging dir (after a successful merge, or on --overwrite)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def _attempt_name(task: str, attempt: int) -> str:
    return f"{task}__{attempt:05d}"


class CheckpointActor:
    """A trained policy acting in the recorder's env the way `lerobot-eval`'s rollout drives it.

    Loads the checkpoint with its saved pre/post-processors (on the CPU); each step the formatted env
    observation goes through LeRobot's `preprocess_observation`, gets the task text, the preprocessor,
    `select_action` and the postprocessor (MetaWorld's env processors are identities). `reset()` starts
    an episode: the policy's action queue and world history are cleared.
    """

    def __init__(self, path: str):
        from lerobot.configs.policies import PreTrainedConfig
        from lerobot.policies.factory import get_policy_class, make_pre_post_processors

        import lerobot_policy_world_modality  # noqa: F401  (registers our policy types)

        cfg = PreTrainedConfig.from_pretrained(path)
        cfg.device = "cpu"
        cfg.pretrained_path = path
        self.policy = get_policy_class(cfg.type).from_pretrained(path, config=cfg)
        self.policy.eval()
        self.pre, self.post = make_pre_post_processors(
            policy_cfg=cfg, pretrained_path=path, preprocessor_overrides={"device_processor": {"device": "cpu"}}
        )

    def reset(self) -> None:
        """Start an episode."""
        self.policy.reset()

    def batch(self, obs: dict, task: str) -> dict:
        """The preprocessed policy batch of one formatted observation ({"pixels", "agent_pos"})."""
        from lerobot.envs.utils import preprocess_observation

        batch = preprocess_observation({"pixels": obs["pixels"][None], "agent_pos": np.asarray(obs["agent_pos"])[None]})
        return self.pre({**batch, "task": [task]})

    def unnormalise(self, actions) -> np.ndarray:
        """Env actions [..., A] (float64) of normalised policy actions [..., A] (the postprocessor's)."""
        shape = actions.shape
        return self.post(actions.reshape(-1, shape[-1])).cpu().numpy().reshape(shape).astype(np.float64)

    def act(self, obs: dict, task: str) -> np.ndarray:
        """The policy's action [A] for one formatted observation ({"pixels", "agent_pos"})."""
        import torch

        batch = self.batch(obs, task)
        with torch.inference_mode():
            action = self.policy.select_action(batch)
        return self.unnormalise(action)[0]


def run_attempt(env, plan: RecordPlan, task: str, attempt: int, out_dir: Path, on_step=None, actor=None) -> dict:
    """Run one expert episode and record it as a finalized one-episode LeRobotDataset in `out_dir`.

    The episode is saved only if it is kept (`success_only` drops failures); the record dict says what happened.

    The expert sees MetaWorld's raw 39-d observation, so the env is driven through its inner MetaWorld env
    (`env._env`) and every observation is formatted by LeRobot's own `env._format_raw_obs`, i.e. the code
    `MetaworldEnv.reset/step` use. `MetaworldEnv.step` itself is not used because it resets the simulator
    as soon as the task succeeds, which would make the steps recorded after success part of a new episode.
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset.create(
        repo_id=plan.repo_id,
        fps=plan.fps,
        features=dataset_features(plan.use_videos, plan.store_sim_state, mark_success=not plan.success_only,
                                  store_reward=plan.store_reward),  # fmt: skip
        root=out_dir,
        robot_type="sawyer",
        use_videos=plan.use_videos,
        vcodec=plan.vcodec,
        image_writer_threads=2,  # PNG writes overlap with the next simulator step
    )
    np.random.seed(episode_seed(plan.seed, task, attempt))
    rng = _noise_rng(plan.seed, task, attempt)
    raw_obs, _ = env._env.reset()
    if actor is not None:
        actor.reset()
    success_step = None
    steps = 0
    # Frames wait here until the episode ends when failures are kept: their success mark is known only then.
    pending: list[dict] = []
    while steps < plan.max_steps:
        # Rendering is most of the cost, so the frame is rendered here, only for steps that are recorded.
        obs = env._format_raw_obs(raw_obs)
        if plan.actions == "random":
            expert = rng.uniform(-1.0, 1.0, size=4)
        elif plan.actions == "policy":
            expert = actor.act(obs, env.task_description)
        else:
            expert = np.asarray(env.expert_policy.get_action(raw_obs), dtype=np.float64)
        if plan.action_noise > 0 and plan.actions != "random":
            expert = expert + rng.normal(0.0, plan.action_noise, size=expert.shape)
        # The executed action is the clipped float32 one; recording exactly it lets a replay reproduce frames.
        action = np.clip(expert, -1.0, 1.0).astype(np.float32)
        frame = {
            "observation.image": obs["pixels"],
            "observation.state": np.asarray(obs["agent_pos"], dtype=np.float32),
            "action": action,
            "task": env.task_description,
        }
        if plan.store_sim_state:
            frame[SIM_STATE_KEY] = np.asarray(raw_obs, dtype=np.float32)
        raw_obs, reward, _terminated, truncated, info = env._env.step(action)
        if plan.store_reward:
            frame[NEXT_REWARD] = np.array([reward], dtype=np.float32)
        if plan.success_only:
            dataset.add_frame(frame)
        else:
            pending.append(frame)
        steps += 1
        if success_step is None and bool(info.get("success", 0)):
            success_step = steps
        if on_step is not None:
            on_step(steps, success_step is not None)
        if success_step is not None and steps >= success_step + plan.steps_after_success:
            break
        if truncated:
            break  # MetaWorld's own 500-step limit
    success = success_step is not None
    kept = success or not plan.success_only
    for frame in pending:
        dataset.add_frame({**frame, EPISODE_SUCCESS: np.array([float(success)], dtype=np.float32)})
    if kept:
        dataset.save_episode()
    dataset.stop_image_writer()
    dataset.finalize()
    return {"task": task, "attempt": attempt, "success": success, "success_step": success_step,
            "frames": steps, "kept": kept}


def merge(staging: Staging, plan: RecordPlan, names: list[str]) -> None:
    """Aggregate the committed one-episode datasets into `<root>` (built aside, then renamed in one step)."""
    from lerobot.datasets.aggregate import aggregate_datasets

    roots = [staging.episodes_dir / n for n in names]
    aggregate_datasets(repo_ids=[plan.repo_id] * len(roots), roots=roots, aggr_repo_id=plan.repo_id,
                       aggr_root=staging.merge_dir)


def _load_records_summary(staging: Staging, plan: RecordPlan) -> dict:
    """Per-task and total counts from the committed attempt records."""
    per_task = {}
    for task in plan.tasks:
        recs = staging.records(task).values()
        kept = sorted((r for r in recs if r["kept"]), key=lambda r: r["attempt"])[: plan.episodes_per_task]
        per_task[task] = {
            "attempts": len(recs),
            "expert_successes": sum(r["success"] for r in recs),
            "episodes": len(kept),
            "frames": sum(r["frames"] for r in kept),
        }
    return per_task


def record(plan: RecordPlan, root: Path, overwrite: bool = False) -> dict:
    """Record `plan` into `root` (resuming an interrupted run) and return the summary dict."""
    staging = Staging(root)
    info_path = root / RECORDING_INFO
    if overwrite:
        staging.remove()
        shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        done = json.loads(info_path.read_text()) if info_path.exists() else None
        same = done is not None and {k: v for k, v in plan_with_defaults(done["plan"]).items() if k != "max_attempts_per_task"} == {
            k: v for k, v in asdict(plan).items() if k != "max_attempts_per_task"
        }  # how many attempts were allowed does not change a finished dataset
        if same:
            staging.remove()  # a kill after the final rename can leave it behind
            return {**done["summary"], "reused": True}
        what = "was recorded with other settings" if done else "exists and was not written by this recorder"
        raise RecordError(
            f"Dataset root {root} {what}. Pick another --dataset.root, or add --overwrite true to replace it."
        )

    staging.open(plan)
    from lerobot.envs.metaworld import (
        MetaworldEnv,  # heavy (mujoco, lerobot.envs): only when recording
    )

    start = time.time()
    total = plan.episodes_per_task * len(plan.tasks)
    kept_before = sum(s["episodes"] for s in _load_records_summary(staging, plan).values())
    if kept_before:
        print(f"Resuming {staging.dir}: {kept_before}/{total} episodes already recorded.", flush=True)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=kept_before, desc="episodes", unit="ep", dynamic_ncols=True)
    actor = CheckpointActor(plan.policy_path) if plan.actions == "policy" else None
    names: list[str] = []
    new_frames = 0
    for task in plan.tasks:
        records = staging.records(task)
        env = None
        attempt = 0
        while True:
            kept = sorted(a for a, r in records.items() if r["kept"])
            if len(kept) >= plan.episodes_per_task:
                break
            if attempt >= plan.max_attempts_per_task:
                bar.close()
                raise RecordError(
                    f"The expert kept only {len(kept)}/{plan.episodes_per_task} episodes of {task} in "
                    f"{attempt} attempts. Rerun with a higher --max_attempts_per_task to resume from here, or "
                    f"start over (--overwrite true) with a lower --action_noise, a higher --max_steps "
                    f"(now {plan.max_steps}) or --success_only false."
                )
            if attempt in records:
                attempt += 1
                continue
            if env is None:
                env = MetaworldEnv(task=task, obs_type="pixels_agent_pos")
            name = _attempt_name(task, attempt)
            tmp = staging.episodes_dir / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)

            def on_step(step, succeeded, _task=task, _attempt=attempt):
                done = " ok" if succeeded else ""
                bar.set_postfix_str(f"{_task} #{_attempt} step {step}{done}", refresh=False)

            t0 = time.time()
            rec = run_attempt(env, plan, task, attempt, tmp, on_step=on_step, actor=actor)
            rec["seconds"] = round(time.time() - t0, 2)
            if not rec["kept"]:
                shutil.rmtree(tmp, ignore_errors=True)
            staging.commit(name, tmp if rec["kept"] else None, rec)
            records[attempt] = rec
            if rec["kept"]:
                new_frames += rec["frames"]
                bar.update(1)
            attempt += 1
        if env is not None:
            env.close()  # frees the EGL context now rather than in a noisy interpreter-exit __del__
        kept = sorted(a for a, r in records.items() if r["kept"])[: plan.episodes_per_task]
        names += [_attempt_name(task, a) for a in kept]
    bar.close()

    per_task = _load_records_summary(staging, plan)
    print(f"Merging {len(names)} episodes into {root} ...", flush=True)
    merge(staging, plan, names)
    attempts = sum(s["attempts"] for s in per_task.values())
    successes = sum(s["expert_successes"] for s in per_task.values())
    elapsed = time.time() - start
    summary = {
        "repo_id": plan.repo_id,
        "root": str(root),
        "episodes": len(names),
        "frames": sum(s["frames"] for s in per_task.values()),
        "expert_attempts": attempts,
        "expert_successes": successes,
        "expert_success_rate": successes / attempts if attempts else 0.0,
        "per_task": per_task,
        "seconds_this_run": round(elapsed, 1),
        "frames_this_run": new_frames,
    }
    atomic_write_json(staging.merge_dir / RECORDING_INFO, {"plan": asdict(plan), "summary": summary})
    root.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging.merge_dir, root)  # the dataset appears complete, in one step
    fsync_dir(root.parent)
    staging.remove()
    return {**summary, "reused": False}


def _bool(text: str) -> bool:
    """Parse LeRobot/draccus-style booleans (true/false/1/0/yes/no)."""
    low = str(text).strip().lower()
    if low in {"1", "true", "yes", "y", "on"}:
        return True
    if low in {"0", "false", "no", "n", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """CLI parser; dotted flags follow LeRobot's naming (`--dataset.repo_id`, `--env.task`)."""
    p = argparse.ArgumentParser(
        prog="lerobot-wm-record-metaworld",
        description="Record MetaWorld scripted-expert demonstrations into a LeRobotDataset "
        "(observation.image, observation.state, action, task). Resumes after an interruption.",
    )
    p.add_argument("--dataset.repo_id", dest="repo_id", required=True, help="e.g. local/metaworld_drawer_close")
    p.add_argument("--dataset.root", dest="root", default=None,
                   help="output dir (default: $HF_LEROBOT_HOME/<repo_id>)")
    p.add_argument("--env.task", "--tasks", dest="tasks", required=True,
                   help="task(s), comma-separated, or a difficulty group (easy, medium, hard, very_hard)")
    p.add_argument("--episodes_per_task", "--dataset.num_episodes", dest="episodes_per_task", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--action_noise", type=float, default=0.1, help="std of Gaussian noise on expert actions")
    p.add_argument("--actions", choices=("expert", "random", "policy"), default="expert",
                   help="who acts: the scripted expert (plus --action_noise), uniform random actions, or the "
                        "checkpoint given by --policy.path (plus --action_noise)")
    p.add_argument("--policy.path", dest="policy_path", default=None,
                   help="pretrained_model directory of a checkpoint that acts with --actions policy")
    p.add_argument("--success_only", type=_bool, nargs="?", const=True, default=True,
                   help=f"keep only successful episodes; with false every episode is kept and marked in {EPISODE_SUCCESS}")
    p.add_argument("--max_attempts_per_task", type=int, default=None, help="default: 3 x episodes_per_task")
    p.add_argument("--max_steps", type=int, default=200, help="max steps (frames) per episode, <= 500")
    p.add_argument("--steps_after_success", type=int, default=5)
    p.add_argument("--dataset.fps", "--fps", dest="fps", type=int, default=METAWORLD_FPS)
    p.add_argument("--dataset.use_videos", "--use_videos", dest="use_videos", type=_bool, nargs="?", const=True,
                   default=True)
    p.add_argument("--dataset.vcodec", "--vcodec", dest="vcodec", default="libsvtav1")
    p.add_argument("--store_sim_state", type=_bool, nargs="?", const=True, default=False,
                   help=f"also store MetaWorld's raw 39-d observation (object positions) as {SIM_STATE_KEY}, for probes")
    p.add_argument("--overwrite", type=_bool, nargs="?", const=True, default=False,
                   help="discard an existing dataset or interrupted recording at this root")
    return p


def _check(args) -> None:
    """Reject bad numbers before touching the simulator."""
    if args.episodes_per_task < 1:
        raise RecordError(f"--episodes_per_task must be >= 1, got {args.episodes_per_task}.")
    if not 1 <= args.max_steps <= 500:
        raise RecordError(f"--max_steps must be in 1..500 (MetaWorld's episode limit), got {args.max_steps}.")
    if args.action_noise < 0:
        raise RecordError(f"--action_noise is a standard deviation and must be >= 0, got {args.action_noise}.")
    if (args.actions == "policy") != (args.policy_path is not None):
        raise RecordError("--actions policy and --policy.path=<checkpoint>/pretrained_model go together: give both "
                          "to record a checkpoint's rollouts, or neither.")
    if args.policy_path is not None and not (Path(args.policy_path) / "config.json").is_file():
        raise RecordError(f"--policy.path {args.policy_path} has no config.json: give a checkpoint's "
                          "pretrained_model directory (e.g. outputs/train/x/checkpoints/last/pretrained_model).")
    if args.actions == "random" and args.success_only:
        raise RecordError("--actions random almost never succeeds, so --success_only would record nothing: add "
                          "--success_only false (episodes are kept and marked in episode_success).")
    if args.steps_after_success < 0 or args.fps < 1:
        raise RecordError("--steps_after_success must be >= 0 and --dataset.fps >= 1.")
    if args.use_videos:
        from lerobot.datasets.video_utils import VALID_VIDEO_CODECS

        if args.vcodec not in VALID_VIDEO_CODECS:
            raise RecordError(f"--dataset.vcodec {args.vcodec!r} is not one LeRobot can write; use one of "
                              f"{sorted(VALID_VIDEO_CODECS)} (libsvtav1 is LeRobot's default).")


def main(argv: list[str] | None = None) -> int:
    """Console entry point of `lerobot-wm-record-metaworld`."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")  # CPU rendering; must be set before mujoco is imported
    # The scripted experts warn on every task that their gains exceed [-1, 1]; actions are clipped anyway.
    warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
    try:
        _check(args)
        from lerobot.utils.constants import HF_LEROBOT_HOME

        root = Path(args.root).expanduser().resolve() if args.root else (HF_LEROBOT_HOME / args.repo_id).resolve()
        plan = RecordPlan(
            repo_id=args.repo_id, tasks=resolve_tasks(args.tasks), episodes_per_task=args.episodes_per_task,
            seed=args.seed, action_noise=args.action_noise, success_only=args.success_only,
            max_attempts_per_task=args.max_attempts_per_task or 3 * args.episodes_per_task,
            max_steps=args.max_steps, steps_after_success=args.steps_after_success, fps=args.fps,
            use_videos=args.use_videos, vcodec=args.vcodec, store_sim_state=args.store_sim_state,
            actions=args.actions,
            policy_path=str(Path(args.policy_path).resolve()) if args.policy_path else None,
        )
        summary = record(plan, root, overwrite=args.overwrite)
    except RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Committed episodes are safe in the staging dir; the partial one is dropped on the next run.
        print("\ninterrupted: rerun the same command to resume.", file=sys.stderr)
        return 130
    _print_summary(summary, plan)
    return 0


def _print_summary(s: dict, plan: RecordPlan) -> None:
    """Human-readable end-of-run report (stdout)."""
    head = "Dataset already recorded (nothing to do)" if s["reused"] else "Recording finished"
    print(f"{head}: {s['episodes']} episodes, {s['frames']} frames of {', '.join(plan.tasks)}")
    print(f"  expert success rate: {s['expert_successes']}/{s['expert_attempts']} attempts "
          f"({100 * s['expert_success_rate']:.0f}%), action noise std {plan.action_noise}")
    for task, t in s["per_task"].items():
        print(f"  {task}: {t['episodes']} episodes, {t['frames']} frames, "
              f"expert {t['expert_successes']}/{t['attempts']}")
    if not s["reused"] and s["frames_this_run"]:
        print(f"  time this run: {s['seconds_this_run']:.1f} s "
              f"({1000 * s['seconds_this_run'] / s['frames_this_run']:.0f} ms per recorded frame)")
    print(f"  saved to: {s['root']}")
    print(f"  load with: LeRobotDataset({plan.repo_id!r}, root={s['root']!r}, video_backend='pyav')")


if __name__ == "__main__":
    sys.exit(main())
