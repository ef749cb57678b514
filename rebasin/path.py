"""Linear paths between two networks: interpolation, evaluation along the path, and barriers.

Everything is a pure function over state_dicts: the user's model is only run through
:func:`torch.func.functional_call` and is unchanged afterwards (parameters, buffers and every
submodule's ``training`` flag).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._errors import RebasinError
from ._functional import forward_with_state, model_device

__all__ = [
    "interpolate",
    "PathResult",
    "evaluate_path",
    "reset_bn_stats",
    "barrier",
    "BARRIER_KINDS",
    "BARRIER_METRICS",
    "StatePath",
]

BARRIER_KINDS = ("max_minus_mean", "detrended", "midpoint")
BARRIER_METRICS = ("loss", "accuracy")

State = Mapping[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


@runtime_checkable
class StatePath(Protocol):
    """Anything with ``state_dict_at(t) -> state_dict`` (e.g. a fitted curve)."""

    def state_dict_at(self, t: float) -> Mapping[str, Tensor]: ...


PathLike = Union[StatePath, Callable[[float], Mapping[str, Tensor]]]


# ----------------------------------------------------------------------------------------------
# interpolation


def _finite_float(value: Any, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise RebasinError(f"{name} must be a finite real number, got {value!r}") from err
    if isinstance(value, bool) or not math.isfinite(out):
        raise RebasinError(f"{name} must be a finite real number, got {value!r}")
    return out


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``, else RebasinError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RebasinError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_same_layout(state_a: State, state_b: State) -> None:
    only_a = [k for k in state_a if k not in state_b]
    only_b = [k for k in state_b if k not in state_a]
    shapes = [
        f"{k!r}: {tuple(state_a[k].shape)} vs {tuple(state_b[k].shape)}"
        for k in state_a
        if k in state_b and state_a[k].shape != state_b[k].shape
    ]
    if only_a or only_b or shapes:
        parts = []
        if only_a:
            parts.append(f"keys only in state_a: {only_a}")
        if only_b:
            parts.append(f"keys only in state_b: {only_b}")
        if shapes:
            parts.append("shapes differ (a vs b): " + "; ".join(shapes))
        raise RebasinError("state_a and state_b do not have the same layout: " + "; ".join(parts))


def interpolate(state_a: State, state_b: State, t: float) -> dict[str, Tensor]:
    r"""The state on the straight line between two state_dicts.

    .. math:: \theta(t) = (1 - t)\,\theta_A + t\,\theta_B

    computed with :func:`torch.lerp`, which is exact at both ends: ``t=0`` gives ``state_a``'s
    values and ``t=1`` gives ``state_b``'s values bit for bit.

    Parameters
    ----------
    state_a, state_b
        State_dicts with the same keys and shapes (parameters and buffers). Floating tensors
        must have the same dtype and device in both. Not mutated.
    t
        A finite real number; values outside ``[0, 1]`` extrapolate along the line.

    Returns
    -------
    dict
        New tensors only. Floating (and complex) entries are interpolated and differentiable with
        respect to both inputs; integer entries (``num_batches_tracked``) are copies of
        ``state_a``'s.

    Examples
    --------
    >>> import torch
    >>> a, b = {"w": torch.zeros(2)}, {"w": torch.tensor([2.0, 4.0])}
    >>> interpolate(a, b, 0.25)["w"]
    tensor([0.5000, 1.0000])
    """
    t = _finite_float(t, "t")
    _check_same_layout(state_a, state_b)
    out: dict[str, Tensor] = {}
    for key, a in state_a.items():
        b = state_b[key]
        if a.is_floating_point() or a.is_complex():
            if a.dtype != b.dtype or a.device != b.device:
                raise RebasinError(
                    f"cannot interpolate {key!r}: state_a has {a.dtype} on {a.device}, "
                    f"state_b has {b.dtype} on {b.device}; convert one of them first"
                )
            out[key] = torch.lerp(a, b, t)
        else:
            out[key] = a.clone()
    return out


# ----------------------------------------------------------------------------------------------
# results and barriers


@dataclass(frozen=True)
class PathResult:
    """Loss (and accuracy) of a network evaluated at points ``t`` along a path.

    Attributes
    ----------
    t
        Path positions, shape ``(n,)`` as a tuple of floats.
    loss
        Mean loss at each ``t`` (tuple of ``n`` floats).
    accuracy
        Accuracy in ``[0, 1]`` at each ``t``, or ``None`` when the task is not classification.
    metadata
        JSON-friendly facts about the evaluation (number of examples, whether BatchNorm
        statistics were reset, the path, ...).

    Examples
    --------
    >>> r = PathResult(t=(0.0, 0.5, 1.0), loss=(0.1, 0.9, 0.2), accuracy=None)
    >>> round(r.barrier(), 6)
    0.75
    """

    t: tuple[float, ...]
    loss: tuple[float, ...]
    accuracy: tuple[float, ...] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = tuple(float(v) for v in self.t)
        loss = tuple(float(v) for v in self.loss)
        acc = None if self.accuracy is None else tuple(float(v) for v in self.accuracy)
        if len(loss) != len(t) or (acc is not None and len(acc) != len(t)):
            raise RebasinError(
                f"PathResult needs one loss and accuracy per t: got {len(t)} t, {len(loss)} loss, "
                f"{'no' if acc is None else len(acc)} accuracy values"
            )
        if acc is not None and any(not 0.0 <= a <= 1.0 for a in acc):
            raise RebasinError(f"accuracy values must lie in [0, 1], got {acc}")
        object.__setattr__(self, "t", t)
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "accuracy", acc)
        object.__setattr__(self, "metadata", dict(self.metadata))

    def __len__(self) -> int:
        return len(self.t)

    def barrier(self, kind: str = "max_minus_mean", metric: str = "loss") -> float:
        """Shortcut for :func:`barrier` on this result."""
        return barrier(self, kind=kind, metric=metric)

    def as_dict(self) -> dict[str, Any]:
        """Plain lists and dicts (JSON-serialisable when the metadata is)."""
        return {
            "t": list(self.t),
            "loss": list(self.loss),
            "accuracy": None if self.accuracy is None else list(self.accuracy),
            "metadata": dict(self.metadata),
        }

    def to_json(self, **kwargs: Any) -> str:
        """``json.dumps(self.as_dict(), **kwargs)``."""
        return json.dumps(self.as_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PathResult:
        """Inverse of :meth:`as_dict`."""
        missing = [k for k in ("t", "loss") if k not in data]
        if missing:
            raise RebasinError(f"PathResult.from_dict: missing {missing}; got keys {sorted(data)}")
        return cls(
            t=data["t"], loss=data["loss"], accuracy=data.get("accuracy"), metadata=data.get("metadata") or {}
        )

    @classmethod
    def from_json(cls, text: str) -> PathResult:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        def curve(name: str, values: tuple[float, ...], worst: Callable[..., float]) -> str:
            i = values.index(worst(values))
            label = "max" if worst is max else "min"
            return f"{name} {values[0]:.4g} -> {label} {values[i]:.4g} (t={self.t[i]:.3g}) -> {values[-1]:.4g}"

        parts = [f"{len(self)} points in [{min(self.t):.3g}, {max(self.t):.3g}]"]
        if len(self):
            parts.append(curve("loss", self.loss, max))
            if self.accuracy is not None:
                parts.append(curve("accuracy", self.accuracy, min))
        return f"PathResult({'; '.join(parts)})"


def _even_grid(n: int) -> list[float]:
    # i / (n - 1) is a correctly rounded division: exact 0.0, 1.0, and 0.5 for odd n.
    return [i / (n - 1) for i in range(n)]


def barrier(
    values_or_result: PathResult | Sequence[float] | Tensor,
    kind: str = "max_minus_mean",
    metric: str = "loss",
    ts: Sequence[float] | Tensor | None = None,
) -> float:
    r"""Height of the bump along a path, from the loss or accuracy curve.

    For a loss curve :math:`L(t)` (only points with :math:`0 \le t \le 1` enter the maximum):

    .. math::
        \text{max\_minus\_mean} &= \max_t L(t) - \tfrac12 (L(0) + L(1)) \\
        \text{detrended} &= \max_t \big[L(t) - ((1 - t) L(0) + t L(1))\big] \\
        \text{midpoint} &= L(\tfrac12) - \tfrac12 (L(0) + L(1))

    For accuracy the mirror image, so that a drop in accuracy gives a positive barrier, e.g.
    :math:`\tfrac12 (A(0) + A(1)) - \min_t A(t)`.

    Parameters
    ----------
    values_or_result
        A :class:`PathResult` or the curve's values, shape ``(n,)`` with ``n >= 2``.
    kind
        One of ``"max_minus_mean"``, ``"detrended"``, ``"midpoint"``.
    metric
        ``"loss"`` or ``"accuracy"`` (which curve of a :class:`PathResult`; for plain values it
        sets the sign).
    ts
        Positions of plain values; evenly spaced over ``[0, 1]`` when omitted. Must contain
        0 and 1 (and 0.5 for ``"midpoint"``). Not allowed with a :class:`PathResult`.

    Returns
    -------
    float

    Examples
    --------
    >>> barrier([0.2, 1.0, 0.4])
    0.7
    >>> round(barrier([0.9, 0.5, 0.7], metric="accuracy", kind="midpoint"), 6)
    0.3
    """
    if kind not in BARRIER_KINDS:
        raise RebasinError(f"unknown barrier kind {kind!r}; valid kinds: {list(BARRIER_KINDS)}")
    if metric not in BARRIER_METRICS:
        raise RebasinError(f"unknown barrier metric {metric!r}; valid metrics: {list(BARRIER_METRICS)}")
    if isinstance(values_or_result, PathResult):
        if ts is not None:
            raise RebasinError("ts is taken from the PathResult; do not pass ts= with one")
        ts = values_or_result.t
        values = getattr(values_or_result, metric)
        if values is None:
            raise RebasinError("this PathResult has no accuracy (not a classification task); use metric='loss'")
    else:
        values = values_or_result
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() < 2:
        raise RebasinError(f"a barrier needs at least 2 points on the path, got {v.numel()}")
    t = torch.as_tensor(_even_grid(v.numel()) if ts is None else ts, dtype=torch.float64).reshape(-1)
    if t.numel() != v.numel():
        raise RebasinError(f"got {v.numel()} values but {t.numel()} positions ts")
    if not bool(torch.isfinite(t).all()):
        raise RebasinError(f"ts must be finite, got {t.tolist()}")
    if metric == "accuracy":
        v = -v  # a drop in accuracy is a bump in -accuracy

    def at(point: float) -> Tensor:
        hit = (t - point).abs() <= 1e-9
        if not bool(hit.any()):
            raise RebasinError(f"barrier kind {kind!r} needs t={point} on the grid; got ts={t.tolist()}")
        return v[hit][0]

    v0, v1 = at(0.0), at(1.0)
    inside = (t >= 0) & (t <= 1)
    if kind == "max_minus_mean":
        out = v[inside].max() - 0.5 * (v0 + v1)
    elif kind == "detrended":
        out = (v[inside] - ((1 - t[inside]) * v0 + t[inside] * v1)).max()
    else:
        out = at(0.5) - 0.5 * (v0 + v1)
    return float(out)


# ----------------------------------------------------------------------------------------------
# running the model on explicit states


def _split_batch(batch: Any) -> tuple[Any, Any]:
    """``(x, y)`` from a loader batch; ``y`` is None for a bare input."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise RebasinError(
            f"a loader batch must be (inputs, targets); got a {type(batch).__name__} of {len(batch)} items"
        )
    if isinstance(batch, Tensor):
        return batch, None
    raise RebasinError(f"a loader batch must be (inputs, targets) or a tensor; got {type(batch).__name__}")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _check_state_for_model(model: nn.Module, state: State, name: str = "state") -> None:
    ref = model.state_dict(keep_vars=True)
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    shapes = [
        f"{k!r}: {tuple(state[k].shape)} (model: {tuple(ref[k].shape)})"
        for k in ref
        if k in state and state[k].shape != ref[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"missing keys: {missing}"] if missing else []
        parts += [f"unexpected keys: {unexpected}"] if unexpected else []
        parts += ["wrong shapes: " + "; ".join(shapes)] if shapes else []
        raise RebasinError(f"{name} does not fit the model ({type(model).__name__}): " + "; ".join(parts))


def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    return model_device(model) if device is None else torch.device(device)


def _evaluate_state(
    model: nn.Module,
    state: State,
    loader: Iterable[Any],
    *,
    loss_fn: LossFn | None,
    device: torch.device,
    name: str = "state",
) -> tuple[float, float | None, int]:
    """Mean loss, accuracy (None unless every batch looks like classification) and example count.

    ``loss_fn(output, target)`` returns the batch *mean*; it is weighted by the batch size.
    This is the single evaluation routine behind :func:`evaluate_path` and ``rebasin.train.evaluate``.
    """
    _check_state_for_model(model, state, name=name)
    state = {k: v.to(device) for k, v in state.items()}
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n_examples = n_targets = 0
    classification = True
    with torch.no_grad():
        for batch in loader:
            x, y = _split_batch(batch)
            if y is None:
                raise RebasinError("evaluation needs (inputs, targets) batches; the loader yielded inputs only")
            x, y = _to(x, device), _to(y, device)
            out = forward_with_state(model, state, x, eval_mode=True)
            n = int(y.shape[0])
            loss_sum += loss_fn(out, y).detach().to(torch.float64) * n
            n_examples += n
            classification = classification and (
                isinstance(out, Tensor)
                and not y.is_floating_point()
                and y.dtype != torch.bool
                and out.ndim == y.ndim + 1
                and out.shape[0] == y.shape[0]
            )
            if classification:
                correct += (out.argmax(dim=1) == y).sum()
                n_targets += y.numel()
    if n_examples == 0:
        raise RebasinError("the evaluation loader yielded no batches")
    accuracy = float(correct) / n_targets if classification and n_targets else None
    return float(loss_sum) / n_examples, accuracy, n_examples


@contextlib.contextmanager
def _only_bn_training(model: nn.Module, bns: Iterable[nn.Module]) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for m in bns:
            m.train()
        yield
    finally:
        for m, f in flags.items():
            m.training = f


def reset_bn_stats(
    model: nn.Module,
    state: State,
    loader: Iterable[Any],
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    r"""Recompute every BatchNorm's running statistics for ``state`` over a loader.

    The result equals what PyTorch's cumulative average (``momentum=None``) stores after
    ``reset_running_stats()`` and one training-mode forward pass per batch: ``running_mean``
    and ``running_var`` are the averages over batches of each batch's mean and unbiased
    variance of the BatchNorm input, and ``num_batches_tracked`` is the number of batches.
    Averages are accumulated in float64. Only the BatchNorm layers run in training mode
    (dropout and the like stay in eval mode, so the statistics are deterministic).

    Parameters
    ----------
    model
        The architecture; its parameters, buffers, ``momentum`` and ``training`` flags are
        unchanged afterwards.
    state
        Full state_dict for ``model`` (parameters and buffers). Not mutated.
    loader
        Yields ``(inputs, targets)`` or bare inputs; targets are ignored.
    max_batches
        Use at most this many batches (all when None).
    device
        Where to run; defaults to the model's device.

    Returns
    -------
    dict
        A new state_dict: BatchNorm buffers are new tensors (same dtype and device as in
        ``state``), every other entry is ``state``'s tensor itself. A model without
        BatchNorm layers (tracking running statistics) gets ``dict(state)`` back.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> x = torch.randn(32, 3)
    >>> new = reset_bn_stats(model, model.state_dict(), [x[:16], x[16:]])
    >>> int(new["1.num_batches_tracked"])
    2
    """
    _check_state_for_model(model, state)
    bns = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}
    out = dict(state)
    if not bns:
        return out
    if max_batches is not None:
        _check_int(max_batches, "max_batches")
    device = _resolve_device(model, device)
    prefix = {name: f"{name}." if name else "" for name in bns}
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    # BatchNorm updates its buffers in place during the forward pass: give it scratch copies.
    work = {k: v.to(device) for k, v in state.items()}
    for name in bns:
        for buf in buffers:
            key = prefix[name] + buf
            if key in work:
                work[key] = state[key].to(device, copy=True)

    sums: dict[str, list[Tensor]] = {}
    calls = dict.fromkeys(bns, 0)

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().to(torch.float64)
            dims = [0, *range(2, x.ndim)]
            mean, var = x.mean(dim=dims), x.var(dim=dims, correction=1)
            if name in sums:
                sums[name][0] += mean
                sums[name][1] += var
            else:
                sums[name] = [mean, var]
            calls[name] += 1

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in bns.items()]
    n_batches = 0
    try:
        with torch.no_grad(), _only_bn_training(model, bns.values()):
            for batch in loader:
                if max_batches is not None and n_batches >= max_batches:
                    break
                x, _ = _split_batch(batch)
                forward_with_state(model, work, _to(x, device))
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise RebasinError("reset_bn_stats: the loader yielded no batches")

    for name in bns:
        k = calls[name]
        mean_key, var_key, count_key = (prefix[name] + b for b in buffers)
        old_mean, old_var = state[mean_key], state[var_key]
        if k:
            mean, var = sums[name][0] / k, sums[name][1] / k
        else:  # never reached by the forward pass: the reset values
            mean, var = torch.zeros_like(old_mean), torch.ones_like(old_var)
        out[mean_key] = mean.to(dtype=old_mean.dtype, device=old_mean.device)
        out[var_key] = var.to(dtype=old_var.dtype, device=old_var.device)
        if count_key in state:
            out[count_key] = torch.full_like(state[count_key], k)
    return out


