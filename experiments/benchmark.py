"""The benchmark suite: every strategy on eight models at three criteria, against an exhaustive oracle.

    python experiments/benchmark.py --out experiments/results                      # the whole suite
    python experiments/benchmark.py --models digits-fragile dwcnn --criteria 0.01 0.001 \
        --strategies sensitivity bayesian --oracle-trials 60 --name benchmark-reduced   # a reduced run
    python experiments/benchmark.py --merge A.csv B.csv --name benchmark      # one table from several runs

Cases (``--models``): the digits CNN plain and fragile on PyTorch FX (``digits``, ``digits-fragile``)
and exported to ONNX (``digits-onnx``, ``digits-onnx-fragile``); all-MiniLM-L6-v2 on STS-B dev
through ONNX Runtime, static approach only (``minilm-sts``), and the same model's Hugging Face
BertModel through the FX adapter (``minilm-sts-fx``; both need the text extra and
../shared/data/stsbenchmark); and two architectures trained here, held out of the strategy's design
(``dwcnn``: a MobileNet-style depthwise CNN; ``transformer``: a patch transformer-encoder classifier;
``mlp``: a residual MLP on a synthetic tabular task with 5000 test samples, added after the other
two, so that a 0.1% goal is more than one sample; see experiments/benchmark_models.py). Criteria:
relative losses (default 1%, 0.5%, 0.1%).

The oracle of a case is an exhaustive search (``--oracle-trials`` candidates in the exhaustive
strategy's order: every all-INT8 knob setting, then single-op fallbacks, ...) run once and cached
in ``<out>/oracle/``; for each criterion its fastest passing candidate is the reference. Neural
Compressor 2.6 ``basic`` runs on the FX cases where it imports (a benchmark-only install, see
``NC_INSTALL``; it is not installed in the project's environment).

Per (case, criterion, tuner): met, eval_fn calls (the FP32 baseline included), the final model's
latency ratio to FP32 and to the oracle's fastest passing candidate (each measured here as one
interleaved ratio on the same batch), ops in FP32, wall time. Writes <name>.csv, <name>.md (with a
summary per tuner, design cases and held-out cases apart) and <name>.png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from autoquant import AccuracyCriterion, QuantConfig, Restriction, Tuner
from autoquant.adapters import adapter_for
from autoquant.criterion import metric_step
from autoquant.examples.digits import BATCH_SIZE, accuracy_fn, load_data, make_fragile, train_model
from autoquant.latency import measure_ratio
from autoquant.strategies import STRATEGIES

sys.path.insert(0, str(Path(__file__).parent))
import benchmark_models  # noqa: E402  (experiments/ is not a package)

NC_INSTALL = ('pip install "setuptools<81" six pycocotools opencv-python-headless Deprecated prettytable psutil '
              'schema && pip install --no-deps neural-compressor==2.6')
NC = "neural-compressor basic"  # its rows' tuner
CASES = ("digits", "digits-fragile", "digits-onnx", "digits-onnx-fragile", "minilm-sts", "minilm-sts-fx", "dwcnn",
         "transformer", "mlp")
HELD_OUT = ("dwcnn", "transformer", "mlp")
# never run while the default strategy was designed
STS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsbenchmark"  # ../shared of the repo
log = logging.getLogger("benchmark")


@dataclass
class Case:
    """One model to tune: what every tuner gets."""

    name: str
    model: Any
    calibration: list
    eval_fn: Callable[[Any], float]
    torch_model: bool  # Neural Compressor's PyTorch FX path applies
    restrict: Restriction | None = None

    @property
    def held_out(self) -> bool:
        return self.name in HELD_OUT


# --- the models -----------------------------------------------------------------------------------
def build_cases(names: list[str], seed: int, cache: Path) -> list[Case]:
    data = load_data(seed)
    eval_fn, calibration = accuracy_fn(data), data.calibration_batches()
    plain = _cached(cache / f"digits-{seed}.pt", lambda: train_model(data, seed=seed))
    fragile = make_fragile(copy.deepcopy(plain), data.train[0][:512])  # type: ignore[arg-type]
    cases = {"digits": lambda: Case("digits", plain, calibration, eval_fn, True),
             "digits-fragile": lambda: Case("digits-fragile", fragile, calibration, eval_fn, True),
             "dwcnn": lambda: Case("dwcnn", _cached(cache / f"dwcnn-{seed}.pt",
                                                    lambda: benchmark_models.depthwise_net(data, seed)),
                                   calibration, eval_fn, True),
             "transformer": lambda: Case("transformer", _cached(cache / f"transformer-{seed}.pt",
                                                                lambda: benchmark_models.patch_transformer(data, seed)),
                                         calibration, eval_fn, True),
             "mlp": lambda: mlp_case(seed, cache),
             "minilm-sts": lambda: minilm_case(seed),
             "minilm-sts-fx": lambda: minilm_case(seed, fx=True)}
    if any("onnx" in n for n in names):
        digits_onnx = importlib.import_module("autoquant.examples.digits_onnx")
        feeds, onnx_eval = digits_onnx.calibration_batches(data), digits_onnx.accuracy_fn(data)
        cases["digits-onnx"] = lambda: Case("digits-onnx", digits_onnx.export(plain), feeds, onnx_eval, False)
        cases["digits-onnx-fragile"] = lambda: Case("digits-onnx-fragile", digits_onnx.export(fragile), feeds,
                                                    onnx_eval, False)
    built = [cases[n]() for n in names]
    return [c for c in built if c is not None]


def _cached(path: Path, train: Callable[[], nn.Module]) -> nn.Module:
    """A model trained once per seed; later runs load the same weights (training is deterministic anyway)."""
    if path.exists():
        return torch.load(path, weights_only=False).eval()
    model = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return model


def mlp_case(seed: int, cache: Path) -> Case:
    """A residual MLP on a synthetic 10-class tabular task whose test split has 5000 samples: its 0.1%
    goal allows 4 samples lost, where the digits cases' 597 images allow none."""
    data = benchmark_models.tabular_data(seed)
    model = _cached(cache / f"mlp-{seed}.pt", lambda: benchmark_models.residual_mlp(data, seed))
    return Case("mlp", model, data.calibration_batches(), accuracy_fn(data), True)


