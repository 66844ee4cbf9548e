"""`lerobot-wm-demo`: the offline quickstart and learning check, end to end on one MetaWorld task.

Stages, each a subprocess of the project's or LeRobot's own console scripts, logged to
`<work_dir>/logs/<stage>.log`:

1. record   `lerobot-wm-record-metaworld`: scripted-expert demonstrations into a LeRobotDataset;
2. latents  `lerobot-wm-precompute --encoder=pixels`: the latent cache and the latent-only training view;
3. train    `lerobot-train --policy.type=world_f` on that view, saving a checkpoint every `--save_freq`;
4. eval     `lerobot-eval --env.type=metaworld` on the final checkpoint;
5. probe    `lerobot-wm-probe` on the final checkpoint when the variant has a world memory (F): does the
            action path read it? Its verdict is printed next to the success rate;
6. report   per-checkpoint metrics on fixed dataset batches (`report.checkpoint_metrics`), then
            `<work_dir>/report.html` (matplotlib charts inline as PNG) and `<work_dir>/report.json`.

Running it again reuses every finished stage (complete dataset, complete cache, checkpoint at the
requested step, finished evaluation, computed metrics) and says so; an interrupted training resumes
from its last checkpoint. Training and evaluation folders are keyed by their settings, so changing a
setting starts a new run next to the old one instead of overwriting it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Model sizes: (width, depth, heads, fusion_heads, prophet_width, prophet_depth, prophet_heads).
SIZES = {
    "tiny": (32, 1, 2, 2, 32, 1, 2),
    "small": (128, 2, 4, 4, 64, 1, 4),
    "base": (256, 4, 8, 4, 128, 2, 4),
}
# Progress lines worth showing at once (the rest of a stage's output only goes to its log).
_IMPORTANT = re.compile(r"(step:\S+ .*loss:|Recording finished|Dataset already|Latent cache for|pc_success|"
                        r"Overall Aggregated|Fitted encoder|already fitted|Error|error:|Traceback)")


class DemoError(RuntimeError):
    """A stage failed or the inputs are inconsistent; the message says what to do."""


def _bin(name: str) -> str:
    """The console script `name` of this interpreter's environment (the venv the demo runs in)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise DemoError(f"'{name}' not found. Install the project: pip install -e '.[metaworld]'")
    return found


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_stage(name: str, cmd: list[str], log_path: Path, env: dict | None = None, every_s: float = 20.0) -> float:
    """Run `cmd`, streaming its output to `log_path` and showing progress; returns the wall seconds.

    Important lines are shown at once; otherwise the latest line at most every `every_s` seconds.
    On failure raises DemoError with the failing command and the tail of the log.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "PYTHONUNBUFFERED": "1", **(env or {})}
    _say(f"{name}: {shlex.join(cmd)}")
    _say(f"{name}: log -> {log_path}")
    start = last_shown = time.time()
    latest = ""
    with open(log_path, "ab") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env)
        buf = b""
        while True:
            chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                if not line:
                    continue
                latest = line
                if _IMPORTANT.search(line):
                    print(f"    [{name}] {line[:200]}", flush=True)
                    last_shown = time.time()
            if time.time() - last_shown > every_s and latest:
                print(f"    [{name} {time.time() - start:5.0f}s] {latest[:160]}", flush=True)
                last_shown = time.time()
        rc = proc.wait()
    seconds = time.time() - start
    if rc != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise DemoError(
            f"stage '{name}' failed (exit code {rc}) after {seconds:.0f} s.\n--- last lines of {log_path} ---\n"
            f"{tail}\n--- failing command ---\n{shlex.join(cmd)}"
        )
    _say(f"{name}: done in {seconds:.0f} s")
    return seconds


# ---------------------------------------------------------------------------------------------- stages
def stage_dataset(args, work: Path) -> tuple[str, Path]:
    """Record the expert dataset unless an identical (or a user-given, existing) one is there."""
    repo_id = args.repo_id or f"local/wm_demo_{args.task.replace('-', '_')}"
    root = Path(args.dataset_root).expanduser().resolve() if args.dataset_root else work / "dataset"
    info = root / "meta" / "wm_recording.json"
    if args.dataset_root and (root / "meta" / "info.json").exists() and not info.exists():
        _say(f"record: using the existing dataset at {root} (not recorded by this tool) - skipped")
        return repo_id, root
    if info.exists():
        plan = json.loads(info.read_text())["plan"]
        if plan["tasks"] == [args.task] and plan["episodes_per_task"] == args.episodes and (
            args.dataset_root
            or (plan["seed"], plan["max_steps"], plan["success_only"]) == (args.seed, args.max_record_steps, args.success_only)
        ):
            _say(f"record: dataset complete at {root} ({plan['episodes_per_task']} episodes) - skipped")
            return plan["repo_id"], root
        if args.dataset_root:
            raise DemoError(
                f"{root} holds {plan['episodes_per_task']} episodes of {plan['tasks']}, not {args.episodes} of "
                f"{args.task}. Pass --episodes={plan['episodes_per_task']} --task={plan['tasks'][0]} to use it, "
                "or another --dataset_root."
            )
    cmd = [
        _bin("lerobot-wm-record-metaworld"), f"--dataset.repo_id={repo_id}", f"--dataset.root={root}",
        f"--env.task={args.task}", f"--episodes_per_task={args.episodes}", f"--seed={args.seed}",
        f"--max_steps={args.max_record_steps}", f"--success_only={str(args.success_only).lower()}",
    ]  # fmt: skip
    if not args.dataset_root and info.exists():
        cmd.append("--overwrite=true")  # the demo's own dataset, recorded with other settings: replace it
    run_stage("record", cmd, work / "logs" / "record.log")
    return repo_id, root


def stage_encoder(args, work: Path, repo_id: str, root: Path) -> str:
    """`--encoder=fit`: fit a world encoder on the recorded dataset (reused on rerun); returns the encoder to use."""
    if args.encoder != "fit":
        return args.encoder
    # Keyed by the dataset (its info.json changes when it is re-recorded) and the fit flags: other data or
    # flags fit next to the old encoder instead of failing on it.
    info = (root / "meta" / "info.json").read_text()
    out = work / "encoder" / f"fit_{_key(str(root), info, args.fit_arg)}"
    cmd = [_bin("lerobot-wm-fit-encoder"), f"--dataset.repo_id={repo_id}", f"--dataset.root={root}",
           f"--output_dir={out}", *args.fit_arg]  # fmt: skip
    run_stage("fit-encoder", cmd, work / "logs" / "fit_encoder.log")
    return str(out)


def stage_latents(args, work: Path, repo_id: str, root: Path) -> Path:
    """Precompute the world-latent cache and the training view unless both are complete."""
    from lerobot_policy_world_modality.latents.cache import DatasetIdentity, LatentCache, LatentCacheError
    from lerobot_policy_world_modality.latents.encoders import resolve_encoder_identity
    from lerobot_policy_world_modality.latents.train_view import default_view_root

    cache_root = work / "cache"
    view = default_view_root(cache_root, repo_id, root)
    camera = _first_camera(root)
    try:
        LatentCache.open(cache_root, DatasetIdentity.from_dataset(repo_id, root), camera,
                         resolve_encoder_identity(args.encoder))
        if (view / "meta" / "info.json").exists():
            _say(f"latents: cache complete under {cache_root} - skipped")
            return view
    except LatentCacheError:
        pass
    cmd = [
        _bin("lerobot-wm-precompute"), f"--dataset.repo_id={repo_id}", f"--dataset.root={root}",
        f"--encoder={args.encoder}", f"--cache_root={cache_root}",
    ]  # fmt: skip
    run_stage("latents", cmd, work / "logs" / "latents.log")
    text = (work / "logs" / "latents.log").read_text(errors="replace")
    found = re.findall(r"Latent-only training view[^:]*: (.+)", text)
    return Path(found[-1].strip()) if found else view


def _first_camera(root: Path) -> str:
    features = json.loads((root / "meta" / "info.json").read_text())["features"]
    cams = [k for k, ft in features.items() if ft.get("dtype") in ("video", "image")]
    if not cams:
        raise DemoError(f"The dataset at {root} has no camera; the demo needs MetaWorld's observation.image.")
    return cams[0]


def train_flags(args, repo_id: str, view: Path, work: Path, camera: str) -> list[str]:
    """lerobot-train's policy, dataset and loop flags for the demo settings (without the output dir)."""
    w, d, h, fh, pw, pd, ph = SIZES[args.size]
    return [
        "--policy.type=world_f", f"--policy.variant={args.variant}", f"--policy.encoder={args.encoder}",
        f"--policy.world_cameras=[{camera}]", f"--policy.latent_cache_root={work / 'cache'}",
        "--policy.device=cpu", "--policy.push_to_hub=false",
        f"--policy.width={w}", f"--policy.depth={d}", f"--policy.heads={h}", f"--policy.fusion_heads={fh}",
        f"--policy.prophet_width={pw}", f"--policy.prophet_depth={pd}", f"--policy.prophet_heads={ph}",
        f"--policy.chunk_size={args.chunk_size}", f"--policy.n_action_steps={args.n_action_steps}",
        f"--dataset.repo_id={repo_id}", f"--dataset.root={view}", "--dataset.video_backend=pyav",
        f"--batch_size={args.batch_size}", f"--steps={args.steps}", f"--save_freq={args.save_freq}",
        f"--log_freq={args.log_freq}", "--num_workers=0", "--eval_freq=0", "--wandb.enable=false",
        f"--seed={args.seed}", *args.train_arg,
    ]  # fmt: skip


