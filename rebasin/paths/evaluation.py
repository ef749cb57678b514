"""Loss and accuracy along a path: the straight line, a REPAIRed line, a curve, or any ``t -> state``.

The user's model is only run through :func:`torch.func.functional_call` and is unchanged afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._common import State, check_finite, check_float, check_int, check_pair, progress_bar, resolve_device
from .._errors import RebasinError
from .linear import PathLike, PathResult, StatePath, even_grid, interpolate
from .repairing import RepairedPath
from .running import LossFn, evaluate_state, reset_bn_stats

__all__ = ["evaluate_path"]


def _state_source(
    state_a: State | None, state_b: State | None, path: PathLike | None, device: torch.device
) -> tuple[Callable[[float], State], str]:
    if path is not None:
        if state_a is not None or state_b is not None:
            raise RebasinError("pass either path= or state_a/state_b, not both (give None for the states)")
        if isinstance(path, StatePath):
            return path.state_dict_at, type(path).__name__
        if callable(path):
            return path, getattr(path, "__name__", type(path).__name__)
        raise RebasinError(
            f"path must be a callable t -> state_dict or have a state_dict_at(t) method; got {type(path).__name__}"
        )
    if state_a is None or state_b is None:
        raise RebasinError("evaluate_path needs state_a and state_b (or path=)")
    check_pair(state_a, state_b)  # same layout and dtypes, finite: NaN in B would poison even t = 0
    a = {k: v.to(device) for k, v in state_a.items()}
    b = {k: v.to(device) for k, v in state_b.items()}
    return (lambda t: interpolate(a, b, t)), "linear"


def evaluate_path(
    model: nn.Module,
    state_a: State | None,
    state_b: State | None,
    loader: Iterable[Any],
    *,
    num_points: int = 25,
    ts: Sequence[float] | Tensor | None = None,
    loss_fn: LossFn | None = None,
    bn_loader: Iterable[Any] | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    path: PathLike | None = None,
    repair: bool = False,
    repair_loader: Iterable[Any] | None = None,
    spec: Any = None,
    progress: bool | None = None,
    sync: bool = True,
    group: Any = None,
) -> PathResult:
    r"""Loss and accuracy of ``model`` along the path from ``state_a`` to ``state_b``.

    At each ``t`` the state :math:`\theta(t)` is built (default: :func:`interpolate`) and the
    *unmodified* model is run on it in eval mode through :func:`torch.func.functional_call`.

    Parameters
    ----------
    model
        The architecture. Unchanged afterwards (state and ``training`` flags).
    state_a, state_b
        Endpoint state_dicts (parameters and buffers), or None when ``path`` is given.
    loader
        Yields ``(inputs, targets)``; both are moved to ``device``.
    num_points
        Size of the even grid ``linspace(0, 1, num_points)``, which always contains both
        endpoints (and ``t = 0.5`` when odd). At least 2.
    ts
        Explicit positions (any finite values, extrapolation allowed); overrides ``num_points``.
    loss_fn
        ``loss_fn(outputs, targets) -> batch mean``, given the model's output as it returns it;
        default cross-entropy on the logits. The reported loss is the mean over all examples. The
        logits are the output itself, the ``"logits"`` of a ``transformers`` ``ModelOutput`` or a
        dict, or the first element of a tuple. Accuracy (argmax over dim 1 of the logits) is
        reported when targets are integer class indices of shape ``logits.shape[:1] +
        logits.shape[2:]``, else None.
    bn_loader
        If given, BatchNorm running statistics are recomputed at every ``t`` with
        :func:`reset_bn_stats` before evaluating (no-op for models without BatchNorm).
    max_batches
        Cap on the batches read from the *statistics* loaders: ``bn_loader`` at every ``t`` and
        the REPAIR statistics loader (all batches when None). The evaluation ``loader`` is always
        read whole.
    device
        Where to run; defaults to the model's device.
    path
        A callable ``path(t) -> state_dict`` or an object with ``state_dict_at(t)`` (e.g. a
        curve); then ``state_a`` and ``state_b`` must be None.
    repair
        Apply REPAIR (:class:`rebasin.RepairedPath`) at every ``t``: the interpolated
        model's permuted channels get the interpolated endpoint statistics, measured on
        ``repair_loader``. Endpoint statistics are measured once for the whole path.
    repair_loader
        The REPAIR statistics loader; default ``bn_loader``, else ``loader``.
    spec
        Permutation spec for REPAIR (traced from the model when omitted).
    progress
        Show a tqdm bar over ``t``; None (default): only when stderr is a terminal (or in Jupyter), so a piped or logged run stays clean.
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default) every
        sum — the losses, the correct counts, the BatchNorm and REPAIR statistics — is added over the
        ranks of ``group`` (None: the default group): each rank gets the result on the union of the
        shards. ``sync=False``: this process's data only. See docs/distributed.md.

    Returns
    -------
    PathResult

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(4, 3)
    >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    >>> sa, sb = nn.Linear(4, 3).state_dict(), nn.Linear(4, 3).state_dict()
    >>> res = evaluate_path(model, sa, sb, data, num_points=5)
    >>> res.t
    (0.0, 0.25, 0.5, 0.75, 1.0)
    """
    device = resolve_device(model, device=device)
    if max_batches is not None:
        check_int(max_batches, "max_batches")
    if repair:
        if path is not None:
            raise RebasinError("repair=True builds its own path from state_a and state_b; do not pass path=")
        stats_loader = repair_loader if repair_loader is not None else (bn_loader if bn_loader is not None else loader)
        path = RepairedPath(model, state_a, state_b, stats_loader, spec=spec, max_batches=max_batches, device=device,
                            sync=sync, group=group)
        state_a = state_b = None
    if ts is None:
        grid = even_grid(check_int(num_points, "num_points (both endpoints are always evaluated)", 2))
    else:
        grid = [check_float(v, "each entry of ts") for v in torch.as_tensor(ts, dtype=torch.float64).reshape(-1)]
        if not grid:
            raise RebasinError("ts is empty")
    state_at, path_name = _state_source(state_a, state_b, path, device)

    losses: list[float] = []
    accs: list[float | None] = []
    n_examples = 0
    iterator = progress_bar(grid, progress, desc="path", unit="t")
    for t in iterator:
        state = state_at(t)
        where = f"the state at t={t:g}" + ("" if path_name == "linear" else f" of the path {path_name}")
        check_finite(state, where)
        if bn_loader is not None:
            state = reset_bn_stats(model, state, bn_loader, max_batches=max_batches, device=device, sync=sync,
                                   group=group)
        loss, acc, n_examples = evaluate_state(model, state, loader, loss_fn=loss_fn, device=device, name=where,
                                               sync=sync, group=group)
        if not math.isfinite(loss):
            raise RebasinError(
                f"the loss at t={t:g} is {loss} although every entry of {where} is finite: the model's outputs or "
                "loss_fn overflow (a float16 model?) or loss_fn returns NaN; a barrier of such a curve is meaningless"
            )
        losses.append(loss)
        accs.append(acc)
    metadata = {
        "path": path_name,
        "num_examples": n_examples,
        "bn_reset": bn_loader is not None,
        "max_batches": max_batches,
        "loss_fn": "cross_entropy" if loss_fn is None else getattr(loss_fn, "__name__", type(loss_fn).__name__),
        "device": str(device),
    }
    accuracy = None if any(a is None for a in accs) else [float(a) for a in accs if a is not None]
    return PathResult(t=grid, loss=losses, accuracy=accuracy, metadata=metadata)
