"""What a tuning job returns, and how it is saved and loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from autoquant.criterion import AccuracyCriterion
from autoquant.errors import AutoquantError, first_line
from autoquant.space import QuantConfig

if TYPE_CHECKING:
    from autoquant.adapters import Adapter

RESULT_FILE = "result.json"
HISTORY_FILE = "history.csv"
SENSITIVITY_FILE = "sensitivity.csv"
SENSITIVITY_PLOT = "sensitivity.png"


@dataclass
class TuneResult:
    """The best candidate found (whether or not it met the criterion) and the whole history."""

    model: Any
    config: QuantConfig
    met: bool
    accuracy: float
    baseline_accuracy: float
    loss: float  # in the criterion's terms (relative or absolute); negative when better than FP32
    latency_ratio: float  # candidate / FP32 latency, median of interleaved runs
    fp32_ops: list[str]
    quantizable_ops: int
    trials: int  # trials toward max_trials (duplicates and failures included; stale and collisions not)
    evaluations: int  # calls of eval_fn on candidates
    elapsed_s: float
    criterion: AccuracyCriterion
    adapter: Adapter = field(repr=False)  # the Adapter that built the model (it also saves it)
    history: pd.DataFrame = field(repr=False)
    best_trial: int = -1
    # Per-op sensitivity ranking (rank, op, op_type, sensitivity, ...), when the strategy made one.
    sensitivity: pd.DataFrame | None = field(default=None, repr=False)
    probe_cost: str = ""  # what the strategy's output probe spent (builds, model runs, seconds), if anything
    # Candidates that could not be built, scored or run: trial number -> reason.
    failed_trials: dict[int, str] = field(default_factory=dict)

    @property
    def slower_than_fp32(self) -> bool:
        """The goal is met but no passing candidate ran faster than FP32: keep FP32 on this backend."""
        return self.met and self.latency_ratio >= 1.0

    @property
    def relative_loss(self) -> float:
        worse_by = self.baseline_accuracy - self.accuracy
        if not self.criterion.higher_is_better:
            worse_by = -worse_by
        return worse_by / abs(self.baseline_accuracy) if self.baseline_accuracy else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "met": self.met,
            "criterion": self.criterion.describe(),
            "baseline_accuracy": self.baseline_accuracy,
            "accuracy": self.accuracy,
            "relative_loss": self.relative_loss,
            "latency_ratio": self.latency_ratio,
            "slower_than_fp32": self.slower_than_fp32,
            "fp32_ops": self.fp32_ops,
            "quantizable_ops": self.quantizable_ops,
            "trials": self.trials,
            "evaluations": self.evaluations,
            "best_trial": self.best_trial,
            "failed_trials": {str(n): reason for n, reason in self.failed_trials.items()},
            "elapsed_s": self.elapsed_s,
            "probe_cost": self.probe_cost,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``result.json`` (config and metrics), ``history.csv``, with a sensitivity ranking
        ``sensitivity.csv`` and its bar plot ``sensitivity.png``, and last the model: a model that
        cannot be saved loses none of the rest (``result.json`` then has ``model_file: null``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"adapter": self.adapter.name, "model_file": None, "config": self.config.to_dict(), **self.summary()}
        (directory / RESULT_FILE).write_text(json.dumps(record, indent=2))
        self.history.to_csv(directory / HISTORY_FILE, index=False)
        if self.sensitivity is not None:
            from autoquant.plots import plot_sensitivity

            self.sensitivity.to_csv(directory / SENSITIVITY_FILE, index=False)
            plot_sensitivity(self.sensitivity, directory / SENSITIVITY_PLOT, fp32_ops=self.fp32_ops)
        try:
            model_path = self.adapter.save_model(self.model, directory)
        except Exception as exc:
            raise AutoquantError(
                f"Could not save the model ({first_line(exc)}). {RESULT_FILE} and {HISTORY_FILE} are written to "
                f"{directory}; the chosen config is in {RESULT_FILE} and rebuilds the model."
            ) from exc
        record["model_file"] = model_path.name
        (directory / RESULT_FILE).write_text(json.dumps(record, indent=2))
        return directory


def load(directory: str | Path) -> Any:
    """Load the quantized model that ``TuneResult.save`` wrote into ``directory``."""
    from autoquant.adapters import adapter_class

    directory = Path(directory)
    record = json.loads((directory / RESULT_FILE).read_text())
    if record.get("model_file") is None:
        raise AutoquantError(f"{directory} has no saved model (saving it failed): rebuild it from the config in "
                             f"{RESULT_FILE} (autoquant.load_config).")
    return adapter_class(record["adapter"]).load_model(directory / record["model_file"])


def load_config(directory: str | Path) -> QuantConfig:
    """The chosen config of a saved result."""
    record = json.loads((Path(directory) / RESULT_FILE).read_text())
    return QuantConfig.from_dict(record["config"])
