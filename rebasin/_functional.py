"""Running user modules on explicit state_dicts without mutating them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["state_of", "forward_with_state", "evaluating", "as_args", "model_device"]


def state_of(model: nn.Module) -> dict[str, Tensor]:
    """The model's full state_dict (parameters and buffers), detached, sharing storage."""
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}


def as_args(example_input: Any) -> tuple:
    """A tensor becomes ``(tensor,)``; a tuple or list is taken as positional arguments."""
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    return (example_input,)


@contextlib.contextmanager
def evaluating(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block and restore each one's flag afterwards."""
    if not enabled:
        yield model
        return
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, f in flags.items():
            m.training = f


def forward_with_state(
    model: nn.Module, state: Mapping[str, Tensor], inputs: Any, *, eval_mode: bool = False
) -> Any:
    """``model(*inputs)`` with its parameters and buffers replaced by ``state`` (strict)."""
    with evaluating(model, eval_mode):
        return functional_call(model, dict(state), as_args(inputs), strict=True, tie_weights=False)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for an empty model)."""
    for t in model.state_dict(keep_vars=True).values():
        return t.device
    return torch.device("cpu")
