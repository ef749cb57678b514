r"""Mode-connecting curves between two networks through trainable bends.

* :class:`BezierCurve` and :class:`PolyChainCurve` (Garipov et al. 2018; Tatro et al. 2020 for
  *aligned* endpoints): a path :math:`\phi(t)` through trainable bend points with fixed endpoints.
  A curve is an :class:`torch.nn.Module` over *state_dicts*: :meth:`~_Curve.state_dict_at`
  returns the full state_dict at ``t`` (differentiable with respect to the bends), and the
  *unmodified* user module is run on it with :func:`torch.func.functional_call` — there is no
  per-architecture "curve twin" of the network. :func:`fit_curve` trains the bends.

Every path here plugs into :func:`rebasin.evaluate_path` as ``path=`` (use ``bn_loader=`` there
to recompute BatchNorm statistics at each evaluated ``t``). An *aligned* curve is simply a curve
between A and the aligned B (``align(...).state_b``), with any matcher.

References: T. Garipov, P. Izmailov, D. Podoprikhin, D. Vetrov, A. G. Wilson, "Loss Surfaces,
Mode Connectivity, and Fast Ensembling of DNNs", NeurIPS 2018. N. J. Tatro, P.-Y. Chen, P. Das,
I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode Connectivity via Neuron Alignment",
NeurIPS 2020. I. Anokhin, D. Yarotsky, "Low-loss connection of weight vectors: distribution-based
approaches", ICML 2020.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._common import (
    as_state,
    check_float,
    check_int,
    check_pair,
    check_same_layout,
    check_state_for_model,
    cross_entropy_of,
    forward_with_state,
    own_global_rng,
    progress_bar,
    resolve_device,
    split_batch,
    to_device,
    training,
)
from .._distributed import fingerprint, guarded, lockstep, reducer, synced_backward
from .._errors import RebasinError

__all__ = ["BezierCurve", "PolyChainCurve", "CURVE_KINDS", "fit_curve", "CurveFit"]

State = Mapping[str, Tensor]
_BN_BUFFERS = ("running_mean", "running_var")


class _TensorStore(nn.Module):
    """Fixed tensors kept as buffers (so ``.to(device)`` moves them), in a given key order."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t.detach().clone())

    def __getitem__(self, i: int) -> Tensor:
        return getattr(self, f"t{i}")


