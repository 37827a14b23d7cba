"""Exceptions raised by irm_lens.

Every error says what was wrong, what was expected, and what to do about it. They subclass
the closest built-in exception so that generic ``except ValueError`` code keeps working.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class IRMLensError(Exception):
    """Base class of every error raised by irm_lens."""


class ModelNotFoundError(IRMLensError, FileNotFoundError):
    """A model path or name points at nothing that can be loaded."""


class ModelNotAvailableOfflineError(IRMLensError, OSError):
    """The model's weights are not on this machine and the hub cannot (or may not) be reached."""


class DataNotFoundError(IRMLensError, FileNotFoundError):
    """A data file or corpus is missing."""


class UnsupportedArchitectureError(IRMLensError, ValueError):
    """The model is not a Llama-architecture causal LM."""


class ShapeMismatchError(IRMLensError, ValueError):
    """An IRM (or a tensor) does not fit the model it is used with."""


class CheckpointError(IRMLensError, ValueError):
    """A checkpoint on disk is missing, truncated, corrupted or hostile."""


class ConfigError(IRMLensError, ValueError):
    """A configuration value is invalid."""


class OutputPathError(IRMLensError, OSError):
    """An output location cannot be written."""


class NeuronIndexError(IRMLensError, IndexError):
    """A residual index ("neuron") or layer is outside the model, or not an integer."""


def check_config_keys(config_class: type, d: Mapping[str, Any], what: str) -> None:
    """Refuse keys of a saved config ``d`` that the dataclass ``config_class`` has no field for
    (a file from a newer version, or a typo), naming ``what`` the config is."""
    unknown = set(d) - {f.name for f in dataclasses.fields(config_class)}
    if unknown:
        raise ConfigError(f"Unknown {what} keys: {sorted(unknown)}.")
