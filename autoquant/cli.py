"""The ``autoquant`` command: run, resume, check and report YAML tuning jobs.

    autoquant validate configs/digits-fx.yaml    # schema and callables, nothing runs
    autoquant space configs/digits-fx.yaml       # the ops and knobs the adapter exposes
    autoquant tune configs/digits-fx.yaml        # runs; continues the job's study if it exists
    autoquant resume configs/digits-fx.yaml      # continues, and fails if there is nothing to continue
    autoquant report autoquant-out/digits-fx     # table, history.csv and plots from the study
    autoquant schema                             # every YAML key, its type, default and meaning (Markdown)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from autoquant import __version__, storage
from autoquant.config import JOB_COPY, STATS_FILE, LoadedJob, load_job, mask_url, parse_job
from autoquant.errors import AutoquantError, ConfigError
from autoquant.plots import plot_history
from autoquant.progress import StderrLines
from autoquant.report import history_frame, print_summary
from autoquant.result import HISTORY_FILE, TuneResult
from autoquant.trials import BASELINE, best_trial, counted, records, study_records
from autoquant.tuner import TuneInterrupted, Tuner
from autoquant.yaml_reference import yaml_reference

log = logging.getLogger("autoquant")
CONFIG_FILE = "config.yaml"


# --- running a job (also used by experiments/sweep.py) ------------------------------------------
def make_tuner(job: LoadedJob, *, on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
               stats_cache: Path | None = None, restart: bool = False) -> Tuner:
    spec = job.spec
    search = spec.strategy.model_dump(exclude={"name", "options"})  # the rest are Tuner's keywords
    return Tuner(
        spec.criterion.criterion(), strategy=spec.strategy.strategy(), restrict=spec.space.restriction(),
        storage=job.storage(), study_name=job.name, latency_budget_s=spec.latency_budget_s,
        latency_precision=spec.latency_precision, stats_cache=stats_cache or job.output / STATS_FILE,
        on_trial=on_trial, restart=restart, **search,
    )


def study_trials(job: LoadedJob) -> int | None:
    """Trials in the job's study, or None when it has no study yet (creates nothing)."""
    if not storage.exists(job.storage_url):
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=job.name, storage=job.storage())
    except KeyError:
        return None
    return counted(study_records(study))


def run_job(job: LoadedJob, console: Console | None = None, *, stats_cache: Path | None = None,
            restart: bool = False, verbose: bool = True) -> TuneResult:
    """Tune, then write result.json, history.csv, config.yaml, plots and the model to the output.

    ``stats_cache`` (default: in the output folder) lets runs of the same model share one calibration;
    ``verbose=False``: no progress display or lines (``--quiet``).
    """
    console = console or Console()
    out = job.output
    out.mkdir(parents=True, exist_ok=True)
    record = job.masked_dict() | {"output": str(out)}
    (out / JOB_COPY).write_text(yaml.safe_dump(record, sort_keys=False))
    existing = None if restart else study_trials(job)
    where = mask_url(job.storage_url)
    if existing:
        log.info("Continuing study '%s' (%d trial(s) so far) in %s.", job.name, existing, where)
    else:
        log.info("New study '%s' in %s.", job.name, where)
    tuner = make_tuner(job, stats_cache=stats_cache, restart=restart)
    model = job.load_model()
    try:
        result = tuner.tune(model, job.load_calibration(), job.load_eval(), adapter=job.adapter,
                             verbose=verbose)
    except TuneInterrupted as exc:
        if exc.partial_result is not None:
            print_summary(exc.partial_result, console)
        raise
    print_summary(result, console)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(result.config.to_dict(), sort_keys=False))
    plot_history(result.history, out, baseline=result.baseline_accuracy, criterion=result.criterion,
                 chosen=result.best_trial)
    result.save(out)
    console.print(f"Wrote result.json, history.csv, {CONFIG_FILE}, trials.png, tradeoff.png and the model to {out}/")
    return result


# --- report -------------------------------------------------------------------------------------
def report(target: Path, console: Console) -> pd.DataFrame:
    """Table, history.csv and plots from the study of a job file or of an output folder."""
    if target.is_dir():
        copy = target / JOB_COPY
        if not copy.exists():
            raise ConfigError(f"{target} has no {JOB_COPY}: pass the job's YAML file, or an output folder of "
                              "'autoquant tune'.")
        job = load_job(copy, output=str(target.resolve()))
        if "***" in (job.spec.storage or ""):
            raise ConfigError(f"The storage of {target} has a password, which is never written: "
                              "pass the job's YAML file instead.")
    else:
        job = load_job(target)
    if study_trials(job) is None:
        raise ConfigError(f"No study '{job.name}' in {mask_url(job.storage_url)}: run 'autoquant tune' first.")
    study = optuna.load_study(study_name=job.name, storage=job.storage())
    trials = study.get_trials(deepcopy=False)
    history = history_frame(trials)
    baseline = study.user_attrs.get(BASELINE)
    criterion = job.spec.criterion.criterion()
    best = best_trial(records(trials), baseline, criterion)
    job.output.mkdir(parents=True, exist_ok=True)
    history.to_csv(job.output / HISTORY_FILE, index=False)
    if baseline is not None:
        plot_history(history, job.output, baseline=baseline, criterion=criterion,
                     chosen=best.number if best else None)
    table = Table(title=f"study '{job.name}': {counted(records(trials))} trial(s); FP32 {baseline}; "
                        f"goal: {criterion.describe()}")
    columns = ("trial", "outcome", "accuracy", "latency_ratio", "n_fp32")
    for column in columns:
        table.add_column(column, no_wrap=True)
    table.add_column("config", overflow="fold")  # never cut: per-op calibration is part of it
    for row in history.itertuples(index=False):
        mark = " *" if best is not None and row.trial == best.number else ""
        table.add_row(*[_fmt(getattr(row, c)) + (mark if c == "trial" else "") for c in columns],
                      _fmt(row.config) + (f"  [{row.error}]" if _fmt(row.error) else ""))
    console.print(table)
    if best is not None and best.measurement is not None and baseline is not None:
        met = criterion.passes(baseline, best.measurement.accuracy)
        console.print(f"chosen (*): trial {best.number}, goal {'MET' if met else 'NOT met'}")
    console.print(f"Wrote {HISTORY_FILE}, trials.png and tradeoff.png to {job.output}/")
    return history


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --- verbs --------------------------------------------------------------------------------------
def _with_overrides(job: LoadedJob, args: argparse.Namespace) -> LoadedJob:
    """The job with the command line's overrides, validated like the YAML they replace."""
    data = job.spec.model_dump()
    if args.strategy is not None and args.strategy != job.spec.strategy.name:
        data["strategy"] |= {"name": args.strategy, "options": {}}  # the job's options are for its strategy
    if args.max_trials is not None:
        data["strategy"]["max_trials"] = args.max_trials
    for kind in ("relative", "absolute"):
        if getattr(args, kind) is not None:
            data["criterion"] |= {"relative": None, "absolute": None, kind: getattr(args, kind)}
    return LoadedJob(parse_job(data, source="command line"), job.path)