class _Curve(nn.Module):
    """Shared machinery: endpoints fixed, interior control points trainable."""

    kind = "curve"

    def __init__(
        self,
        state_a: State | nn.Module,
        state_b: State | nn.Module,
        num_bends: int = 3,
        *,
        trainable_keys: Iterable[str] | None = None,
    ) -> None:
        super().__init__()
        a, b = as_state(state_a, "state_a"), as_state(state_b, "state_b")
        check_pair(a, b)
        if isinstance(num_bends, bool) or not isinstance(num_bends, int) or num_bends < 2:
            raise RebasinError(
                f"num_bends must be an int >= 2 (the number of control points including both endpoints; "
                f"3 gives one trainable bend), got {num_bends!r}"
            )
        self.keys: tuple[str, ...] = tuple(a)
        floating = [k for k in self.keys if a[k].is_floating_point()]
        if trainable_keys is None:
            train = [k for k in floating if not k.endswith(_BN_BUFFERS)]
        else:
            train = list(dict.fromkeys(trainable_keys))
            bad = [k for k in train if k not in a or not a[k].is_floating_point()]
            if bad:
                raise RebasinError(f"trainable_keys must name floating entries of the state_dicts; not so: {bad[:8]}")
        self.trainable_keys: tuple[str, ...] = tuple(train)
        self.fixed_keys: tuple[str, ...] = tuple(k for k in self.keys if k not in set(train))
        self.num_bends = num_bends
        self.start = _TensorStore([a[k] for k in self.keys])
        self.end = _TensorStore([b[k] for k in self.keys])
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._trainable_index = {k: i for i, k in enumerate(self.trainable_keys)}
        # Interior control points start evenly spaced on the segment: the initial curve is the line.
        self.bends = nn.ModuleList(
            nn.ParameterList(
                nn.Parameter(torch.lerp(a[k], b[k], j / (num_bends - 1)).clone()) for k in self.trainable_keys
            )
            for j in range(1, num_bends - 1)
        )

    # -------------------------------------------------------------------- control points
    def control_point(self, j: int, key: str) -> Tensor:
        """Control point ``j`` (0 = A, ``num_bends - 1`` = B) of entry ``key``."""
        i = self._index[key]
        if j == 0:
            return self.start[i]
        if j == self.num_bends - 1:
            return self.end[i]
        return self.bends[j - 1][self._trainable_index[key]]  # type: ignore[index]  # nn.Module attributes are typed Tensor | Module

    def _trainable_at(self, t: float, points: list[Tensor]) -> Tensor:  # pragma: no cover - abstract
        """The curve's formula at ``t`` through the control points ``points`` of one entry."""
        raise NotImplementedError

    def state_dict_at(self, t: float, *, end: State | None = None) -> dict[str, Tensor]:
        r"""The full state_dict :math:`\phi(t)` for ``0 <= t <= 1``.

        Trainable entries are differentiable with respect to the bends; at ``t = 0`` and ``t = 1``
        they are exactly A's and B's tensors (copies). Other floating entries (BatchNorm running
        statistics) are linearly interpolated between the endpoints as placeholders — recompute
        them for the state at ``t`` with ``bn_loader=`` in :func:`rebasin.evaluate_path` or with
        :func:`rebasin.reset_bn_stats` — and, like integer entries (copies of A's), carry no
        gradient. Every returned tensor is new (running it in training mode cannot touch the
        curve's buffers).

        Parameters
        ----------
        t
            Position on the curve, in ``[0, 1]``.
        end
            Replaces B for this call: a state_dict with the curve's keys and shapes, on its device.
            The trainable entries are then differentiable with respect to ``end`` as well (this is
            how :func:`rebasin.paths.proximal_alternating_minimization` learns B's permutation together
            with the bend). Default: the curve's own B.
        """
        t = check_float(t, "t")
        if not 0.0 <= t <= 1.0:
            raise RebasinError(f"a curve is defined for 0 <= t <= 1, got t={t}")
        if end is not None:
            check_same_layout({k: self.start[i] for k, i in self._index.items()}, end, ("the curve's A", "end"))
        out: dict[str, Tensor] = {}
        for key in self.keys:
            i = self._index[key]
            a, b = self.start[i], (self.end[i] if end is None else end[key])
            if t == 0.0:
                value = a.clone()
            elif t == 1.0:
                value = b.clone()
            elif key in self._trainable_index:
                value = self._trainable_at(t, self._points(key, b))
            elif a.is_floating_point():
                value = torch.lerp(a, b, t)
            else:
                value = a.clone()
            out[key] = value if key in self._trainable_index else value.detach()
        return out

    def _points(self, key: str, end: Tensor) -> list[Tensor]:
        """Control points of the trainable entry ``key``: A's tensor, the bends, then ``end``."""
        j = self._trainable_index[key]
        return [self.start[self._index[key]], *(bend[j] for bend in self.bends), end]  # type: ignore[index]  # nn.Module attributes are typed Tensor | Module

    def with_end(self, state_b: State | nn.Module) -> _Curve:
        """A curve of the same kind from the same A to ``state_b``, carrying a copy of this curve's bends.

        The bends are kept as they are (they live in A's basis), so this is the learned curve moved
        onto another B, e.g. B under a different permutation. This curve is not changed.

        Parameters
        ----------
        state_b
            The new endpoint: the same keys, shapes and dtypes as this curve's B.

        Returns
        -------
        BezierCurve or PolyChainCurve
            Same type, ``num_bends`` and ``trainable_keys``, on the device of this curve's A.
        """
        start = {k: self.start[i] for k, i in self._index.items()}
        end = as_state(state_b, "state_b")
        end = {k: v.to(start[k].device) if k in start else v for k, v in end.items()}
        new = type(self)(start, end, self.num_bends, trainable_keys=self.trainable_keys)
        with torch.no_grad():
            for mine, learned in zip(new.parameters(), self.parameters()):
                mine.copy_(learned)
        return new

    def forward(self, t: float) -> dict[str, Tensor]:
        """Same as :meth:`state_dict_at` (``curve(t)``)."""
        return self.state_dict_at(t)

    def extra_repr(self) -> str:
        return f"num_bends={self.num_bends}, trainable entries={len(self.trainable_keys)}, fixed entries={len(self.fixed_keys)}"


