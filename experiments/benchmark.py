"""Every strategy on every shipped example at two criteria, and Neural Compressor's ``basic``, in one run.

    python experiments/benchmark.py --criteria 0.01 0.001 --max-trials 40 --out experiments/results

Models: the digits CNN plain and fragile (PyTorch FX); the same two exported to ONNX when the ONNX
example imports; MiniLM on STS-B when named with ``--models`` and its data and weights are here.
Neural Compressor 2.6 runs where it imports (a benchmark-only install, never a project
dependency; see the module's ``NC_INSTALL``), on the FX models, with the same model, calibration
data, eval_fn and criterion, in a temporary folder (it writes ``nc_workspace/`` into the cwd).

Per (model, criterion, tuner) it records: met, evaluations of eval_fn until met (all of them when
not met), wall time, final accuracy, the final model's latency ratio (re-measured here, interleaved
against FP32, median, the same input batch for every tuner), the latency ratio of full INT8 (all
ops INT8, min-max) for reference, and the ops left in FP32. Writes benchmark.csv, benchmark.md and
benchmark.png (latency ratio against evaluations, one point per tuner x model x criterion).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from autoquant import AccuracyCriterion, Tuner
from autoquant.examples.digits import BATCH_SIZE, accuracy_fn, load_data, make_fragile, train_model
from autoquant.latency import measure_latency
from autoquant.strategies import STRATEGIES

STS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsbenchmark"  # ../shared of the repo

NC_INSTALL = ('pip install "setuptools<81" six pycocotools opencv-python-headless Deprecated prettytable psutil '
              'schema && pip install --no-deps neural-compressor==2.6')
log = logging.getLogger("benchmark")


@dataclass
class Case:
    """One model to tune: what every tuner gets."""

    name: str
    model: Any
    calibration: list
    eval_fn: Callable[[Any], float]
    torch_model: bool  # Neural Compressor's PyTorch FX path applies


# --- the models -----------------------------------------------------------------------------------
def digits_cases(seed: int, onnx: bool) -> list[Case]:
    data = load_data(seed)
    plain = train_model(data, seed=seed)
    fragile = make_fragile(copy.deepcopy(plain), data.train[0][:512])
    eval_fn = accuracy_fn(data)
    cases = [Case("digits", plain, data.calibration_batches(), eval_fn, True),
             Case("digits-fragile", fragile, data.calibration_batches(), eval_fn, True)]
    if onnx:
        try:
            digits_onnx = importlib.import_module("autoquant.examples.digits_onnx")
        except ImportError as exc:
            log.warning("Skipping the ONNX digits models: %s", exc)
        else:
            feeds, onnx_eval = digits_onnx.calibration_batches(data), digits_onnx.accuracy_fn(data)
            cases += [Case("digits-onnx", digits_onnx.export(plain), feeds, onnx_eval, False),
                      Case("digits-onnx-fragile", digits_onnx.export(fragile), feeds, onnx_eval, False)]
    return cases


def minilm_case(seed: int, dev_pairs: int | None) -> Case | None:
    """all-MiniLM-L6-v2 on STS-B dev (Spearman), as experiments/minilm_sts.py tunes it."""
    try:
        import onnx

        from autoquant.examples import text

        model = onnx.load_from_string(text.export_minilm())
        calibration = text.encode(text.train_sentences(STS_DIR, 256, seed=seed), 32)
        dev = text.read_sts(STS_DIR, "dev", limit=dev_pairs)
    except Exception as exc:  # missing extra, weights or data: the benchmark runs without it
        log.warning("Skipping MiniLM: %s: %s", type(exc).__name__, exc)
        return None
    batches = dev.batches()
    return Case("minilm-sts", model, calibration, lambda session: dev.spearman(session, batches), False)


# --- measurements ----------------------------------------------------------------------------------
class Counting:
    """eval_fn that remembers every score, so "evaluations until met" is counted the same for all."""

    def __init__(self, eval_fn: Callable[[Any], float]) -> None:
        self.eval_fn = eval_fn
        self.scores: list[float] = []

    def __call__(self, model: Any) -> float:
        self.scores.append(float(self.eval_fn(model)))
        return self.scores[-1]

    def evaluations_until_met(self, criterion: AccuracyCriterion) -> tuple[bool, int]:
        """scores[0] is the FP32 baseline; the rest are candidates, in order."""
        baseline, candidates = self.scores[0], self.scores[1:]
        for i, score in enumerate(candidates, start=1):
            if criterion.passes(baseline, score):
                return True, i
        return False, len(candidates)


def weight_layers(model: nn.Module) -> tuple[int, int]:
    """(float, all) Conv/Linear layers of a torch model: a fallback count every tuner's model has."""
    quantized = float_ = 0
    for module in model.modules():
        kind = type(module).__module__
        name = type(module).__name__
        if kind.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")) and \
                name.startswith(("Conv", "Linear")) and not name.endswith("PackedParams"):
            quantized += 1
        elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            float_ += 1
    return float_, float_ + quantized


