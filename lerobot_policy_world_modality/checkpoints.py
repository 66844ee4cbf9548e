"""Strict weight loading for the plugin's policies: a checkpoint either fits exactly or is refused.

LeRobot 0.4.4's `PreTrainedPolicy.from_pretrained` loads weights with `strict=False` and only logs the
keys that did not fit. For a world-modality policy that is a silent failure: a checkpoint written by
another version of this plugin (modules renamed) evaluates with a randomly initialised Prophet and
cross-attention, and with the gate at 0 it even behaves like a plausible policy without world memory.
"""

from __future__ import annotations

import json
from pathlib import Path

# Config fields that never shape the weights: a difference in them explains no mismatch.
_RUNTIME_FIELDS = {
    "device",
    "pretrained_path",
    "use_amp",
    "push_to_hub",
    "repo_id",
    "private",
    "tags",
    "license",
}


class CheckpointMismatchError(ValueError):
    """The weights of a checkpoint do not fit the policy its config builds."""


class StrictCheckpointLoading:
    """Mixin for `PreTrainedPolicy` subclasses: `from_pretrained` refuses weights that do not fit exactly.

    Goes before `PreTrainedPolicy` in the bases; it replaces the one hook LeRobot's loader calls.
    """

    @classmethod
    def _load_as_safetensor(cls, model, model_file: str, map_location: str, strict: bool):
        """Load `model_file` into `model` on `map_location`; any missing or unexpected key is an error.

        `strict` is ignored on purpose: LeRobot passes False by default, which is what this refuses.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        try:
            missing, unexpected = load_model(model, model_file, strict=False, device=map_location)
        except RuntimeError as err:
            if "size mismatch" not in str(err):
                raise
            raise CheckpointMismatchError(
                f"The weights in {model_file} do not fit this {cls.name} policy: "
                f"{str(err).splitlines()[-1].strip()}{overrides_note(model.config, model_file)}"
            ) from None
        except (SafetensorError, OSError) as err:
            raise CheckpointMismatchError(
                f"Cannot read the weights file {model_file}: {err}. The file is damaged or incomplete (e.g. "
                "a copy or download that stopped early); copy or download the checkpoint again."
            ) from err
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"The weights in {model_file} do not fit this {cls.name} policy: {len(missing)} missing "
                f"(e.g. {sorted(missing)[:4]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:4]}). "
                "The checkpoint was written by another version of lerobot_policy_world_modality or for "
                "other architecture options. Evaluate it with the plugin version that trained it, or retrain."
                + overrides_note(model.config, model_file)
            )
        return model


def overrides_note(config, model_file: str) -> str:
    """The config fields that differ from the checkpoint's saved config.json, each named as the
    `--policy.<field>` override that contradicts the weights ("" when none differs or none is saved)."""
    import draccus

    saved_file = Path(model_file).parent / "config.json"
    if not saved_file.is_file():
        return ""
    saved = json.loads(saved_file.read_text())
    current = json.loads(json.dumps(draccus.encode(config)))
    differ = [k for k in saved if k in current and k not in _RUNTIME_FIELDS and current[k] != saved[k]]
    if not differ:
        return ""
    names = "; ".join(
        f"--policy.{k}={json.dumps(current[k])} contradicts the weights (trained with {k}={json.dumps(saved[k])})"
        for k in differ
    )
    return f". {names}. Drop these overrides: they change the architecture the weights were trained for."