# ----------------------------------------------------------------------------------------------
# evaluation along a path


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
    _check_same_layout(state_a, state_b)
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
    bn_batches: int | None = None,
    device: torch.device | str | None = None,
    path: PathLike | None = None,
    repair: bool = False,
    repair_loader: Iterable[Any] | None = None,
    spec: Any = None,
    progress: bool = False,
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
        ``loss_fn(outputs, targets) -> batch mean``; default cross-entropy. The reported loss is
        the mean over all examples. Accuracy (argmax over dim 1) is reported when targets are
        integer class indices of shape ``outputs.shape[:1] + outputs.shape[2:]``, else None.
    bn_loader
        If given, BatchNorm running statistics are recomputed at every ``t`` with
        :func:`reset_bn_stats` before evaluating (no-op for models without BatchNorm).
    bn_batches
        ``max_batches`` for that reset.
    device
        Where to run; defaults to the model's device.
    path
        A callable ``path(t) -> state_dict`` or an object with ``state_dict_at(t)`` (e.g. a
        curve); then ``state_a`` and ``state_b`` must be None.
    repair
        Apply REPAIR (:class:`rebasin.repair.RepairedPath`) at every ``t``: the interpolated
        model's permuted channels get the interpolated endpoint statistics, measured on
        ``repair_loader`` (default: ``bn_loader``, else ``loader``). Endpoint statistics are
        measured once for the whole path.
    spec
        Permutation spec for REPAIR (traced from the model when omitted).
    progress
        Show a tqdm bar over ``t``.

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
    device = _resolve_device(model, device)
    if repair:
        from .repair import RepairedPath

        if path is not None:
            raise RebasinError("repair=True builds its own path from state_a and state_b; do not pass path=")
        stats_loader = repair_loader if repair_loader is not None else (bn_loader if bn_loader is not None else loader)
        path = RepairedPath(model, state_a, state_b, stats_loader, spec=spec, max_batches=bn_batches, device=device)
        state_a = state_b = None
    if ts is None:
        grid = _even_grid(_check_int(num_points, "num_points (both endpoints are always evaluated)", 2))
    else:
        grid = [_finite_float(v, "each entry of ts") for v in torch.as_tensor(ts, dtype=torch.float64).reshape(-1)]
        if not grid:
            raise RebasinError("ts is empty")
    state_at, path_name = _state_source(state_a, state_b, path, device)

    losses: list[float] = []
    accs: list[float | None] = []
    n_examples = 0
    iterator: Iterable[float] = grid
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(grid, desc="path", unit="t")
    for t in iterator:
        state = state_at(t)
        if bn_loader is not None:
            state = reset_bn_stats(model, state, bn_loader, max_batches=bn_batches, device=device)
        loss, acc, n_examples = _evaluate_state(
            model, state, loader, loss_fn=loss_fn, device=device, name=f"the state at t={t:g}"
        )
        losses.append(loss)
        accs.append(acc)
    metadata = {
        "path": path_name,
        "num_examples": n_examples,
        "bn_reset": bn_loader is not None,
        "bn_batches": bn_batches,
        "loss_fn": "cross_entropy" if loss_fn is None else getattr(loss_fn, "__name__", type(loss_fn).__name__),
        "device": str(device),
    }
    accuracy = None if any(a is None for a in accs) else [float(a) for a in accs if a is not None]
    return PathResult(t=grid, loss=losses, accuracy=accuracy, metadata=metadata)
