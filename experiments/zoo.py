"""The structural model zoo through both adapters: the issue-14 contract and costs, as a table.

    python experiments/zoo.py --size ci
    python experiments/zoo.py --size bench --models tf_effnet resnet --fallbacks 5
    python experiments/zoo.py --size bench --models mobilevit --adapters onnx --tune 8

For each zoo model (``autoquant.examples.zoo``) and adapter (FX on the module, ONNX on its export)
it runs the contract checks of ``autoquant.examples.zoo_checks`` (coverage of every Conv/Linear,
the default build, single-op fallbacks, the all-FP32 build against FP32, save and load) and
records: space-build time (the adapter's constructor), calibration time, the median time to build
one candidate (over every candidate built here), the output probe's cost as the sensitivity
strategy runs it (time and model runs), and the latency of the default INT8 candidate against
FP32 (interleaved pairs until known to +-5%, with the 95% interval width as spread). With
``--tune N`` it also runs the default tuner (at most N trials) on output fidelity to FP32 and records
the result's latency over FP32's and whether its summary says it is slower. A crash is a build or
run that raised. Held-out models (``zoo.HELD_OUT``) get their own table.

Writes ``zoo.md`` and ``zoo.csv`` (``zoo_bench.*`` for ``--size bench``) into ``--out``, after
every model, so an interrupted run keeps what it measured. ``--merge DIR...`` combines the tables of
runs made one model at a time (each with its own ``--out DIR``) into one, in ``--out``:

    python experiments/zoo.py --size bench --merge /work/zoo-bench/resnet /work/zoo-bench/efficientnet ...
"""

from __future__ import annotations

import argparse
import ast
import logging
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd

from autoquant import AccuracyCriterion, Tuner
from autoquant.errors import first_line
from autoquant.examples import zoo_checks as checks
from autoquant.examples.zoo import HELD_OUT, SIZES, ZOO, ZooCase, export_onnx
from autoquant.latency import measure_ratio
from autoquant.probe import OutputProbe, flatten_outputs, output_arrays
from autoquant.strategies.sensitivity import SensitivityStrategy

RESULTS = Path(__file__).resolve().parent / "results"
TUNE_LOSS = 0.02  # --tune's goal: output fidelity to FP32 within 2% (relative squared error)
EVAL_SAMPLES = 744  # the probe's budget is two eval_fn calls on this many samples (issue 14's ImageNet set)
log = logging.getLogger("zoo")


@dataclass
class Row:
    """One model through one adapter."""

    model: str
    adapter: str
    kind: str
    held_out: bool
    ops: int | None = None
    weighted: int | None = None  # Conv/Linear (ONNX: Conv/MatMul/Gemm) found in the model
    unaccounted: int | None = None
    unsupported: int | None = None
    space_s: float | None = None
    calib_s: float | None = None
    build_median_s: float | None = None
    builds: int = 0
    probe_s: float | None = None
    probe_runs: int | None = None
    probe_evals: float | None = None  # the probe's time in eval_fn calls (EVAL_SAMPLES in FP32)
    probe_budget: float | None = None  # the probe's time over its budget (2 eval_fn calls, 10 s at least)
    int8_vs_fp32: float | None = None
    latency_spread: float | None = None
    tuned_ratio: float | None = None  # --tune: the tuned model's latency over FP32's
    tuned_trials: int | None = None
    tuned_verdict: str = "-"
    fp32_error: float | None = None
    coverage: str = "-"
    default: str = "-"
    fallback: str = "-"
    fp32: str = "-"
    save_load: str = "-"
    crashes: int = 0
    errors: dict[str, str] = field(default_factory=dict)