def torch_runner(model: nn.Module, inputs: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(inputs)

    return run


# --- the tuners -------------------------------------------------------------------------------------
def run_autoquant(case: Case, strategy: str, relative: float, args: argparse.Namespace,
                  full_int8: dict[str, float]) -> dict[str, Any]:
    criterion = AccuracyCriterion(relative=relative)
    counting = Counting(case.eval_fn)
    start = time.perf_counter()
    result = Tuner(criterion, strategy=strategy, max_trials=args.max_trials, seed=args.seed).tune(
        case.model, case.calibration, counting)
    wall = time.perf_counter() - start
    met, until = counting.evaluations_until_met(criterion)
    adapter = result.adapter
    fp32_run = adapter.runner(adapter.fp32_model)
    # result.model is what the user saves (an ONNX adapter gives a ModelProto); build gives what runs.
    latency = measure_latency(fp32_run, adapter.runner(adapter.build(result.config)), budget_s=args.latency_budget)
    if case.name not in full_int8:  # the reference: every op INT8 with the default knobs
        default = adapter.build(adapter.space.resolve(adapter.space.default_config()))
        full_int8[case.name] = measure_latency(fp32_run, adapter.runner(default), budget_s=args.latency_budget).ratio
    layers = weight_layers(result.model) if case.torch_model else None
    return {
        "tuner": strategy, "met": met and result.met, "evaluations": until, "wall_s": wall,
        "fp32_accuracy": result.baseline_accuracy, "final_accuracy": result.accuracy,
        "relative_loss": result.relative_loss, "latency_ratio": latency.ratio,
        "full_int8_latency_ratio": full_int8[case.name],
        "ops_fp32": f"{len(result.fp32_ops)}/{result.quantizable_ops}",
        "conv_linear_fp32": f"{layers[0]}/{layers[1]}" if layers else "",
        "config": result.config.describe() + (f" +{len(result.config.op_calibration)} op calib."
                                              if result.config.op_calibration else ""),
    }


def nc_available() -> bool:
    try:
        with _quiet():
            importlib.import_module("neural_compressor.quantization")
    except Exception as exc:  # ImportError, or its import-time failures on newer stacks
        log.warning("Neural Compressor is not usable here (%s: %s); install it with: %s", type(exc).__name__, exc,
                    NC_INSTALL)
        return False
    return True


def run_neural_compressor(case: Case, relative: float, args: argparse.Namespace,
                          full_int8: dict[str, float]) -> dict[str, Any]:
    """Neural Compressor 2.6 ``basic`` on the PyTorch FX backend, as its documentation sets it up."""
    from neural_compressor.config import AccuracyCriterion as NCCriterion
    from neural_compressor.config import PostTrainingQuantConfig, TuningCriterion
    from neural_compressor.quantization import fit

    images = torch.cat([batch[0] for batch in case.calibration])
    labels = torch.cat([batch[1] for batch in case.calibration])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=BATCH_SIZE)
    config = PostTrainingQuantConfig(
        approach="static", backend="default", calibration_sampling_size=[len(images)],
        accuracy_criterion=NCCriterion(criterion="relative", tolerable_loss=relative, higher_is_better=True),
        tuning_criterion=TuningCriterion(strategy="basic", max_trials=args.max_trials, timeout=0),
    )
    counting = Counting(case.eval_fn)
    criterion = AccuracyCriterion(relative=relative)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir, _cwd(workdir), _quiet():
        quantized = fit(copy.deepcopy(case.model), config, calib_dataloader=loader, eval_func=counting)
    wall = time.perf_counter() - start
    met, until = counting.evaluations_until_met(criterion)
    row = {"tuner": "neural-compressor basic", "met": met and quantized is not None, "evaluations": until,
           "wall_s": wall, "fp32_accuracy": counting.scores[0], "full_int8_latency_ratio": full_int8.get(case.name)}
    if quantized is None:  # NC returns None when nothing met the goal
        return {**row, "final_accuracy": None, "relative_loss": None, "latency_ratio": None, "ops_fp32": "",
                "conv_linear_fp32": "", "config": "None (no model returned)"}
    model = quantized.model
    first = images[:BATCH_SIZE]  # the batch autoquant's adapters measure latency on
    latency = measure_latency(torch_runner(case.model, first), torch_runner(model, first), budget_s=args.latency_budget)
    accuracy = case.eval_fn(model)
    layers = weight_layers(model)
    return {**row, "final_accuracy": accuracy, "relative_loss": (counting.scores[0] - accuracy) / counting.scores[0],
            "latency_ratio": latency.ratio, "ops_fp32": "", "conv_linear_fp32": f"{layers[0]}/{layers[1]}",
            "config": f"engine {torch.backends.quantized.engine}"}


@contextlib.contextmanager
def _cwd(path: str):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _quiet():
    """Neural Compressor logs every tuning step at INFO through the root logger."""
    loggers = [logging.getLogger(), logging.getLogger("neural_compressor")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=False):
            logger.setLevel(level)


