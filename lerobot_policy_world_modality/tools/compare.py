"""`lerobot-wm-compare`: matched experiments (arms x seeds x tasks x rollout memory modes), one command, one report.

    lerobot-wm-compare configs/experiments/metaworld_smoke.yaml [--output_dir=...] [--jobs=2]
                       [--num_shards=N --shard_index=i] [--dry_run]

The experiment file (YAML or JSON; see `docs/compare.md` and `configs/experiments/`) names the dataset,
the arms (lerobot-train flags, optional `init_from` and world `encoder`), the seeds and the shared budget,
the env and its tasks, the rollout memory modes of each arm and the comparisons to report. The work is cut
into units, each a subprocess of a stock entry point, its output logged to `<output_dir>/logs/<unit>.log`:

    record     lerobot-wm-record-metaworld  (only when the spec says how and the dataset does not exist)
    fit_encoder lerobot-wm-fit-encoder      (only when an arm's encoder is `fit`, into <output_dir>/encoder;
                                            `fit:<name>` is dataset.fits' <name>, into <output_dir>/encoders/<name>)
    precompute lerobot-wm-precompute        (latent cache + latent-only training view), one per encoder
    train      lerobot-train, one per arm and seed (then per-checkpoint metrics for the curves)
    eval       lerobot-eval, one per arm, seed, task and rollout mode (MetaWorld: the capped launcher)
    probe      lerobot-wm-probe, one per trained checkpoint that has a world memory

Every unit ends by writing its record (`<output_dir>/units/<unit>.json`) atomically, so a rerun skips it;
a killed training resumes from its last checkpoint. `--jobs N` runs N units side by side;
`--num_shards N --shard_index i` gives this process the training units i, i+N, ... with their evals and
probes (the shared record/precompute units are shard 0's; the others wait for them), so machines sharing
the output folder split the work. At the end `report.json`, `results.md` and `report.html` are written
from whatever records exist.

The spec is validated before anything runs: unknown arms or modes in comparisons, a missing dataset,
and any flag lerobot-train would reject (each arm's full flag list is parsed in-process by LeRobot's own
config parser) are errors naming the arm, the flag and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from ..fileio import atomic_write_bytes, atomic_write_text
from .probe import has_world_model_only

# Policy types that train on the latent-only training view (they read no camera); others need the frames.
VIEW_POLICY_TYPES = ("world_f", "world_token_c")
# lerobot-train flags the spec's shared budget and dataset own: an arm setting them would break the match.
TOOL_OWNED_TRAIN_FLAGS = ("--dataset.repo_id", "--dataset.root", "--dataset.episodes", "--seed", "--steps",
                          "--batch_size", "--output_dir", "--save_freq", "--log_freq")  # fmt: skip
# Rollout mode name of an arm whose policy has no world memory (no --policy.memory_mode_rollout flag).
NO_MEMORY_MODE = "none"
METAWORLD_LAUNCHER = "from lerobot_policy_world_modality.tools.demo import lerobot_eval_capped as m; m()"
CURVES_LAUNCHER = "from lerobot_policy_world_modality.tools.compare import checkpoint_curves_main as m; m()"
# Where an explaining policy (--policy.explain=true) writes its rollout texts, inside each eval unit's output folder.
EXPLANATIONS_FILE = "explanations.jsonl"
# Episodes per eval unit whose explanations the report prints (this many successes and as many failures).
REPORT_EXPLAINED_EPISODES = 2


class SpecError(ValueError):
    """An experiment file that cannot be run as written; the message names the entry and the fix."""


def _say(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _bin(name: str) -> str:
    """The console script `name` of this interpreter's environment (as the demo finds it)."""
    from .demo import DemoError, _bin as find_script

    try:
        return find_script(name)
    except DemoError as err:
        raise SpecError(str(err)) from None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


# ------------------------------------------------------------------------------------------------ spec
def load_spec(path: str | Path) -> dict:
    """The experiment file as a dict (YAML, which also reads JSON)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise SpecError(f"Experiment file {path} does not exist; presets are in configs/experiments/.")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path} is not valid YAML/JSON: {err}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{path} must hold a mapping with dataset, train, arms, eval and comparisons.")
    spec.setdefault("name", path.stem)
    return spec


@dataclass
class Arm:
    """One arm after validation: its flags and what its parsed policy config says about it."""

    # Arm name (unique; used in comparisons as <name>@<mode>)
    name: str
    # The arm's own lerobot-train flags (policy type and options)
    flags: list[str]
    # Checkpoint the arm starts from (smolvla_world: --policy.init_from; others: --policy.path)
    init_from: str | None
    # Rollout modes to evaluate: memory modes ("none" for a policy without a world memory) or rollout_flags names
    modes: list[str]
    # LeRobot policy type, from the parsed config
    policy_type: str = ""
    # Whether the policy injects a world memory (then it is probed)
    has_memory: bool = False
    # Whether it has an action-conditioned world model without a memory (then the probe reports that model)
    has_world_model: bool = False
    # Whether the policy reads world latents (then the cache flags are added)
    uses_latents: bool = False
    # Whether it trains on the latent-only view instead of the dataset itself
    uses_view: bool = False
    # World encoder of its latents (lerobot-wm-precompute --encoder / --policy.encoder): the arm's `encoder`
    # key, else dataset.encoder; "fit" / "fit:<name>" are resolved to the experiment's fitted encoder directories
    encoder: str = "pixels"
    # Named rollout variants: mode name -> extra --policy.* flags of its lerobot-eval (e.g. a planner on)
    rollout_flags: dict[str, list[str]] = field(default_factory=dict)


def fit_dirs(out: Path, dataset: dict) -> dict[str, Path]:
    """Where the tool fits each encoder a spec can name.

    "fit" goes to <out>/encoder, "fit:<name>" (an entry of dataset.fits) to <out>/encoders/<name>.
    """
    named = dataset.get("fits") or {}
    return {"fit": out / "encoder", **{f"fit:{n}": out / "encoders" / str(n) for n in named}}


@dataclass
class Plan:
    """A validated experiment: the spec's values with defaults filled in and the arms resolved."""

    spec: dict
    out: Path
    arms: dict[str, Arm]
    repo_id: str
    root: Path
    cameras: list[str]
    encoder: str
    cache_root: Path
    seeds: list[int]
    steps: int
    batch_size: int
    save_freq: int
    log_freq: int
    common_flags: list[str]
    env: str
    tasks: list[str]
    episodes: int
    eval_seed: int
    episode_length: int | None
    eval_flags: list[str]
    comparisons: list[tuple[str, str]]
    heldout: list[int] = field(default_factory=list)
    record: dict | None = None
    # lerobot-wm-fit-encoder settings of each encoder the tool fits: label ("fit" or "fit:<name>") -> settings
    fits: dict[str, dict] = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    alpha: float = 0.05

    def fit_dirs(self) -> dict[str, Path]:
        """Encoder directory of every fit label the spec may name: "fit" and "fit:<name>" for dataset.fits."""
        return fit_dirs(self.out, self.spec.get("dataset") or {})

    def fit_unit(self, encoder: str) -> str | None:
        """The fit_encoder unit that writes `encoder`, or None when the tool does not fit it."""
        for label, path in self.fit_dirs().items():
            if encoder == str(path):
                return "fit_encoder" if label == "fit" else f"fit_encoder/{label.partition(':')[2]}"
        return None

    def view_root(self) -> Path:
        """The latent-only training view precompute writes for this dataset."""
        from ..latents.train_view import default_view_root

        return default_view_root(self.cache_root, self.repo_id, self.root)

    def total_episodes(self) -> int:
        """Episodes of the dataset (from its metadata, or from the recording plan before it exists)."""
        info = self.root / "meta" / "info.json"
        if info.exists():
            return int(json.loads(info.read_text())["total_episodes"])
        if self.record:
            return len(self.record["tasks"]) * int(self.record["episodes_per_task"])
        raise SpecError(f"dataset.root {self.root} does not exist yet: heldout_episodes cannot be resolved.")

    def train_episodes(self) -> list[int] | None:
        """The episodes arms train on (all but the held-out ones), or None when nothing is held out."""
        if not self.heldout:
            return None
        return [e for e in range(self.total_episodes()) if e not in set(self.heldout)]


def _need(section: dict, key: str, where: str, example: str):
    if key not in section or section[key] in (None, "", []):
        raise SpecError(f"The experiment file needs '{where}.{key}' (e.g. {example}).")
    return section[key]


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def _parse_comparison(item) -> tuple[str, str]:
    if isinstance(item, str):
        parts = [p.strip() for p in re.split(r"\s+vs\.?\s+", item)]
    else:
        parts = [str(p).strip() for p in item]
    if len(parts) != 2:
        raise SpecError(f"Comparison {item!r} must name two arm@mode entries, e.g. 'F@pred vs A@pred'.")
    return parts[0], parts[1]


