"""The YAML job: its schema, validated in one place, and what it resolves to.

A job names the model, the calibration data and the eval function (``module:function`` or
``path/to/file.py:function`` callables, or an ``.onnx`` path for the model), the adapter, the
space restrictions, the criterion, the strategy, the storage and the output folder. Unknown keys
are errors; relative paths are relative to the YAML file's folder. YAML is read with safe_load.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autoquant.adapters import ADAPTERS
from autoquant.criterion import AccuracyCriterion
from autoquant.errors import ConfigError, did_you_mean
from autoquant.space import APPROACHES, CALIBRATIONS, GRANULARITIES, SCHEMES, Restriction
from autoquant.strategies import STRATEGIES

STUDY_FILE = "study.db"
STATS_FILE = "calibration-stats.json"
JOB_COPY = "job.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CallableRef(_Strict):
    """``module:function`` (or ``file.py:function``) and keyword arguments for it."""

    call: str
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("call")
    @classmethod
    def _form(cls, value: str) -> str:
        module, sep, name = value.rpartition(":")
        if not sep or not module or not name.isidentifier():
            raise ValueError(f"'{value}' is not 'module:function' (e.g. 'mypkg.jobs:make_model')")
        return value


class SpaceSpec(_Strict):
    """Restrictions of the search space (autoquant.space.Restriction)."""

    approach: str | list[str] | None = None
    calibration: str | list[str] | None = None
    granularity: str | list[str] | None = None
    scheme: str | list[str] | None = None
    fp32_ops: list[str] = Field(default_factory=list)
    fp32_op_types: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known_values(self) -> SpaceSpec:
        for knob, allowed in (("approach", APPROACHES), ("calibration", CALIBRATIONS),
                              ("granularity", GRANULARITIES), ("scheme", SCHEMES)):
            value = getattr(self, knob)
            for v in [value] if isinstance(value, str) else value or []:
                if v not in allowed:
                    raise ValueError(f"space.{knob}: unknown value '{v}'.{did_you_mean(v, allowed)} "
                                     f"Allowed: {', '.join(allowed)}")
        return self

    def restriction(self) -> Restriction:
        return Restriction(**self.model_dump())


class CriterionSpec(_Strict):
    relative: float | None = None
    absolute: float | None = None
    higher_is_better: bool = True

    @model_validator(mode="after")
    def _one_of(self) -> CriterionSpec:
        self.criterion()  # AccuracyCriterion's own checks (a ConfigError is a ValueError)
        return self

    def criterion(self) -> AccuracyCriterion:
        return AccuracyCriterion(relative=self.relative, absolute=self.absolute, higher_is_better=self.higher_is_better)


class StrategySpec(_Strict):
    name: str = "sensitivity" if "sensitivity" in STRATEGIES else "bayesian"
    max_trials: int = Field(50, ge=1)
    timeout: float | None = Field(None, gt=0)
    seed: int | None = 0
    objective: str = "accuracy"  # "accuracy": stop at the first pass; "latency": fastest pass in the budget
    trial_timeout: float | None = Field(None, gt=0)  # seconds; a longer trial is recorded FAIL
    isolate: bool = False  # build and score each candidate in a child process (hangs, crashes)

    @field_validator("objective")
    @classmethod
    def _objective(cls, value: str) -> str:
        from autoquant.tuner import OBJECTIVES

        if value not in OBJECTIVES:
            raise ValueError(f"unknown objective '{value}'.{did_you_mean(value, OBJECTIVES)} "
                             f"Allowed: {', '.join(OBJECTIVES)}")
        return value

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy '{value}'.{did_you_mean(value, STRATEGIES)} "
                             f"Known strategies: {', '.join(STRATEGIES)}")
        return value


class Job(_Strict):
    """One tuning job, as written in YAML."""

    name: str | None = None
    model: str | CallableRef
    calibration: str | CallableRef
    eval: str | CallableRef
    adapter: str = "auto"
    space: SpaceSpec = Field(default_factory=SpaceSpec)
    criterion: CriterionSpec = Field(default_factory=lambda: CriterionSpec(relative=0.01))
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    storage: str | None = None
    output: str | None = None
    latency_budget_s: float = Field(0.25, gt=0)

    @field_validator("calibration", "eval")
    @classmethod
    def _callable(cls, value: str | CallableRef) -> CallableRef:
        return CallableRef(call=value) if isinstance(value, str) else value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | CallableRef) -> str | CallableRef:
        if isinstance(value, str) and not value.endswith(".onnx"):
            return CallableRef(call=value)
        return value

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str) -> str:
        allowed = ["auto", *ADAPTERS]
        if value not in allowed:
            raise ValueError(f"unknown adapter '{value}'.{did_you_mean(value, allowed)} Known: {', '.join(allowed)}")
        return value

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
        if not self.spec.storage:
            return f"sqlite:///{self.output / STUDY_FILE}"
        url = os.path.expandvars(self.spec.storage)
        if url.startswith("journal:"):
            return "journal:" + str(self._resolve(url[len("journal:"):]))
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            return "sqlite:///" + str(self._resolve(url[len("sqlite:///"):]))
        return url

    def storage(self) -> Any:
        """What Tuner(storage=...) takes: a URL, or a JournalStorage for ``journal:PATH``."""
        url = self.storage_url
        if url.startswith("journal:"):
            import optuna

            path = Path(url[len("journal:"):])
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            return optuna.storages.JournalStorage(backend)
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            return url
        return _rdb_storage(url)

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
        data = self.spec.model_dump(mode="json", exclude_none=True)
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
        raise ConfigError(f"{path}: a job is a mapping of keys (model, calibration, eval, ...), got {type(data).__name__}.")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return LoadedJob(parse_job(data, source=str(path)), path)


def parse_job(data: dict[str, Any], *, source: str = "job") -> Job:
    try:
        return Job.model_validate(data)
    except ValidationError as exc:
        # A mapping given for a "str or mapping" key: the str branch's complaint is noise.
        errors = [e for e in exc.errors() if not ("str" in e["loc"] and isinstance(e.get("input"), dict))]
        raise ConfigError(f"{source}: " + "; ".join(_explain(e) for e in errors or exc.errors())) from None


def _explain(error: dict[str, Any]) -> str:
    """One pydantic error as 'key: problem (value): what is allowed'."""
    # Drop the union-member tags pydantic puts in locations ("str", "CallableRef", "function-after[...]").
    loc = [str(p) for p in error["loc"] if str(p) not in ("str", "CallableRef") and not str(p).startswith("function-")]
    key = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        parent, name = _model_at(loc[:-1]), loc[-1]
        allowed = list(parent.model_fields) if parent else []
        return f"unknown key '{key}'.{did_you_mean(name, allowed)} Allowed keys here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"missing required key '{key}'"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
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
        raise ConfigError(f"{key}: cannot import '{module_name}' ({type(exc).__name__}: {exc}).") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ConfigError(f"{key}: '{module_name}' has no callable '{name}'.{did_you_mean(name, public)} "
                          f"Callables there: {', '.join(public[:12])}")
    return fn


def _rdb_storage(url: str) -> Any:
    """Optuna's RDB storage, tolerating workers that create the schema of a new database at once."""
    import optuna
    import sqlalchemy.exc

    # pool_pre_ping: a connection the database dropped (a restart) is replaced, not used and failed.
    engine_kwargs = {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except sqlalchemy.exc.IntegrityError:  # another worker created the same table a moment earlier
            time.sleep(0.5 * (attempt + 1))
        except ImportError as exc:
            raise ConfigError(f"storage {mask_url(url)}: no database driver ({exc}); for PostgreSQL "
                              "pip install 'psycopg[binary]'.") from None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


_PASSWORD = re.compile(r"(://[^:/@]+:)([^@]+)(@)")


def mask_url(url: str) -> str:
    """A storage URL safe to print: ``postgresql://user:***@host/db``."""
    return _PASSWORD.sub(r"\1***\3", url)
