"""The tunable space an adapter exposes, and one point in it (a QuantConfig).

An adapter lists its quantizable ops and the knob values its backend supports; strategies pick
points; the user may restrict the space (pin a knob, force ops to FP32) before the search.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from autoquant.calibration import SEARCHED
from autoquant.errors import ConfigError, unknown_choice
from autoquant.smoothing import check_alpha

APPROACHES = ("static", "dynamic")
CALIBRATIONS = SEARCHED  # the names and the math live in autoquant.calibration
GRANULARITIES = ("per_channel", "per_tensor")
SCHEMES = ("asymmetric", "symmetric")
# The precision an op runs in when it falls back from INT8 (bf16 only on ops measured faster in it).
FALLBACKS = ("fp32", "bf16")
KNOBS = ("approach", "calibration", "granularity", "scheme")  # the string-valued knobs
# Every knob: smooth_alpha's values are numbers and None (no smoothing); fallback applies to
# the FP32 ops of a candidate only, so all-INT8 knob settings do not vary it.
ALL_KNOBS = (*KNOBS, "smooth_alpha", "fallback")
_FIELD_OF_KNOB = {"approach": "approaches", "calibration": "calibrations", "granularity": "granularities",
                  "scheme": "schemes", "smooth_alpha": "smooth_alphas", "fallback": "fallbacks"}
OP_PARAM_PREFIX = "op:"


@dataclass(frozen=True)
class OpInfo:
    """A quantizable op: ``name`` is stable across candidates; ``approaches`` where it can run INT8;
    ``bf16_ratio`` its measured BF16/FP32 latency where BF16 is faster (None: it falls back to FP32 only)."""

    name: str
    op_type: str
    approaches: tuple[str, ...] = ("static",)
    bf16_ratio: float | None = None


@dataclass(frozen=True)
class UnsupportedOp:
    """A part of the model that stays FP32 whatever the search does, and why."""

    name: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class OpCount:
    """How one kind of op (Linear, Conv2d, MatMul...) of the whole model runs in a config: INT8,
    FP32 though in the space (chosen, by request, or not under this approach), or FP32 because it
    is not in the space at all (``Space.unsupported``)."""

    op_type: str
    int8: int
    fp32: int
    unsupported: int

    @property
    def total(self) -> int:
        return self.int8 + self.fp32 + self.unsupported

    def to_dict(self) -> dict[str, int]:
        return {"int8": self.int8, "fp32": self.fp32, "not_quantizable": self.unsupported, "total": self.total}


@dataclass(frozen=True)
class QuantConfig:
    """One candidate: the knob values and the ops that fall back to FP32.

    In the dynamic approach activations are quantized at run time, so ``calibration`` and
    ``scheme`` do not apply and are None. ``op_calibration`` overrides ``calibration`` for the
    input activations of single ops (static only), e.g. ``{"features.3": "entropy"}``.
    ``smooth_alpha`` is SmoothQuant's migration strength (autoquant.smoothing; static only), None = off.
    ``fallback`` is the precision of the FP32 ops that the backend runs faster in BF16 ("bf16"), or "fp32".
    ``bf16_ops`` names the ops built in BF16 when they are in FP32 (``Space.resolve`` fills it in from
    ``fallback``: a result's config names them, so it rebuilds the same model whatever a later BF16
    timing says).
    """

    approach: str = "static"
    calibration: str | None = "minmax"
    granularity: str = "per_channel"
    scheme: str | None = "asymmetric"
    fp32_ops: frozenset[str] = field(default_factory=frozenset)
    op_calibration: Mapping[str, str] = field(default_factory=dict)
    smooth_alpha: float | None = None
    fallback: str = "fp32"
    bf16_ops: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        # Normalise so that equal configs compare equal whatever containers they were given.
        object.__setattr__(self, "fp32_ops", frozenset(self.fp32_ops))
        object.__setattr__(self, "bf16_ops", frozenset(self.bf16_ops))
        object.__setattr__(self, "op_calibration", dict(sorted(dict(self.op_calibration).items())))
        object.__setattr__(self, "smooth_alpha", check_alpha(self.smooth_alpha))

    def __hash__(self) -> int:
        return hash(self.key())

    def calibration_of(self, op: str) -> str | None:
        """The calibration method for the input activations of ``op``."""
        return self.op_calibration.get(op, self.calibration)

    def to_dict(self) -> dict[str, Any]:
        return {
            "approach": self.approach,
            "calibration": self.calibration,
            "granularity": self.granularity,
            "scheme": self.scheme,
            "fp32_ops": sorted(self.fp32_ops),
            "op_calibration": dict(self.op_calibration),
            # Only when on: configs stored before the knob existed keep their keys.
            **({"smooth_alpha": self.smooth_alpha} if self.smooth_alpha is not None else {}),
            **({"fallback": self.fallback} if self.fallback != "fp32" else {}),
            **({"bf16_ops": sorted(self.bf16_ops)} if self.bf16_ops else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        allowed = [*ALL_KNOBS, "fp32_ops", "op_calibration", "bf16_ops"]
        unknown = set(data) - set(allowed)
        if unknown:
            raise ConfigError(f"Unknown QuantConfig keys {sorted(unknown)}; allowed: {allowed}.")
        return cls(**data)

    def key(self) -> str:
        """Canonical text of the config: equal configs have equal keys."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def describe(self) -> str:
        """The knob values, e.g. "static/entropy/asymmetric/per_channel" (+ "/smooth0.5" when smoothing)."""
        knobs = [self.approach, self.granularity]
        if self.approach == "static":
            knobs[1:1] = [str(self.calibration), str(self.scheme)]
        if self.smooth_alpha is not None:
            knobs.append(f"smooth{self.smooth_alpha:g}")
        if self.fallback != "fp32":
            knobs.append(f"{self.fallback}-fallback")
        return "/".join(knobs)