@contextlib.contextmanager
def _no_help_text():
    """Skip draccus's --help text while parsing: it reads the source of every config class, seconds per parse.

    Only the help strings change (they are never printed here); the parse and its errors are the same.
    """
    try:
        from draccus.wrappers import docstring
    except ImportError:  # another draccus layout: parse the slow way
        yield
        return
    original = docstring.get_attribute_docstring
    docstring.get_attribute_docstring = lambda *a, **k: docstring.AttributeDocString()
    try:
        yield
    finally:
        docstring.get_attribute_docstring = original


def parse_train_flags(flags: list[str]):
    """Parse a lerobot-train flag list with LeRobot's own parser (as lerobot-train does, plugins registered).

    Returns the TrainPipelineConfig; raises SpecError with the parser's complaint. `--policy.path=<dir>`
    is replaced by `--policy.type=<type in dir/config.json>` so the remaining policy flags are checked
    against that policy's config class.
    """
    import draccus
    from lerobot.configs.train import TrainPipelineConfig
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()
    args = []
    for flag in flags:
        if flag.startswith("--policy.path="):
            from lerobot.configs.policies import PreTrainedConfig

            try:
                ptype = PreTrainedConfig.from_pretrained(flag.split("=", 1)[1]).type
            except Exception as exc:  # a missing folder, or a Hub id while offline
                raise SpecError(f"{flag}: cannot read its config.json ({type(exc).__name__}: {str(exc)[:200]}). Use a "
                                "local pretrained_model folder, or download the checkpoint first "
                                "(huggingface-cli download <id> --local-dir <dir>)") from None
            args.append(f"--policy.type={ptype}")
        else:
            args.append(flag)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), _no_help_text():
            return draccus.parse(config_class=TrainPipelineConfig, args=args)
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if "error:" in ln]
        raise SpecError(lines[-1].split("error:", 1)[1].strip() if lines else err.getvalue()[-500:]) from None
    except Exception as exc:  # draccus wraps the config class's own ValueErrors in DecodingError
        root = exc
        while (root.__cause__ or root.__context__) is not None:
            root = root.__cause__ or root.__context__
        detail = str(exc).splitlines()[0] if root is exc else str(root)
        raise SpecError(detail) from None


def _probe_supports_episodes() -> bool:
    from . import probe

    with contextlib.redirect_stderr(io.StringIO()):
        try:
            probe.parse_args(["--policy.path=x", "--dataset.root=y", "--episodes=0"])
            return True
        except SystemExit:
            return False


def _lerobot_home() -> Path:
    from lerobot.utils.constants import HF_LEROBOT_HOME

    return Path(HF_LEROBOT_HOME)


