"""autoquant: the fastest INT8 model that still meets your accuracy goal."""

from autoquant.criterion import AccuracyCriterion
from autoquant.errors import (
    AutoquantError,
    BackendError,
    CalibrationDataError,
    ConfigError,
    EvalFunctionError,
)
from autoquant.result import TuneResult, load, load_config
from autoquant.space import OpInfo, QuantConfig, Restriction, Space, UnsupportedOp
from autoquant.tuner import Tuner

__version__ = "0.1.0"

__all__ = [
    "AccuracyCriterion", "AutoquantError", "BackendError", "CalibrationDataError", "ConfigError",
    "EvalFunctionError", "OpInfo", "QuantConfig", "Restriction", "Space", "TuneResult", "Tuner",
    "UnsupportedOp", "load", "load_config",
]