@dataclass(frozen=True)
class Restriction:
    """What the user pins before the search.

    Each knob is None (search all values the backend offers), one value, or a list of values.
    ``smooth_alpha`` values are numbers in [0, 1] and None for "no smoothing" (so only a list can
    pin it off: ``[None]``). ``fp32_ops`` and ``fp32_op_types`` name ops that must stay FP32 (never searched).
    """

    approach: str | Sequence[str] | None = None
    calibration: str | Sequence[str] | None = None
    granularity: str | Sequence[str] | None = None
    scheme: str | Sequence[str] | None = None
    smooth_alpha: float | Sequence[float | None] | None = None
    fallback: str | Sequence[str] | None = None
    fp32_ops: Sequence[str] = ()
    fp32_op_types: Sequence[str] = ()


@dataclass(frozen=True)
class Space:
    """The ops and knob values a strategy may choose from."""

    ops: tuple[OpInfo, ...]
    approaches: tuple[str, ...] = ("static",)
    calibrations: tuple[str, ...] = CALIBRATIONS
    granularities: tuple[str, ...] = GRANULARITIES
    schemes: tuple[str, ...] = SCHEMES
    smooth_alphas: tuple[float | None, ...] = (None,)  # (None,): the adapter cannot smooth
    fallbacks: tuple[str, ...] = ("fp32",)  # ("fp32", "bf16") where some op runs faster in BF16
    bf16_buildable: frozenset[str] = frozenset()  # ops the backend can build in BF16 (faster or not)
    fixed_fp32: frozenset[str] = frozenset()
    unsupported: tuple[UnsupportedOp, ...] = ()

    def __post_init__(self) -> None:
        names = [op.name for op in self.ops]
        if len(set(names)) != len(names):
            raise ConfigError(f"Op names must be unique, got duplicates in {names}.")
        for knob in ALL_KNOBS:
            if not self.choices(knob):
                raise ConfigError(f"The space has no value left for '{knob}'.")

    # --- inspection -------------------------------------------------------------------------
    @property
    def op_names(self) -> tuple[str, ...]:
        return tuple(op.name for op in self.ops)

    def choices(self, knob: str) -> tuple[str, ...]:
        return getattr(self, _FIELD_OF_KNOB[knob])

    def bf16_ops(self) -> frozenset[str]:
        """Ops that run BF16 when they fall back under ``fallback="bf16"`` (measured faster)."""
        return frozenset(op.name for op in self.ops if op.bf16_ratio is not None)

    def tunable_ops(self, approach: str) -> tuple[OpInfo, ...]:
        """Ops whose INT8/FP32 choice is searched under ``approach``."""
        return tuple(op for op in self.ops if approach in op.approaches and op.name not in self.fixed_fp32)

    def fp32_ops(self, config: QuantConfig) -> frozenset[str]:
        """Every op that runs FP32 in ``config``: chosen, forced by the user, or unsupported by the approach."""
        tunable = {op.name for op in self.tunable_ops(config.approach)}
        return frozenset(config.fp32_ops) | (set(self.op_names) - tunable)

    def op_counts(self, config: QuantConfig) -> tuple[OpCount, ...]:
        """Per op kind, over the whole model (searched ops and ``unsupported`` parts alike), how many
        run INT8 and FP32 in ``config``; kinds in order of first appearance.

        >>> ops = (OpInfo("a", "Linear"), OpInfo("b", "Linear"))
        >>> space = Space(ops, unsupported=(UnsupportedOp("c", "Linear", "x"),))
        >>> space.op_counts(QuantConfig(fp32_ops=frozenset({"b"})))
        (OpCount(op_type='Linear', int8=1, fp32=1, unsupported=1),)
        """
        fp32 = self.fp32_ops(config)
        kinds = dict.fromkeys([op.op_type for op in self.ops] + [op.op_type for op in self.unsupported])
        return tuple(OpCount(
            kind,
            int8=sum(1 for op in self.ops if op.op_type == kind and op.name not in fp32),
            fp32=sum(1 for op in self.ops if op.op_type == kind and op.name in fp32),
            unsupported=sum(1 for op in self.unsupported if op.op_type == kind),
        ) for kind in kinds)

    def resolve(self, config: QuantConfig) -> QuantConfig:
        """``config`` with every FP32 op listed, and those built in BF16, as a backend must build it."""
        return replace(config, fp32_ops=self.fp32_ops(config), bf16_ops=self.bf16_of(config))

    def bf16_of(self, config: QuantConfig) -> frozenset[str]:
        """The FP32 ops ``config`` builds in BF16: those it lists, else under ``fallback="bf16"`` the
        ones measured faster in BF16."""
        fp32 = self.fp32_ops(config)
        if config.bf16_ops:
            return config.bf16_ops & fp32
        return fp32 & self.bf16_ops() if config.fallback == "bf16" else frozenset()

    def knob_configs(self) -> list[QuantConfig]:
        """Every knob combination with no op in FP32, in order of preference (first = default)."""
        configs: list[QuantConfig] = []
        for approach in self.approaches:
            if approach == "dynamic":
                configs += [QuantConfig("dynamic", None, g, None) for g in self.granularities]
            else:
                configs += [
                    QuantConfig("static", c, g, s, smooth_alpha=a)
                    for g, c, s, a in itertools.product(self.granularities, self.calibrations, self.schemes,
                                                        self.smooth_alphas)
                ]
        return configs

    def default_config(self) -> QuantConfig:
        """All INT8, with the first (preferred) value of every knob."""
        return self.knob_configs()[0]

    def size(self) -> int:
        return sum(2 ** len(self.tunable_ops(c.approach)) for c in self.knob_configs())

    def __str__(self) -> str:
        """What can be quantized, what cannot and why: the table ``autoquant space`` prints."""
        by_type = Counter(op.op_type for op in self.ops)
        kinds = ", ".join(f"{n} {t}" for t, n in by_type.items()) or "none"
        rows = [("op", "type", "approaches", "searched")] + [
            (op.name, op.op_type, ", ".join(op.approaches), "no (FP32 by request)" if op.name in self.fixed_fp32
             else "yes") for op in self.ops]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [f"{len(self.ops)} quantizable op(s) ({kinds}); {self.size():,} candidates"]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                  for row in rows]
        lines.append("knobs: " + "; ".join(f"{k}={'|'.join(map(_text, self.choices(k)))}" for k in ALL_KNOBS))
        if self.unsupported:
            lines.append("stays FP32 whatever the search does:")
            lines += [f"  {op.name} ({op.op_type}): {op.reason}" for op in self.unsupported]
        return "\n".join(lines)

    # --- restriction --------------------------------------------------------------------------
    def restrict(self, restriction: Restriction) -> Space:
        """A copy with knobs pinned and ops forced to FP32; unknown values are errors."""
        pinned: dict[str, Any] = {}
        for knob in ALL_KNOBS:
            wanted = getattr(restriction, knob)
            if wanted is None:
                continue
            wanted = tuple(wanted) if isinstance(wanted, (list, tuple)) else (wanted,)
            for value in wanted:
                _check_choice(knob, value, self.choices(knob))
            pinned[_FIELD_OF_KNOB[knob]] = tuple(v for v in self.choices(knob) if v in wanted)
        fixed = set(self.fixed_fp32)
        for pattern in restriction.fp32_ops:
            fixed |= self.matching_ops(pattern)
        types = sorted({op.op_type for op in self.ops})
        for op_type in restriction.fp32_op_types:
            _check_choice("op type", op_type, types)
            fixed |= {op.name for op in self.ops if op.op_type == op_type}
        return replace(self, fixed_fp32=frozenset(fixed), **pinned)

    def matching_ops(self, pattern: str) -> set[str]:
        """Op names matching ``pattern``, a name or a glob (``*``, ``?``, ``[...]``); none is an error.

        >>> space = Space((OpInfo("layer.0.fc", "Linear"), OpInfo("layer.1.fc", "Linear"), OpInfo("head", "Linear")))
        >>> sorted(space.matching_ops("layer.*.fc"))
        ['layer.0.fc', 'layer.1.fc']
        """
        matched = {name for name in self.op_names if fnmatch.fnmatchcase(name, pattern)}
        if not matched:
            raise unknown_choice("op pattern" if set(pattern) & set("*?[") else "op", pattern, self.op_names)
        return matched

    # --- the Optuna encoding -------------------------------------------------------------------
    def suggest(self, trial: Any) -> QuantConfig:
        """Ask an Optuna trial for every knob and every op's INT8/FP32 choice."""
        values = {knob: trial.suggest_categorical(knob, list(self.choices(knob))) for knob in self._suggested()}
        values.setdefault("fallback", self.fallbacks[0])
        fp32 = {
            op.name
            for op in self.tunable_ops(values["approach"])
            if trial.suggest_categorical(OP_PARAM_PREFIX + op.name, ["int8", "fp32"]) == "fp32"
        }
        return self.canonical(QuantConfig(fp32_ops=frozenset(fp32), **values))

    def params(self, config: QuantConfig) -> dict[str, str]:
        """The Optuna parameters that make ``suggest`` return ``config`` (for enqueueing it)."""
        params = {knob: getattr(config, knob) for knob in self._suggested()}
        # Knobs that do not apply to this approach still need a value for the sampler's record.
        params = {k: v if v is not None or v in self.choices(k) else self.choices(k)[0] for k, v in params.items()}
        for op in self.tunable_ops(config.approach):
            params[OP_PARAM_PREFIX + op.name] = "fp32" if op.name in config.fp32_ops else "int8"
        return params

    def _suggested(self) -> tuple[str, ...]:
        """The knobs an Optuna trial is asked for: ``fallback`` only where the space offers a choice
        (so studies of spaces without BF16 keep their parameters)."""
        return ALL_KNOBS if len(self.fallbacks) > 1 else tuple(k for k in ALL_KNOBS if k != "fallback")

    def canonical(self, config: QuantConfig) -> QuantConfig:
        """Drop what does not apply: activation knobs under dynamic, fallbacks of untunable ops,
        calibration overrides of FP32 ops or equal to the global one."""
        tunable = {op.name for op in self.tunable_ops(config.approach)}
        fp32 = config.fp32_ops & tunable
        overrides = {
            op: method for op, method in config.op_calibration.items()
            if op in tunable and op not in fp32 and method != config.calibration
        }
        config = replace(config, fp32_ops=fp32, op_calibration=overrides,
                         bf16_ops=config.bf16_ops & self.fp32_ops(config))
        if config.bf16_ops:
            config = replace(config, fallback="bf16")
        elif not (self.fp32_ops(config) & self.bf16_ops()):
            config = replace(config, fallback="fp32")  # no op it would change
        if config.approach == "dynamic":
            config = replace(config, calibration=None, scheme=None, smooth_alpha=None, op_calibration={})
        return config

    def validate(self, config: QuantConfig) -> QuantConfig:
        """Check a config against this space (e.g. one loaded from a file) and canonicalise it."""
        if config.bf16_ops:
            self._check_bf16_ops(config)
        elif config.fallback == "bf16" and "bf16" not in self.fallbacks:
            raise ConfigError("fallback: bf16 is not offered here: no Linear of this model was measured faster in "
                              "BF16 than in FP32 on this machine (the offer is timed when the adapter is made). "
                              "Set fallback: fp32.")
        for knob in ALL_KNOBS:
            value = getattr(config, knob)
            if knob == "fallback" and config.bf16_ops:  # named ops, checked above: no timed offer needed
                continue
            if value is not None or config.approach != "dynamic":
                _check_choice(knob, value, self.choices(knob))
        for name in config.fp32_ops:
            _check_choice("op", name, self.op_names)
        for name, method in config.op_calibration.items():
            _check_choice("op", name, self.op_names)
            _check_choice("calibration", method, self.calibrations)
        return self.canonical(config)

    def _check_bf16_ops(self, config: QuantConfig) -> None:
        for name in config.bf16_ops:
            _check_choice("op", name, self.op_names)
        if not config.bf16_ops <= self.bf16_buildable:
            raise ConfigError(f"bf16_ops {sorted(config.bf16_ops - self.bf16_buildable)} cannot be built in BF16 "
                              "here (BF16 fallback needs the FX adapter, a plain Linear, and a CPU with native "
                              "BF16). Remove bf16_ops to build them in FP32.")


def _check_choice(what: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise unknown_choice(what, _text(value), [_text(a) for a in allowed])


def _text(value: Any) -> str:
    """A knob value as users write it (None is YAML's null: no smoothing)."""
    return "null" if value is None else str(value)