class BezierCurve(_Curve):
    r"""Bezier curve through ``num_bends`` control points, the outer two fixed at A and B.

    .. math::

        \phi(t) = \sum_{k=0}^{m} \binom{m}{k} t^k (1 - t)^{m - k}\,\theta_k,
        \qquad m = \text{num\_bends} - 1,\ \theta_0 = \theta_A,\ \theta_m = \theta_B .

    The interior points start evenly spaced on the segment, so the untrained curve is the straight
    line (Bernstein polynomials reproduce linear functions).

    Parameters
    ----------
    state_a, state_b
        Endpoint state_dicts (or modules) of one architecture, with the same keys, shapes and
        dtypes; for an *aligned* curve pass B's aligned state. Copied into buffers.
    num_bends
        Control points *including* both endpoints (Garipov et al.'s convention): 3 gives a
        quadratic curve with one trainable bend.
    trainable_keys
        Entries the curve parameterises; default every floating entry except BatchNorm
        ``running_mean`` / ``running_var`` (recompute those at each ``t`` instead).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    >>> curve = BezierCurve(a.state_dict(), b.state_dict(), num_bends=3)
    >>> torch.equal(curve.state_dict_at(0.0)["weight"], a.weight.detach())
    True
    >>> curve.state_dict_at(0.5)["weight"].requires_grad
    True
    """

    kind = "bezier"

    def _trainable_at(self, t: float, points: list[Tensor]) -> Tensor:
        m = len(points) - 1
        terms = [point * (math.comb(m, j) * t**j * (1.0 - t) ** (m - j)) for j, point in enumerate(points)]
        out = terms[0]
        for term in terms[1:]:
            out = out + term
        return out


class PolyChainCurve(_Curve):
    r"""Polygonal chain through ``num_bends`` control points at ``t_k = k / (num_bends - 1)``.

    .. math::

        \phi(t) = (1 - s)\,\theta_k + s\,\theta_{k+1},\qquad
        k = \lfloor t\,m \rfloor,\ s = t\,m - k,\ m = \text{num\_bends} - 1 .

    Parameters and initialisation as for :class:`BezierCurve` (``num_bends=3``: one bend at
    ``t = 1/2``).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    >>> curve = PolyChainCurve(a.state_dict(), b.state_dict())
    >>> torch.equal(curve.state_dict_at(1.0)["bias"], b.bias.detach())
    True
    """

    kind = "polychain"

    def _trainable_at(self, t: float, points: list[Tensor]) -> Tensor:
        m = len(points) - 1
        k = min(math.floor(t * m), m - 1)
        s = t * m - k
        return torch.lerp(points[k], points[k + 1], s)


#: Curve classes by their ``kind``, for functions that take ``curve="bezier" | "polychain"``.
CURVE_KINDS: dict[str, type[BezierCurve] | type[PolyChainCurve]] = {c.kind: c for c in (BezierCurve, PolyChainCurve)}


# ----------------------------------------------------------------------------------------------
# training the bends


@dataclass(frozen=True)
class CurveFit:
    """What :func:`fit_curve` did.

    Attributes
    ----------
    loss
        Mean training loss (without the weight-decay term) of each epoch.
    steps
        Optimizer steps taken.
    time_s
        Wall time in seconds.
    """

    loss: tuple[float, ...]
    steps: int
    time_s: float