def _tune(args: argparse.Namespace, console: Console, *, resume: bool) -> None:
    job = _with_overrides(load_job(args.job), args)
    if args.out:  # relative to the current folder, like any command-line path
        job.output = Path(args.out).resolve()
    if resume and not study_trials(job):
        raise ConfigError(f"Nothing to resume: no study '{job.name}' with trials in {mask_url(job.storage_url)}. "
                          "Use 'autoquant tune' to start it.")
    run_job(job, console, restart=args.restart, verbose=not args.quiet)


def _validate(args: argparse.Namespace, console: Console) -> None:
    job = load_job(args.job)
    checked = job.check_callables()
    console.print(f"{args.job}: valid job '{job.name}'")
    for line in checked:
        console.print(f"  {line} (importable)")
    spec = job.spec
    console.print(f"  adapter {spec.adapter}; strategy {spec.strategy.name}, max_trials {spec.strategy.max_trials}; "
                  f"goal: {spec.criterion.criterion().describe()}")
    console.print(f"  storage {mask_url(job.storage_url)}; output {job.output}")


def _space(args: argparse.Namespace, console: Console) -> None:
    job = load_job(args.job)
    tuner = make_tuner(job)
    space = tuner.space(job.load_model(), job.load_calibration(), adapter=job.adapter)
    console.print(f"adapter: {job.spec.adapter}", highlight=False)
    console.print(str(space), markup=False, highlight=False, soft_wrap=True)  # the same text as print(space)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoquant", description="Accuracy-driven INT8 tuning from YAML jobs.",
                                     epilog="Run 'autoquant VERB --help' for a verb's options.")
    parser.add_argument("--version", action="version", version=f"autoquant {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def job_verb(name: str, text: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=text, description=text)
        p.add_argument("job", metavar="JOB.yaml", help="the job file")
        return p

    for name, text in (
        ("tune", "Run a job. If its study already holds trials (an earlier run, killed or not), continue it: "
                 "finished trials are kept, the one a crash interrupted runs again."),
        ("resume", "Continue a job's existing study (an error if there is none)."),
    ):
        p = job_verb(name, text)
        p.add_argument("--max-trials", type=int, help="override strategy.max_trials (the total for the study)")
        p.add_argument("--strategy", help="override strategy.name (its options are then dropped)")
        goal = p.add_mutually_exclusive_group()
        goal.add_argument("--relative", type=float, help="override the criterion: tolerated relative loss (0.01: 1%%)")
        goal.add_argument("--absolute", type=float, help="override the criterion: tolerated absolute loss")
        p.add_argument("--out", help="override the output folder")
        p.add_argument("--restart", action="store_true",
                       help="delete the job's study and calibration cache and start over (after a model change)")
        p.add_argument("--quiet", action="store_true",
                       help="no progress display and no progress lines (warnings, errors and the summary remain)")
    job_verb("validate", "Check a job without running it: the schema, and that its callables import.")
    job_verb("space", "Load the model and list the ops and knobs the adapter exposes, after the job's "
                      "restrictions, and the parts that stay FP32 and why.")
    p = verbs.add_parser("report", help="Print the trial table and write history.csv and plots from a study.",
                         description="Print the trial table and write history.csv, trials.png and tradeoff.png "
                                     "from the study of an output folder of 'autoquant tune' or of a job file.")
    p.add_argument("target", metavar="OUTDIR_or_JOB.yaml")
    verbs.add_parser("schema", help="Print the YAML job reference (every key, type, default, meaning) as Markdown.",
                     description="Print the YAML job reference, generated from the schema, as Markdown.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    quiet = getattr(args, "quiet", False)
    # autoquant's own handler, so that on a terminal the tuner draws its progress display under the lines
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        handlers=[StderrLines("%(asctime)s %(message)s", "%H:%M:%S")])
    handlers = {"tune": lambda: _tune(args, console, resume=False), "resume": lambda: _tune(args, console, resume=True),
                "validate": lambda: _validate(args, console), "space": lambda: _space(args, console),
                "report": lambda: report(Path(args.target), console),
                "schema": lambda: sys.stdout.write(yaml_reference())}
    try:
        handlers[args.verb]()
    except AutoquantError as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
