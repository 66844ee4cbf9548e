#!/usr/bin/env bash
# Learning check (issue 4): world_f trained on <= 50 expert demos of button-press-v3 with the offline
# default encoder, bounded CPU training, 20 evaluation episodes with stock lerobot-eval.
# Target: >= 80% success. Results: outputs/learning_check/report.html (see docs/demo.md).
# Reuse an already recorded dataset with: bash scripts/learning_check.sh --dataset_root=<dir>
set -euo pipefail
export MUJOCO_GL="${MUJOCO_GL:-egl}"
# One torch thread per process: on a 2-core machine shared with other jobs, two spinning OpenMP threads
# per process made training steps 10-30x slower (seen here: 3 s/step instead of 0.2 s/step).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
command -v lerobot-wm-demo >/dev/null || {
  echo "lerobot-wm-demo not found: activate the environment you installed the project into" \
       "(pip install -e '.[metaworld]'), e.g. source .venv/bin/activate" >&2
  exit 1
}
exec lerobot-wm-demo --work_dir=outputs/learning_check --task=button-press-v3 --episodes=50 \
  --size=small --chunk_size=10 --n_action_steps=5 --steps=1500 --batch_size=64 --save_freq=500 --log_freq=50 \
  --train_arg=--policy.optimizer_lr=3e-4 \
  --eval_episodes=20 --episode_length=200 "$@"
