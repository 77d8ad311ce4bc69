"""FX adapter: full INT8 (the default candidate, BN folded) against FP32 on zoo models, at 224x224.

    flock /work/timing.lock python experiments/fx_zoo_speed.py --models tf_effnet,efficientnet --budget-s 10

Per model: setup time (build, space, calibration), the INT8/FP32 latency ratio (``measure_ratio``:
interleaved pairs until +-5% or the budget, with its 95% interval), and the ops of the space by type.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections import Counter

from autoquant import QuantConfig
from autoquant.adapters.fx import FXAdapter
from autoquant.examples.zoo import ZOO
from autoquant.latency import measure_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tf_effnet,efficientnet,mobilenet_v2,resnet,convnext,dense_unet")
    parser.add_argument("--size", default="bench", choices=("ci", "bench"))
    parser.add_argument("--budget-s", type=float, default=10.0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("autoquant").setLevel(logging.ERROR)
    for name in args.models.split(","):
        start = time.perf_counter()
        case = ZOO[name].build(args.size)
        adapter = FXAdapter(case.model, case.calib_batches)
        adapter.calibrate()
        setup_s = time.perf_counter() - start
        int8 = adapter.build(QuantConfig())
        ratio = measure_ratio(adapter.runner(adapter.fp32_model), adapter.runner(int8), budget_s=args.budget_s)
        kinds = Counter(op.op_type for op in adapter.space.ops)
        held = " (held out)" if ZOO[name].held_out else ""
        print(f"{name}{held}: setup {setup_s:.0f} s, INT8/FP32 {ratio}, ops {dict(kinds)}", flush=True)


if __name__ == "__main__":
    main()
