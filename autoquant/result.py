"""What a tuning job returns, and how it is saved and loaded."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from autoquant.criterion import AccuracyCriterion
from autoquant.errors import AutoquantError, first_line
from autoquant.space import OpCount, QuantConfig

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
    # The whole model by op kind: INT8, FP32 in the space, not quantizable (see Space.op_counts).
    op_counts: tuple[OpCount, ...] = ()
    latency_precision: float | None = None  # latency_ratio known to +- this share (95% interval)
    metric_step: float | None = None  # the metric counts samples in steps coarser than the goal (see step_advice)

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

    @property
    def verdict(self) -> str:
        """One line: the goal met or not, and whether the result is faster than FP32."""
        if not self.met:
            return f"goal NOT met ({self.criterion.describe()}): the most accurate candidate is returned"
        if self.slower_than_fp32:
            return (f"goal met, but no passing candidate ran faster than FP32 (best x{self.latency_ratio:.2f} the "
                    "FP32 latency): the FP32 model is the faster choice on this backend")
        return f"goal met at x{self.latency_ratio:.2f} the FP32 latency"

    def summary(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "met": self.met,
            "criterion": self.criterion.describe(),
            "baseline_accuracy": self.baseline_accuracy,
            "accuracy": self.accuracy,
            "relative_loss": self.relative_loss,
            "latency_ratio": self.latency_ratio,
            "latency_precision": self.latency_precision,
            "slower_than_fp32": self.slower_than_fp32,
            "fp32_ops": self.fp32_ops,
            "quantizable_ops": self.quantizable_ops,
            "quantized": counts_text(self.op_counts),
            "op_counts": {c.op_type: c.to_dict() for c in self.op_counts},
            "trials": self.trials,
            "evaluations": self.evaluations,
            "best_trial": self.best_trial,
            "failed_trials": {str(n): reason for n, reason in self.failed_trials.items()},
            "elapsed_s": self.elapsed_s,
            "probe_cost": self.probe_cost,
            "metric_step": self.metric_step,
        }

    def save(self, directory: str | Path, *, onnx: bool = False) -> Path:
        """Write ``result.json`` (config and metrics), ``history.csv``, with a sensitivity ranking
        ``sensitivity.csv`` and its bar plot ``sensitivity.png``, and last the model: a model that
        cannot be saved loses none of the rest (``result.json`` then has ``model_file: null``).

        ``onnx=True`` also writes an FX result as ``model.onnx`` (static INT8 only, see
        ``autoquant.export``); an ONNX Runtime result is ONNX already."""
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
        if onnx:
            record["onnx_file"] = self._export_onnx(directory, model_path).name
            (directory / RESULT_FILE).write_text(json.dumps(record, indent=2))
        return directory

    def _export_onnx(self, directory: Path, model_path: Path) -> Path:
        if model_path.suffix == ".onnx":
            return model_path
        from autoquant.export import ONNX_FILE, export_onnx

        example = getattr(self.adapter, "_example", None)  # the FX adapter's first calibration batch
        if self.adapter.name != "fx" or example is None:
            raise AutoquantError(f"ONNX export is offered for FX results only, not for the {self.adapter.name} "
                                 "adapter's.")
        return export_onnx(self.model, example, directory / ONNX_FILE)


def counts_text(counts: Sequence[OpCount]) -> str:
    """The whole model's ops by kind, INT8 of all: "12 of 38 Linear (20 left FP32, 6 not quantizable); 3 of 3 Conv"."""
    parts = []
    for c in counts:
        why = [f"{c.fp32} left FP32" if c.fp32 else "",
               f"{c.unsupported} not quantizable" if c.unsupported else ""]
        why_text = ", ".join(w for w in why if w)
        parts.append(f"{c.int8} of {c.total} {c.op_type}" + (f" ({why_text})" if why_text else ""))
    return "; ".join(parts) or "no ops"


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
