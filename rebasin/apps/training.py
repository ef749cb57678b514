"""Minimal training and evaluation helpers for the demos, benchmarks and tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .._common import (
    as_args,
    check_int,
    cross_entropy_of,
    evaluating,
    nonempty,
    progress_bar,
    resolve_device,
    split_batch,
    state_of,
    to_device,
)
from .._errors import RebasinError
from ..paths.running import LossFn, evaluate_state

__all__ = ["fit_classifier_", "evaluate", "seeded_model", "evaluating"]

M = TypeVar("M", bound=nn.Module)

_OPTIMIZERS = ("adam", "adamw", "sgd")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)`` and restore every RNG state afterwards."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def seeded_model(factory: Callable[[], M], seed: int) -> M:
    """``factory()`` called under a fixed seed, without touching the global RNG state.

    Examples
    --------
    >>> from torch import nn
    >>> a = seeded_model(lambda: nn.Linear(3, 2), seed=1)
    >>> b = seeded_model(lambda: nn.Linear(3, 2), seed=1)
    >>> bool((a.weight == b.weight).all())
    True
    """
    with _seeded(seed):
        return factory()


def fit_classifier_(
    model: M,
    train_loader: Iterable[Any],
    *,
    epochs: int,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> M:
    """Train ``model`` in place with cross-entropy; returns the same model.

    Parameters
    ----------
    model
        Mutated: its parameters (and BatchNorm buffers) are trained; it is moved to ``device``
        if one is given. Its ``training`` flags are restored afterwards.
    train_loader
        Yields ``(inputs, targets)`` with integer class targets.
    epochs
        Passes over ``train_loader`` (positive int).
    lr, weight_decay
        Optimizer settings.
    optimizer
        ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9).
    seed
        Seeds dropout and any loader without its own generator; the global RNG state is
        restored afterwards.
    device
        Where to train; defaults to the model's device.
    progress
        Show a tqdm bar over epochs; None (default): only when stderr is a terminal (or in Jupyter), so a piped or logged run stays clean.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))]
    >>> model = fit_classifier_(nn.Linear(4, 2), data, epochs=2)
    """
    check_int(epochs, "epochs")
    if not lr > 0:
        raise RebasinError(f"lr must be positive, got {lr!r}")
    if optimizer not in _OPTIMIZERS:
        raise RebasinError(f"unknown optimizer {optimizer!r}; valid: {list(_OPTIMIZERS)}")
    device = resolve_device(model, device=device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    flags = {m: m.training for m in model.modules()}
    epoch_iter: Iterable[int] = progress_bar(range(epochs), progress, desc="train", unit="epoch")
    try:
        model.train()
        with _seeded(seed):
            for _ in epoch_iter:
                for batch in nonempty(train_loader, "fit_classifier_"):
                    x, y = split_batch(batch)
                    if y is None:
                        raise RebasinError("training needs (inputs, targets) batches; the loader yielded inputs only")
                    x, y = to_device(x, device), to_device(y, device)
                    opt.zero_grad(set_to_none=True)
                    args, kwargs = as_args(x)
                    cross_entropy_of(model(*args, **kwargs), y).backward()
                    opt.step()
    finally:
        for m, f in flags.items():
            m.training = f
    return model


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    state: Mapping[str, Tensor] | None = None,
    loss_fn: LossFn | None = None,
    device: torch.device | str | None = None,
) -> tuple[float, float | None]:
    """Mean loss and accuracy of ``model`` (or of ``model`` run on ``state``) over ``loader``.

    The same routine that :func:`rebasin.evaluate_path` runs at each ``t``: eval mode,
    :func:`torch.func.functional_call`, the model left unchanged.

    Parameters
    ----------
    model
        The architecture (and the weights when ``state`` is None).
    loader
        Yields ``(inputs, targets)``.
    state
        Full state_dict to evaluate instead of the model's own.
    loss_fn
        ``loss_fn(outputs, targets) -> batch mean``; default cross-entropy.
    device
        Where to run; defaults to the model's device.

    Returns
    -------
    (loss, accuracy)
        ``accuracy`` in ``[0, 1]``, or None when the targets are not class indices.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    >>> loss, acc = evaluate(nn.Linear(4, 3), data)
    >>> 0.0 <= acc <= 1.0
    True
    """
    device = resolve_device(model, device=device)
    state = state_of(model) if state is None else state
    loss, acc, _ = evaluate_state(model, state, loader, loss_fn=loss_fn, device=device)
    return loss, acc