def stage_train(args, work: Path, repo_id: str, root: Path, view: Path) -> tuple[Path, dict]:
    """Train (or reuse / resume) world_f; returns the run dir and {seconds, command}."""
    flags = train_flags(args, repo_id, view, work, _first_camera(root))
    # The run is keyed by every flag except the loop length and logging: world_f has a constant learning
    # rate, so the checkpoint at step N is the same whatever --steps was, and a longer run resumes it.
    loop = ("--steps=", "--save_freq=", "--log_freq=")
    run_dir = work / "train" / f"{args.variant}_{args.size}_{_key([f for f in flags if not f.startswith(loop)], str(root))}"
    final = run_dir / "checkpoints" / f"{args.steps:06d}" / "pretrained_model"
    record_path = run_dir / "demo_train.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"seconds": 0.0}
    if (final / "model.safetensors").exists():
        _say(f"train: checkpoint at step {args.steps} exists ({final}) - skipped")
        return run_dir, record
    last = run_dir / "checkpoints" / "last" / "pretrained_model" / "train_config.json"
    if last.exists():
        done = json.loads((last.parent.parent / "training_state" / "training_step.json").read_text())["step"]
        if done >= args.steps:
            raise DemoError(
                f"{run_dir} already trained to step {done} but has no checkpoint at step {args.steps}. Pick "
                f"--steps among {sorted(int(p.name) for p in (run_dir / 'checkpoints').iterdir() if p.name.isdigit())}"
                " or a larger one."
            )
        _say(f"train: resuming {run_dir} from step {done} to {args.steps}")
        cmd = [_bin("lerobot-train"), f"--config_path={last}", "--resume=true", f"--steps={args.steps}",
               f"--save_freq={args.save_freq}", f"--log_freq={args.log_freq}", f"--output_dir={run_dir}"]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # started but no checkpoint yet: nothing to keep
        cmd = [_bin("lerobot-train"), *flags, f"--output_dir={run_dir}"]
    log = work / "logs" / f"train_{run_dir.name}.log"
    seconds = run_stage("train", cmd, log, env={"HF_HUB_OFFLINE": "1"})
    record = {"seconds": record["seconds"] + seconds, "command": shlex.join([_bin("lerobot-train"), *flags,
                                                                           f"--output_dir={run_dir}"])}
    run_dir.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2))
    return run_dir, record


