"""INT8/FP32 latency of every zoo CNN through the ONNX adapter (default candidate) on this CPU.

    python experiments/onnx_zoo_speed.py [--size bench] [--models resnet,...] [--out FILE]

Each model is built and exported at ``--size``, calibrated on its 4 calibration batches; the
default candidate and the FP32 model run the example batch, timed with ``measure_ratio``
(interleaved pairs until the median ratio is known to +-5%, or 30 s). Prints one markdown row
per model; held-out models are marked.
"""

from __future__ import annotations

import argparse
import logging
import time

import onnx

from autoquant.adapters.onnx import ONNXAdapter
from autoquant.examples.zoo import ZOO, export_onnx
from autoquant.latency import measure_ratio


def row(name: str, size: str) -> str:
    case = ZOO[name].build(size)
    model = onnx.load_from_string(export_onnx(case))
    start = time.perf_counter()
    adapter = ONNXAdapter(model, case.feeds())
    adapter.calibrate()
    int8 = adapter.build(adapter.space.resolve(adapter.space.default_config()))
    prepare = time.perf_counter() - start
    fp32_run = lambda: adapter.fp32_model.run(None, case.feeds([case.example])[0])  # noqa: E731
    int8_run = lambda: int8.run(None, case.feeds([case.example])[0])  # noqa: E731
    r = measure_ratio(fp32_run, int8_run, budget_s=30)
    held = " (held out)" if ZOO[name].held_out else ""
    cells = [f"{name}{held}", len(adapter.space.ops), f"{r.ratio:.2f}", f"{r.low:.2f}-{r.high:.2f}", r.pairs,
             f"{prepare:.0f} s"]
    return "| " + " | ".join(map(str, cells)) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="bench")
    parser.add_argument("--models", default=",".join(n for n, e in ZOO.items() if e.kind == "cnn"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print("| model | ops | INT8/FP32 | 95% CI | pairs | calibrate + build |\n|---|---|---|---|---|---|", flush=True)
    for name in args.models.split(","):
        try:
            print(row(name, args.size), flush=True)
        except Exception as exc:  # one model's failure is a row, not the end of the table
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} |", flush=True)


if __name__ == "__main__":
    main()
