"""The last line of a failed LeRobot command names what went wrong: a policy option, or a damaged file.

LeRobot's command-line parser (draccus) wraps every ValueError raised while a config is built in its own
"Couldn't instantiate class ..." / "Could not decode the value ..." errors, so a validation message of
ours sits in the middle of a 60-line traceback under draccus's. A truncated `config.json` or
`model.safetensors` surfaces as a bare `JSONDecodeError` / `SafetensorError` that never names the file.
Neither is raised in code of ours that could add the context: the configs are built, and a checkpoint's
`config.json` parsed, inside LeRobot and draccus before any policy code runs.

So importing the plugin (which `lerobot-train` and `lerobot-eval` do before they parse their flags)
installs an exception hook that prints Python's traceback unchanged and then one more line: the message of
a `PolicyConfigError` in the exception's chain, or the file a JSON or safetensors reader was reading when
it failed, with the fix. For any other error the hook prints exactly what Python would.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

# Local names under which the readers in the failing call stack hold the file they read: `fp` in
# json.load, `filename` in safetensors.torch.load_file / safe_open callers, `file` / `stream` in draccus.
_FILE_LOCALS = ("fp", "filename", "file", "stream", "config_file", "model_file")


class PolicyConfigError(ValueError):
    """An invalid policy option found while the config is built; the message names the flag and the fix.

    A ValueError, so callers that build configs in Python catch it as before.
    """

    def __init__(self, message: str, policy_type: str | None = None):
        super().__init__(message)
        self.policy_type = policy_type


@contextlib.contextmanager
def policy_config_errors(policy_type: str) -> Iterator[None]:
    """Re-raise a ValueError of a config's validation as a `PolicyConfigError` (same message and frames)."""
    try:
        yield
    except PolicyConfigError:
        raise
    except ValueError as err:
        # `from None`: the original is the same error, and chaining it would double the traceback.
        raise PolicyConfigError(str(err), policy_type).with_traceback(err.__traceback__) from None


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or during, outermost first."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return chain


def _file_being_read(exc: BaseException) -> str | None:
    """The file the innermost reader in `exc`'s traceback was reading, when one holds an existing file."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in _FILE_LOCALS:
            value = frame.f_locals.get(name)
            path = getattr(value, "name", value)
            if isinstance(path, (str, os.PathLike)) and Path(path).is_file():
                return str(path)
    return None


def final_line(exc: BaseException) -> str | None:
    """The line to print after `exc`'s traceback, or None when Python's own last line already says it all."""
    chain = _chain(exc)
    for err in chain:
        if isinstance(err, PolicyConfigError):
            if err is exc:
                return None  # the traceback already ends with this message
            kind = f"{err.policy_type} " if err.policy_type else ""
            return f"Invalid {kind}policy configuration: {err}"
    for err in chain:
        if isinstance(err, (json.JSONDecodeError, SafetensorError)):
            path = _file_being_read(err)
            if path is not None and path not in str(exc):  # an error of ours may have named it already
                return (
                    f"Cannot read {path}: {err}. The file is damaged or incomplete (a copy, download or save "
                    "that stopped early): save, copy or download the checkpoint again."
                )
    return None


def install_excepthook() -> None:
    """Print `final_line` after the traceback of an uncaught exception (once per process; chains the old hook)."""
    previous = sys.excepthook
    if getattr(previous, "world_modality_hook", False):
        return

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        try:
            line = final_line(exc)
        except Exception:  # the hook must never hide the original error behind one of its own
            line = None
        if line:
            print(line, file=sys.stderr)

    hook.world_modality_hook = True
    sys.excepthook = hook