def seed_metaworld_resets() -> None:
    """Make `MetaworldEnv.reset(seed=s)` start the episode from a state that depends on `s` alone.

    MetaWorld ignores reset's seed and draws the object and goal positions from NumPy's global generator,
    which lerobot-eval seeds once (`--seed`). LeRobot's `MetaworldEnv.step` also resets the simulator when
    the task succeeds, one more draw. So without this, episode i's start depends on how many earlier
    episodes succeeded, and two arms evaluated "on the same env seeds" start episode i from the same state
    only until their successes first differ. Seeding the global generator with `s` right before the reset
    ties the start to the seed (lerobot-eval gives episode i the seed `--seed` + i)."""
    import numpy as np
    from lerobot.envs import metaworld

    original = metaworld.MetaworldEnv.reset
    if getattr(original, "_wm_seeded", False):
        return

    def reset(self, seed=None, **kwargs):
        if seed is not None:
            np.random.seed(seed)
        return original(self, seed=seed, **kwargs)

    reset._wm_seeded = True
    metaworld.MetaworldEnv.reset = reset


def lerobot_eval_capped() -> None:
    """Run stock `lerobot-eval` (same argv) with MetaWorld episodes capped at `--env.episode_length`.

    LeRobot 0.4.4's MetaWorld env ignores `--env.episode_length`: its rollouts always last up to
    MetaWorld's 500 steps (`MetaworldEnv._max_episode_steps = max_path_length`), so a failing episode
    costs minutes (docs/benchmarks.md). This launcher sets that attribute to the requested length after the env is built
    and then calls LeRobot's own entry point unchanged.

    `--max_videos=N` (this launcher's own flag, taken out of argv) caps the episodes rendered to video:
    stock lerobot-eval always renders up to 10, a second render of every step plus video encoding.

    It also makes each MetaWorld episode start from a state set by its env seed alone
    (`seed_metaworld_resets`), so that paired arms share their starts.
    """
    seed_metaworld_resets()
    videos = [a for a in sys.argv[1:] if a.startswith("--max_videos=")]
    if videos:
        sys.argv = [a for a in sys.argv if a not in videos]
        try:
            max_videos = int(videos[-1].split("=", 1)[1])
        except ValueError:
            sys.exit(f"error: {videos[-1]} must be an integer number of episodes to render (0 = no videos).")
        if max_videos < 0:
            sys.exit(f"error: {videos[-1]} must be >= 0.")
        from lerobot.scripts import lerobot_eval

        original_all = lerobot_eval.eval_policy_all

        def eval_all(*a, **kw):
            kw["max_episodes_rendered"] = min(max_videos, kw.get("max_episodes_rendered", max_videos))
            return original_all(*a, **kw)

        lerobot_eval.eval_policy_all = eval_all
    lengths = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--env.episode_length=")]
    if lengths:
        from lerobot.envs import metaworld

        cap = int(lengths[-1])
        original_init = metaworld.MetaworldEnv.__init__

        def init(self, *a, **kw):
            original_init(self, *a, **kw)
            self._max_episode_steps = min(cap, self._max_episode_steps)

        metaworld.MetaworldEnv.__init__ = init
    from lerobot.scripts.lerobot_eval import main as eval_main

    eval_main()


