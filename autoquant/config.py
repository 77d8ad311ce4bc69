"""The YAML job: its schema, validated in one place, and what it resolves to.

A job names the model, the calibration data and the eval function (``module:function`` or
``path/to/file.py:function`` callables, or an ``.onnx`` path for the model), the adapter, the
space restrictions, the criterion, the strategy, the storage and the output folder. Unknown keys
are errors; relative paths are relative to the YAML file's folder. YAML is read with safe_load.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from autoquant.adapters import ADAPTERS, is_onnx_path
from autoquant.criterion import DEFAULT_CRITERION, AccuracyCriterion
from autoquant.errors import ConfigError, check_choice, unknown_choice
from autoquant.smoothing import ALPHAS, check_alpha
from autoquant.space import (
    APPROACHES,
    CALIBRATIONS,
    FALLBACKS,
    GRANULARITIES,
    SCHEMES,
    Restriction,
)
from autoquant.storage import mask_url, open_storage, resolve_url
from autoquant.strategies import STRATEGIES, Strategy
from autoquant.tuner import OBJECTIVES, Tuner

STUDY_FILE = "study.db"
STATS_FILE = "calibration-stats.json"
JOB_COPY = "job.yaml"

# The Tuner's defaults are the YAML defaults: defined once, in Tuner.__init__.
_TUNER = {name: p.default for name, p in inspect.signature(Tuner.__init__).parameters.items()}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CallableRef(_Strict):
    """A callable given as a mapping: `module:function` (or `file.py:function`) and keyword arguments for it."""

    call: str = Field(description="`module:function`, or `path/to/file.py:function` relative to the job file")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments the function is called with")

    @field_validator("call")
    @classmethod
    def _form(cls, value: str) -> str:
        module, sep, name = value.rpartition(":")
        if not sep or not module or not name.isidentifier():
            raise ValueError(f"'{value}' is not 'module:function' (e.g. 'mypkg.jobs:make_model')")
        return value


_KNOB = "search only this value, or this list of values (default: every value the adapter offers): "


class SpaceSpec(_Strict):
    """Restrictions of the search space (autoquant.space.Restriction)."""

    approach: str | list[str] | None = Field(None, description=_KNOB + ", ".join(APPROACHES))
    calibration: str | list[str] | None = Field(None, description=_KNOB + ", ".join(CALIBRATIONS))
    granularity: str | list[str] | None = Field(None, description=_KNOB + ", ".join(GRANULARITIES))
    scheme: str | list[str] | None = Field(None, description=_KNOB + ", ".join(SCHEMES))
    smooth_alpha: float | list[float | None] | None = Field(None, description=(
        "SmoothQuant strength(s) to search, numbers in [0, 1]; null in a list means no smoothing "
        "(`[null, 0.5, 0.8]`; `[null]` turns it off). Default: every value the adapter offers (ONNX: "
        + ", ".join(map(str, ALPHAS)).replace("None", "null") + "; static only)"))
    fallback: str | list[str] | None = Field(None, description=(
        "precision of the ops that fall back from INT8: " + ", ".join(FALLBACKS) + " (bf16 only where the "
        "adapter measured it faster than FP32 for that op; FX on CPUs with native BF16)"))
    fp32_ops: list[str] = Field(default_factory=list, description=(
        "ops that stay FP32, by name or glob pattern (`bert.encoder.layer.*.output.dense`); "
        "a pattern that matches no op is an error"))
    fp32_op_types: list[str] = Field(default_factory=list, description="op types that stay FP32 (`Linear`, `Conv`)")

    @model_validator(mode="after")
    def _known_values(self) -> SpaceSpec:
        for knob, allowed in (("approach", APPROACHES), ("calibration", CALIBRATIONS),
                              ("granularity", GRANULARITIES), ("scheme", SCHEMES), ("fallback", FALLBACKS)):
            value = getattr(self, knob)
            for v in [value] if isinstance(value, str) else value or []:
                check_choice(f"space.{knob} value", v, allowed)
        alphas = self.smooth_alpha if isinstance(self.smooth_alpha, list) else [self.smooth_alpha]
        for alpha in alphas:
            check_alpha(alpha)
        return self

    def restriction(self) -> Restriction:
        return Restriction(**self.model_dump())


class CriterionSpec(_Strict):
    """The accuracy goal (autoquant.AccuracyCriterion): exactly one of relative or absolute."""

    relative: float | None = Field(None, description="tolerated loss as a fraction of the FP32 metric (0.01: 1%)")
    absolute: float | None = Field(None, description="tolerated loss in the metric's units")
    higher_is_better: bool = Field(True, description="false for a loss or an error rate (a rise is then a loss)")
    allow_large_relative: bool = Field(False, description=(
        "accept relative >= 1 for a higher-is-better metric (refused by default: a percent typed as a fraction)"))

    @model_validator(mode="after")
    def _one_of(self) -> CriterionSpec:
        self.criterion()  # AccuracyCriterion's own checks (a ConfigError is a ValueError)
        return self

    def criterion(self) -> AccuracyCriterion:
        return AccuracyCriterion(**self.model_dump())


class StrategySpec(_Strict):
    """How to search, and when to stop."""

    name: str = Field(_TUNER["strategy"], description="the search strategy: " + ", ".join(STRATEGIES))
    max_trials: int = Field(_TUNER["max_trials"], ge=1, description="most candidates the study evaluates in all")
    timeout: float | None = Field(_TUNER["timeout"], gt=0, description="seconds; stop starting trials after it")
    seed: int | None = Field(_TUNER["seed"], description="the strategy's random seed (null: a different run each time)")
    objective: str = Field(_TUNER["objective"], description=(
        "`accuracy`: stop at the first candidate that meets the goal; `latency`: go on within the budget "
        "and return the fastest that meets it"))
    options: dict[str, Any] = Field(default_factory=dict, description=(
        "keyword arguments of the strategy's class, e.g. `{n_startup_trials: 10}` for bayesian, "
        "`{measure: fp32, confidence: 0.7}` for sensitivity"))
    trial_timeout: float | None = Field(_TUNER["trial_timeout"], gt=0, description=(
        "seconds; a trial that takes longer is recorded FAIL and the job goes on (null: no limit)"))
    isolate: bool = Field(_TUNER["isolate"], description=(
        "score each candidate in a child process (eval_fn runs there, once), so a hang or a crash fails "
        "only that trial"))

    @field_validator("objective")
    @classmethod
    def _objective(cls, value: str) -> str:
        return check_choice("objective", value, OBJECTIVES)

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        return check_choice("strategy", value, STRATEGIES)

    @model_validator(mode="after")
    def _options(self) -> StrategySpec:
        params = inspect.signature(STRATEGIES[self.name]).parameters
        allowed = [n for n, p in params.items() if n != "seed" and p.kind is not p.VAR_KEYWORD]
        for key in self.options:
            check_choice("option", key, allowed, where=f" of strategy '{self.name}'")
        self.strategy()  # the strategy's own checks of the values
        return self

    def strategy(self) -> Strategy:
        return STRATEGIES[self.name](seed=self.seed, **self.options)


class Job(_Strict):
    """One tuning job, as written in YAML."""

    name: str | None = Field(None, description="the study's name (default: the job file's name without .yaml)")
    model: str | CallableRef = Field(description="a path to an `.onnx` file, or a callable that returns the model")
    calibration: CallableRef = Field(description="a callable that returns the calibration batches (iterable)")
    eval: CallableRef = Field(description="a callable `eval_fn(model) -> float`: the metric of a candidate")
    adapter: str = Field("auto", description="the backend: auto (from the model's type), " + ", ".join(ADAPTERS))
    space: SpaceSpec = Field(default_factory=lambda: SpaceSpec(), description="restrictions of the search space")
    criterion: CriterionSpec = Field(default_factory=lambda: CriterionSpec(**dataclasses.asdict(DEFAULT_CRITERION)),
                                     description="the accuracy goal")
    strategy: StrategySpec = Field(default_factory=lambda: StrategySpec(),
                                   description="the search, or just its name (`strategy: bayesian`)")
    storage: str | None = Field(None, description=(
        "where the study lives (default: a SQLite file in the output folder): `sqlite:///PATH`, `journal:PATH` "
        "(several processes), `postgresql://user:${PGPASSWORD}@host/db` (several machines); "
        "environment variables are expanded"))
    output: str | None = Field(None, description="the output folder (default: `autoquant-out/NAME`)")
    latency_budget_s: float = Field(_TUNER["latency_budget_s"], gt=0, description=(
        "most seconds one latency measurement may take (it stops earlier once `latency_precision` is reached; "
        "up to 4 times as long while it cannot tell faster from slower than FP32)"))
    latency_precision: float = Field(_TUNER["latency_precision"], gt=0, description=(
        "latency is timed against FP32 in interleaved pairs until the ratio is known to this relative precision "
        "(0.05: +-5% at 95% confidence)"))

    @field_validator("calibration", "eval", mode="before")
    @classmethod
    def _callable(cls, value: Any) -> Any:
        return {"call": value} if isinstance(value, str) else value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | CallableRef) -> str | CallableRef:
        return CallableRef(call=value) if isinstance(value, str) and not is_onnx_path(value) else value

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str) -> str:
        return check_choice("adapter", value, ["auto", *ADAPTERS])

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class LoadedJob:
    """A validated job with its paths resolved against the YAML file's folder."""

    def __init__(self, spec: Job, path: Path | None) -> None:
        self.spec, self.path = spec, path
        self.base = path.parent.resolve() if path else Path.cwd()
        self.name = spec.name or (path.stem if path else "autoquant")
        self.output = self._resolve(spec.output or f"autoquant-out/{self.name}")

    def _resolve(self, value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return (p if p.is_absolute() else self.base / p).resolve()

    # --- storage ------------------------------------------------------------------------------
    @property
    def storage_url(self) -> str:
        """The storage as given (environment variables expanded) or the default SQLite file."""
        return resolve_url(self.spec.storage, base=self.base, default_file=self.output / STUDY_FILE)

    def storage(self) -> str | optuna.storages.BaseStorage:
        """What Tuner(storage=...) takes: a URL, or a JournalStorage for ``journal:PATH``."""
        return open_storage(self.storage_url)

    # --- callables ----------------------------------------------------------------------------
    def resolve_callable(self, ref: CallableRef, key: str) -> Callable[..., Any]:
        return load_callable(ref.call, base=self.base, key=key)

    def load_model(self) -> Any:
        model = self.spec.model
        if isinstance(model, str):  # an ONNX file
            path = self._resolve(model)
            if not path.exists():
                raise ConfigError(f"model: the file {path} does not exist.")
            return str(path)
        return self.resolve_callable(model, "model")(**model.args)

    def load_calibration(self) -> Any:
        ref = self.spec.calibration
        return self.resolve_callable(ref, "calibration")(**ref.args)

    def load_eval(self) -> Callable[[Any], float]:
        ref = self.spec.eval
        fn = self.resolve_callable(ref, "eval")
        return functools.partial(fn, **ref.args) if ref.args else fn

    def check_callables(self) -> list[str]:
        """Import every callable without calling it; the names checked."""
        checked = []
        for key in ("model", "calibration", "eval"):
            ref = getattr(self.spec, key)
            if isinstance(ref, CallableRef):
                self.resolve_callable(ref, key)
                checked.append(f"{key}: {ref.call}")
            else:
                self.load_model()
                checked.append(f"{key}: {ref}")
        return checked

    @property
    def adapter(self) -> str | None:
        return None if self.spec.adapter == "auto" else self.spec.adapter

    def masked_dict(self) -> dict[str, Any]:
        """The job as plain data with any storage password masked (for job.yaml in the output)."""
        # The name is written even when the job had none: the output folder must know its study.
        data = {"name": self.name, **self.spec.model_dump(mode="json", exclude_none=True)}
        if "storage" in data:
            data["storage"] = mask_url(data["storage"])
        return data


def load_job(path: str | Path, **overrides: Any) -> LoadedJob:
    """Read and validate a YAML job. ``overrides`` replace top-level keys (e.g. output=...)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Job file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job is a mapping of keys (model, calibration, eval, ...), "
                          f"got {type(data).__name__}.")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return LoadedJob(parse_job(data, source=str(path)), path)


def parse_job(data: dict[str, Any], *, source: str = "job") -> Job:
    try:
        return Job.model_validate(data)
    except ValidationError as exc:
        # A mapping given for a "str or mapping" key: the str branch's complaint is noise.
        errors = [e for e in exc.errors() if not ("str" in e["loc"] and isinstance(e.get("input"), dict))]
        raise ConfigError(f"{source}: " + "; ".join(_explain(e) for e in errors or exc.errors())) from None


def _explain(error: ErrorDetails) -> str:
    """One pydantic error as 'key: problem (value): what is allowed'."""
    # Drop the union-member tags pydantic puts in locations ("str", "CallableRef", "function-after[...]").
    loc = [str(p) for p in error["loc"] if str(p) not in ("str", "CallableRef") and not str(p).startswith("function-")]
    key = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        parent, name = _model_at(loc[:-1]), loc[-1]
        where = f" under '{'.'.join(loc[:-1])}'" if loc[:-1] else ""
        return str(unknown_choice("key", name, list(parent.model_fields) if parent else [], where=where))
    if error["type"] == "missing":
        return f"missing required key '{key}'"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    shown = "" if isinstance(value, dict) or repr(value) in message else f" (got {value!r})"
    return f"{key}: {message}{shown}"


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Job
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return None
        sub = next((t for t in getattr(field.annotation, "__args__", (field.annotation,))
                    if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if sub is None:
            return None
        model = sub
    return model


def load_callable(spec: str, *, base: Path, key: str = "callable") -> Callable[..., Any]:
    """``module:function`` or ``path/to/file.py:function`` (relative to ``base``)."""
    module_name, _, name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name) if Path(module_name).is_absolute() else base / module_name
            if not path.exists():
                raise ConfigError(f"{key}: the file {path} does not exist.")
            mod_name = f"autoquant_job_{path.stem}_{abs(hash(str(path)))}"
            module = sys.modules.get(mod_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(mod_name, path)
                if loader_spec is None or loader_spec.loader is None:
                    raise ConfigError(f"{key}: {path} cannot be loaded as a Python module.")
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[mod_name] = module
                loader_spec.loader.exec_module(module)
        else:
            if str(base) not in sys.path:
                sys.path.append(str(base))  # modules next to the job file import like a script's
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:
        # Where in the user's code it failed: the last frame of the traceback (kept as __cause__ too).
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise ConfigError(f"{key}: cannot import '{module_name}' ({type(exc).__name__}: {exc}; "
                          f"at {frame.filename}:{frame.lineno}).") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ConfigError(f"{key}: {unknown_choice('callable', name, public, where=f' in {module_name!r}')}")
    return fn
