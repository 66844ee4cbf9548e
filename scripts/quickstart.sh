#!/usr/bin/env bash
# The README's one-command demo: record 10 MetaWorld expert demos of button-press-v3, precompute world
# latents with the offline `pixels` encoder, train world_f with lerobot-train, evaluate it with
# lerobot-eval, and write outputs/demo/report.html. Rerunning reuses every finished stage.
# Extra flags are passed on to lerobot-wm-demo (see `lerobot-wm-demo --help`), e.g. `--encoder=fit` fits a
# small world encoder on the recorded frames first (lerobot-wm-fit-encoder, reused on rerun) instead of
# `pixels`, or `--encoder=<dir>` uses one fitted before.
set -euo pipefail
export MUJOCO_GL="${MUJOCO_GL:-egl}"
# One torch thread per process: on a 2-core machine shared with other jobs, two spinning OpenMP threads
# per process made training steps many times slower (figures in docs/benchmarks.md).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
command -v lerobot-wm-demo >/dev/null || {
  echo "lerobot-wm-demo not found: activate the environment you installed the project into" \
       "(pip install -e '.[metaworld]'), e.g. source .venv/bin/activate" >&2
  exit 1
}
exec lerobot-wm-demo --work_dir=outputs/demo --task=button-press-v3 --episodes=10 \
  --size=small --steps=1500 --batch_size=32 --train_arg=--policy.optimizer_lr=3e-4 \
  --eval_episodes=10 --episode_length=150 "$@"