def minilm_case(seed: int, fx: bool = False) -> Case | None:
    """all-MiniLM-L6-v2 on STS-B dev (Spearman): through ONNX Runtime, static approach only, or (``fx``)
    the Hugging Face BertModel through the FX adapter, whole space (Neural Compressor's image-batch
    set-up does not apply to it)."""
    try:
        import onnx

        from autoquant.examples import text

        model = text.load_minilm() if fx else onnx.load_from_string(text.export_minilm())
        calibration = text.encode(text.train_sentences(STS_DIR, 256, seed=seed), 32)
        dev = text.read_sts(STS_DIR, "dev")
    except Exception as exc:  # missing extra, weights or data: the benchmark runs without it
        log.warning("Skipping MiniLM: %s: %s", type(exc).__name__, exc)
        return None
    batches = dev.batches()
    if fx:
        return Case("minilm-sts-fx", model, text.torch_batches(calibration),
                    lambda module: dev.spearman(text.TorchSession(module), batches), False)
    return Case("minilm-sts", model, calibration, lambda session: dev.spearman(session, batches), False,
                Restriction(approach="static"))


# --- measurements ----------------------------------------------------------------------------------
class Counting:
    """eval_fn that counts its calls (the FP32 baseline is the first)."""

    def __init__(self, eval_fn: Callable[[Any], float]) -> None:
        self.eval_fn, self.scores = eval_fn, list[float]()

    def __call__(self, model: Any) -> float:
        self.scores.append(float(self.eval_fn(model)))
        return self.scores[-1]


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