# --- tables and the plot -------------------------------------------------------------------------------
def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    criteria = list(dict.fromkeys(table["criterion"]))
    tuners = list(dict.fromkeys(table["tuner"]))
    models = list(dict.fromkeys(table["model"]))
    markers = "osD^vP*X"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(criteria), figsize=(6 * len(criteria), 4.8), squeeze=False, sharey=True)
    for ax, criterion in zip(axes[0], criteria, strict=False):
        for _, row in table[table["criterion"] == criterion].iterrows():
            if pd.isna(row["evaluations"]):
                continue  # the run failed: its error is in the table
            color = colors[tuners.index(row["tuner"]) % len(colors)]
            marker = markers[models.index(row["model"]) % 8]
            if pd.isna(row["latency_ratio"]):  # no model returned: the user is left with FP32
                ax.scatter(row["evaluations"], 1.0, s=60, marker="x", color=color)
                continue
            ax.scatter(row["evaluations"], row["latency_ratio"], s=60, marker=marker,
                       facecolors=color if row["met"] else "none", edgecolors=color)
        ax.set_title(f"criterion: {criterion}")
        ax.set_xlabel("evaluations of eval_fn (until met, or all when not met)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("latency ratio INT8/FP32 (lower is faster)")
    handles = [plt.Line2D([], [], ls="", marker="o", color=colors[i % len(colors)], label=t)
               for i, t in enumerate(tuners)]
    handles += [plt.Line2D([], [], ls="", marker=markers[i % 8], color="gray", label=m) for i, m in enumerate(models)]
    fig.legend(handles=handles, loc="center right", fontsize=8, title="hollow: not met\nx: no model (FP32)")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--criteria", type=float, nargs="+", default=[0.01, 0.001], help="relative tolerated losses")
    parser.add_argument("--strategies", nargs="+", default=sorted(STRATEGIES), choices=sorted(STRATEGIES))
    parser.add_argument("--models", nargs="+",
                        default=["digits", "digits-fragile", "digits-onnx", "digits-onnx-fragile"],
                        help="also: minilm-sts (needs the text extra and ../shared/data/stsbenchmark)")
    parser.add_argument("--max-trials", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-budget", type=float, default=1.0, help="seconds per final latency measurement")
    parser.add_argument("--dev-pairs", type=int, default=None, help="MiniLM: first N STS-B dev pairs (default all)")
    parser.add_argument("--no-nc", action="store_true", help="skip Neural Compressor even where it imports")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: latency ratios stay stable on a shared, loaded machine)")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--name", default="benchmark", help="file name stem of the outputs")
    parser.add_argument("--replot", action="store_true", help="only redraw the .md and .png from the .csv")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        return write(pd.read_csv(out / f"{args.name}.csv").to_dict("records"), out, args.name)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)

    cases: list[Case | None] = [*digits_cases(args.seed, onnx=any("onnx" in m for m in args.models))]
    if "minilm-sts" in args.models:
        cases.append(minilm_case(args.seed, args.dev_pairs))
    chosen = [c for c in cases if c is not None and c.name in args.models]
    use_nc = not args.no_nc and any(c.torch_model for c in chosen) and nc_available()
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    full_int8: dict[str, float] = {}
    for case in chosen:
        for relative in args.criteria:
            runs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                (s, functools.partial(run_autoquant, case, s, relative, args, full_int8)) for s in args.strategies]
            if use_nc and case.torch_model:
                nc = functools.partial(run_neural_compressor, case, relative, args, full_int8)
                runs.append(("neural-compressor", nc))
            for tuner, run in runs:
                log.info("%s, %.2f%% relative: %s ...", case.name, 100 * relative, tuner)
                try:
                    row = {"model": case.name, "criterion": f"{relative:.2%} relative", **run()}
                except Exception as exc:  # one broken tuner or backend must not lose the other rows
                    log.exception("%s on %s failed", tuner, case.name)
                    row = {"model": case.name, "criterion": f"{relative:.2%} relative", "tuner": tuner, "met": False,
                           "latency_ratio": None, "config": f"error: {type(exc).__name__}: {exc}"[:200]}
                rows.append(row)
                log.info("  met %s in %s evaluation(s), latency ratio %s, %.1f s", row["met"], row.get("evaluations"),
                         row["latency_ratio"], row.get("wall_s", float("nan")))
                table = write(rows, out, args.name)  # after every run: a long benchmark keeps what it did
    print(table.to_markdown(index=False, floatfmt=".4g"))
    return table


def write(rows: list[dict[str, Any]], out: Path, name: str) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table["latency_vs_full_int8"] = (pd.to_numeric(table["latency_ratio"], errors="coerce")
                                     / pd.to_numeric(table.get("full_int8_latency_ratio"), errors="coerce"))
    table.to_csv(out / f"{name}.csv", index=False)
    (out / f"{name}.md").write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
    plot(table, out / f"{name}.png")
    return table


if __name__ == "__main__":
    main()
