"""The costs shared by the learners along the linear path (:class:`~rebasin.SinkhornRebasin`,
:class:`~rebasin.matching.TransformRebasin`): a user's callable, checked to return a scalar, and the task
loss at ``t = 1/2`` (``"midpoint"``) or at one ``t ~ U(0, 1)`` per step drawn from the learner's generator
(``"random"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._common import split_batch
from .._errors import RebasinError

__all__ = ["user_cost", "task_cost"]


def user_cost(cost: Callable[[Any, Any], Any], module: Any, batch: Any) -> Tensor:
    """``cost(module, batch)`` as a 0-d tensor; :class:`RebasinError` when it is not a one-element tensor."""
    value = cost(module, batch)
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise RebasinError(f"the cost callable must return a scalar tensor, got {shape}")
    return value.reshape(())


def task_cost(module: Callable[..., Any], cost: str, batch: Any, loss_fn: Callable[[Any, Tensor], Tensor],
              generator: torch.Generator) -> Tensor:
    """``loss_fn(module(x, t=t), y)`` with ``t = 1/2`` for ``cost == "midpoint"``, else drawn from ``generator``."""
    x, y = split_batch(batch)
    if y is None:
        raise RebasinError(
            "the task-loss costs need batches with targets ((inputs, targets) or a mapping with 'labels'); "
            "for other batch layouts pass a callable cost(module, batch)"
        )
    t = 0.5 if cost == "midpoint" else float(torch.rand((), generator=generator))
    return loss_fn(module(x, t=t), y)
