"""Sparse row-wise optimizers and learning-rate schedules: pure math, no I/O.

The write path gathers the rows a step touched and the same rows of each slot table,
calls :meth:`SparseOptimizer.apply` on those dense ``(n, dim)`` float32 arrays and logs
the results. ``rules`` holds the update rules (and :func:`sum_duplicates`), ``schedules``
the learning-rate schedules. Imports numpy and ``embstore.errors`` only, never
TensorFlow.
"""

from embstore.optim.rules import (
    FTRL,
    SGD,
    Adagrad,
    Adam,
    SparseOptimizer,
    get_optimizer,
    optimizer_from_config,
    sum_duplicates,
)
from embstore.optim.schedules import (
    ExponentialDecay,
    LearningRateSchedule,
    LinearWarmup,
    PiecewiseConstant,
    schedule_from_config,
)

__all__ = [
    "sum_duplicates", "SparseOptimizer", "SGD", "Adagrad", "Adam", "FTRL",
    "LearningRateSchedule", "ExponentialDecay", "PiecewiseConstant", "LinearWarmup",
    "schedule_from_config", "optimizer_from_config", "get_optimizer",
]
