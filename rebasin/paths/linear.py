"""The straight line between two networks, and the results and barriers of any path.

``interpolate`` and ``combine`` build states on the line (or in the simplex of several models);
:class:`PathResult` holds a loss/accuracy curve and :func:`barrier` measures its bump. Pure functions over
state_dicts; nothing here runs a model (that is :mod:`rebasin.paths.running`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

from .._common import (
    State,
    check_float,
    check_pair,
    check_same_layout,
)
from .._errors import RebasinError

__all__ = [
    "interpolate",
    "PathResult",
    "combine",
    "barrier",
    "BARRIER_KINDS",
    "BARRIER_METRICS",
    "StatePath",
    "LinearPath",
]

BARRIER_KINDS = ("max_minus_mean", "detrended", "midpoint")
BARRIER_METRICS = ("loss", "accuracy")


@runtime_checkable
class StatePath(Protocol):
    """Anything with ``state_dict_at(t) -> state_dict`` (e.g. a fitted curve)."""

    def state_dict_at(self, t: float) -> Mapping[str, Tensor]: ...


PathLike = Union[StatePath, Callable[[float], Mapping[str, Tensor]]]


# ----------------------------------------------------------------------------------------------
# interpolation


class LinearPath:
    """The straight line from ``state_a`` to ``state_b`` as a path object (for :func:`rebasin.evaluate_path`).

    ``state_dict_at(t)`` (and calling it) is ``interpolate(state_a, state_b, t)``.

    Parameters
    ----------
    state_a, state_b
        Full state_dicts of one architecture (same keys, shapes and dtypes; finite). Not mutated.

    Examples
    --------
    >>> import torch
    >>> path = LinearPath({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    >>> path.state_dict_at(0.25)["w"]
    tensor([0.2500, 0.2500])
    """

    __name__ = "linear"

    def __init__(self, state_a: State, state_b: State) -> None:
        check_pair(state_a, state_b)  # same layout and dtypes, finite: NaN in B would poison even t = 0
        self.state_a, self.state_b = dict(state_a), dict(state_b)

    def state_dict_at(self, t: float) -> dict[str, Tensor]:
        """The state at ``t`` (0 is A, 1 is B; any finite ``t``)."""
        return interpolate(self.state_a, self.state_b, t)

    __call__ = state_dict_at

    def to(self, device: torch.device | str) -> LinearPath:
        """The same line with both endpoints on ``device`` (a new object)."""
        path = LinearPath.__new__(LinearPath)
        path.state_a = {k: v.to(device) for k, v in self.state_a.items()}
        path.state_b = {k: v.to(device) for k, v in self.state_b.items()}
        return path



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
    t = check_float(t, "t")
    check_same_layout(state_a, state_b)
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


def combine(states: Sequence[State], weights: Sequence[float]) -> dict[str, Tensor]:
    """``sum_i w_i state_i`` for floating entries (exact for one-hot weights), integers from state 0.

    Each entry keeps state 0's dtype; a bfloat16 or float16 sum is accumulated in float32 and rounded once.
    """
    if len(states) == 2 and weights[0] + weights[1] == 1.0:
        return interpolate(states[0], states[1], weights[1])  # one lerp: rounded once in any dtype
    out: dict[str, Tensor] = {}
    for key, ref in states[0].items():
        if ref.is_floating_point() or ref.is_complex():
            low = ref.is_floating_point() and torch.finfo(ref.dtype).bits < 32
            acc = (ref.float() if low else ref) * weights[0]
            for s, w in zip(states[1:], weights[1:]):
                acc = acc + s[key].to(ref.device, torch.float32 if low else s[key].dtype) * w
            out[key] = acc.to(ref.dtype) if low else acc
        else:
            out[key] = ref.clone()
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


def even_grid(n: int) -> list[float]:
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
    t = torch.as_tensor(even_grid(v.numel()) if ts is None else ts, dtype=torch.float64).reshape(-1)
    if t.numel() != v.numel():
        raise RebasinError(f"got {v.numel()} values but {t.numel()} positions ts")
    if not bool(torch.isfinite(t).all()):
        raise RebasinError(f"ts must be finite, got {t.tolist()}")
    if not bool(torch.isfinite(v).all()):
        bad = [round(float(p), 6) for p in t[~torch.isfinite(v)]]
        raise RebasinError(f"the {metric} curve is NaN or inf at t={bad}: a barrier of it is undefined (was a state "
                           "along the path not finite?)")
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
