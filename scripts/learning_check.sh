#!/usr/bin/env bash
# Learning check (issue 4): world_f trained on <= 50 expert demos of button-press-v3 with the offline
# default encoder, bounded CPU training, 20 evaluation episodes with stock lerobot-eval.
# Target: >= 80% success. Results: outputs/learning_check/report.html (see docs/demo.md).
# Reuse an already recorded dataset with: bash scripts/learning_check.sh --dataset_root=<dir>
# It is the quickstart with larger settings: later flags override the quickstart's defaults.
# With a fitted encoder instead of pixels: bash scripts/learning_check.sh --encoder=fit
# (fits on the recorded demos first, reused on rerun; --fit_arg=--steps=6000 etc. tune the fit: the default
# 400 steps keep the quickstart short, and 6,000 is the fit that beat pixels on multi-stage tasks, docs/encoders.md).
set -euo pipefail
exec bash "$(dirname "$0")/quickstart.sh" --work_dir=outputs/learning_check --episodes=50 \
  --chunk_size=10 --n_action_steps=5 --steps=1500 --batch_size=64 --save_freq=500 --log_freq=50 \
  --eval_episodes=20 --episode_length=200 "$@"
