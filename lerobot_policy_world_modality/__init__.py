"""LeRobot policy plugin that treats the world as a first-class modality.

Importing this package registers every policy type and processor step it provides with LeRobot,
which is what `lerobot-train` / `lerobot-eval` rely on when they discover `lerobot_policy_*` plugins.
"""

from .cli_errors import install_excepthook
from .latents import processor as _latent_step  # noqa: F401  registers the world-latent step
from .smolvla_world import configuration_smolvla_world as _smolvla_world  # noqa: F401  `smolvla_world`
from .world_f import configuration_world_f as _world_f  # noqa: F401  registers `world_f`
from .world_token_c import configuration_world_token_c as _world_token_c  # noqa: F401  registers `world_token_c`

__version__ = "0.1.0"

# lerobot-train / lerobot-eval import the plugin before they parse their flags: from here on, a failed
# command ends with our config message or the damaged file's name (see cli_errors).
install_excepthook()