# --- the oracle -------------------------------------------------------------------------------------
def oracle_trials(case: Case, args: argparse.Namespace) -> tuple[float, pd.DataFrame]:
    """The FP32 baseline and every candidate of an exhaustive search (cached in <out>/oracle/)."""
    path = Path(args.out) / "oracle" / f"{case.name}-seed{args.seed}-{args.oracle_trials}.json"
    if path.exists():
        data = json.loads(path.read_text())
        return data["baseline"], pd.DataFrame(data["trials"])
    log.info("%s: oracle (exhaustive, %d candidates) ...", case.name, args.oracle_trials)
    result = Tuner(AccuracyCriterion(relative=0.5, allow_large_relative=True), strategy="exhaustive",
                   objective="latency", max_trials=args.oracle_trials, restrict=case.restrict,
                   latency_budget_s=0.1).tune(case.model, case.calibration, case.eval_fn)
    history = result.history.dropna(subset=["accuracy"])
    trials = [{"config": _config_of(row).to_dict(), "accuracy": row["accuracy"], "latency_ratio": row["latency_ratio"]}
              for _, row in history.iterrows()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"baseline": result.baseline_accuracy, "trials": trials}, indent=1))
    return result.baseline_accuracy, pd.DataFrame(trials)


def _config_of(row: pd.Series) -> QuantConfig:
    def value(knob: str) -> Any:  # None for the activation knobs of a dynamic candidate
        return None if pd.isna(row[knob]) else row[knob]

    fp32 = row["fp32_ops"].split() if isinstance(row["fp32_ops"], str) else []
    return QuantConfig(value("approach"), value("calibration"), value("granularity"), value("scheme"), frozenset(fp32))


def oracle_config(baseline: float, trials: pd.DataFrame, criterion: AccuracyCriterion) -> QuantConfig | None:
    """The fastest passing candidate of the oracle's search (None when none passes)."""
    passing = trials[[criterion.passes(baseline, a) for a in trials["accuracy"]]]
    if passing.empty:
        return None
    return QuantConfig.from_dict(passing.sort_values("latency_ratio").iloc[0]["config"])


# --- the tuners -------------------------------------------------------------------------------------
def run_autoquant(case: Case, strategy: str, criterion: AccuracyCriterion, args: argparse.Namespace) -> dict[str, Any]:
    counting = Counting(case.eval_fn)
    start = time.perf_counter()
    result = Tuner(criterion, strategy=strategy, max_trials=args.max_trials, seed=args.seed,
                   restrict=case.restrict).tune(case.model, case.calibration, counting)
    wall = time.perf_counter() - start
    layers = weight_layers(result.model) if case.torch_model else None
    return {"tuner": strategy, "met": result.met, "evaluations": len(counting.scores), "wall_s": wall,
            "fp32_accuracy": result.baseline_accuracy, "final_accuracy": result.accuracy,
            "relative_loss": result.relative_loss, "ops_fp32": f"{len(result.fp32_ops)}/{result.quantizable_ops}",
            "conv_linear_fp32": f"{layers[0]}/{layers[1]}" if layers else "",
            "config": result.config.describe() + (f" +{len(result.config.op_calibration)} op calib."
                                                  if result.config.op_calibration else ""),
            "_adapter": result.adapter, "_config": result.config}


def add_latencies(row: dict[str, Any], oracle: QuantConfig | None, case: Case,
                  args: argparse.Namespace) -> dict[str, Any]:
    """The final model's latency against FP32 and against the oracle's fastest passing candidate: each a
    ratio measured here, interleaved, on the same batch (absolute times are meaningless on a shared machine),
    once per case and pair of models."""
    adapter, config, foreign = row.pop("_adapter", None), row.pop("_config", None), row.pop("_model", None)
    if foreign is not None and oracle is not None:  # Neural Compressor's model against the oracle's, built here
        ours = _calibrated_adapter(case)
        first = next(iter(case.calibration))[0][:BATCH_SIZE]
        reference = torch_runner(ours.build(ours.space.resolve(oracle)), first)
        row["vs_oracle"] = measure_ratio(reference, torch_runner(foreign, first), budget_s=args.latency_budget).ratio
    if adapter is None:
        return row
    row["final_config"] = json.dumps(config.to_dict())
    row["latency_ratio"] = _ratio(case, adapter, None, config, args)
    if oracle is not None:
        row["vs_oracle"] = _ratio(case, adapter, oracle, config, args)
    return row