class _Timed:
    """Records the duration of every ``adapter.build``."""

    def __init__(self, adapter: Any) -> None:
        self.times: list[float] = []
        self._build = adapter.build
        adapter.build = self

    def __call__(self, config: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._build(config)
        finally:
            self.times.append(time.perf_counter() - start)


def run_one(case: ZooCase, adapter_name: str, args: argparse.Namespace) -> Row:
    row = Row(case.name, adapter_name, case.kind, ZOO[case.name].held_out)

    def attempt(check: str, fn: Any) -> Any:
        try:
            value = fn()
            setattr(row, check, "ok")
            return value
        except AssertionError as exc:
            setattr(row, check, "FAIL")
            row.errors[check] = first_line(exc, 300)
        except Exception as exc:  # a crash: the table records it and moves on
            setattr(row, check, "CRASH")
            row.crashes += 1
            row.errors[check] = first_line(exc, 300)
        return None

    try:
        exported = export_onnx(case) if adapter_name == "onnx" else None  # the user's file: not timed
        start = time.perf_counter()
        adapter = checks.make_adapter(case, adapter_name, exported)
        row.space_s = time.perf_counter() - start
        start = time.perf_counter()
        adapter.calibrate()
        row.calib_s = time.perf_counter() - start
    except Exception as exc:
        row.crashes += 1
        row.errors["adapter"] = first_line(exc, 300)
        return row
    space = adapter.space
    row.ops, row.unsupported = len(space.ops), len(space.unsupported)
    expected = checks.weighted_ops(case, adapter, exported)
    row.weighted, row.unaccounted = len(expected), len(checks.unaccounted(expected, space))
    attempt("coverage", lambda: checks.check_coverage(case, adapter, exported))
    timed = _Timed(adapter)
    model = attempt("default", lambda: checks.check_default(adapter))

    ops = checks.fallback_sample(space, args.fallbacks)
    failures = checks.fallback_failures(adapter, ops)
    row.fallback = f"{len(ops) - len(failures)}/{len(ops)}"
    if failures:
        row.crashes += len(failures)
        row.errors["fallback"] = f"{len(failures)} failed; first: {failures[0]}"
    row.fp32_error = attempt("fp32", lambda: checks.all_fp32_error(adapter))
    if row.fp32_error is not None and row.fp32_error > checks.FP32_TOLERANCE:
        row.fp32 = "FAIL"
        row.errors["fp32"] = f"all-FP32 candidate differs from the FP32 model: relative error {row.fp32_error:.2e}"
    if model is not None:
        attempt("save_load", lambda: checks.check_save_load(adapter, model))
        row.int8_vs_fp32, row.latency_spread = _latency(adapter, model, args.latency_s)
    row.builds = len(timed.times)
    row.build_median_s = statistics.median(timed.times) if timed.times else None
    if args.probe:
        _probe(adapter, row)
    if args.tune:
        _tune(case, adapter, exported, row, args.tune)
    return row


def _latency(adapter: Any, model: Any, budget_s: float) -> tuple[float, float]:
    """INT8/FP32 from interleaved pairs (until known to +-5% or 3 x ``budget_s``), and the width of its 95%
    interval relative to the ratio."""
    r = measure_ratio(adapter.runner(adapter.fp32_model), adapter.runner(model), budget_s=3 * budget_s)
    return r.ratio, (r.high - r.low) / r.ratio


def _probe(adapter: Any, row: Row) -> None:
    """The sensitivity strategy's full profile, the most the tuner spends on the probe, under the
    tuner's budget: two calls of an eval_fn that runs FP32 on EVAL_SAMPLES samples."""
    eval_s = _eval_seconds(adapter)
    probe = OutputProbe(adapter, adapter.space, eval_seconds=eval_s)
    strategy = SensitivityStrategy()
    strategy.setup(adapter.space, probe)
    start = time.perf_counter()
    try:
        strategy.profile()
    except Exception as exc:
        row.crashes += 1
        row.errors["probe"] = first_line(exc, 300)
    row.probe_s, row.probe_runs = time.perf_counter() - start, probe.calls + 1  # + the FP32 reference
    row.probe_evals = row.probe_s / eval_s
    row.probe_budget = row.probe_s / probe.budget_s if probe.budget_s else None


def _tune(case: ZooCase, adapter: Any, exported: bytes | None, row: Row, trials: int) -> None:
    """The default tuner on the model, as a user runs it: is its result faster than FP32, and does
    it say so when it is not? The metric is output fidelity to FP32 on the latency batch (1 - relative
    squared error), the goal a loss of at most TUNE_LOSS."""
    reference = flatten_outputs(adapter.runner(adapter.fp32_model)())

    def fidelity(model: Any) -> float:
        outputs = flatten_outputs(adapter.runner(model)())  # the zoo's adapter runs the tuner's candidates
        return 1.0 - float(np.sum((outputs - reference) ** 2) / np.sum(reference**2))

    model: Any = case.model if exported is None else onnx.load_from_string(exported)
    data = case.calib_batches if exported is None else case.feeds()
    try:
        result = Tuner(AccuracyCriterion(absolute=TUNE_LOSS), max_trials=trials).tune(
            model, data, fidelity, adapter=adapter.name)
    except Exception as exc:
        row.crashes += 1
        row.errors["tune"] = first_line(exc, 300)
        return
    row.tuned_ratio, row.tuned_trials = result.latency_ratio, result.trials
    row.tuned_verdict = ("not met" if not result.met else "SLOWER than FP32" if result.slower_than_fp32
                         else "faster than FP32")


def _eval_seconds(adapter: Any) -> float:
    """An eval_fn's time: the FP32 model on EVAL_SAMPLES samples (the median batch time, scaled)."""
    run = adapter.runner(adapter.fp32_model)
    run()  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        outputs = run()
        times.append(time.perf_counter() - start)
    samples = len(output_arrays(outputs)[0])
    return statistics.median(times) * EVAL_SAMPLES / samples


# --- the report --------------------------------------------------------------------------------------
COLUMNS = {
    "model": "model", "adapter": "adapter", "ops": "ops", "weighted": "conv/linear found",
    "unaccounted": "unaccounted", "unsupported": "unsupported", "space_s": "space s", "calib_s": "calib s",
    "build_median_s": "build median s", "builds": "builds", "probe_s": "probe s", "probe_runs": "probe runs",
    "probe_evals": "probe / eval_fn", "probe_budget": "probe / budget",
    "int8_vs_fp32": "INT8/FP32 latency", "latency_spread": "spread", "tuned_ratio": "tuned/FP32 latency",
    "tuned_trials": "tuned trials", "tuned_verdict": "tuner says", "coverage": "coverage",
    "default": "default", "fallback": "fallbacks ok", "fp32": "all-FP32", "fp32_error": "all-FP32 rel. error",
    "save_load": "save/load", "crashes": "crashes",
}


def write_report(rows: list[Row], args: argparse.Namespace, command: str, elapsed: float) -> Path:
    table = pd.DataFrame([{k: getattr(r, k) for k in [*COLUMNS, "kind", "held_out"]} | {"errors": r.errors}
                          for r in rows])
    sample = "all ops" if args.fallbacks is None else f"up to {args.fallbacks} spread over the graph"
    runs = (f"Command: `{command}`  \n{len(rows)} model x adapter pairs in {elapsed:.0f} s on this machine "
            "(2 shared cores: times are indicative, latency ratios are interleaved medians).\n")
    return _write(table, args.out, args.size, runs, sample)


def merge(directories: list[Path], out: Path, size: str) -> Path:
    """One table from runs written to separate ``--out`` directories (one model per run, so that
    each holds the timing lock briefly); a later directory's row for a model and adapter replaces
    an earlier one's."""
    stem, tables, commands = _stem(size), [], []
    for directory in directories:
        csv, md = directory / f"{stem}.csv", directory / f"{stem}.md"
        if not csv.exists() or not md.exists():
            raise SystemExit(f"{directory} holds no {stem}.csv and {stem}.md: pass directories written by "
                             f"`experiments/zoo.py --size {size} --out DIR`.")
        tables.append(pd.read_csv(csv))
        commands += re.findall(r"^Command: `([^`]*)`", md.read_text(), flags=re.MULTILINE)
    table = pd.concat(tables).drop_duplicates(["model", "adapter"], keep="last")
    order = {name: i for i, name in enumerate(ZOO)}
    table = table.sort_values(["model", "adapter"], key=lambda c: c.map(order) if c.name == "model" else c)
    table["errors"] = table["errors"].map(lambda text: ast.literal_eval(text) if isinstance(text, str) else {})
    merged = " ".join(["python experiments/zoo.py --size", size, "--merge", *map(str, directories)])
    runs = ("Merged by `" + merged + "` from one run per model and adapter set (each alone under the timing lock; "
            "2 shared cores: times are indicative, latency ratios are interleaved medians). Runs:\n\n"
            + "\n".join(f"- `{c}`" for c in commands) + "\n")
    return _write(table.reset_index(drop=True), out, size, runs, "as each run's --fallbacks says")


def _stem(size: str) -> str:
    return "zoo" if size == "ci" else f"zoo_{size}"


def _write(table: pd.DataFrame, out: Path, size: str, runs: str, sample: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{_stem(size)}.csv", index=False)
    shown = table.rename(columns=COLUMNS)
    parts = [
        f"# Model zoo through both adapters ({size} size)\n",
        runs,
        "Checks (autoquant/examples/zoo_checks.py): coverage = every Conv/Linear in the space or in "
        "`space.unsupported`; default = default candidate builds and runs; fallbacks = single-op fallbacks "
        f"that build and run ({sample}); "
        f"all-FP32 = every op FP32 matches the FP32 model (relative L2 error <= {checks.FP32_TOLERANCE:g}); "
        "save/load = same outputs after save_model/load_model. Latency: the default candidate against FP32, "
        "interleaved pairs until the ratio is known to +-5%; spread = width of its 95% interval over the ratio. "
        "Tuned (with --tune N): the default tuner, N trials at most, on output fidelity to FP32 (1 - relative "
        f"squared error on the latency batch) with a loss of at most {TUNE_LOSS:g}: the result's latency over "
        "FP32's and what its summary says.\n",
    ]
    for title, held in (("Design set", False), (f"Held-out models ({', '.join(HELD_OUT)}): not for tuning", True)):
        part = shown[table["held_out"] == held].drop(columns=["kind", "held_out", "errors"])
        if len(part):
            parts += [f"\n## {title}\n", part.to_markdown(index=False, floatfmt=".3g"), ""]
    failures = [f"- {r.model} / {r.adapter} / {check}: {text}"
                for r in table.itertuples() for check, text in r.errors.items()]
    parts += ["\n## Failures (first line of each error)\n", "\n".join(failures) or "none", ""]
    path = out / f"{_stem(size)}.md"
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="ci")
    parser.add_argument("--models", nargs="+", choices=list(ZOO), default=list(ZOO))
    parser.add_argument("--adapters", nargs="+", choices=checks.ADAPTERS, default=list(checks.ADAPTERS))
    parser.add_argument("--fallbacks", type=int, default=None,
                        help="single-op fallbacks per model, spread over the graph (default: every op)")
    parser.add_argument("--latency-s", type=float, default=0.5, help="time budget of one latency measurement")
    parser.add_argument("--no-probe", dest="probe", action="store_false", help="skip the probe's cost")
    parser.add_argument("--tune", type=int, default=0, metavar="N",
                        help="also run the default tuner (N trials at most) and record its result's latency")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                        help="merge earlier runs' tables (their --out directories) into one in --out; runs nothing")
    args = parser.parse_args(argv)
    if args.merge:
        print(merge(args.merge, args.out, args.size).read_text())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("autoquant").setLevel(logging.ERROR)  # the table says what failed
    warnings.filterwarnings("ignore")  # tracer and deprecation warnings by the hundred
    command = "python experiments/zoo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start, rows = time.perf_counter(), []
    for name in args.models:
        case = ZOO[name].build(args.size)
        for adapter in args.adapters:
            log.info("%s / %s ...", name, adapter)
            rows.append(run_one(case, adapter, args))
            row = rows[-1]
            log.info("%s / %s: %d crash(es); %s", name, adapter, row.crashes,
                     "; ".join(f"{k}: {v[:120]}" for k, v in row.errors.items()) or "all checks pass")
            path = write_report(rows, args, command, time.perf_counter() - start)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
