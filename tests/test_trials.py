"""The trial record: one owner of the keys, one count, one numbering, and what a result says."""

import json
import re
import time
from pathlib import Path

import numpy as np
import optuna
from rich.console import Console

from autoquant import AccuracyCriterion, QuantConfig, Restriction, Tuner
from autoquant.report import config_text, history_frame
from autoquant.trials import (
    COLLISION_OF,
    CONFIG,
    CONFIG_KEY,
    RECORD_VERSION,
    STALE,
    VERSION,
    Measurement,
    TrialRecord,
    counted,
    records,
)
from tests.fake_adapter import FakeAdapter, accuracy, fake_model

ROOT = Path(__file__).resolve().parent.parent
MEASURED = Measurement(accuracy=0.9, loss=0.0, passed=True, latency_ratio=0.5, latency_ms=1.0, fp32_latency_ms=2.0,
                       n_fp32=0, build_s=0.1, eval_s=0.2)


def test_no_module_but_trials_spells_an_attribute_key():
    literal = re.compile(r"""(user_attrs(\.get)?\(?\[?\s*["']|set_(trial_)?user_attr\([^,]*?,?\s*["'])""")
    offenders = []
    for folder in ("autoquant", "strategies", "experiments", "adapters"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "trials.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if literal.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_a_record_reads_back_what_was_written():
    study = optuna.create_study()
    trial = study.ask()
    config = QuantConfig(fp32_ops={"op1"}, op_calibration={"op0": "entropy"})
    trial.set_user_attr(CONFIG, config.to_dict())
    trial.set_user_attr(CONFIG_KEY, config.key())
    for name, value in MEASURED.to_attrs().items():
        trial.set_user_attr(name, value)
    study.tell(trial, 0.0)
    (record,) = records(study.trials)
    assert record.config == config and record.measurement == MEASURED
    assert record.measured and record.evaluated and record.counts and record.outcome == "PASS"


def test_one_count_leaves_out_stale_trials_and_collisions():
    study = optuna.create_study()
    for attr in (None, STALE, COLLISION_OF, None):
        trial = study.ask()
        if attr:
            trial.set_user_attr(attr, True if attr == STALE else 0)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert counted(records(study.trials)) == 2
    assert [r.outcome for r in records(study.trials)] == ["FAILED"] * 4


def test_one_numbering_in_log_history_and_result(tmp_path, caplog):
    caplog.set_level("INFO", logger="autoquant")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    result = Tuner(strategy="exhaustive", max_trials=4, storage=storage, study_name="n",
                   restrict=Restriction(calibration="minmax", scheme="asymmetric", granularity="per_channel"),
                   criterion=AccuracyCriterion(absolute=0.0)).tune(
        fake_model(n_ops=2, sensitive={0: 0.5, 1: 0.5}), [None], accuracy, adapter=FakeAdapter)
    logged = [int(n) for n in re.findall(r"trial (\d+) \(\d+/4\)", caplog.text)]
    assert logged == list(result.history["trial"]) == [t.number for t in optuna.load_study(
        study_name="n", storage=storage).trials] == [0, 1, 2, 3]
    assert re.findall(r"trial \d+ \((\d+)/4\)", caplog.text) == ["1", "2", "3", "4"]
    assert optuna.load_study(study_name="n", storage=storage).user_attrs[VERSION] == RECORD_VERSION
    assert result.best_trial in logged


def test_the_config_shows_per_op_calibration_and_is_never_cut():
    config = QuantConfig(op_calibration={"features.layer.3.very_long_operator_name": "percentile-99.99"})
    text = config_text(config)
    assert text.endswith("+percentile-99.99@features.layer.3.very_long_operator_name")
    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr(CONFIG, config.to_dict())
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert history_frame(study.trials)["config"][0] == text

    from rich.table import Table  # the report's config column folds (overflow="fold"), as here

    table = Table()
    table.add_column("config", overflow="fold")
    table.add_row(text)
    console = Console(width=40, record=True)
    console.print(table)
    assert text.replace(" ", "") in "".join(console.export_text().replace("│", "").split())


class SlowINT8Adapter(FakeAdapter):
    """INT8 candidates run 3 ms slower than the FP32 model: no candidate is faster."""

    def runner(self, model):
        def run():
            if model.config is not None:
                time.sleep(0.003)
            return np.array([model.accuracy()])
        return run


def test_a_result_slower_than_fp32_is_flagged(tmp_path, caplog):
    caplog.set_level("WARNING", logger="autoquant")
    result = Tuner(strategy="random", max_trials=2, latency_budget_s=0.05).tune(
        fake_model(n_ops=2), [None], accuracy, adapter=SlowINT8Adapter)
    assert result.met and result.latency_ratio > 1 and result.slower_than_fp32
    assert "No passing candidate is faster than FP32" in caplog.text
    from autoquant.report import summary_table

    console = Console(width=120, record=True)
    console.print(summary_table(result))
    assert "SLOWER than FP32" in console.export_text()
    result.save(tmp_path)
    assert json.loads((tmp_path / "result.json").read_text())["slower_than_fp32"] is True


def test_a_model_that_cannot_be_saved_loses_nothing_else(tmp_path):
    import pytest

    from autoquant import AutoquantError

    class Unsaveable(FakeAdapter):
        def save_model(self, model, directory):
            raise RuntimeError("Tracer cannot infer type of output: dict")

    result = Tuner(strategy="random", max_trials=2).tune(fake_model(n_ops=2), [None], accuracy, adapter=Unsaveable)
    with pytest.raises(AutoquantError, match="Could not save the model .*dict.*history.csv are written"):
        result.save(tmp_path)
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["model_file"] is None and QuantConfig.from_dict(record["config"]) == result.config
    assert len((tmp_path / "history.csv").read_text().splitlines()) == len(result.history) + 1


def test_trial_record_of_a_running_trial_without_a_measurement():
    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr("accuracy", 0.5)  # a worker in the middle of writing its measurement
    record = TrialRecord.of(study.trials[0])
    assert record.measurement is None and not record.measured and record.outcome == "RUNNING"