def stage_eval(args, work: Path, run_dir: Path) -> tuple[Path, dict]:
    """Evaluate the final checkpoint in MetaWorld unless this evaluation already finished."""
    ckpt = run_dir / "checkpoints" / f"{args.steps:06d}" / "pretrained_model"
    eval_dir = work / "eval" / f"{run_dir.name}_n{args.eval_episodes}_len{args.episode_length}_seed{args.eval_seed}"
    # Stock lerobot-eval, through a launcher that makes --env.episode_length effective for MetaWorld.
    launcher = [sys.executable, "-c", "from lerobot_policy_world_modality.tools.demo import lerobot_eval_capped as m; m()"]
    cmd = [
        *launcher, f"--policy.path={ckpt}", "--policy.device=cpu", "--env.type=metaworld",
        f"--env.task={args.task}", f"--env.episode_length={args.episode_length}",
        f"--eval.n_episodes={args.eval_episodes}", "--eval.batch_size=1", f"--seed={args.eval_seed}",
        f"--output_dir={eval_dir}",
    ]  # fmt: skip
    info_path = eval_dir / "eval_info.json"
    record_path = eval_dir / "demo_eval.json"
    if info_path.exists() and record_path.exists():
        _say(f"eval: finished evaluation found in {eval_dir} - skipped")
        return eval_dir, json.loads(record_path.read_text())
    shutil.rmtree(eval_dir, ignore_errors=True)  # lerobot-eval writes eval_info.json last
    seconds = run_stage("eval", cmd, work / "logs" / f"eval_{eval_dir.name}.log", env={"HF_HUB_OFFLINE": "1"})
    record = {"seconds": seconds, "command": shlex.join(cmd)}
    record_path.write_text(json.dumps(record, indent=2))
    return eval_dir, record


