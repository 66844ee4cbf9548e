"""world_token_c on a real dataset and cache: fit tool, stock factory, online == cached tokens, train -> eval."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from support.cli import BIN, TINY_WORLD_TOKEN_C, capped_eval_cmd, short_train_flags
from support.datasets import make_synthetic_dataset

REPO = "local/world_token_c_e2e"


def _run(cmd, timeout=600):
    env = {**os.environ, "MUJOCO_GL": "egl"}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def dataset_root(tmp_path):
    root = tmp_path / "ds"
    make_synthetic_dataset(root, repo_id=REPO, episode_lengths=(12, 1, 9), image_hw=(48, 48))
    return root


def _fit(dataset_root, capsys, *extra) -> tuple[str, str]:
    """Run lerobot-wm-fit-codebook in-process; returns (its stdout, the codebook path it printed)."""
    from lerobot_policy_world_modality.tools.fit_codebook import main

    assert main([f"--dataset.repo_id={REPO}", f"--dataset.root={dataset_root}", *extra]) == 0
    out = capsys.readouterr().out
    flag = next(part for part in out.split() if part.startswith("--policy.codebook_path="))
    return out, flag.split("=", 1)[1]


def test_fit_tool_factory_and_online_tokens_equal_cached(dataset_root, capsys):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.policies.factory import (
        get_policy_class,
        make_policy,
        make_policy_config,
        make_pre_post_processors,
    )

    import lerobot_policy_world_modality  # noqa: F401  (registers the type)
    from lerobot_policy_world_modality.constants import OBS_WORLD_LATENT
    from lerobot_policy_world_modality.tools.precompute import main as precompute
    from lerobot_policy_world_modality.latents.processor import WorldLatentStep
    from lerobot_policy_world_modality.tools.fit_codebook import main as fit
    from lerobot_policy_world_modality.world.codebook import CodebookError, load_codebook, save_codebook
    from lerobot_policy_world_modality.world_token_c.modeling_world_token_c import WorldTokenCPolicy

    assert get_policy_class("world_token_c") is WorldTokenCPolicy
    with pytest.raises(SystemExit, match="lerobot-wm-precompute"):  # no cache yet: say how to build it
        fit([f"--dataset.repo_id={REPO}", f"--dataset.root={dataset_root}", "--codes=4"])
    assert precompute([f"--dataset.repo_id={REPO}", f"--dataset.root={dataset_root}", "--no_progress"]) == 0
    view_line = next(line for line in capsys.readouterr().out.splitlines() if "training view" in line)
    view = view_line.split(": ", 1)[1].strip()

    out, path = _fit(dataset_root, capsys, "--codes=4", "--iters=20", "--batch_size=16", "--seed=1")
    assert "lerobot-train --policy.type=world_token_c" in out and "perplexity" in out
    book, meta = load_codebook(path)
    cache_dir = Path(meta["caches"][0]["cache_dir"])
    assert Path(path).parent == cache_dir / "codebooks"  # next to the cache it was fitted on
    assert (
        json.loads((cache_dir / "meta.json").read_text())["fingerprint"] == meta["caches"][0]["fingerprint"]
    )
    assert meta["options"]["seed"] == 1 and meta["rows_fitted"] == 22 and len(meta["usage"]) == 1
    # Same options again: the finished file is found, not refitted.
    out_again, path_again = _fit(
        dataset_root, capsys, "--codes=4", "--iters=20", "--batch_size=16", "--seed=1"
    )
    assert "already fitted" in out_again and path_again == path
    # The training view printed by lerobot-wm-precompute leads to the same caches, hence the same file.
    out_view, path_view = _fit(view, capsys, "--codes=4", "--iters=20", "--batch_size=16", "--seed=1")
    assert "already fitted" in out_view and path_view == path and f"--dataset.root={view}" in out_view

    meta_ds = LeRobotDatasetMetadata(REPO, root=dataset_root)
    kw = dict(device="cpu", width=32, depth=1, heads=2, chunk_size=4, n_action_steps=2, future_frames=2)
    cfg = make_policy_config("world_token_c", codebook_path=path, **kw)
    policy = make_policy(cfg, ds_meta=meta_ds)
    assert isinstance(policy, WorldTokenCPolicy) and torch.equal(policy.codebook.centroids, book.centroids)
    assert (cfg.codebook_size, cfg.codebook_factors, cfg.codebook_digest) == (4, 1, meta["digest"])
    pre, post = make_pre_post_processors(cfg, dataset_stats=meta_ds.stats)
    assert any(isinstance(s, WorldLatentStep) for s in pre.steps)

    # Tokens of the cached latents (training batches carry `index`) equal tokens of the same frames
    # encoded online (evaluation batches do not), frame by frame.
    ds = LeRobotDataset(REPO, root=dataset_root, video_backend="pyav")
    items = [ds[i] for i in range(len(ds))]
    cached = pre(torch.utils.data.default_collate(items))
    live = {k: torch.stack([it[k] for it in items]) for k in ("observation.image", "observation.state")}
    online = pre(live)
    cached_tokens = policy.tokens(cached[OBS_WORLD_LATENT])
    online_tokens = torch.cat([policy.tokens(online[OBS_WORLD_LATENT][i : i + 1]) for i in range(len(items))])
    assert torch.equal(online_tokens, cached_tokens)
    assert cached_tokens.unique().numel() >= 3  # the check is not vacuous: frames get different tokens
    policy.reset()
    assert post(policy.select_action(online)).shape == (len(items), 4)

    # A codebook fitted on other latents than the training dataset's cache is refused with the fix.
    stale = dict(meta, caches=[{**meta["caches"][0], "fingerprint": "0" * 64}])
    other = save_codebook(Path(path).with_name("stale.safetensors"), book, stale)
    with pytest.raises(CodebookError, match="Refit it: lerobot-wm-fit-codebook"):
        make_policy(make_policy_config("world_token_c", codebook_path=str(other), **kw), ds_meta=meta_ds)


@pytest.mark.slow
def test_precompute_fit_train_eval_metaworld(dataset_root, tmp_path):
    res = _run([BIN / "lerobot-wm-precompute", f"--dataset.repo_id={REPO}", f"--dataset.root={dataset_root}"])
    assert res.returncode == 0, res.stderr
    res = _run(
        [
            BIN / "lerobot-wm-fit-codebook",
            f"--dataset.repo_id={REPO}",
            f"--dataset.root={dataset_root}",
            "--codes=4",
            "--factorisation=product",
            "--iters=10",
            "--batch_size=16",
        ]
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # The printed command carries the training view and the codebook: train with exactly those flags.
    train_line = res.stdout.split("Train with:")[1].strip().splitlines()[0]
    flags = [f.strip("'") for f in train_line.split()[1:] if f.startswith("--")]
    assert any(f.startswith("--policy.codebook_path=") for f in flags)
    flags = [f.replace("--policy.world_cameras='[", "--policy.world_cameras=[").rstrip("'") for f in flags]

    out = tmp_path / "train"
    res = _run(
        [
            BIN / "lerobot-train",
            *flags,
            "--policy.mask_world_from_actions=true",
            *TINY_WORLD_TOKEN_C,
            *short_train_flags(out, steps=4),
        ]
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ckpt = out / "checkpoints" / "last" / "pretrained_model"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["type"] == "world_token_c" and cfg["codebook_factorisation"] == "product"
    assert (cfg["codebook_size"], cfg["codebook_factors"]) == (4, 2)
    # The card a push would upload: the codebook and the training's token loss (docs/publishing.md).
    card = (ckpt / "README.md").read_text()
    assert "world_token_c" in card and cfg["codebook_digest"] in card and "world_ce:" in card

    # Evaluation reads neither the cache nor the codebook file: remove them all.
    shutil.rmtree(os.environ["LEROBOT_WM_CACHE"])
    eval_dir = tmp_path / "eval"
    res = _run(capped_eval_cmd(ckpt, eval_dir, episode_length=20))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    info = json.loads((eval_dir / "eval_info.json").read_text())
    overall = info.get("overall", info.get("aggregated", {}))
    assert torch.isfinite(torch.tensor(float(overall["avg_sum_reward"])))
