"""An in-memory adapter for strategy and tuner tests: no torch, no onnxruntime, milliseconds per trial.

A FakeModel has ops op0..op{n-1}; each op costs ``sensitivity[op]`` accuracy while it is INT8, and
the calibration method scales the cost of the ops listed in ``calibration_helps`` (KL/percentile
rescue them, as with outlier activations in real models). Every candidate runs in half the FP32
time, plus 0.6 ms for each op of ``slow_int8`` left INT8 (an INT8 kernel slower than FP32's). The
ops in ``dynamic`` may also run INT8 in the dynamic approach (the space then has both).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoquant.adapters import Adapter
from autoquant.data import iterate_batches
from autoquant.latency import LatencyRatio
from autoquant.space import OpInfo, QuantConfig, Space


@dataclass
class FakeModel:
    sensitivity: dict[str, float]
    baseline: float = 0.9
    calibration_helps: tuple[str, ...] = ()
    config: QuantConfig | None = None  # None: the FP32 model
    calibrations: list[int] = field(default_factory=list, repr=False)  # not part of the model
    slow_int8: tuple[str, ...] = field(default=(), kw_only=True)
    dynamic: tuple[str, ...] = field(default=(), kw_only=True)  # ops that also run INT8 in the dynamic approach

    def accuracy(self) -> float:
        if self.config is None:
            return self.baseline
        loss = 0.0
        for op, cost in self.sensitivity.items():
            if op in self.config.fp32_ops:
                continue
            if op in self.calibration_helps and self.config.calibration in ("entropy", "percentile-99.99"):
                cost /= 10
            loss += cost
        return self.baseline - loss


class FakeAdapter(Adapter):
    name = "fake"

    @classmethod
    def accepts(cls, model: object) -> bool:
        return isinstance(model, FakeModel)

    def __init__(self, model: FakeModel, calib_data: Any) -> None:
        self.model, self.calib_data = model, calib_data
        self.space = Space(
            ops=tuple(OpInfo(name, "Linear", approaches=("static", "dynamic") if name in model.dynamic else ("static",))
                      for name in model.sensitivity),
            approaches=("static", "dynamic") if model.dynamic else ("static",))

    @property
    def fp32_model(self) -> FakeModel:
        return self.model

    def calibrate(self, on_batch=None) -> None:
        if not self.model.calibrations:
            for done, _ in enumerate(iterate_batches(self.calib_data), 1):  # read once, as a real adapter does
                if on_batch is not None:
                    on_batch(done)
            self.model.calibrations.append(1)

    def build(self, config: QuantConfig) -> FakeModel:
        self.space.validate(config)
        return FakeModel(self.model.sensitivity, self.model.baseline, self.model.calibration_helps, config,
                         slow_int8=self.model.slow_int8, dynamic=self.model.dynamic)

    def runner(self, model: FakeModel):
        """The "output" is the model's accuracy, so the probe's error tracks the accuracy loss. Every
        candidate runs in half the FP32 time (0.5 ms against 1 ms), as INT8 should: a pass is faster
        than FP32 and stops the search (a pass slower than FP32 would not); each ``slow_int8`` op
        left INT8 adds 0.6 ms."""
        import numpy as np

        config = model.config
        seconds = 0.001 if config is None else 0.0005 + 0.0006 * len(set(model.slow_int8) - config.fp32_ops)

        def run():
            time.sleep(seconds)
            return np.array([model.accuracy()])
        return run

    def save_model(self, model: FakeModel, directory: Path) -> Path:
        path = Path(directory) / "fake.json"
        assert model.config is not None, "only quantized candidates are saved"
        path.write_text(json.dumps([model.sensitivity, model.baseline, model.calibration_helps,
                                    model.config.to_dict()]))
        return path

    @classmethod
    def load_model(cls, path: Path) -> FakeModel:
        sensitivity, baseline, helps, config = json.loads(Path(path).read_text())
        return FakeModel(sensitivity, baseline, tuple(helps), QuantConfig.from_dict(config))


def fake_model(n_ops: int = 6, sensitive: dict[int, float] | None = None, **kwargs) -> FakeModel:
    """n ops costing 0.0001 each, except the ``sensitive`` ones."""
    costs = {f"op{i}": 0.0001 for i in range(n_ops)}
    for i, cost in (sensitive or {}).items():
        costs[f"op{i}"] = cost
    return FakeModel(costs, **kwargs)


def accuracy(model: FakeModel) -> float:
    return model.accuracy()


def fixed_latency(ratio_of):
    """A tuner's latency_fn returning ``ratio_of(config)``, known to +-1% (the backend still runs)."""
    def measure(config: QuantConfig, fp32_run, candidate_run) -> LatencyRatio:
        candidate_run()
        r = ratio_of(config)
        return LatencyRatio(r, 0.99 * r, 1.01 * r, 0.95, 10, 1.0, r)
    return measure