def validate(spec: dict, output_dir: str | None = None, check_flags: bool = True, require_data: bool = True) -> Plan:
    """Check the whole spec before anything runs; returns the Plan or raises SpecError naming the fix.

    `check_flags=False` skips parsing the arms' flags (and so their init_from checkpoints) and
    `require_data=False` the dataset's existence: both only for checking a preset's structure offline.
    """
    from ..world.memory import ROLLOUT_MEMORY_MODES

    for key in ("dataset", "train", "arms", "eval", "comparisons"):
        _need(spec, key, "<top level>", f"{key}: ... (see configs/experiments/metaworld_smoke.yaml)")
    ds, tr, ev = spec["dataset"], spec["train"], spec["eval"]
    repo_id = str(_need(ds, "repo_id", "dataset", "repo_id: local/metaworld_smoke"))
    root = Path(ds["root"]).expanduser().resolve() if ds.get("root") else _lerobot_home() / repo_id
    record = ds.get("record")
    if require_data and not (root / "meta" / "info.json").exists():
        if not record:
            raise SpecError(
                f"dataset.root {root} is not a LeRobotDataset (no meta/info.json). Record it first "
                f"(lerobot-wm-record-metaworld --dataset.repo_id={repo_id} --dataset.root={root} --env.task=...), "
                "fix the path, or add a 'dataset.record' section (tasks, episodes_per_task) so the tool records it."
            )
        _need(record, "tasks", "dataset.record", "tasks: [button-press-v3]")
        _need(record, "episodes_per_task", "dataset.record", "episodes_per_task: 30")
    out = Path(output_dir or spec.get("output_dir") or f"outputs/compare/{spec['name']}").expanduser().resolve()
    cameras = list(ds.get("cameras") or [])
    if (root / "meta" / "info.json").exists():
        feats = json.loads((root / "meta" / "info.json").read_text())["features"]
        available = [k for k, f in feats.items() if f.get("dtype") in ("video", "image")]
        missing = [c for c in cameras if c not in available]
        if missing:
            raise SpecError(f"dataset.cameras {missing} are not cameras of {root}; it has {available}.")
        cameras = cameras or available[:1]
    cameras = cameras or ["observation.image"]

    seeds = [int(s) for s in _need(tr, "seeds", "train", "seeds: [0, 1, 2]")]
    steps, batch = int(_need(tr, "steps", "train", "steps: 200")), int(_need(tr, "batch_size", "train", "batch_size: 16"))
    if steps < 1 or batch < 1 or len(set(seeds)) != len(seeds):
        raise SpecError("train.steps and train.batch_size must be >= 1 and train.seeds distinct integers.")
    episodes = int(_need(ev, "episodes", "eval", "episodes: 10"))
    tasks = [str(t) for t in _need(ev, "tasks", "eval", "tasks: [button-press-v3]")]
    default_encoder = str(ds.get("encoder", "pixels"))
    named = ds.get("fits") or {}
    if not isinstance(named, dict) or any(not re.fullmatch(r"[A-Za-z0-9_.-]+", str(n)) for n in named):
        raise SpecError("dataset.fits must map names (letters, digits, '_', '.', '-') to lerobot-wm-fit-encoder "
                        "settings, e.g. {big: {steps: 6000}}; arms read one as encoder: fit:big.")
    encoder = resolve_encoder(default_encoder, "dataset.encoder", fit_dirs(out, ds))
    plan = Plan(
        spec=spec, out=out, arms={}, repo_id=repo_id, root=root, cameras=cameras,
        encoder=encoder,
        cache_root=Path(ds["cache_root"]).expanduser().resolve() if ds.get("cache_root") else out / "cache",
        seeds=seeds, steps=steps, batch_size=batch,
        save_freq=int(tr.get("save_freq") or max(1, steps // 4)), log_freq=int(tr.get("log_freq") or max(1, steps // 20)),
        common_flags=[str(f) for f in tr.get("flags", [])],
        env=str(ev.get("env", "metaworld")), tasks=tasks, episodes=episodes, eval_seed=int(ev.get("seed", 1000)),
        episode_length=int(ev["episode_length"]) if ev.get("episode_length") else None,
        eval_flags=[str(f) for f in ev.get("flags", ["--policy.device=cpu"])],
        comparisons=[_parse_comparison(c) for c in spec["comparisons"]],
        record=record, probe=dict(spec.get("probe") or {}), alpha=float(spec.get("alpha", 0.05)),
    )  # fmt: skip
    if episodes < 1:
        raise SpecError("eval.episodes must be >= 1.")
    if not (type(ev.get("videos", 1)) is int and ev.get("videos", 1) >= 0):  # bool is an int subclass: refuse it
        raise SpecError(f"eval.videos must be a whole number >= 0 of episodes to render per evaluation (got {ev['videos']!r}).")

    held = ds.get("heldout_episodes")
    if held:
        total = plan.total_episodes()
        plan.heldout = list(range(total - int(held), total)) if isinstance(held, int) else sorted(int(e) for e in held)
        if not 0 < len(plan.heldout) < total or not all(0 <= e < total for e in plan.heldout):
            raise SpecError(f"dataset.heldout_episodes {held!r} must leave some of the {total} episodes for training.")
        if not _probe_supports_episodes():
            raise SpecError("dataset.heldout_episodes needs lerobot-wm-probe --episodes, which this install lacks: "
                            "update the plugin, or drop heldout_episodes (the probe then reads training episodes).")

    names = []
    for raw in spec["arms"]:
        name = str(_need(raw, "name", "arms[]", "name: A"))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise SpecError(f"Arm name {name!r} must be unique and use only letters, digits, '_', '.', '-'.")
        names.append(name)
        flags = [str(f) for f in raw.get("flags", [])]
        owned = [f for f in flags if _flag_name(f) in TOOL_OWNED_TRAIN_FLAGS]
        if owned:
            raise SpecError(f"Arm '{name}' sets {owned}: the spec's dataset and train sections own them (the arms must "
                            "share data and budget). Move the value to 'train:' or 'dataset:'.")
        modes = raw.get("rollout_modes")
        plan.arms[name] = Arm(name, flags, raw.get("init_from"), [str(m) for m in modes] if modes else [],
                              encoder=resolve_encoder(str(raw.get("encoder") or default_encoder), f"Arm '{name}'",
                                                      plan.fit_dirs()),
                              rollout_flags=parse_rollout_flags(raw.get("rollout_flags"), name))  # fmt: skip
    # The encoder is the spec's to set (per arm or in dataset.encoder): precompute must use the same one.
    set_directly = [f for f in plan.common_flags + [f for a in plan.arms.values() for f in a.flags]
                    if _flag_name(f) == "--policy.encoder"]  # fmt: skip
    if set_directly:
        raise SpecError(f"{set_directly} in train.flags or arms[].flags: the tool sets --policy.encoder from the "
                        "arm's `encoder:` key (default dataset.encoder) and precomputes its latents with it. Move the "
                        "value there.")
    used = {a.encoder for a in plan.arms.values()}
    for label, path in plan.fit_dirs().items():
        where = "dataset.fit" if label == "fit" else f"dataset.fits.{label.partition(':')[2]}"
        settings = ds.get("fit") if label == "fit" else named[label.partition(":")[2]]
        if str(path) not in used:
            if settings:
                raise SpecError(f"{where} is set but no arm uses encoder '{label}': set an arm's (or dataset.) "
                                f"encoder: {label}, or remove it.")
            continue
        # the tool fits this encoder once on the dataset's frames; every arm naming it reads it
        settings = dict(settings or {})
        unknown = sorted(set(settings) - {"steps", "seed", "flags"})
        if unknown:
            raise SpecError(f"{where} has unknown keys {unknown}; it takes steps, seed and flags "
                            "(other lerobot-wm-fit-encoder options, e.g. ['--dim=256']).")
        plan.fits[label] = settings

    for x, y in plan.comparisons:
        for name in (x.partition("@")[0], y.partition("@")[0]):
            if name not in plan.arms:
                raise SpecError(f"Comparison '{x} vs {y}' names arm '{name}', which is not among the arms "
                                f"{sorted(plan.arms)}. Fix the name or add the arm.")

    for arm in plan.arms.values():
        if check_flags:
            try:
                cfg = parse_train_flags(train_flags(plan, arm, plan.seeds[0]))
            except SpecError as err:
                raise SpecError(f"Arm '{arm.name}': lerobot-train would reject its flags: {str(err).rstrip('.')}. Fix or remove the "
                                f"flag in arms[{arm.name}].flags (or train.flags).") from None
            pol = cfg.policy
            arm.policy_type = pol.type
            arm.has_memory = bool(getattr(pol, "inject_memory", False)) and hasattr(pol, "memory_mode_train")
            arm.has_world_model = has_world_model_only(pol)
            arm.uses_latents = hasattr(pol, "latent_cache_root")
            arm.uses_view = pol.type in VIEW_POLICY_TYPES
            with_modes = hasattr(pol, "memory_mode_rollout")
            if arm.uses_latents:  # the cache flags change the flag list: parse the final one
                try:
                    parse_train_flags(train_flags(plan, arm, plan.seeds[0]))
                except SpecError as err:
                    raise SpecError(f"Arm '{arm.name}': lerobot-train would reject its flags: {err}.") from None
            for mode, extra in arm.rollout_flags.items():  # the evaluated config = the trained one + the variant
                try:
                    parse_train_flags([*train_flags(plan, arm, plan.seeds[0]), *extra])
                except SpecError as err:
                    raise SpecError(f"Arm '{arm.name}': rollout_flags '{mode}' would give a config LeRobot rejects: "
                                    f"{str(err).rstrip('.')}. Fix the flags, or train the arm with what they need.") from None
        else:  # structure check only: a policy given by type (ours) has rollout memory modes, an init checkpoint not
            with_modes = any(f.startswith("--policy.type=") for f in (*plan.common_flags, *arm.flags))
        arm.modes = arm.modes or (["pred"] if with_modes else [NO_MEMORY_MODE])
        allowed = (*(ROLLOUT_MEMORY_MODES if with_modes else (NO_MEMORY_MODE,)), *arm.rollout_flags)
        bad = [m for m in arm.modes if m not in allowed]
        if bad:
            raise SpecError(f"Arm '{arm.name}' lists rollout_modes {bad}; its policy allows {list(allowed)}.")

    for x, y in plan.comparisons:
        for entry in (x, y):
            name, _, mode = entry.partition("@")
            mode = mode or plan.arms[name].modes[0]
            if mode not in plan.arms[name].modes:
                raise SpecError(f"Comparison '{x} vs {y}': arm '{name}' is not evaluated with rollout mode '{mode}' "
                                f"(its rollout_modes are {plan.arms[name].modes}). Add it there or fix the comparison.")
    plan.comparisons = [tuple(_full_entry(plan, e) for e in pair) for pair in plan.comparisons]
    return plan


def parse_rollout_flags(raw, arm: str) -> dict[str, list[str]]:
    """An arm's `rollout_flags` (mode name -> --policy.* flags added to its lerobot-eval), validated.

    Named variants of one checkpoint's rollout, e.g. `{cem: [--policy.planner=cem]}`: the same weights,
    env seeds and episodes with and without the variant, so `<arm>@pred vs <arm>@cem` is a paired test.
    """
    from ..world.memory import MEMORY_MODES

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(f"Arm '{arm}': rollout_flags must map a mode name to a list of --policy.* flags, got {raw!r}.")
    out = {}
    for mode, flags in raw.items():
        mode = str(mode)
        if mode in (*MEMORY_MODES, NO_MEMORY_MODE) or not re.fullmatch(r"[A-Za-z0-9_.-]+", mode):
            raise SpecError(f"Arm '{arm}': rollout_flags name {mode!r} must be new (not a memory mode) and use only "
                            "letters, digits, '_', '.', '-'.")
        flags = [str(f) for f in (flags or [])]
        bad = [f for f in flags if not f.startswith("--policy.") or "=" not in f]
        if not flags or bad:
            raise SpecError(f"Arm '{arm}': rollout_flags '{mode}' needs --policy.<field>=<value> flags (rollout-time "
                            f"options of the trained checkpoint, e.g. --policy.planner=cem); got {bad or flags}.")
        out[mode] = flags
    return out


def resolve_encoder(value: str, where: str, fit_dirs: dict[str, Path]) -> str:
    """The encoder a spec's `encoder` value names: "fit" / "fit:<name>" become their directories (`fit_dirs`);
    anything unknown is a SpecError.

    Accepted: a built-in (`pixels`, `pixels-<side>`), "fit", "fit:<name>" (a dataset.fits entry), a local encoder
    directory, or a Hub id (`owner/name`, not a local path). Checked before anything runs, since precompute
    would only fail later.
    """
    if value in fit_dirs:
        return str(fit_dirs[value])
    if value.startswith("fit:"):
        raise SpecError(f"{where}: encoder {value!r} names no entry of dataset.fits (it has "
                        f"{sorted(k.partition(':')[2] for k in fit_dirs if k != 'fit')}). Add "
                        f"`fits: {{{value[4:]}: {{steps: ..., flags: [...]}}}}` under dataset, or fix the name.")
    if re.fullmatch(r"pixels(-[1-9][0-9]*)?", value) or Path(value).expanduser().is_dir():
        return value
    # A Hub id looks like a two-part relative path; one whose first part exists here is a missing local folder.
    if re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not Path(value.split("/")[0]).expanduser().exists():
        return value
    raise SpecError(f"{where}: encoder {value!r} is not a built-in (pixels, pixels-<side>), 'fit' or "
                    "'fit:<name>' (an encoder the tool fits on the dataset, settings in dataset.fit or dataset.fits), "
                    f"a local encoder directory (there is none at {Path(value).expanduser().resolve()}), nor a Hub id "
                    "(owner/name). Fix the value, or fit the encoder first (lerobot-wm-fit-encoder --output_dir=<dir>) "
                    "and give its directory.")


def encoder_label(plan: Plan, encoder: str) -> str:
    """Short name of an encoder for unit ids and tables: "fit" / "fit:<name>" for the fitted ones, else the value."""
    return next((label for label, path in plan.fit_dirs().items() if encoder == str(path)), encoder)


def _full_entry(plan: Plan, entry: str) -> str:
    name, _, mode = entry.partition("@")
    return f"{name}@{mode or plan.arms[name].modes[0]}"


# ----------------------------------------------------------------------------------------------- flags
def train_dir(plan: Plan, arm: str, seed: int) -> Path:
    """lerobot-train's output_dir of one arm and seed."""
    return plan.out / "train" / arm / f"seed{seed}"


def final_checkpoint(plan: Plan, arm: str, seed: int) -> Path:
    """The `pretrained_model` folder of the last training step."""
    return train_dir(plan, arm, seed) / "checkpoints" / f"{plan.steps:06d}" / "pretrained_model"


def probe_path(plan: Plan, arm: str, seed: int) -> Path:
    """Where lerobot-wm-probe writes its JSON for one arm and seed."""
    return plan.out / "probe" / arm / f"seed{seed}.json"


def arm_dataset_root(plan: Plan, arm: Arm) -> Path:
    """The dataset an arm trains (and is probed) on: the latent-only view or the dataset itself."""
    return plan.view_root() if arm.uses_view else plan.root


def train_flags(plan: Plan, arm: Arm, seed: int) -> list[str]:
    """The complete lerobot-train flag list of `arm` at `seed` (without the program name)."""
    flags = [*plan.common_flags, *arm.flags]
    if arm.init_from:
        init_key = "--policy.init_from" if arm.policy_type == "smolvla_world" or "--policy.type=smolvla_world" in flags else "--policy.path"
        flags.append(f"{init_key}={arm.init_from}")
    if arm.uses_latents:
        given = {_flag_name(f) for f in flags}
        for flag in (f"--policy.latent_cache_root={plan.cache_root}", f"--policy.encoder={arm.encoder}",
                     f"--policy.world_cameras=[{','.join(plan.cameras)}]"):  # fmt: skip
            if _flag_name(flag) not in given:
                flags.append(flag)
    flags += [f"--dataset.repo_id={plan.repo_id}", f"--dataset.root={arm_dataset_root(plan, arm)}"]
    episodes = plan.train_episodes() if plan.heldout else None
    if episodes:
        flags.append(f"--dataset.episodes=[{','.join(map(str, episodes))}]")
    flags += [f"--seed={seed}", f"--steps={plan.steps}", f"--batch_size={plan.batch_size}",
              f"--save_freq={plan.save_freq}", f"--log_freq={plan.log_freq}",
              f"--output_dir={train_dir(plan, arm.name, seed)}"]  # fmt: skip
    return flags


# ----------------------------------------------------------------------------------------------- units
@dataclass
class Unit:
    """One subprocess-sized piece of work with the units it needs finished first."""

    # Unique id, also its record's file name (slashes become '__')
    id: str
    # record, fit_encoder, precompute, train, eval or probe
    kind: str
    # Ids of the units that must be done first
    deps: list[str] = field(default_factory=list)
    # Arm, seed, task and rollout mode the unit is about (where they apply)
    arm: str | None = None
    seed: int | None = None
    task: str | None = None
    mode: str | None = None
    # Index of the training unit this unit belongs to (decides its shard); None for shared units
    group: int | None = None
    # The encoder a precompute unit computes latents with
    encoder: str | None = None


def precompute_ids(plan: Plan) -> dict[str, str]:
    """The precompute unit of each encoder the latent-reading arms use: encoder -> unit id.

    One encoder keeps the plain id "precompute" (earlier output folders resume); several get
    "precompute/<label>", the fitted encoders' last (they wait for their fits, the others need not).
    """
    encoders = list(dict.fromkeys(a.encoder for a in plan.arms.values() if a.uses_latents))
    encoders.sort(key=lambda e: plan.fit_unit(e) is not None)  # stable: otherwise in the arms' order
    if len(encoders) <= 1:
        return {e: "precompute" for e in encoders}
    ids: dict[str, str] = {}
    for enc in encoders:
        uid = "precompute/" + re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(encoder_label(plan, enc)).name)
        while uid in ids.values():  # two paths ending in the same folder name
            uid += "_"
        ids[enc] = uid
    return ids


def plan_units(plan: Plan) -> list[Unit]:
    """Every unit of the experiment, in a fixed order (the same on every machine)."""
    units: list[Unit] = []
    setup: list[str] = []
    if plan.record and not (plan.root / "meta" / "info.json").exists():
        units.append(Unit("record", "record"))
        setup = ["record"]
    pre_ids = precompute_ids(plan)
    for enc in pre_ids:
        if plan.fit_unit(enc):
            units.append(Unit(plan.fit_unit(enc), "fit_encoder", deps=list(setup), encoder=enc))
    previous: list[str] = []
    for enc, uid in pre_ids.items():
        fit = [plan.fit_unit(enc)] if plan.fit_unit(enc) else []
        # One after another: every precompute (re)writes the same latent-only training view, one rename each.
        units.append(Unit(uid, "precompute", deps=(fit or list(setup)) + previous, encoder=enc))
        previous = [uid]
    group = 0
    # Seed-major: a run stopped part way has the same seeds for every arm, so what finished is still paired.
    for seed in plan.seeds:
        for arm in plan.arms.values():
            tid = f"train/{arm.name}/seed{seed}"
            deps = [pre_ids[arm.encoder]] if arm.uses_latents else list(setup)
            units.append(Unit(tid, "train", deps, arm.name, seed, group=group))
            # Before the (simulator-bound, slow) evaluations: it answers "is it used?" cheaply.
            if arm.has_memory or arm.has_world_model:
                units.append(Unit(f"probe/{arm.name}/seed{seed}", "probe", [tid], arm.name, seed, group=group))
            for task in plan.tasks:
                for mode in arm.modes:
                    units.append(Unit(f"eval/{arm.name}/seed{seed}/{task}/{mode}", "eval", [tid], arm.name, seed,
                                      task, mode, group=group))  # fmt: skip
            group += 1
    return units


def shard_of(unit: Unit, num_shards: int) -> int:
    """The shard that runs `unit`: shared units are shard 0's; an arm-seed's units follow its training unit."""
    return 0 if unit.group is None else unit.group % num_shards


def record_path(plan: Plan, unit_id: str) -> Path:
    """Where a finished unit's record lives (its presence means done)."""
    return plan.out / "units" / f"{unit_id.replace('/', '__')}.json"


def is_done(plan: Plan, unit_id: str) -> bool:
    """True when the unit's record exists."""
    return record_path(plan, unit_id).exists()


def _die_with_parent() -> list[str]:
    """Command prefix that makes a child die with the tool (Linux `setpriv --pdeathsig`), or [] without it.

    A killed tool then leaves no orphan that finishes a training behind the next run's back. PDEATHSIG
    survives exec, and setting it through setpriv avoids `preexec_fn`, which is unsafe with threads.
    """
    found = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [found, "--pdeathsig", "KILL", "--"] if found else []


def stop_orphan(pid_file: Path, marker: str) -> None:
    """Kill the process recorded in `pid_file` if it still runs a command naming `marker` (a run folder).

    Second line of defence after PDEATHSIG: a training left running by a killed tool (another OS, or a
    child that outlived it) must not keep writing into the folder a rerun resumes from.
    """
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text() or 0)
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        alive = pid > 0 and marker in cmdline.read_bytes().decode(errors="replace")
    except OSError:
        alive = False
    if alive:
        _say(f"stopping process {pid} left running by an earlier, killed run ({marker})")
        os.kill(pid, 9)
        for _ in range(200):
            if not cmdline.exists():
                break
            time.sleep(0.05)
    pid_file.unlink(missing_ok=True)