_RATIOS: dict[tuple[str, str, str], float] = {}


def _ratio(case: Case, adapter: Any, reference: QuantConfig | None, config: QuantConfig,
           args: argparse.Namespace) -> float:
    """``config``'s latency over ``reference``'s (None: FP32), measured once per case and pair: the
    criteria that end on the same model get the same number, and the oracle's own config is 1."""
    space = adapter.space
    key = (case.name, space.canonical(reference).key() if reference else "fp32", space.canonical(config).key())
    if key[1] == key[2]:
        return 1.0
    if key not in _RATIOS:
        base = adapter.runner(adapter.build(space.resolve(reference)) if reference else adapter.fp32_model)
        final = adapter.runner(adapter.build(space.resolve(config)))
        _RATIOS[key] = measure_ratio(base, final, budget_s=args.latency_budget).ratio
    return _RATIOS[key]


_ADAPTERS: dict[str, Any] = {}


def _calibrated_adapter(case: Case) -> Any:
    """Our adapter for the case, calibrated once per run (every criterion's oracle is built from it)."""
    if case.name not in _ADAPTERS:
        _ADAPTERS[case.name] = adapter_for(case.model)(case.model, case.calibration)
        _ADAPTERS[case.name].calibrate()
    return _ADAPTERS[case.name]


def nc_available() -> bool:
    try:
        with _quiet():
            importlib.import_module("neural_compressor.quantization")
    except Exception as exc:  # ImportError, or its import-time failures on newer stacks
        log.warning("Neural Compressor is not usable here (%s: %s); install it with: %s", type(exc).__name__, exc,
                    NC_INSTALL)
        return False
    return True


def run_neural_compressor(case: Case, relative: float, args: argparse.Namespace) -> dict[str, Any]:
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
    met = any(criterion.passes(counting.scores[0], score) for score in counting.scores[1:])
    row = {"tuner": NC, "met": met and quantized is not None,
           "evaluations": len(counting.scores), "wall_s": wall, "fp32_accuracy": counting.scores[0]}
    if quantized is None:  # NC returns None when nothing met the goal
        return {**row, "final_accuracy": None, "relative_loss": None, "latency_ratio": None, "ops_fp32": "",
                "conv_linear_fp32": "", "config": "None (no model returned)"}
    model = quantized.model
    # timed as a copy (its weights packed again) whose first run is the latency batch: a oneDNN INT8
    # conv keeps one primitive, for the input shape of its first run (NC's eval_fn batches)
    timed = copy.deepcopy(model)
    first = images[:BATCH_SIZE]  # the batch autoquant's adapters measure latency on
    latency = measure_ratio(torch_runner(case.model, first), torch_runner(timed, first), budget_s=args.latency_budget)
    accuracy = case.eval_fn(model)
    layers = weight_layers(model)
    return {**row, "final_accuracy": accuracy, "relative_loss": (counting.scores[0] - accuracy) / counting.scores[0],
            "latency_ratio": latency.ratio, "ops_fp32": "", "conv_linear_fp32": f"{layers[0]}/{layers[1]}",
            "config": f"engine {torch.backends.quantized.engine}", "_model": timed}


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
def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per tuner, design and held-out cases apart, and apart again the goals finer than one step of the
    metric (one sample: a pass must lose none, so single samples decide): goals met of those the
    oracle can meet, median and worst eval_fn calls and latency against the oracle."""
    rows = []
    for (cases, tuner), group in _by_cases(table):
        meetable = group[group["oracle_met"] == True]  # noqa: E712 (None: no oracle ran for the case)
        rows.append({"cases": cases, "tuner": tuner,
                     "met / meetable": f"{int(meetable['met'].sum())}/{len(meetable)}",
                     "median evaluations": group["evaluations"].median(), "max evaluations": group["evaluations"].max(),
                     "median vs oracle": meetable["vs_oracle"].median(),
                     "worst vs oracle": meetable["vs_oracle"].max()})
    return pd.DataFrame(rows)


def _by_cases(table: pd.DataFrame) -> Any:
    """The rows grouped by ("design" or "held out", with ", goal < 1 sample" where the goal is finer than
    one step of the metric) and tuner, in the table's order (a CSV without ``below_step``: none is)."""
    below = table["below_step"].fillna(False).astype(bool) if "below_step" in table else False
    cases = table["held_out"].map({True: "held out", False: "design"}) + \
        pd.Series(below, index=table.index).map({True: ", goal < 1 sample", False: ""})
    return table.assign(cases=cases).groupby(["cases", "tuner"], sort=False)


