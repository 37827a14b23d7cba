"""irm_lens: steer a frozen Llama with an Injectable Realignment Model, then explain it.

The public API:

* ``load_model``: any Llama-architecture model (embedded SmolLM2 by default) as a frozen
  ``HookedTransformer``;
* ``IRM`` / ``IRMConfig`` / ``layer_set``: the Injectable Realignment Model;
* ``inject``: a context manager under which the model runs with the IRM's outputs added;
* ``load_alignment`` / ``load_texts`` / ``split_texts``: alignment data (built-in or yours);
* ``generate_synthetic`` / ``read_synthetic``: paper-style data, questions answered in a tone;
* ``train`` / ``TrainConfig``: train an IRM with checkpoints and resume (objectives:
  cross-entropy or preference, with a KL fluency term); ``train_recipe`` / ``RECIPES``: the
  named recipes (the default, ``"preference"``, starts from a CAA vector);
* ``continue_text`` / ``compare_generations``: generation through the chat template, with an
  intervention on or off (batched, KV-cached);
* ``evaluate``: the emotion lift of an IRM with its confidence interval and fluency checks;
* steering baselines scored the same way: ``mean_difference_vector`` (CAA), ``actadd_vector``,
  ``SteeringVector``, ``Prompting``; ``warm_start`` (an IRM that starts as a vector);
  ``generate_pairs`` / ``read_pairs`` (preference pairs); ``compare_steering`` (every
  intervention on the same prompts, with dose-response) and ``paired_difference`` (two of
  them head to head, prompt by prompt);
* analyses of the index an IRM relies on: ``collect_irm_outputs`` / ``striation_score`` /
  ``dominant_neurons`` / ``compare_runs`` / ``run_sweep``, ``norm_weights``,
  ``activation_magnitudes``, ``logit_attribution``, ``norm_scale_split`` (direct vs
  norm-scale path), ``patch_neuron``, ``ablate``, ``explain`` (all of them for one index), and
  ``dominance_curve`` (the dominant index along a run's checkpoints) and
  ``cross_run_agreement`` (how runs agree on their indices as they train);
* ``plant_outlier`` / ``outlier_signature``: a model organism, an index given the 1512
  signature by a weight edit, the analyses' ground truth;
* ``predict_dominant``: the index a trained IRM will rely on, forecast from the frozen model
  alone, and ``validate_prediction`` / ``check_prediction`` to score it against trained IRMs;
* ``report``: one self-contained HTML file from those results;
* ``investigate``: the main job, all of the above in one call.
"""

from irm_lens._packages import irm_lens_version
from irm_lens.analysis.ablation import Ablation, AblationResult, ablate, measure_ablation
from irm_lens.analysis.attribution import LogitAttribution, logit_attribution
from irm_lens.analysis.dossier import NeuronDossier, explain
from irm_lens.analysis.dynamics import DominanceCurve, cross_run_agreement, dominance_curve
from irm_lens.analysis.magnitudes import ActivationMagnitudes, activation_magnitudes
from irm_lens.analysis.norms import NormWeights, norm_weights
from irm_lens.analysis.normscale import NormScaleSplit, norm_scale_split
from irm_lens.analysis.outputs import (
    DominantNeurons,
    IRMOutputs,
    RunComparison,
    StriationScore,
    collect_irm_outputs,
    compare_runs,
    dominant_neurons,
    striation_score,
)
from irm_lens.analysis.patching import PatchingResult, patch_neuron
from irm_lens.analysis.prediction import (
    Prediction,
    PredictionCheck,
    check_prediction,
    predict_dominant,
    validate_prediction,
)
from irm_lens.attention import set_attention
from irm_lens.compare import (
    PairedDifference,
    SteeringComparison,
    compare_steering,
    paired_difference,
)
from irm_lens.data.corpora import BUILTIN_ALIGNMENTS, load_alignment, neutral_prompts
from irm_lens.data.dataset import load_texts, split_texts
from irm_lens.data.synthetic import generate_synthetic, read_synthetic
from irm_lens.errors import (
    CheckpointError,
    ConfigError,
    IRMLensError,
    ModelNotAvailableOfflineError,
    ModelNotFoundError,
    NeuronIndexError,
    OutputPathError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
)
from irm_lens.evaluate import EvalResult, evaluate
from irm_lens.generation import Generation, compare_generations, continue_text
from irm_lens.inject import inject
from irm_lens.investigate import Investigation, InvestigationSettings, investigate
from irm_lens.irm import IRM, IRM_PRESETS, LAYER_PRESETS, IRMConfig, layer_set
from irm_lens.models import EMBEDDED_MODEL_NAME, load_model
from irm_lens.organism import PlantedOutlier, outlier_signature, plant_outlier
from irm_lens.pairs import corpus_pairs, generate_pairs, read_pairs
from irm_lens.recipes import RECIPES, Recipe, RecipeResult, train_recipe
from irm_lens.report import report
from irm_lens.steering import (
    Prompting,
    SteeringVector,
    SteeringVectorConfig,
    actadd_vector,
    mean_difference_vector,
    warm_start,
)
from irm_lens.sweeps import SweepRun, run_sweep, sweep_runs
from irm_lens.train import TrainConfig, TrainResult, paper_l1, train

__all__ = [
    "Ablation",
    "AblationResult",
    "ActivationMagnitudes",
    "DominanceCurve",
    "DominantNeurons",
    "IRMOutputs",
    "LogitAttribution",
    "NeuronDossier",
    "NeuronIndexError",
    "NormScaleSplit",
    "NormWeights",
    "PatchingResult",
    "Prediction",
    "PredictionCheck",
    "RunComparison",
    "StriationScore",
    "SweepRun",
    "ablate",
    "activation_magnitudes",
    "collect_irm_outputs",
    "compare_runs",
    "cross_run_agreement",
    "dominance_curve",
    "dominant_neurons",
    "explain",
    "logit_attribution",
    "measure_ablation",
    "norm_scale_split",
    "norm_weights",
    "patch_neuron",
    "predict_dominant",
    "check_prediction",
    "validate_prediction",
    "Investigation",
    "InvestigationSettings",
    "investigate",
    "report",
    "run_sweep",
    "striation_score",
    "sweep_runs",
    "BUILTIN_ALIGNMENTS",
    "EMBEDDED_MODEL_NAME",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "Generation",
    "compare_generations",
    "continue_text",
    "PlantedOutlier",
    "outlier_signature",
    "plant_outlier",
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
    "Prompting",
    "PairedDifference",
    "SteeringComparison",
    "SteeringVector",
    "SteeringVectorConfig",
    "actadd_vector",
    "compare_steering",
    "paired_difference",
    "corpus_pairs",
    "generate_pairs",
    "mean_difference_vector",
    "read_pairs",
    "warm_start",
    "RECIPES",
    "Recipe",
    "RecipeResult",
    "train_recipe",
    "set_attention",
    "layer_set",
    "load_model",
]
__version__ = irm_lens_version()
