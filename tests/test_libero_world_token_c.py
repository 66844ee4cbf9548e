"""LIBERO: `world_token_c` with a codebook fitted on both cameras, trained, then stock `lerobot-eval` on LIBERO.

Skips with the install command when hf-libero or its assets are missing (see tests/test_libero.py).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil

import pytest
from safetensors import safe_open
from support.cli import TINY_WORLD_TOKEN_C
from support.libero import (
    LIBERO_CAMERAS,
    LIBERO_REPO,
    check_one_episode_eval,
    eval_libero,
    libero_dataset,  # noqa: F401  (fixture)
    libero_home,  # noqa: F401  (fixture)
    precompute_cameras,
    requires_libero,
    train_policy,
)

from lerobot_policy_world_modality.latents.encoders import load_encoder
from lerobot_policy_world_modality.tools.fit_codebook import main as fit_codebook
from lerobot_policy_world_modality.world.codebook import load_codebook

pytestmark = requires_libero
# Codes of the fitted codebook: few, so 10 k-means iterations on the 22 frames fit it.
CODES = 4


def _printed_train_flags(stdout: str) -> dict[str, str]:
    """The `--key=value` flags of the lerobot-train command that lerobot-wm-fit-codebook printed."""
    line = stdout.split("Train with:", 1)[1].strip().splitlines()[0]
    return dict(f.split("=", 1) for f in shlex.split(line) if f.startswith("--"))


@pytest.mark.slow
def test_world_token_c_two_cameras_fit_train_and_lerobot_eval_on_libero(
    libero_dataset,  # noqa: F811
    libero_home,  # noqa: F811
    tmp_path,
    capsys,
):
    """Precompute both cameras, fit the codebook on their concatenated latents, lerobot-train
    world_token_c on the training view with the printed flags, stock lerobot-eval from the checkpoint."""
    view = precompute_cameras(libero_dataset)
    single = load_encoder("pixels").dim  # one camera's latent dim
    cameras = ",".join(LIBERO_CAMERAS)
    # lerobot-wm-fit-codebook's entry point in-process: the import of the plugin is ~14 s of a subprocess
    # on this box (the console script itself runs in a subprocess in tests/test_world_token_c_e2e.py).
    fitted = fit_codebook(
        [
            f"--dataset.repo_id={LIBERO_REPO}",
            f"--dataset.root={libero_dataset}",
            f"--camera={cameras}",
            f"--codes={CODES}",
            "--iters=10",
            "--batch_size=16",
        ]
    )
    out = capsys.readouterr().out
    assert fitted == 0 and f"latents of dim {2 * single} (" in out, out  # both cameras, concatenated
    printed = _printed_train_flags(out)
    assert printed["--policy.world_cameras"] == f"[{cameras}]" and printed["--dataset.root"] == str(view)
    book, book_meta = load_codebook(printed["--policy.codebook_path"])
    assert book_meta["cameras"] == list(LIBERO_CAMERAS)
    assert [c["camera"] for c in book_meta["caches"]] == list(LIBERO_CAMERAS)

    # Train with exactly the printed policy flags (train_policy sets the printed dataset flags itself).
    flags = [f"{k}={v}" for k, v in printed.items() if k.startswith("--policy.") and k != "--policy.type"]
    ckpt = train_policy(
        "world_token_c", view, tmp_path / "train", flags + TINY_WORLD_TOKEN_C, env=libero_home
    )
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["type"] == "world_token_c" and cfg["world_cameras"] == list(LIBERO_CAMERAS)
    assert cfg["world_latent_dim"] == 2 * single  # per-camera latents concatenated
    assert book.dim == cfg["world_latent_dim"]
    assert (cfg["codebook_size"], cfg["codebook_factors"]) == (CODES, 1)
    assert cfg["codebook_digest"] == book_meta["digest"]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert f.get_slice("codebook.centroids").get_shape() == [1, CODES, 2 * single]
    pre = json.loads((ckpt / "policy_preprocessor.json").read_text())
    step = next(s for s in pre["steps"] if s.get("registry_name") == "world_modality_latents")
    assert step["config"]["cameras"] == list(LIBERO_CAMERAS)

    # Evaluation reads neither the latent cache nor the codebook file (it lives in the cache): remove them,
    # so both cameras of the live LIBERO frames are encoded online and tokenised by the checkpoint's buffer.
    shutil.rmtree(os.environ["LEROBOT_WM_CACHE"])
    check_one_episode_eval(eval_libero(ckpt, tmp_path / "eval", libero_home))