def stage_probe(args, work: Path, run_dir: Path, view: Path, repo_id: str) -> dict | None:
    """`lerobot-wm-probe` of the final checkpoint (variant F only), reused when its JSON exists; None without memory."""
    if args.variant != "F":
        _say(f"probe: variant {args.variant} has no world memory - skipped")
        return None
    ckpt = run_dir / "checkpoints" / f"{args.steps:06d}" / "pretrained_model"
    out = work / "probe" / f"{run_dir.name}_{args.steps:06d}.json"
    if out.exists():
        _say(f"probe: result found at {out} - skipped")
    else:
        cmd = [_bin("lerobot-wm-probe"), f"--policy.path={ckpt}", f"--dataset.root={view}",
               f"--dataset.repo_id={repo_id}", f"--batches={args.metric_batches}", "--batch_size=16", f"--out={out}"]
        run_stage("probe", cmd, work / "logs" / f"probe_{run_dir.name}.log", env={"HF_HUB_OFFLINE": "1"})
    return json.loads(out.read_text())


def stage_metrics(args, work: Path, run_dir: Path, view: Path, repo_id: str) -> list[dict]:
    """checkpoint_metrics of every saved checkpoint, cached per checkpoint in <work>/metrics/."""
    from .report import checkpoint_metrics

    out = []
    ckpts = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    cache_dir = work / "metrics" / run_dir.name
    cache_dir.mkdir(parents=True, exist_ok=True)
    fresh = 0
    for ckpt in ckpts:
        path = cache_dir / f"{ckpt.name}_b{args.metric_batches}.json"
        if path.exists():
            metrics = json.loads(path.read_text())
        else:
            metrics = {"step": int(ckpt.name), **checkpoint_metrics(
                ckpt / "pretrained_model", view, n_batches=args.metric_batches, batch_size=32, repo_id=repo_id)}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(metrics, indent=2))
            tmp.replace(path)
            fresh += 1
        out.append(metrics)
    reused = len(ckpts) - fresh
    _say(f"metrics: {len(ckpts)} checkpoints ({fresh} computed, {reused} reused)" + (" - skipped" if not fresh else ""))
    return out


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """Command-line options; defaults are the quickstart's (its measured time: docs/demo.md)."""
    p = argparse.ArgumentParser(prog="lerobot-wm-demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work_dir", default="outputs/demo", help="everything goes here (dataset, cache, runs, report)")
    p.add_argument("--task", default="button-press-v3", help="MetaWorld task")
    p.add_argument("--episodes", type=int, default=10, help="expert episodes to record")
    p.add_argument("--max_record_steps", type=int, default=200, help="cap on steps per recorded episode")
    p.add_argument("--success_only", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="keep only successful expert episodes (false: also short, unfinished ones)")
    p.add_argument("--dataset_root", default=None, help="use (or record into) this dataset instead of <work_dir>/dataset")
    p.add_argument("--repo_id", default=None, help="dataset repo id (default local/wm_demo_<task>)")
    p.add_argument("--encoder", default="pixels",
                   help="world encoder: pixels (offline default), a Hub id or local dir, or 'fit' to fit one on the "
                   "recorded dataset first (lerobot-wm-fit-encoder, reused on rerun)")
    p.add_argument("--fit_arg", action="append", default=[], help="extra lerobot-wm-fit-encoder flag (repeatable)")
    p.add_argument("--variant", default="F", choices=["A", "B_cont", "F"], help="world_f variant")
    p.add_argument("--size", default="small", choices=sorted(SIZES), help="model size preset")
    p.add_argument("--chunk_size", type=int, default=10, help="action chunk length")
    p.add_argument("--n_action_steps", type=int, default=5, help="actions executed per chunk")
    p.add_argument("--steps", type=int, default=1500, help="training steps")
    p.add_argument("--batch_size", type=int, default=32, help="training batch size")
    p.add_argument("--save_freq", type=int, default=None, help="checkpoint every N steps (default steps/5)")
    p.add_argument("--log_freq", type=int, default=None, help="console loss every N steps (default steps/20)")
    p.add_argument("--train_arg", action="append", default=[], help="extra lerobot-train flag (repeatable)")
    p.add_argument("--eval_episodes", type=int, default=10, help="lerobot-eval episodes")
    p.add_argument("--episode_length", type=int, default=150, help="max steps per eval episode")
    p.add_argument("--eval_seed", type=int, default=1000, help="lerobot-eval seed (its default)")
    p.add_argument("--metric_batches", type=int, default=4, help="fixed batches (of 32) per checkpoint metric")
    p.add_argument("--seed", type=int, default=0, help="recording and training seed")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lerobot-wm-demo`."""
    args = build_parser().parse_args(argv)
    args.save_freq = args.save_freq or max(1, args.steps // 5)
    args.log_freq = args.log_freq or max(1, args.steps // 20)
    for name in ("episodes", "steps", "batch_size", "eval_episodes", "episode_length", "save_freq", "log_freq"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1, got {getattr(args, name)}.", file=sys.stderr)
            return 2
    work = Path(args.work_dir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MUJOCO_GL", "egl")
    t0 = time.time()
    try:
        repo_id, root = stage_dataset(args, work)
        args.encoder = stage_encoder(args, work, repo_id, root)
        view = stage_latents(args, work, repo_id, root)
        run_dir, train = stage_train(args, work, repo_id, root, view)
        eval_dir, evald = stage_eval(args, work, run_dir)
        per_ckpt = stage_metrics(args, work, run_dir, view, repo_id)
        probe = stage_probe(args, work, run_dir, view, repo_id)
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    report = build_report(args, work, repo_id, root, run_dir, train, eval_dir, evald, per_ckpt)
    report["probe"] = probe
    from .report import probe_verdict, write_report

    json_path, html_path = write_report(report, work)
    rate = report["success_rate"]
    print("\n==================== world_f demo ====================")
    print(f"task           {args.task}  ({report['episodes']} expert episodes, {report['frames']} frames)")
    print(f"success rate   {'n/a' if rate is None else f'{100 * rate:.0f}%'} over {args.eval_episodes} eval episodes")
    print(f"world memory   {probe_verdict(probe)}")
    print(f"training time  {report['train_seconds']:.0f} s for {args.steps} steps (batch {args.batch_size}, {args.size} model)")
    print(f"checkpoint     {report['checkpoint']}")
    print(f"eval videos    {report['eval_videos'] or 'none'}")
    print(f"report         {html_path}\n               {json_path}")
    print(f"this run took  {time.time() - t0:.0f} s")
    return 0


def build_report(args, work, repo_id, root, run_dir, train, eval_dir, evald, per_ckpt) -> dict:
    """The report.json content from the stages' outputs."""
    from .report import parse_train_log

    info = json.loads((root / "meta" / "info.json").read_text())
    ev = json.loads((eval_dir / "eval_info.json").read_text())
    overall = ev.get("overall") or ev.get("aggregated") or {}
    pc = overall.get("pc_success")
    log = work / "logs" / f"train_{run_dir.name}.log"
    curve = parse_train_log(log.read_text(errors="replace"), args.log_freq) if log.exists() else []
    videos = eval_dir / "videos"
    ckpt = run_dir / "checkpoints" / f"{args.steps:06d}" / "pretrained_model"
    success = None if pc is None else float(pc) / 100
    return {
        "task": args.task,
        "repo_id": repo_id,
        "dataset_root": str(root),
        "episodes": int(info["total_episodes"]),
        "frames": int(info["total_frames"]),
        "encoder": args.encoder,
        "policy": f"world_f variant {args.variant}, size {args.size} {SIZES[args.size]}, chunk {args.chunk_size}, "
        f"n_action_steps {args.n_action_steps}, batch {args.batch_size}",
        "train_steps": args.steps,
        "train_seconds": round(float(train.get("seconds", 0.0)), 1),
        "eval_episodes": args.eval_episodes,
        "episode_length": args.episode_length,
        "eval_seconds": round(float(evald.get("seconds", 0.0)), 1),
        "success_rate": success,
        "evaluations": [{"train_step": args.steps, "success_rate": success or 0.0, "n_episodes": args.eval_episodes}],
        "checkpoint": str(ckpt),
        "eval_dir": str(eval_dir),
        "eval_videos": str(videos) if videos.exists() else None,
        "train_loss_curve": curve,
        "per_checkpoint_metrics": per_ckpt,
        "commands": [c for c in (train.get("command"), evald.get("command")) if c],
    }


if __name__ == "__main__":
    sys.exit(main())
