"""Latency by op type on one zoo model: which types' INT8 kernels beat FP32 on this machine.

    python experiments/zoo_op_types.py mobilevit onnx
    python experiments/zoo_op_types.py mobilevit onnx --int8 MatMul --budget 40

For each op type of the default knob setting: the candidate with only that type INT8 and the one
with only that type FP32, against FP32 (interleaved pairs until +-5% or ``--budget`` seconds). With
``--int8 TYPE...``: the candidate with only those types INT8, to +-1%.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import defaultdict
from dataclasses import replace

from autoquant.examples import zoo
from autoquant.examples import zoo_checks as checks
from autoquant.latency import measure_ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=list(zoo.ZOO))
    parser.add_argument("adapter", choices=checks.ADAPTERS)
    parser.add_argument("--size", choices=zoo.SIZES, default="bench")
    parser.add_argument("--int8", nargs="+", metavar="TYPE", help="measure only this set of types INT8")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds per measurement at most")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    case = zoo.ZOO[args.model].build(args.size)
    exported = zoo.export_onnx(case) if args.adapter == "onnx" else None
    adapter = checks.make_adapter(case, args.adapter, exported)
    adapter.calibrate()
    space, base = adapter.space, adapter.space.default_config()
    types: dict[str, set[str]] = defaultdict(set)
    for op in space.tunable_ops(base.approach):
        types[op.op_type].add(op.name)
    every = set().union(*types.values())
    fp32 = adapter.runner(adapter.fp32_model)

    def ratio(fp32_ops: set[str], precision: float = 0.05) -> str:
        model = adapter.build(space.resolve(replace(base, fp32_ops=frozenset(fp32_ops))))
        return str(measure_ratio(fp32, adapter.runner(model), precision=precision, budget_s=args.budget))

    print(f"{args.model} / {args.adapter}, {base.describe()}; all INT8: {ratio(set())}")
    if args.int8:
        int8 = set().union(*(types[t] for t in args.int8))
        print(f"only {' + '.join(args.int8)} INT8: {ratio(every - int8, precision=0.01)}")
        return 0
    for op_type, names in types.items():
        print(f"{op_type} ({len(names)} ops): only INT8 {ratio(every - names)}; only FP32 {ratio(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
