"""The `smolvla_world` policy type: configuration, model and processors, found by LeRobot by naming convention.

Importing the package registers the config type and the instruction processor step (which a saved
pipeline needs when `lerobot-eval` reloads it).
"""

from . import processor_smolvla_world as _processor  # noqa: F401  registers the config and the step
