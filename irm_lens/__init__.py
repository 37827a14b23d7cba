"""irm_lens: steer a frozen Llama with an Injectable Realignment Model, then explain it.

The public API:

* ``load_model``: any Llama-architecture model (embedded SmolLM2 by default) as a frozen
  ``HookedTransformer``;
* ``IRM`` / ``IRMConfig`` / ``layer_set``: the Injectable Realignment Model;
* ``inject``: a context manager under which the model runs with the IRM's outputs added.
"""

from irm_lens.errors import (
    CheckpointError,
    ConfigError,
    IRMLensError,
    ModelNotAvailableOfflineError,
    ModelNotFoundError,
    OutputPathError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
)
from irm_lens.inject import inject
from irm_lens.irm import IRM, IRM_PRESETS, LAYER_PRESETS, IRMConfig, layer_set
from irm_lens.models import EMBEDDED_MODEL_NAME, load_model

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "IRM",
    "IRM_PRESETS",
    "LAYER_PRESETS",
    "CheckpointError",
    "ConfigError",
    "IRMConfig",
    "IRMLensError",
    "ModelNotAvailableOfflineError",
    "ModelNotFoundError",
    "OutputPathError",
    "ShapeMismatchError",
    "UnsupportedArchitectureError",
    "inject",
    "layer_set",
    "load_model",
]
__version__ = "0.1.0"
