"""The trial record: what autoquant keeps on each Optuna trial and study, and how it is read.

Every trial and study attribute key is named here and nowhere else. Writers (the tuner, the
workers' heartbeat) use the key constants and ``Measurement.to_attrs``; readers (CLI, report,
strategies, sweeps) see a trial as a frozen ``TrialRecord`` and ask it the questions that used
to be spelled in several places: is it measured, does it count toward ``max_trials``, what was
its config, what came of it.

Trial numbers are Optuna's (0-based) everywhere: the log, history.csv, the report, errors and
result.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import MISSING, dataclass, fields
from typing import Any

import optuna

from autoquant.criterion import AccuracyCriterion
from autoquant.errors import ConfigError
from autoquant.fingerprint import Fingerprint
from autoquant.space import QuantConfig

TrialState = optuna.trial.TrialState

# Bumped when the meaning or the keys of the record change: an older study is then refused.
RECORD_VERSION = 1

# --- study attributes -------------------------------------------------------------------------
VERSION = "record_version"
BASELINE = "baseline"  # the FP32 accuracy, measured once per study (resumes and workers agree)
BASELINE_EVAL_S = "baseline_eval_s"  # seconds of that eval_fn call: the probe's budget is counted in them
FINGERPRINT = "fingerprint"  # of the model and the calibration data (autoquant.fingerprint)

# --- trial attributes -------------------------------------------------------------------------
CONFIG = "config"  # QuantConfig.to_dict()
CONFIG_KEY = "config_key"  # QuantConfig.key(): equal configs, equal keys
WORKER = "worker"  # "host:pid", written when the trial is created
HEARTBEAT = "heartbeat"  # UNIX time, refreshed while the trial runs
DUPLICATE_OF = "duplicate_of"  # an earlier trial with the same config: its measurement was copied
COLLISION_OF = "collision_of"  # another worker took this config first: FAIL, not counted
STALE = "stale"  # left RUNNING by a stopped worker: FAIL, not counted, its config runs again
ERROR = "error"  # why a trial FAILed (build, eval_fn, timeout, crash, stop)


@dataclass(frozen=True)
class Measurement:
    """What one evaluated candidate measured; each field is a trial attribute of the same name."""

    accuracy: float
    loss: float
    passed: bool
    latency_ratio: float  # candidate / FP32 latency
    latency_ms: float
    fp32_latency_ms: float
    n_fp32: int
    build_s: float
    eval_s: float
    # How well latency_ratio is known: the 95% interval's relative half-width (0.05: +-5%); None in
    # studies written before it was recorded.
    latency_precision: float | None = None

    def to_attrs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Measurement | None:
        """None unless every required field is there (a RUNNING trial of another worker may have some)."""
        names = [f.name for f in fields(cls)]
        if not all(f.name in attrs for f in fields(cls) if f.default is MISSING):
            return None
        return cls(**{name: attrs[name] for name in names if name in attrs})


MEASUREMENT_KEYS = tuple(f.name for f in fields(Measurement))


@dataclass(frozen=True)
class TrialRecord:
    """A read-only view of one trial."""

    number: int
    state: TrialState
    config: QuantConfig | None
    config_key: str | None
    measurement: Measurement | None
    duplicate_of: int | None = None
    collision_of: int | None = None
    stale: bool = False
    error: str | None = None
    worker: str | None = None
    heartbeat: float | None = None
    seconds: float | None = None  # wall time from start to finish

    @classmethod
    def of(cls, trial: optuna.trial.FrozenTrial) -> TrialRecord:
        attrs = trial.user_attrs
        done, start = trial.datetime_complete, trial.datetime_start
        return cls(
            number=trial.number,
            state=trial.state,
            config=QuantConfig.from_dict(attrs[CONFIG]) if CONFIG in attrs else None,
            config_key=attrs.get(CONFIG_KEY),
            measurement=Measurement.from_attrs(attrs),
            duplicate_of=attrs.get(DUPLICATE_OF),
            collision_of=attrs.get(COLLISION_OF),
            stale=bool(attrs.get(STALE, False)),
            error=attrs.get(ERROR),
            worker=attrs.get(WORKER),
            heartbeat=attrs.get(HEARTBEAT),
            seconds=(done - start).total_seconds() if done and start else None,
        )

    @property
    def measured(self) -> bool:
        """Finished with a measurement (its own, or a duplicate's copy)."""
        return self.state == TrialState.COMPLETE and self.measurement is not None

    @property
    def evaluated(self) -> bool:
        """Measured by a call of eval_fn of its own (not a duplicate's copy)."""
        return self.measured and self.duplicate_of is None

    @property
    def counts(self) -> bool:
        """Toward ``max_trials``: a stale trial is run again and a collision ran elsewhere."""
        return not self.stale and self.collision_of is None

    @property
    def passed(self) -> bool:
        return self.measurement is not None and self.measurement.passed

    @property
    def outcome(self) -> str:
        """PASS, fail (measured, goal missed), FAILED (no measurement, see ``error``), RUNNING..."""
        if self.measured:
            return "PASS" if self.passed else "fail"
        if self.state == TrialState.FAIL:
            return "FAILED"
        return self.state.name


def records(trials: Iterable[optuna.trial.FrozenTrial]) -> list[TrialRecord]:
    return [TrialRecord.of(t) for t in trials]


def study_records(study: optuna.Study) -> list[TrialRecord]:
    return records(study.get_trials(deepcopy=False))


def counted(trials: Iterable[TrialRecord]) -> int:
    """The one count of trials shown everywhere (log, progress, result): those toward max_trials."""
    return sum(1 for t in trials if t.counts)


def measured_by_key(trials: Iterable[TrialRecord]) -> dict[str, TrialRecord]:
    """Measured trials by config key (the first of each config)."""
    found: dict[str, TrialRecord] = {}
    for t in trials:
        if t.measured and t.config_key is not None:
            found.setdefault(t.config_key, t)
    return found


def tried_keys(trials: Iterable[TrialRecord]) -> set[str]:
    """Config keys of trials that ran or are running (finished, failed or in flight)."""
    return {t.config_key for t in trials if t.config_key is not None}


def check_study(study: optuna.Study, fp: Fingerprint) -> None:
    """Tie ``study`` to this record version and to the model and data of ``fp``: a new study is
    stamped; an existing one made with another model, data or record version is refused."""
    attrs = study.user_attrs
    if VERSION not in attrs and not study.get_trials(deepcopy=False):
        # New, or being stamped by another worker this moment (the version goes last, so a study with
        # a version always has its fingerprint; two workers stamping write the same values).
        study.set_user_attr(FINGERPRINT, fp.to_dict())
        study.set_user_attr(VERSION, RECORD_VERSION)
        return
    fix = ("Use a new job name (study_name) or output folder, or start over with --restart "
           "(Tuner(..., restart=True)), which deletes this study and its calibration cache.")
    version = attrs.get(VERSION, 0)
    if version != RECORD_VERSION or FINGERPRINT not in attrs:
        raise ConfigError(f"Study '{study.study_name}' was written by another autoquant (trial record version "
                          f"{version}, this one reads {RECORD_VERSION}), so its trials cannot be trusted. {fix}")
    changed = fp.changes(Fingerprint.from_dict(attrs[FINGERPRINT]))
    if changed:
        raise ConfigError(f"Study '{study.study_name}' was made with another model or data: {changed} changed since "
                          f"(its FP32 baseline, trials and calibration belong to the old one). {fix}")


def best_trial(trials: Iterable[TrialRecord], baseline: float | None,
               criterion: AccuracyCriterion) -> TrialRecord | None:
    """The result among measured trials: the fastest that passes, else the most accurate (None if none)."""
    rated = [(t.measurement, t) for t in trials if t.measured and t.measurement is not None]
    if not rated or baseline is None:
        return None
    passing = [(m, t) for m, t in rated if criterion.passes(baseline, m.accuracy)]
    if passing:
        return min(passing, key=lambda mt: (mt[0].latency_ratio, mt[1].number))[1]
    return min(rated, key=lambda mt: (criterion.loss(baseline, mt[0].accuracy), mt[0].latency_ratio, mt[1].number))[1]
