"""Loss and accuracy along a path: the straight line, a REPAIRed line, a curve, or any ``t -> state``.

The path object says how the path is built (:class:`~rebasin.paths.linear.LinearPath`,
:class:`~rebasin.paths.repairing.RepairedPath`, a curve, any of them wrapped in
:class:`~rebasin.paths.running.BNResetPath`); :func:`evaluate_path` only measures.

The user's model is only run through :func:`torch.func.functional_call` and is unchanged afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._common import State, check_finite, check_float, check_int, progress_bar, resolve_device
from .._deprecation import deprecated_form
from .._errors import RebasinError
from .linear import LinearPath, PathLike, PathResult, StatePath, even_grid
from .repairing import RepairedPath
from .running import BNResetPath, LossFn, evaluate_state

__all__ = ["evaluate_path"]


_OLD_KEYWORDS = frozenset({"state_a", "state_b", "path", "bn_loader", "repair", "repair_loader", "spec", "max_batches"})


def _old_form(model: Any = None, *args: Any, **kwargs: Any) -> bool:
    """The 0.2 form ``evaluate_path(model, state_a, state_b, loader, ...)``: states (or None) where the path goes."""
    if len(args) >= 3 or _OLD_KEYWORDS & set(kwargs):  # model, state_a, state_b, loader
        return True
    return bool(args) and (args[0] is None or isinstance(args[0], Mapping))


def _evaluate_path_02(
    model: nn.Module,
    state_a: State | None = None,
    state_b: State | None = None,
    loader: Iterable[Any] | None = None,
    *,
    bn_loader: Iterable[Any] | None = None,
    max_batches: int | None = None,
    path: PathLike | None = None,
    repair: bool = False,
    repair_loader: Iterable[Any] | None = None,
    spec: Any = None,
    device: torch.device | str | None = None,
    sync: bool = True,
    group: Any = None,
    **rest: Any,
) -> PathResult:
    """The 0.2 ``evaluate_path(model, state_a, state_b, loader, ...)``: the path object built from its keywords."""
    if loader is None and state_a is not None and not isinstance(state_b, Mapping):
        raise RebasinError("evaluate_path(model, path, loader) takes a path object, not a state_dict: pass "
                           "LinearPath(state_a, state_b) (or another path object) as the second argument")
    if max_batches is not None:
        check_int(max_batches, "max_batches")
    if repair:
        if path is not None:
            raise RebasinError("repair=True builds its own path from state_a and state_b; do not pass path=")
        stats_loader = repair_loader if repair_loader is not None else (bn_loader if bn_loader is not None else loader)
        path = RepairedPath(model, state_a, state_b, stats_loader, spec=spec, max_batches=max_batches,  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
                            device=resolve_device(model, device=device), sync=sync, group=group)
    elif path is not None:
        if state_a is not None or state_b is not None:
            raise RebasinError("pass either path= or state_a/state_b, not both (give None for the states)")
    elif state_a is None or state_b is None:
        raise RebasinError("evaluate_path needs state_a and state_b (or path=)")
    else:
        path = LinearPath(state_a, state_b)
    if bn_loader is not None:
        path = BNResetPath(path, model, bn_loader, max_batches=max_batches, device=device, sync=sync, group=group)
    return evaluate_path.__wrapped__(model, path, loader, device=device, sync=sync, group=group,  # type: ignore[attr-defined]  # __wrapped__ is the undecorated function: mypy only sees the wrapper
                                     **rest)


def _state_source(path: PathLike) -> tuple[Callable[[float], State], str]:
    inner = path.path if isinstance(path, BNResetPath) else path
    name = "linear" if isinstance(inner, LinearPath) else (
        type(inner).__name__ if isinstance(inner, StatePath) else getattr(inner, "__name__", type(inner).__name__))
    if isinstance(path, StatePath):
        return path.state_dict_at, name
    if callable(path):
        return path, name
    raise RebasinError(
        f"path must be a callable t -> state_dict or have a state_dict_at(t) method; got {type(path).__name__}"
    )


@deprecated_form(
    _evaluate_path_02,
    when=_old_form,
    use="evaluate_path(model, path, loader) with path=LinearPath(state_a, state_b), RepairedPath(...), a curve, "
    "or BNResetPath(path, model, bn_loader) for bn_loader=",
)
def evaluate_path(
    model: nn.Module,
    path: PathLike,
    loader: Iterable[Any],
    *,
    num_points: int = 25,
    ts: Sequence[float] | Tensor | None = None,
    loss_fn: LossFn | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    sync: bool = True,
    group: Any = None,
) -> PathResult:
    r"""Loss and accuracy of ``model`` along a path.

    At each ``t`` the path's state :math:`\theta(t)` is built and the *unmodified* model is run on it in
    eval mode through :func:`torch.func.functional_call`. The path object says how the path is built:

    * :class:`rebasin.LinearPath`\ ``(state_a, state_b)`` — the straight line (:func:`interpolate`);
    * :class:`rebasin.RepairedPath`\ ``(model, state_a, state_b, stats_loader)`` — the line with REPAIR
      at every point;
    * a curve (:class:`rebasin.BezierCurve`, :class:`rebasin.paths.PolyChainCurve`, ...) or any callable
      ``t -> state_dict``;
    * :class:`rebasin.BNResetPath`\ ``(path, model, bn_loader)`` — any of these with BatchNorm statistics
      recomputed at every point.

    Parameters
    ----------
    model
        The architecture. Unchanged afterwards (state and ``training`` flags).
    path
        The path object (see above).
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
    device
        Where to run; defaults to the model's device.
    progress
        Show a tqdm bar over ``t``; None (default): only when stderr is a terminal (or in Jupyter), so a piped or logged run stays clean.
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default) every
        sum — the losses and the correct counts (the path objects take their own ``sync``/``group`` for their statistics) — is added over the
        ranks of ``group`` (None: the default group): each rank gets the result on the union of the
        shards. ``sync=False``: this process's data only. See docs/distributed.md.

    Returns
    -------
    PathResult

    Notes
    -----
    The 0.2 form ``evaluate_path(model, state_a, state_b, loader, bn_loader=, max_batches=, path=, repair=,
    repair_loader=, spec=)`` keeps working for one release with a :class:`DeprecationWarning`; it builds
    the path objects above from those keywords.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(4, 3)
    >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    >>> sa, sb = nn.Linear(4, 3).state_dict(), nn.Linear(4, 3).state_dict()
    >>> res = evaluate_path(model, LinearPath(sa, sb), data, num_points=5)
    >>> res.t
    (0.0, 0.25, 0.5, 0.75, 1.0)
    """
    device = resolve_device(model, device=device)
    if ts is None:
        grid = even_grid(check_int(num_points, "num_points (both endpoints are always evaluated)", 2))
    else:
        grid = [check_float(v, "each entry of ts") for v in torch.as_tensor(ts, dtype=torch.float64).reshape(-1)]
        if not grid:
            raise RebasinError("ts is empty")
    if isinstance(path, LinearPath):
        path = path.to(device)
    state_at, path_name = _state_source(path)

    losses: list[float] = []
    accs: list[float | None] = []
    n_examples = 0
    iterator = progress_bar(grid, progress, desc="path", unit="t")
    for t in iterator:
        state = state_at(t)
        where = f"the state at t={t:g}" + ("" if path_name == "linear" else f" of the path {path_name}")
        check_finite(state, where)
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
        "bn_reset": isinstance(path, BNResetPath),
        "max_batches": getattr(path, "max_batches", None),
        "loss_fn": "cross_entropy" if loss_fn is None else getattr(loss_fn, "__name__", type(loss_fn).__name__),
        "device": str(device),
    }
    accuracy = None if any(a is None for a in accs) else [float(a) for a in accs if a is not None]
    return PathResult(t=grid, loss=losses, accuracy=accuracy, metadata=metadata)  # type: ignore[arg-type]  # PathResult stores these sequences as given (lists); its fields say tuple
