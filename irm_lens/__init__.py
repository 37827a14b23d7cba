"""irm_lens: steer a frozen Llama with an Injectable Realignment Model, then explain it.

The public API:

* ``load_model``: any Llama-architecture model (embedded SmolLM2 by default) as a frozen
  ``HookedTransformer``;
* ``IRM`` / ``IRMConfig`` / ``layer_set``: the Injectable Realignment Model;
* ``inject``: a context manager under which the model runs with the IRM's outputs added;
* ``load_alignment`` / ``load_texts`` / ``split_texts``: alignment data (built-in or yours);
* ``generate_synthetic`` / ``read_synthetic``: paper-style data, questions answered in a tone;
* ``train`` / ``TrainConfig``: train an IRM with checkpoints and resume;
* ``evaluate``: the emotion lift of an IRM with its confidence interval and fluency checks.
"""

from irm_lens.data.corpora import BUILTIN_ALIGNMENTS, load_alignment, neutral_prompts
from irm_lens.data.dataset import load_texts, split_texts
from irm_lens.data.synthetic import generate_synthetic, read_synthetic
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
from irm_lens.evaluate import EvalResult, evaluate
from irm_lens.models import EMBEDDED_MODEL_NAME, load_model
from irm_lens.train import TrainConfig, TrainResult, paper_l1, train

__all__ = [
    "BUILTIN_ALIGNMENTS",
    "EMBEDDED_MODEL_NAME",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "generate_synthetic",
    "read_synthetic",
    "load_alignment",
    "load_texts",
    "neutral_prompts",
    "paper_l1",
    "split_texts",
    "train",
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
