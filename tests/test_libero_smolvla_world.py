"""LIBERO: `smolvla_world` (tiny offline SmolVLM) trained on both cameras, then stock `lerobot-eval` on LIBERO.

Skips with the install command when hf-libero or its assets are missing (see tests/test_libero.py).
"""

from __future__ import annotations

import json

import pytest
from support import vlm
from support.libero import (
    LIBERO_ACTION_DIM,
    LIBERO_CAMERAS,
    LIBERO_OBJECT_TASK0,
    LIBERO_REPO,
    LIBERO_STATE_DIM,
    check_one_episode_eval,
    libero_home,  # noqa: F401  (fixture)
    make_libero_dataset,
    requires_libero,
    run_train_eval,
)
from support.vlm import TINY_SMOLVLA

from lerobot_policy_world_modality.constants import OBS_WORLD_LATENT

pytestmark = requires_libero
tiny_vlm = vlm.tiny_vlm  # the session fixture: one tiny SmolVLM for every test module

# LIBERO's env renders both cameras at 256x256 (HuggingFaceVLA/libero stores the same size).
LIBERO_HW = (256, 256)
# The tiny VLM's BPE knows few of LIBERO's words and spells the others letter by letter: room for the
# whole instruction of libero_object task 0 (about 25 tokens).
TOKENIZER_MAX_LENGTH = 32
# The tiny SmolVLA options, with that instruction length.
TINY_LIBERO_SMOLVLA = {**TINY_SMOLVLA, "tokenizer_max_length": TOKENIZER_MAX_LENGTH}
# A small world path: the few CPU training steps take seconds.
SMALL_WORLD = [
    "--policy.history_frames=2",
    "--policy.future_frames=2",
    "--policy.prophet_width=32",
    "--policy.prophet_depth=1",
    "--policy.prophet_heads=2",
    "--policy.fusion_heads=2",
]


def _policy_flag(name: str, value) -> str:
    """`--policy.<name>=<value>` as draccus parses it (tuples as [a,b], booleans lower-case)."""
    text = "[" + ",".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value).lower()
    return f"--policy.{name}={text}"


@pytest.fixture
def libero_256_dataset(tmp_path):
    """A LIBERO-shaped dataset whose two video cameras have the env's (and HuggingFaceVLA/libero's) 256x256."""
    root = tmp_path / "libero_256"
    make_libero_dataset(root, episode_lengths=(10, 7), image_hw=LIBERO_HW)
    return root


@pytest.mark.slow
def test_smolvla_world_two_cameras_train_and_lerobot_eval_on_libero(
    libero_256_dataset,
    libero_home,  # noqa: F811
    tiny_vlm,
    tmp_path,
):
    """Precompute both cameras, lerobot-train smolvla_world on the dataset with its frames, stock
    lerobot-eval on libero_object task 0: SmolVLA's cameras, state, action and instruction meet LIBERO's."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS
    from transformers import AutoTokenizer

    flags = [
        f"--policy.vlm_model_name={tiny_vlm}",
        *(_policy_flag(k, v) for k, v in TINY_LIBERO_SMOLVLA.items()),
        *SMALL_WORLD,
    ]
    ckpt, info = run_train_eval(
        "smolvla_world", flags, libero_256_dataset, tmp_path, env=libero_home, use_training_view=False
    )

    # The inputs are LIBERO's: lerobot-eval feeds the policy exactly these keys (LiberoEnv's features_map)
    # and the world step raises a KeyError naming any world camera missing from the live observation,
    # so a finished eval means both cameras reached SmolVLA's images and the world encoder.
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["type"] == "smolvla_world" and cfg["dataset_root"] == str(libero_256_dataset.resolve())
    features = cfg["input_features"]
    assert {k: (f["type"], f["shape"]) for k, f in features.items()} == {
        **{cam: ("VISUAL", [3, *LIBERO_HW]) for cam in LIBERO_CAMERAS},
        "observation.state": ("STATE", [LIBERO_STATE_DIM]),
    }
    assert cfg["output_features"]["action"]["shape"] == [LIBERO_ACTION_DIM]
    assert cfg["vlm_model_name"] == str(tiny_vlm) and cfg["tokenizer_max_length"] == TOKENIZER_MAX_LENGTH
    assert cfg["resize_imgs_with_padding"] == list(TINY_SMOLVLA["resize_imgs_with_padding"])
    assert cfg["world_cameras"] == list(LIBERO_CAMERAS)
    assert cfg["world_latent_dim"] == 2 * 768  # two 16x16x3 pixel thumbnails, concatenated
    steps = {
        s.get("registry_name"): s
        for s in json.loads((ckpt / "policy_preprocessor.json").read_text())["steps"]
    }
    assert steps["world_modality_latents"]["config"]["cameras"] == list(LIBERO_CAMERAS)
    assert "smolvla_world_instruction" in steps
    assert steps["tokenizer_processor"]["config"]["task_key"] == "task"

    # The instruction reaches the tokenizer: the checkpoint's own preprocessor, on a dataset frame, gives
    # the tokens of LIBERO's instruction (the instruction step, which refuses a missing or blank task,
    # also ran at every eval step on the env's `task`).
    pre = PolicyProcessorPipeline.from_pretrained(ckpt, config_filename="policy_preprocessor.json")
    frame = LeRobotDataset(LIBERO_REPO, root=libero_256_dataset, video_backend="pyav")[0]
    assert frame["task"] == LIBERO_OBJECT_TASK0
    batch = pre(frame)
    tokens = batch[OBS_LANGUAGE_TOKENS][0][batch[OBS_LANGUAGE_ATTENTION_MASK][0].bool()]
    expected = AutoTokenizer.from_pretrained(tiny_vlm)(LIBERO_OBJECT_TASK0 + "\n")["input_ids"]
    assert len(expected) < TOKENIZER_MAX_LENGTH and tokens.tolist() == expected  # whole, not truncated
    assert batch[OBS_WORLD_LATENT].shape == (1, 2 * 768)
    check_one_episode_eval(info)