def against_nc(table: pd.DataFrame) -> pd.DataFrame:
    """Per tuner, on the rows where Neural Compressor returned a model: its eval_fn calls minus
    Neural Compressor's (median and worst), with the same grouping as ``summary``."""
    if NC not in set(table["tuner"]):
        return pd.DataFrame()
    keys = ["model", "criterion"]
    nc = table[(table["tuner"] == NC) & table["latency_ratio"].notna()][keys + ["evaluations"]]
    ours = table[table["tuner"] != NC].merge(nc, on=keys, suffixes=("", "_nc"))
    rows = []
    for (cases, tuner), group in _by_cases(ours):
        extra = group["evaluations"] - group["evaluations_nc"]
        rows.append({"cases": cases, "tuner": tuner, "rows": len(group), "median calls": group["evaluations"].median(),
                     "median calls of NC": group["evaluations_nc"].median(), "calls - NC's, worst": extra.max()})
    return pd.DataFrame(rows)


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
            if pd.isna(row.get("evaluations")) or pd.isna(row.get("vs_oracle")):
                continue  # the run failed (its error is in the table) or the oracle found no pass
            color = colors[tuners.index(row["tuner"]) % len(colors)]
            ax.scatter(row["evaluations"], row["vs_oracle"], s=60, marker=markers[models.index(row["model"]) % 8],
                       facecolors=color if row["met"] else "none", edgecolors=color)
        ax.set_title(f"criterion: {criterion}")
        ax.set_xlabel("eval_fn calls (FP32 baseline included)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("latency / oracle's fastest passing latency")
    handles = [plt.Line2D([], [], ls="", marker="o", color=colors[i % len(colors)], label=t)
               for i, t in enumerate(tuners)]
    handles += [plt.Line2D([], [], ls="", marker=markers[i % 8], color="gray", label=m) for i, m in enumerate(models)]
    fig.legend(handles=handles, loc="center right", fontsize=8, title="hollow: not met")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict[str, Any]], out: Path, name: str, command: str) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    for column in ("evaluations", "latency_ratio", "vs_oracle"):  # absent while no run measured them
        if column not in table:
            table[column] = float("nan")
    table.to_csv(out / f"{name}.csv", index=False)
    text = [f"Command: `{command}`", "", "## Summary", "", summary(table).to_markdown(index=False, floatfmt=".3g"), ""]
    head_to_head = against_nc(table)
    if not head_to_head.empty:
        text += ["## Against Neural Compressor", "", "The rows where Neural Compressor returned a model.", "",
                 head_to_head.to_markdown(index=False, floatfmt=".3g"), ""]
    text += ["## Every run", "", table.to_markdown(index=False, floatfmt=".4g"), ""]
    (out / f"{name}.md").write_text("\n".join(text))
    plot(table, out / f"{name}.png")
    return table


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--criteria", type=float, nargs="+", default=[0.01, 0.005, 0.001],
                        help="relative tolerated losses")
    parser.add_argument("--strategies", nargs="*", default=sorted(STRATEGIES), choices=sorted(STRATEGIES),
                        help="autoquant's strategies to run (none: Neural Compressor only)")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--max-trials", type=int, default=40)
    parser.add_argument("--oracle-trials", type=int, default=300,
                        help="candidates the exhaustive oracle evaluates (0: no oracle, for cases where one "
                             "evaluation takes seconds; their rows have no 'vs oracle')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-budget", type=float, default=1.0, help="seconds per final latency measurement")
    parser.add_argument("--no-nc", action="store_true", help="skip Neural Compressor even where it imports")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: latency ratios stay stable on a shared, loaded machine)")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--name", default="benchmark", help="file name stem of the outputs")
    parser.add_argument("--replot", action="store_true", help="only redraw the .md and .png from the .csv")
    parser.add_argument("--merge", nargs="+", metavar="CSV", help=(
        "runs nothing: one table from earlier runs' CSVs, a later file's row replacing an earlier one's for the "
        "same model, criterion and tuner"))
    args = parser.parse_args(argv)
    command = "python experiments/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    if args.replot:
        return write(pd.read_csv(out / f"{args.name}.csv").to_dict("records"), out, args.name, command)
    if args.merge:
        merged = pd.concat([pd.read_csv(path) for path in args.merge])
        merged = merged.drop_duplicates(["model", "criterion", "tuner"], keep="last").reset_index(drop=True)
        # the suite's order: cases, looser criteria first, strategies by name, Neural Compressor last
        keys = pd.DataFrame({"case": merged["model"].map({name: i for i, name in enumerate(CASES)}),
                             "loss": -merged["criterion"].str.split("%").str[0].astype(float),
                             "tuner": merged["tuner"].where(merged["tuner"].isin(list(STRATEGIES)), "~")})
        merged = merged.loc[keys.sort_values(["case", "loss", "tuner"], kind="stable").index]
        out.mkdir(parents=True, exist_ok=True)
        return write(merged.to_dict("records"), out, args.name, command)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)

    cases = build_cases(args.models, args.seed, out / "cache")
    use_nc = not args.no_nc and any(c.torch_model for c in cases) and nc_available()
    rows: list[dict[str, Any]] = []
    for case in cases:
        searched = oracle_trials(case, args) if args.oracle_trials > 0 else None
        for relative in args.criteria:
            criterion = AccuracyCriterion(relative=relative)
            oracle = oracle_config(*searched, criterion) if searched is not None else None
            below_step = searched is not None and metric_step(
                [searched[0], *searched[1]["accuracy"]], below=criterion.allowed(searched[0])) is not None
            runs = [(s, functools.partial(run_autoquant, case, s, criterion, args)) for s in args.strategies]
            if use_nc and case.torch_model:
                runs.append(("neural-compressor", functools.partial(run_neural_compressor, case, relative, args)))
            for tuner, run in runs:
                log.info("%s, %.2f%% relative: %s ...", case.name, 100 * relative, tuner)
                row = {"model": case.name, "held_out": case.held_out, "criterion": f"{relative:.2%} relative",
                       "oracle_met": oracle is not None if searched is not None else None, "below_step": below_step,
                       "oracle_config": _describe(oracle) if searched is not None else "not run"}
                try:
                    row |= add_latencies(run(), oracle, case, args)
                except Exception as exc:  # one broken tuner or backend must not lose the other rows
                    log.exception("%s on %s failed", tuner, case.name)
                    row |= {"tuner": tuner, "met": False, "config": f"error: {type(exc).__name__}: {exc}"[:200]}
                rows.append(row)
                log.info("  met %s in %s eval_fn calls, latency x%.3g of the oracle's, %.1f s", row["met"],
                         row.get("evaluations"), row.get("vs_oracle", float("nan")), row.get("wall_s", float("nan")))
                table = write(rows, out, args.name, command)  # after every run: a long benchmark keeps what it did
    print(summary(table).to_markdown(index=False, floatfmt=".3g"))
    return table


def _describe(config: QuantConfig | None) -> str:
    if config is None:
        return "none passes"
    return f"{config.describe()} FP32: {' '.join(sorted(config.fp32_ops)) or '-'}"


if __name__ == "__main__":
    main()