def run_cmd(cmd: list[str], log: Path, env: dict | None = None, pid_file: Path | None = None) -> float:
    """Run `cmd` with output to `log`; returns the wall seconds, raises RuntimeError with the log tail on failure.

    With `pid_file`, the child's pid is kept there while it runs (see `stop_orphan`).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **CHILD_THREADS, **(env or {})}
    full_env.setdefault("MUJOCO_GL", "egl")
    start = time.time()
    with open(log, "ab") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen([*_die_with_parent(), *cmd], stdout=fh, stderr=subprocess.STDOUT, env=full_env)
        if pid_file is not None:
            _atomic_write(pid_file, str(proc.pid))
        rc = proc.wait()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"exit code {rc}: {shlex.join(cmd)}\n--- last lines of {log} ---\n{tail}")
    return time.time() - start


# Thread-count variables every child gets (set by `main` from --threads_per_job); empty keeps the caller's.
CHILD_THREADS: dict[str, str] = {}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def threads_per_job(jobs: int, requested: int | None, environ=os.environ, cpus: int | None = None) -> dict[str, str]:
    """Thread-count variables for the children of a run with `jobs` units side by side.

    Without them each torch child starts one thread per core, so N jobs run N x cores threads; on a small
    shared machine their spin-waits starve each other (measured in benchmarks/eval_cost_bench.py; figures in
    docs/benchmarks.md). An explicit --threads_per_job wins, then the caller's OMP_NUM_THREADS, then
    cores // jobs.
    """
    if requested is not None:
        n = requested
    elif environ.get("OMP_NUM_THREADS"):
        return {}
    else:
        n = max(1, (cpus or os.cpu_count() or 1) // max(1, jobs))
    return {k: str(n) for k in THREAD_VARS}


def _log(plan: Plan, unit: Unit) -> Path:
    return plan.out / "logs" / f"{unit.id.replace('/', '__')}.log"


def unit_commands(plan: Plan, unit: Unit) -> list[list[str]]:
    """The commands a unit runs from scratch (training's resume command is decided at run time)."""
    if unit.kind == "record":
        r = plan.record
        return [[_bin("lerobot-wm-record-metaworld"), f"--dataset.repo_id={plan.repo_id}", f"--dataset.root={plan.root}",
                 f"--env.task={','.join(r['tasks'])}", f"--episodes_per_task={r['episodes_per_task']}",
                 f"--seed={r.get('seed', 0)}", f"--max_steps={r.get('max_steps', 200)}",
                 *[str(f) for f in r.get("flags", [])]]]  # fmt: skip
    if unit.kind == "fit_encoder":  # reruns resume a killed fit from its last save (same flags)
        f = plan.fits[encoder_label(plan, unit.encoder)]
        return [[_bin("lerobot-wm-fit-encoder"), f"--dataset.repo_id={plan.repo_id}", f"--dataset.root={plan.root}",
                 f"--camera={','.join(plan.cameras)}", f"--output_dir={unit.encoder}", f"--steps={f.get('steps', 400)}",
                 f"--seed={f.get('seed', 0)}", "--no_progress", *[str(x) for x in f.get("flags", [])]]]  # fmt: skip
    if unit.kind == "precompute":
        return [[_bin("lerobot-wm-precompute"), f"--dataset.repo_id={plan.repo_id}", f"--dataset.root={plan.root}",
                 f"--encoder={unit.encoder}", f"--cache_root={plan.cache_root}", f"--camera={','.join(plan.cameras)}"]]
    arm = plan.arms[unit.arm]
    ckpt = final_checkpoint(plan, unit.arm, unit.seed)
    if unit.kind == "train":
        return [[_bin("lerobot-train"), *train_flags(plan, arm, unit.seed)]]
    if unit.kind == "eval":
        out = plan.out / "eval" / unit.arm / f"seed{unit.seed}" / unit.task / unit.mode
        launcher = [sys.executable, "-c", METAWORLD_LAUNCHER] if plan.env == "metaworld" else [_bin("lerobot-eval")]
        cmd = [*launcher, f"--policy.path={ckpt}", *plan.eval_flags, f"--env.type={plan.env}", f"--env.task={unit.task}",
               f"--eval.n_episodes={plan.episodes}", f"--eval.batch_size={min(plan.episodes, int(plan.spec['eval'].get('batch_size', 1)))}",
               f"--seed={plan.eval_seed}", f"--output_dir={out}"]  # fmt: skip
        if plan.episode_length:
            cmd.insert(len(launcher) + 1, f"--env.episode_length={plan.episode_length}")
        if plan.env == "metaworld":  # the launcher's own flag: stock lerobot-eval renders 10 videos per run
            cmd.insert(len(launcher) + 1, f"--max_videos={int(plan.spec['eval'].get('videos', 1))}")
        if unit.mode in arm.rollout_flags:  # a named variant: its flags, the checkpoint's own memory mode
            cmd[len(launcher) + 1 : len(launcher) + 1] = arm.rollout_flags[unit.mode]
        elif unit.mode != NO_MEMORY_MODE:
            cmd.insert(len(launcher) + 1, f"--policy.memory_mode_rollout={unit.mode}")
        if _explains(plan, arm, cmd) and not any(f.startswith("--policy.explain_path=") for f in cmd):
            cmd.append(f"--policy.explain_path={out / EXPLANATIONS_FILE}")  # lerobot-eval cannot save texts itself
        return [cmd]
    if unit.kind == "probe":
        p = plan.probe
        cmd = [_bin("lerobot-wm-probe"), f"--policy.path={ckpt}", f"--dataset.root={arm_dataset_root(plan, arm)}",
               f"--dataset.repo_id={plan.repo_id}", f"--batches={p.get('batches', 4)}", f"--batch_size={p.get('batch_size', 16)}",
               f"--out={probe_path(plan, unit.arm, unit.seed)}"]  # fmt: skip
        if "threshold" in p:
            cmd.append(f"--threshold={p['threshold']}")
        if plan.heldout:
            cmd.append(f"--episodes={','.join(map(str, plan.heldout))}")
        return [cmd]
    raise ValueError(unit.kind)


def _explains(plan: Plan, arm: Arm, eval_cmd: list[str]) -> bool:
    """Whether an evaluation generates explanations: --policy.explain=true in its flags or its training flags."""
    flags = [*eval_cmd, *arm.flags, *plan.common_flags]
    last = [f.split("=", 1)[1].lower() for f in flags if f.startswith("--policy.explain=")]
    return bool(last) and last[-1] in ("true", "1", "yes")


def read_explanations(path: Path, successes: list[bool], batch_size: int, eval_seed: int) -> list[dict]:
    """An explanations JSONL (one row per new chunk) grouped per evaluated episode, with the episode's outcome.

    The policy numbers its rollouts per `reset()`, and lerobot-eval resets once per batch of
    `batch_size` vectorised envs, so the evaluated episode is `episode * batch_size + env`; its env seed
    is `eval_seed` plus that index, as in the unit's `seeds`.
    """
    episodes: dict[int, list] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            index = int(row["episode"]) * batch_size + int(row.get("env", 0))
            episodes.setdefault(index, []).append([int(row["step"]), str(row["text"])])
    return [{"episode": i, "seed": eval_seed + i, "success": successes[i] if i < len(successes) else None,
             "texts": sorted(texts, key=lambda t: t[0])} for i, texts in sorted(episodes.items())]  # fmt: skip


def run_unit(plan: Plan, unit: Unit) -> dict:
    """Run one unit (resuming a killed training); returns its record (seconds, commands, results)."""
    log = _log(plan, unit)
    cmds = unit_commands(plan, unit)
    record: dict = {"id": unit.id, "kind": unit.kind, "commands": [shlex.join(c) for c in cmds]}
    if unit.kind == "train":
        return run_train(plan, unit, cmds[0], log, record)
    if unit.kind == "eval":
        out = Path(next(f for f in cmds[0] if f.startswith("--output_dir=")).split("=", 1)[1])
        shutil.rmtree(out, ignore_errors=True)  # a killed evaluation leaves nothing worth keeping
        record["seconds"] = run_cmd(cmds[0], log)
        info = json.loads((out / "eval_info.json").read_text())
        record["successes"] = [bool(s) for t in info["per_task"] for s in t["metrics"]["successes"]]
        record["seeds"] = list(range(plan.eval_seed, plan.eval_seed + len(record["successes"])))
        if (out / EXPLANATIONS_FILE).exists():
            batch = int(next(f for f in cmds[0] if f.startswith("--eval.batch_size=")).split("=", 1)[1])
            record["explanations_file"] = str(out / EXPLANATIONS_FILE)
            record["explanations"] = read_explanations(out / EXPLANATIONS_FILE, record["successes"], batch, plan.eval_seed)
        return record
    record["seconds"] = run_cmd(cmds[0], log)
    if unit.kind == "probe":
        record["probe"] = json.loads(probe_path(plan, unit.arm, unit.seed).read_text())
    return record


def run_train(plan: Plan, unit: Unit, fresh: list[str], log: Path, record: dict) -> dict:
    """Train one arm-seed, from scratch or from its last checkpoint, then measure its checkpoints."""
    run = train_dir(plan, unit.arm, unit.seed)
    partial_path = run.parent / f".seed{unit.seed}.attempts.json"  # wall time of earlier, interrupted attempts
    pid_file = run.parent / f".seed{unit.seed}.pid"
    stop_orphan(pid_file, str(run))
    earlier = _earlier_seconds(partial_path, run)
    last_cfg = run / "checkpoints" / "last" / "pretrained_model" / "train_config.json"
    if (final_checkpoint(plan, unit.arm, unit.seed) / "model.safetensors").exists():
        seconds = 0.0
    elif last_cfg.exists():
        done = json.loads((last_cfg.parent.parent / "training_state" / "training_step.json").read_text())["step"]
        _say(f"{unit.id}: resuming from its checkpoint at step {done}")
        cmd = [_bin("lerobot-train"), f"--config_path={last_cfg}", "--resume=true"]
        record["commands"].append(shlex.join(cmd))
        seconds = _timed_attempt(cmd, log, partial_path, earlier, pid_file)
    else:
        shutil.rmtree(run, ignore_errors=True)  # started but no checkpoint yet: nothing to keep
        seconds = _timed_attempt(fresh, log, partial_path, earlier, pid_file)
    record["seconds"] = earlier + seconds
    curves = run / "compare_curves.json"
    arm = plan.arms[unit.arm]
    cmd = [sys.executable, "-c", CURVES_LAUNCHER, str(run), str(arm_dataset_root(plan, arm)), plan.repo_id, str(curves),
           str(plan.spec["train"].get("curve_batches", 2))]  # fmt: skip
    try:
        run_cmd(cmd, log)
        record["checkpoint_metrics"] = json.loads(curves.read_text())
    except (RuntimeError, OSError) as err:  # curves are a nicety; the trained checkpoint is what matters
        record["checkpoint_metrics_error"] = str(err).splitlines()[0]
    from .report import parse_train_log

    record["train_loss_curve"] = parse_train_log(log.read_text(errors="replace"), plan.log_freq)
    partial_path.unlink(missing_ok=True)
    return record


def _earlier_seconds(partial_path: Path, run: Path) -> float:
    """Wall seconds of earlier attempts; a killed one counts up to its last saved checkpoint (what it kept)."""
    if not partial_path.exists():
        return 0.0
    attempts = json.loads(partial_path.read_text())
    seconds = float(attempts["seconds"])
    step_file = run / "checkpoints" / "last" / "training_state" / "training_step.json"
    if attempts.get("started") is not None and step_file.exists():
        seconds += max(0.0, step_file.stat().st_mtime - attempts["started"])
    return seconds


def _timed_attempt(cmd: list[str], log: Path, partial_path: Path, earlier: float, pid_file: Path) -> float:
    start = time.time()
    _atomic_write(partial_path, json.dumps({"seconds": earlier, "started": start}))
    try:
        return run_cmd(cmd, log, pid_file=pid_file)
    finally:  # keep the time spent when this attempt fails (a SIGKILL skips this: see _earlier_seconds)
        _atomic_write(partial_path, json.dumps({"seconds": earlier + time.time() - start, "started": None}))


def checkpoint_curves_main() -> None:
    """`python -c ...` entry: per-checkpoint forward scalars of a training run, as JSON (argv: run view repo out batches)."""
    from .report import checkpoint_metrics

    run, root, repo_id, out, n_batches = sys.argv[1:6]
    rows = []
    for ckpt in sorted(p for p in (Path(run) / "checkpoints").iterdir() if p.name.isdigit()):
        rows.append({"step": int(ckpt.name), **checkpoint_metrics(ckpt / "pretrained_model", root, n_batches=int(n_batches),
                                                                   batch_size=16, repo_id=repo_id)})  # fmt: skip
    _atomic_write(Path(out), json.dumps(rows, indent=2))


def changed_since_done(plan: Plan, unit: Unit) -> list[str]:
    """Arguments that differ between a done unit's recorded first command and the one the spec gives now.

    Non-empty when the spec changed after the unit ran (an arm's flags edited in place): its results would
    otherwise be reported as if they came from the new flags. The program path (argv[0]) is not compared, so
    a rerun from another environment is not flagged.
    """
    recorded = json.loads(record_path(plan, unit.id).read_text()).get("commands") or []
    if not recorded:
        return []
    was, now = shlex.split(recorded[0])[1:], unit_commands(plan, unit)[0][1:]
    return sorted(set(was) ^ set(now)) if was != now else []


def execute(plan: Plan, units: list[Unit], jobs: int = 1, num_shards: int = 1, shard_index: int = 0,
            poll_s: float = 5.0, evals_last: bool = False) -> list[str]:
    """Run this shard's unfinished units, `jobs` at a time, in dependency order; returns the failed unit ids.

    `evals_last` starts an evaluation only when no other unit is ready: every training and probe (the cheap
    "is the memory used?" answer) comes first, the simulator-bound evaluations after.
    """
    by_id = {u.id: u for u in units}
    mine = [u for u in units if shard_of(u, num_shards) == shard_index]
    todo = [u for u in mine if not is_done(plan, u.id)]
    for u in mine:
        if is_done(plan, u.id):
            changed = changed_since_done(plan, u)
            if changed:
                _say(f"WARNING {u.id}: done - skipped, but it ran with other arguments than the spec gives now "
                     f"(differing: {changed}). Its results are kept and reported; to redo it with the new ones, "
                     f"delete {record_path(plan, u.id)}, or give the changed arm a new name.")
            else:
                _say(f"{u.id}: done - skipped")
    if not todo:
        _say("nothing to do: every unit of this shard is done")
        return []
    failed: list[str] = []
    waiting_said: set[str] = set()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        running: dict = {}
        while todo or running:
            blocked = [u for u in todo if any(d in failed for d in u.deps)]
            for u in blocked:
                _say(f"{u.id}: not run, it needs {[d for d in u.deps if d in failed]}, which failed")
                failed.append(u.id)
                todo.remove(u)
            ready = [u for u in todo if all(is_done(plan, d) for d in u.deps)]
            if evals_last:
                ready.sort(key=lambda u: u.kind == "eval")  # stable: plan order within each group
            for u in ready[: max(1, jobs) - len(running)]:
                todo.remove(u)
                _say(f"{u.id}: started (log {_log(plan, u)})")
                running[pool.submit(run_unit, plan, u)] = u
            if not running:
                other = sorted({d for u in todo for d in u.deps if not is_done(plan, d)} - waiting_said)
                for d in other:
                    _say(f"waiting for {d} (shard {shard_of(by_id[d], num_shards)}) to finish")
                waiting_said.update(other)
                time.sleep(poll_s)
                continue
            done_now, _ = wait(list(running), timeout=poll_s, return_when=FIRST_COMPLETED)
            for fut in done_now:
                u = running.pop(fut)
                try:
                    rec = fut.result()
                except Exception as err:  # noqa: BLE001 - one failed unit must not stop the others
                    _say(f"{u.id}: FAILED {err}")
                    failed.append(u.id)
                    continue
                _atomic_write(record_path(plan, u.id), json.dumps(rec, indent=2))
                _say(f"{u.id}: done in {rec.get('seconds', 0):.0f} s")
    return failed


# ---------------------------------------------------------------------------------------------- report
def collect(plan: Plan, units: list[Unit]) -> dict:
    """report.json's content from the unit records that exist."""
    from . import stats

    recs = {u.id: json.loads(record_path(plan, u.id).read_text()) for u in units if is_done(plan, u.id)}
    unit_rows = [{"id": u.id, "kind": u.kind, "status": "done" if u.id in recs else "missing",
                  "seconds": round(recs[u.id]["seconds"], 1) if u.id in recs else None,
                  "commands": recs.get(u.id, {}).get("commands", [])} for u in units]  # fmt: skip
    # Outcomes per (arm, mode): episode lists in a fixed (seed, task, episode) order, so X and Y pair up.
    outcomes: dict[tuple, list] = {}
    results = []
    for arm in plan.arms.values():
        for task in plan.tasks:
            for mode in arm.modes:
                per_seed = {}
                for seed in plan.seeds:
                    rec = recs.get(f"eval/{arm.name}/seed{seed}/{task}/{mode}")
                    if rec:
                        per_seed[seed] = rec["successes"]
                        outcomes.setdefault((arm.name, mode), {})[(seed, task)] = rec["successes"]
                flat = [s for v in per_seed.values() for s in v]
                mean, spread = stats.seed_spread([sum(v) / len(v) for v in per_seed.values() if v])
                results.append({"arm": arm.name, "task": task, "mode": mode, "seeds": sorted(per_seed),
                                **stats.rate_summary(sum(flat), len(flat)), "seed_mean": mean, "seed_sd": spread,
                                "per_seed": {str(s): sum(v) / len(v) for s, v in per_seed.items() if v}})  # fmt: skip
    comparisons = []
    for x, y in plan.comparisons:
        xo = outcomes.get(tuple(x.split("@")), {})
        yo = outcomes.get(tuple(y.split("@")), {})
        keys = [k for k in ((s, t) for s in plan.seeds for t in plan.tasks) if k in xo and k in yo]
        xs = [a for k in keys for a, _ in zip(xo[k], yo[k], strict=False)]
        ys = [b for k in keys for _, b in zip(xo[k], yo[k], strict=False)]
        comp = stats.paired_comparison(x, y, xs, ys, alpha=plan.alpha) if xs else {"x": x, "y": y, "pairs": 0,
                                                                                  "verdict": "not evaluated yet"}
        # Per task as well: a task every arm solves (or fails) dilutes the pooled test of the others.
        if len(plan.tasks) > 1 and xs:
            comp["per_task"] = {}
            for task in plan.tasks:
                tk = [k for k in keys if k[1] == task]
                txs = [a for k in tk for a, _ in zip(xo[k], yo[k], strict=False)]
                tys = [b for k in tk for _, b in zip(xo[k], yo[k], strict=False)]
                if txs:
                    comp["per_task"][task] = stats.paired_comparison(x, y, txs, tys, alpha=plan.alpha)
        comparisons.append(comp)
    probes = []
    for u in units:
        if u.kind == "probe" and u.id in recs:
            probes.append({"arm": u.arm, "seed": u.seed, **probe_row(recs[u.id]["probe"])})
    explanations = [{"arm": u.arm, "seed": u.seed, "task": u.task, "mode": u.mode, "file": recs[u.id].get("explanations_file"),
                     "episodes": recs[u.id]["explanations"]}
                    for u in units if u.kind == "eval" and u.id in recs and "explanations" in recs[u.id]]  # fmt: skip
    curves = {f"{u.arm} s{u.seed}": {"console_loss": recs[u.id].get("train_loss_curve", []),
                                       "checkpoints": recs[u.id].get("checkpoint_metrics", [])}
              for u in units if u.kind == "train" and u.id in recs}  # fmt: skip
    return {
        "name": plan.spec["name"], "output_dir": str(plan.out), "dataset": {"repo_id": plan.repo_id, "root": str(plan.root),
        "cameras": plan.cameras, "encoder": plan.encoder, "heldout_episodes": plan.heldout},
        "budget": {"seeds": plan.seeds, "steps": plan.steps, "batch_size": plan.batch_size},
        "eval": {"env": plan.env, "tasks": plan.tasks, "episodes": plan.episodes, "seed": plan.eval_seed,
                 "episode_length": plan.episode_length},
        "arms": {a.name: {"policy_type": a.policy_type, "flags": a.flags, "init_from": a.init_from, "modes": a.modes,
                          "has_memory": a.has_memory, "rollout_flags": a.rollout_flags,
                          "encoder": encoder_label(plan, a.encoder) if a.uses_latents else None}
                 for a in plan.arms.values()},
        "results": results, "comparisons": comparisons, "probes": probes, "explanations": explanations, "curves": curves,
        "units": unit_rows,
        "complete": all(r["status"] == "done" for r in unit_rows),
    }  # fmt: skip


# Columns of the probe table from the probe's `planning` block (can the planner's score rank chunks?).
PLANNING_COLUMNS = {
    "plan_expert_beats_perturbed": "expert_beats_perturbations",
    "plan_expert_is_best": "expert_is_best",
    "plan_expert_between_mirrored": "expert_between_mirrored",
    "plan_distance_ratio": "planned_distance_ratio",
    "plan_progress_spearman": "progress_spearman",
    "plan_reward_spearman": "reward_spearman",
    "dyn_action_sensitivity": "dynamics_action_sensitivity",
}


def probe_row(probe: dict) -> dict:
    """The probe table's columns of one probe JSON: verdict, gate, entropy, and every world_* scalar it has."""
    from .report import probe_verdict, world_cos_keys

    plan = probe.get("planning") or {}
    planning = {name: plan.get(key) for name, key in PLANNING_COLUMNS.items()}
    scalars = {k: v for k, v in {**probe, **probe.get("world_cosine", {}), **probe.get("world_copy_cosine", {}),
                                 **probe.get("world_motion_cosine", {}), **probe.get("dynamics_cosine", {}),
                                 **probe.get("dynamics_motion_cosine", {}), **planning}.items()
               if k.startswith(("world_", "dyn_", "plan_")) and isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
    ordered = world_cos_keys(scalars) + sorted(k for k in scalars if k not in world_cos_keys(scalars))
    return {"reads_memory": probe.get("reads_memory"), "gate": probe.get("gate"),
            "attn_entropy": probe.get("attn_entropy"), "attn_entropy_uniform": probe.get("attn_entropy_uniform"),
            "action_loss_change_vs_pred": probe.get("action_loss_change_vs_pred", {}),
            "world": {k: scalars[k] for k in ordered}, "verdict": probe_verdict(probe)}  # fmt: skip


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.1f}%"


def _num(v) -> str:
    return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def results_markdown(report: dict) -> str:
    """results.md: the tables of the report in Markdown (success rates, comparisons, probes, units)."""
    lines = [f"# {report['name']}", "",
             f"Budget: {report['budget']['steps']} steps, batch {report['budget']['batch_size']}, seeds "
             f"{report['budget']['seeds']}. Eval: {report['eval']['env']}, {report['eval']['episodes']} episodes per "
             f"task and seed from seed {report['eval']['seed']}.", "",
             "## Arms", "", "| arm | policy | world encoder | rollout memory |", "|---|---|---|---|",
             *[f"| {name} | {a['policy_type']} | {a.get('encoder') or '-'} | {', '.join(a['modes'])} |"
               for name, a in report["arms"].items()], "",
             "## Success rates", "",
             "| arm | task | rollout memory | successes / episodes | rate | Wilson 95% | seed mean ± sd |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["results"]:
        lines.append(f"| {r['arm']} | {r['task']} | {r['mode']} | {r['successes']} / {r['episodes']} | {_pct(r['rate'])} | "
                     f"{_pct(r['ci_low'])} – {_pct(r['ci_high'])} | {_pct(r['seed_mean'])} ± {_pct(r['seed_sd'])} |")
    lines += ["", "## Comparisons (paired by env seed)", "",
              "| X vs Y | pairs | X | Y | X−Y (bootstrap 95%) | only X / only Y | McNemar p | verdict | episodes for 10 pts |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in report["comparisons"]:
        if not c.get("pairs"):
            lines.append(f"| {c['x']} vs {c['y']} | 0 | | | | | | {c['verdict']} | |")
            continue
        lo, hi = c["bootstrap_ci"]
        lines.append(f"| {c['x']} vs {c['y']} | {c['pairs']} | {_pct(c['x_rate'])} | {_pct(c['y_rate'])} | "
                     f"{100 * c['difference']:+.1f} pts ({100 * lo:+.1f}, {100 * hi:+.1f}) | {c['x_only']} / {c['y_only']} | "
                     f"{c['p_value']:.3g} | {c['verdict']} | {c['episodes_for_10pt']} |")
    if report["comparisons"] and any(c.get("pairs") for c in report["comparisons"]):
        lines += ["", "Episodes for 10 pts: " + next(c["power_assumption"] for c in report["comparisons"] if c.get("pairs"))]
    if any(c.get("per_task") for c in report["comparisons"]):
        lines += ["", "## Comparisons per task (paired by env seed)", "",
                  "| X vs Y | task | pairs | X | Y | X−Y (bootstrap 95%) | only X / only Y | McNemar p | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in report["comparisons"]:
            for task, t in c.get("per_task", {}).items():
                lo, hi = t["bootstrap_ci"]
                lines.append(f"| {c['x']} vs {c['y']} | {task} | {t['pairs']} | {_pct(t['x_rate'])} | {_pct(t['y_rate'])} | "
                             f"{100 * t['difference']:+.1f} pts ({100 * lo:+.1f}, {100 * hi:+.1f}) | {t['x_only']} / "
                             f"{t['y_only']} | {t['p_value']:.3g} | {t['verdict']} |")
    lines += ["", "## World-memory probe (per checkpoint)", ""]
    if report["probes"]:
        wkeys = list(dict.fromkeys(k for p in report["probes"] for k in p["world"]))
        # The interventions' effects are the evidence the verdict rests on, so they sit next to it.
        lines += ["| arm | seed | reads memory? | action loss Δ shuffle | action loss Δ zero | gate tanh(g) | "
                  "attention entropy (uniform) | " + " | ".join(wkeys) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(wkeys)]  # fmt: skip
        for p in report["probes"]:
            ent = f"{_num(p['attn_entropy'])} ({_num(p['attn_entropy_uniform'])})"
            change = p.get("action_loss_change_vs_pred", {})
            deltas = " | ".join(f"{100 * change[k]:+.1f}%" if k in change else "" for k in ("shuffle", "zero"))
            reads = "n/a (no memory)" if p["reads_memory"] is None else ("yes" if p["reads_memory"] else "NO")
            lines.append(f"| {p['arm']} | {p['seed']} | {reads} | {deltas} | "
                         f"{_num(p['gate'])} | {ent} | " + " | ".join(_num(p["world"].get(k)) for k in wkeys) + " |")
    else:
        lines.append("No checkpoint with a world memory was probed.")
    lines += explanations_markdown(report.get("explanations", []))
    lines += ["", "## Units", "", "| unit | status | wall s |", "|---|---|---|"]
    lines += [f"| {u['id']} | {u['status']} | {_num(u['seconds'])} |" for u in report["units"]]
    return "\n".join(lines) + "\n"


def _text_spans(texts: list) -> list[str]:
    """Consecutive identical texts as one span: `steps 0-10: text` (the policy often repeats itself)."""
    spans: list[list] = []
    for step, text in texts:
        if spans and spans[-1][2] == text:
            spans[-1][1] = step
        else:
            spans.append([step, step, text])
    return [f"step {a}: {t or '(empty)'}" if a == b else f"steps {a}-{b}: {t or '(empty)'}" for a, b, t in spans]


def explanations_markdown(units: list[dict]) -> list[str]:
    """The report's explanations section: per eval unit, what the policy said in a few successes and failures."""
    if not units:
        return []
    lines = ["", "## Explanations at rollout", "",
             f"What the policy said at each new chunk (--policy.explain=true), for up to {REPORT_EXPLAINED_EPISODES} "
             "successful and failed episodes per evaluation; every text is in the unit's file."]  # fmt: skip
    for u in units:
        lines += ["", f"### {u['arm']}@{u['mode']}, seed {u['seed']}, {u['task']}", "", f"File: {u['file']}", ""]
        for outcome in (True, False):
            for ep in [e for e in u["episodes"] if e["success"] is outcome][:REPORT_EXPLAINED_EPISODES]:
                lines.append(f"- episode {ep['episode']} (env seed {ep['seed']}, {'success' if outcome else 'failure'}): "
                             + "; ".join(_text_spans(ep["texts"])))  # fmt: skip
    return lines


def success_png(report: dict) -> bytes:
    """Success rate per task, one bar per arm@mode, Wilson 95% error bars (all seeds pooled), as PNG bytes."""
    from .plots import grouped_bars_png

    nan = float("nan")
    groups: dict[str, list] = {}
    for task in report["eval"]["tasks"]:
        for r in report["results"]:
            if r["task"] == task:
                cell = (100 * r["rate"], 100 * r["ci_low"], 100 * r["ci_high"]) if r["episodes"] else (nan, nan, nan)
                groups.setdefault(f"{r['arm']}@{r['mode']}", []).append(cell)
    return grouped_bars_png(report["eval"]["tasks"], groups, "Success rate per task (all seeds, Wilson 95%)")


def report_charts(report: dict) -> list[str]:
    """The report's charts: success bars with Wilson error bars, console loss, action/world loss and gate curves."""
    from .plots import bar_chart, img_tag, line_chart

    res = report["results"]
    if len(report["eval"]["tasks"]) > 1:
        arms = ", ".join(dict.fromkeys(f"{r['arm']}@{r['mode']}" for r in res))
        return [img_tag(success_png(report), f"Success rate per task: {arms}"), *report_charts_curves(report)]
    charts = [bar_chart([f"{r['arm']}@{r['mode']}\n{r['task']}" if len(report["eval"]["tasks"]) > 1 else f"{r['arm']}@{r['mode']}"
                         for r in res], [100 * r["rate"] if r["episodes"] else float("nan") for r in res],
                        "Success rate (all seeds, Wilson 95%)",
                        errors=[(100 * r["ci_low"], 100 * r["ci_high"]) if r["episodes"] else (0, 0) for r in res])]  # fmt: skip
    return [*charts, *report_charts_curves(report)]


def report_charts_curves(report: dict) -> list[str]:
    """The training charts: console loss per run; action loss, world loss and gate per saved checkpoint."""
    from .plots import line_chart

    charts = []
    curves = report["curves"]
    charts.append(line_chart({k: v["console_loss"] for k, v in curves.items()}, "Training loss (lerobot-train console)", ylabel="loss"))
    for key, title in (("action_loss", "Action loss per checkpoint"), ("world_loss", "World loss per checkpoint"),
                       ("gate", "Gate tanh(g) per checkpoint")):  # fmt: skip
        series = {k: [(m["step"], m[key]) for m in v["checkpoints"] if key in m] for k, v in curves.items()}
        series = {k: s for k, s in series.items() if s}
        if series:
            charts.append(line_chart(series, title, ylabel=key))
    return charts


def render_html(report: dict) -> str:
    """report.html: one self-contained page (the Markdown tables as HTML, charts as inline PNG, commands)."""
    import html

    from .report import PAGE_CSS

    esc = html.escape
    md = results_markdown(report)
    body = []
    table: list[str] = []

    def flush():
        if table:
            rows = [r.strip("|").split(" | ") for r in table if not set(r) <= set("|-")]
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{esc(c.strip())}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{esc(c.strip())}</td>" for c in r) + "</tr>" for r in rest)
                        + "</table>")  # fmt: skip
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("# "):
            body.append(f"<h1>{esc(line[2:])}</h1>")
        elif line.startswith("### "):
            body.append(f"<h3>{esc(line[4:])}</h3>")
        elif line.startswith("- "):
            body.append(f"<p class='item'>{esc(line[2:])}</p>")
        elif line.startswith("## "):
            body.append(f"<h2>{esc(line[3:])}</h2>")
            if line.startswith("## World-memory probe"):
                body.append("<ul>" + "".join(f"<li>{esc(p['arm'])} seed {p['seed']}: {esc(p['verdict'])}</li>"
                                             for p in report["probes"]) + "</ul>")  # fmt: skip
        elif line:
            body.append(f"<p>{esc(line)}</p>")
    flush()
    charts = "".join(f"<div class='cell'>{c}</div>" for c in report_charts(report))
    commands = "".join(f"<h3>{esc(u['id'])}</h3>" + "".join(f"<pre>{esc(c)}</pre>" for c in u["commands"])
                       for u in report["units"] if u["commands"])  # fmt: skip
    note = "" if report["complete"] else "<p><b>Incomplete:</b> some units have not finished (see Units).</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(report['name'])}: lerobot-wm-compare</title>
<style>{PAGE_CSS}</style></head><body>
{note}{''.join(body)}
<h2>Charts</h2><div class="grid">{charts}</div>
<h2>Commands</h2>{commands}
</body></html>
"""


def write_reports(plan: Plan, units: list[Unit]) -> dict:
    """Write report.json, results.md and report.html into the output folder; returns the report."""
    report = collect(plan, units)
    _atomic_write(plan.out / "report.json", json.dumps(report, indent=2))
    _atomic_write(plan.out / "results.md", results_markdown(report))
    _atomic_write(plan.out / "report.html", render_html(report))
    if report["results"]:
        atomic_write_bytes(plan.out / "success_rates.png", success_png(report))  # for docs and slides
    return report


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="lerobot-wm-compare", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="experiment file (YAML or JSON), e.g. configs/experiments/metaworld_smoke.yaml")
    p.add_argument("--output_dir", default=None, help="default: the spec's output_dir, else outputs/compare/<name>")
    p.add_argument("--jobs", type=int, default=1, help="units run side by side on this machine")
    p.add_argument("--threads_per_job", type=int, default=None,
                   help="torch/OpenMP threads of each child; default: $OMP_NUM_THREADS if set, else cores // jobs")
    p.add_argument("--num_shards", type=int, default=1, help="machines sharing the output folder")
    p.add_argument("--shard_index", type=int, default=0, help="which of --num_shards this process is (0-based)")
    p.add_argument("--evals_last", action="store_true",
                   help="run every training and probe before any evaluation (evaluations are the slow part)")
    p.add_argument("--no_evals", action="store_true",
                   help="run everything but the simulator evaluations (record, fits, trainings, probes), then "
                        "report; the same command without it adds the evaluations")
    p.add_argument("--dry_run", action="store_true", help="validate, list the units and commands, run nothing")
    p.add_argument("--report_only", action="store_true", help="only (re)write the report from finished units")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lerobot-wm-compare`."""
    args = build_parser().parse_args(argv)
    if args.jobs < 1 or args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        print("error: need --jobs >= 1, --num_shards >= 1 and 0 <= --shard_index < --num_shards.", file=sys.stderr)
        return 2
    if args.threads_per_job is not None and args.threads_per_job < 1:
        print(f"error: --threads_per_job must be >= 1 (got {args.threads_per_job}).", file=sys.stderr)
        return 2
    CHILD_THREADS.clear()
    CHILD_THREADS.update(threads_per_job(args.jobs, args.threads_per_job))
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        plan = validate(load_spec(args.spec), args.output_dir)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    units = plan_units(plan)
    plan.out.mkdir(parents=True, exist_ok=True)
    _atomic_write(plan.out / "spec.json", json.dumps(plan.spec, indent=2))
    threads = CHILD_THREADS.get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS", "torch default")
    _say(f"{len(units)} units, output in {plan.out} ({args.jobs} at a time, {threads} thread(s) each)")
    if args.dry_run:
        for u in units:
            state = "done" if is_done(plan, u.id) else f"shard {shard_of(u, args.num_shards)}"
            print(f"{u.id}  [{state}]  needs {u.deps or '-'}")
            for c in unit_commands(plan, u):
                print(f"    {shlex.join(c)}")
        return 0
    # The report still covers every unit: skipped evaluations show as missing, and a later run adds them.
    runnable = [u for u in units if u.kind != "eval"] if args.no_evals else units
    failed = [] if args.report_only else execute(plan, runnable, args.jobs, args.num_shards, args.shard_index,
                                                 evals_last=args.evals_last)
    report = write_reports(plan, units)
    _say(f"report: {plan.out / 'report.html'} ({'complete' if report['complete'] else 'incomplete'})")
    print(results_markdown(report))
    if failed:
        print(f"error: {len(failed)} unit(s) failed or were blocked: {failed}; see {plan.out / 'logs'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
