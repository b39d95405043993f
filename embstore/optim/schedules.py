"""Learning-rate schedules and the number checks of optimizer configs (pure: no I/O).

A schedule is a function of the number of updates already applied, serialisable as
``{"class_name": ..., "config": {...}}``; no code is ever stored.
"""

from __future__ import annotations

import abc
import bisect
import math
from typing import Any, Callable, Mapping, Union

import numpy as np

from embstore.errors import InvalidArgumentError

_REAL_TYPES = (int, float, np.integer, np.floating)


def _real(name: str, value: object, low: float | None = None, high: float | None = None,
          low_open: bool = False, high_open: bool = False) -> float:
    """A finite real in the given interval, as a Python float; else InvalidArgumentError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, _REAL_TYPES):
        raise InvalidArgumentError(
            f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    v = float(value)
    ok = math.isfinite(v)
    ok = ok and (low is None or (v > low if low_open else v >= low))
    ok = ok and (high is None or (v < high if high_open else v <= high))
    if not ok:
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise InvalidArgumentError(f"{name} must be finite and in {lo}, {hi}, got {v!r}")
    return v


def _integer(name: str, value: object, low: int) -> int:
    """An integer >= low (bools refused: True is not a step count)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(
            f"{name} must be an integer >= {low}, got {value!r} of type {type(value).__name__}")
    if value < low:
        raise InvalidArgumentError(f"{name} must be an integer >= {low}, got {int(value)}")
    return int(value)


# --- learning-rate schedules -----------------------------------------------------------


class LearningRateSchedule(abc.ABC):
    """A learning rate as a function of the number of updates already applied (0-based).

    Same convention as Keras: the first update sees iteration 0. Serialisable as
    ``{"class_name": ..., "config": {...}}``; no code is ever stored.
    """

    @abc.abstractmethod
    def __call__(self, iteration: int) -> float: ...

    @abc.abstractmethod
    def get_config(self) -> dict[str, Any]: ...

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LearningRateSchedule":
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class ExponentialDecay(LearningRateSchedule):
    """``initial * decay_rate ** (iteration / decay_steps)``, exponent floored if staircase.
    ``decay_rate`` is in (0, 1] so the rate can never overflow."""

    def __init__(self, initial_learning_rate: float, decay_steps: int, decay_rate: float,
                 staircase: bool = False) -> None:
        self.initial_learning_rate = _real("initial_learning_rate", initial_learning_rate, 0.0)
        self.decay_steps = _integer("decay_steps", decay_steps, 1)
        self.decay_rate = _real("decay_rate", decay_rate, 0.0, 1.0, low_open=True)
        if not isinstance(staircase, bool):
            raise InvalidArgumentError(f"staircase must be a bool, got {staircase!r}")
        self.staircase = staircase

    def __call__(self, iteration: int) -> float:
        p = iteration / self.decay_steps
        p = math.floor(p) if self.staircase else p
        return self.initial_learning_rate * self.decay_rate**p

    def get_config(self) -> dict[str, Any]:
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "decay_rate": self.decay_rate,
                "staircase": self.staircase}


class PiecewiseConstant(LearningRateSchedule):
    """``values[i]`` while ``boundaries[i-1] < iteration <= boundaries[i]`` (Keras semantics)."""

    def __init__(self, boundaries: list[int], values: list[float]) -> None:
        if not isinstance(boundaries, (list, tuple)) or not isinstance(values, (list, tuple)):
            raise InvalidArgumentError(
                f"boundaries and values must be lists, got {boundaries!r} and {values!r}")
        self.boundaries = [_integer(f"boundaries[{i}]", b, 0) for i, b in enumerate(boundaries)]
        self.values = [_real(f"values[{i}]", v, 0.0) for i, v in enumerate(values)]
        if any(a >= b for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise InvalidArgumentError(f"boundaries must increase strictly, got {self.boundaries}")
        if len(self.values) != len(self.boundaries) + 1:
            raise InvalidArgumentError(
                f"expected len(values) == len(boundaries) + 1 == {len(self.boundaries) + 1}, "
                f"got {len(self.values)} values")

    def __call__(self, iteration: int) -> float:
        return self.values[bisect.bisect_left(self.boundaries, iteration)]

    def get_config(self) -> dict[str, Any]:
        return {"boundaries": list(self.boundaries), "values": list(self.values)}


class LinearWarmup(LearningRateSchedule):
    """Ramp linearly from ``initial_learning_rate`` to ``after(0)`` over ``warmup_steps``,
    then follow ``after`` (a float or a schedule, restarted at iteration 0)."""

    def __init__(self, warmup_steps: int, after: float | LearningRateSchedule,
                 initial_learning_rate: float = 0.0) -> None:
        self.warmup_steps = _integer("warmup_steps", warmup_steps, 1)
        self.after = _schedule_arg(after, "after")
        self.initial_learning_rate = _real("initial_learning_rate", initial_learning_rate, 0.0)

    def __call__(self, iteration: int) -> float:
        if iteration >= self.warmup_steps:
            return _evaluate(self.after, iteration - self.warmup_steps)
        target = _evaluate(self.after, 0)
        return self.initial_learning_rate + (target - self.initial_learning_rate) * (
            iteration / self.warmup_steps)

    def get_config(self) -> dict[str, Any]:
        return {"warmup_steps": self.warmup_steps, "after": _lr_to_json(self.after),
                "initial_learning_rate": self.initial_learning_rate}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LinearWarmup":
        config = dict(config)
        if "after" in config:
            config["after"] = _lr_from_json(config["after"])
        return cls(**config)


_SCHEDULES: dict[str, type[LearningRateSchedule]] = {
    c.__name__: c for c in (ExponentialDecay, PiecewiseConstant, LinearWarmup)}
LearningRate = Union[float, LearningRateSchedule, Callable[[int], float]]


def schedule_from_config(config: Mapping[str, Any]) -> LearningRateSchedule:
    """Rebuild a schedule from ``{"class_name": ..., "config": {...}}``."""
    if not isinstance(config, Mapping) or set(config) != {"class_name", "config"}:
        raise InvalidArgumentError(
            f"a schedule config must be {{'class_name': ..., 'config': {{...}}}}, got {config!r}")
    name = config["class_name"]
    cls = _SCHEDULES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise InvalidArgumentError(f"unknown learning-rate schedule {config['class_name']!r}: "
                                   f"expected one of {sorted(_SCHEDULES)}")
    try:
        return cls.from_config(config["config"])
    except TypeError as e:  # unknown or missing keyword
        raise InvalidArgumentError(f"bad config for {cls.__name__}: {e}") from None


def _schedule_arg(value: object, name: str) -> LearningRate:
    """Accept a float (>= 0), a schedule, or (at runtime only) any callable."""
    return value if callable(value) else _real(name, value, 0.0)  # type: ignore[return-value]


def _evaluate(lr: LearningRate, iteration: int) -> float:
    if isinstance(lr, float):
        return lr
    return _real(f"learning_rate({iteration})", lr(iteration), 0.0)


def _lr_to_json(lr: LearningRate) -> float | dict[str, Any]:
    if isinstance(lr, float):
        return lr
    if isinstance(lr, LearningRateSchedule):
        return {"class_name": type(lr).__name__, "config": lr.get_config()}
    raise InvalidArgumentError(
        f"learning_rate is the callable {lr!r}, which cannot be saved in a config (no code is "
        f"stored); use a float or one of the schedules {sorted(_SCHEDULES)}")


def _lr_from_json(value: object) -> float | LearningRateSchedule:
    if isinstance(value, Mapping):
        return schedule_from_config(value)
    return _real("learning_rate", value, 0.0)