def _pairs(loader: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    for batch in loader:
        x, y = split_batch(batch)
        if y is None:
            raise RebasinError("fit_curve needs (inputs, targets) batches; the loader yielded inputs only")
        yield x, y


def fit_curve(
    model: nn.Module,
    path: BezierCurve | PolyChainCurve,
    loader: Iterable[Any],
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    optimizer: str = "adam",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    sync: bool = True,
    group: Any = None,
) -> CurveFit:
    r"""Train the bends of the curve ``path`` so that the whole curve has low loss (Garipov et al. 2018).

    Each batch draws one :math:`t \sim U(0, 1)` (from a generator seeded by ``seed``) and takes a
    step on

    .. math::

        \ell\big(f(x; \phi(t)), y\big) + \tfrac{\lambda}{2}\,\lVert \phi(t) \rVert^2

    where :math:`\lambda` is ``weight_decay`` and the norm runs over the curve's trainable entries
    at ``t`` (weight decay on the *point on the curve*, as in the paper, rather than on the bends).
    The unmodified ``model`` is run on :math:`\phi(t)` in training mode through
    :func:`torch.func.functional_call`: BatchNorm normalises with batch statistics (its running
    buffers at ``t`` are throw-away copies), dropout is active and seeded by ``seed``.

    Parameters
    ----------
    model
        The architecture. Unchanged (parameters, buffers, ``training`` flags).
    path
        The :class:`BezierCurve` or :class:`PolyChainCurve` to train (``path=`` is a path object
        everywhere; ``curve=`` a kind). Mutated: its bends are trained in place and it is moved
        to ``device``.
    loader
        Yields ``(inputs, targets)``.
    epochs
        Passes over ``loader`` (positive int).
    lr, weight_decay
        Learning rate and the :math:`\lambda` above.
    seed
        Seeds the draws of ``t`` and dropout (the global RNG state is restored afterwards).
    optimizer
        ``"adam"`` or ``"sgd"`` (momentum 0.9).
    loss_fn
        ``loss_fn(outputs, targets) -> batch mean``; default cross-entropy.
    device
        Where to train; defaults to the curve's device.
    progress
        Show a tqdm bar over epochs; None (default): only when stderr is a terminal (or in Jupyter), so a piped or logged run stays clean.
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default) the bends
        start from the group's first rank's values, their gradient is averaged over the ranks of ``group``
        (None: the default group) before every step, and the reported losses are over every rank's
        examples. Every rank draws the same ``t`` (same ``seed``), so for equal batch sizes each step is the
        one a single process takes on the union of the ranks' batches — except for what depends on the
        batch itself: BatchNorm's batch statistics and dropout masks are per rank (as under
        ``DistributedDataParallel`` without ``SyncBatchNorm``). Every rank needs as many batches.
        ``sync=False``: this process alone.

    Returns
    -------
    CurveFit

    Examples
    --------
    >>> curve = BezierCurve(model_a, aligned_b, num_bends=3)                    # doctest: +SKIP
    >>> fit = fit_curve(model_a, curve, train_loader, epochs=5, lr=1e-3)        # doctest: +SKIP
    >>> res = evaluate_path(model_a, BNResetPath(curve, model_a, train_loader), test_loader)  # doctest: +SKIP
    """
    if not isinstance(path, _Curve):
        raise RebasinError(f"path must be a BezierCurve or PolyChainCurve (a curve with bends), got {type(path).__name__}")
    check_int(epochs, "epochs")
    if not check_float(lr, "lr") > 0:
        raise RebasinError(f"lr must be positive, got {lr!r}")
    if check_float(weight_decay, "weight_decay") < 0:
        raise RebasinError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if optimizer not in ("adam", "sgd"):
        raise RebasinError(f"unknown optimizer {optimizer!r}; valid: ['adam', 'sgd']")
    if loader is None:
        raise RebasinError("fit_curve needs a loader of (inputs, targets) batches")
    check_state_for_model(model, path.state_dict_at(0.0), name="the curve's state")
    if device is None:
        device = path.start.t0.device if path.keys else resolve_device(model, device=None)  # type: ignore[assignment]  # nn.Module attributes are typed Tensor | Module
    device = torch.device(device)  # type: ignore[arg-type]  # device was resolved from the curve or the model just above
    path.to(device)
    params = [p for p in path.parameters() if p.requires_grad]
    red = reducer(sync, group)
    if red is not None:
        with guarded(red, "fit_curve") as outcome:
            outcome.key = fingerprint(path.state_dict_at(0.0), params, epochs)
        red.same_tensors(params)
    loss_fn = cross_entropy_of if loss_fn is None else loss_fn
    opt: torch.optim.Optimizer | None = None
    if params:
        opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(int(seed))
    losses: list[float] = []
    steps = 0
    start = time.perf_counter()
    epoch_iter: Iterable[int] = progress_bar(range(epochs), progress, desc="fit_curve", unit="epoch")
    with own_global_rng(seed, device), training(model):
        for _ in epoch_iter:
            total, count = 0.0, 0
            for x, y in lockstep(red, _pairs(loader), "fit_curve"):
                x, y = to_device(x, device), to_device(y, device)
                t = float(torch.rand((), generator=gen, dtype=torch.float64))
                seen: list[Tensor] = []

                def objective(x: Any = x, y: Any = y, t: float = t, seen: list[Tensor] = seen) -> Tensor:
                    state = path.state_dict_at(t)
                    loss = loss_fn(forward_with_state(model, state, x), y)
                    seen.append(loss.detach())
                    if weight_decay > 0:
                        penalty = sum(state[k].pow(2).sum() for k in path.trainable_keys)
                        return loss + 0.5 * weight_decay * penalty
                    return loss

                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                    synced_backward(red, params, objective, "fit_curve")
                    opt.step()
                    steps += 1
                else:
                    with torch.no_grad():
                        objective()
                n = int(y.shape[0])
                total += float(seen[0]) * n
                count += n
            if red is not None:  # the epoch's mean loss over every rank's examples
                total, count = red.sum_numbers(total, count)  # type: ignore[assignment]  # Reducer.sum_numbers returns floats; these are whole counts
            if count == 0:
                raise RebasinError("fit_curve: the loader yielded no batches")
            losses.append(total / count)
    if red is not None and params:  # decided once: every rank holds the first rank's bends
        red.same_tensors(params)
    return CurveFit(tuple(losses), steps, time.perf_counter() - start)

