r"""Plain functions behind :class:`continual.MCSGD` (no Avalanche import): losses along line segments.

Mirzadeh et al. (2021), "Linear Mode Connectivity in Multitask and Continual Learning" (MC-SGD), look
for a solution :math:`\bar w_t` for tasks :math:`1..t` that is linearly connected, through low loss,
to the continual minima :math:`\hat w_1, \dots, \hat w_t` (each trained from the previous
:math:`\bar w` on one task). With an episodic memory :math:`M` (a few samples of every task seen),
the objective of :math:`w` is the memory loss sampled along the segments from each anchor
:math:`\hat w_j` to :math:`w`:

.. math::

    \mathcal{L}_{\text{line}}(w) = \frac{1}{t\,n} \sum_{j=1}^{t} \sum_{k=1}^{n}
        \ell_M\!\big(\hat w_j + \tfrac{k}{n}\,(w - \hat w_j)\big),

where :math:`\ell_M` is the mean loss on a batch of the memory and :math:`n` the number of points
per line. The point :math:`k = 0` (the anchor itself) is left out: it does not depend on :math:`w`.
The paper sums the terms; the mean here only rescales the learning rate, and keeps the step size
independent of the number of tasks.

The reference implementation (imirzadeh/CL-LinearModeConnectivity, read for its arithmetic, not copied)
takes a different step, reproduced by :func:`reference_line_loss` and :func:`fit_paired_lines`: two
segments only, each with its own data — :math:`\bar w_{t-1} \to w` on the episodic memory and
:math:`\hat w_t \to w` on a subset of the current task — and, on each, the update direction

.. math::

    g(a, w) = \sum_{k=0}^{n} (n + 1 - k)\, \nabla \ell_B\big(a + \tfrac{k}{n}(w - a)\big) / |B|,

the gradient of the batch-mean loss *at* each point (not through the interpolation: no factor
:math:`k/n`, and the anchor itself, :math:`k = 0`, counts), weighted :math:`n + 1 - k` because the
gradients accumulate on one module from point to point and every partial sum is added, and divided
by the batch size because the batch-mean loss is divided by the number of samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from rebasin import RebasinError
from rebasin.paths.running import evaluating

__all__ = ["line_points", "line_loss", "fit_on_lines", "LineFit", "REDUCTIONS", "STEPS", "reference_line_loss",
           "fit_paired_lines"]

#: How :func:`line_loss` combines its batch losses.
REDUCTIONS = ("mean", "sum")
#: When :func:`fit_paired_lines` steps: after every batch, or once per epoch.
STEPS = ("batch", "epoch")

State = Mapping[str, Tensor]


def line_points(n: int) -> tuple[float, ...]:
    """The ``n`` interpolation weights ``k/n`` (``k = 1..n``) of :math:`w` on each segment.

    Examples
    --------
    >>> line_points(4)
    (0.25, 0.5, 0.75, 1.0)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RebasinError(f"line_points must be a positive int, got {n!r}")
    return tuple(k / n for k in range(1, n + 1))


def line_loss(
    model: nn.Module,
    params: Mapping[str, Tensor],
    anchors: Sequence[State],
    x: Tensor,
    y: Tensor,
    *,
    points: Sequence[float],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Mean loss of ``(x, y)`` at ``points`` along the segment from every anchor to ``params``.

    Parameters
    ----------
    model
        Provides the architecture (and its buffers); its own parameters are not read nor changed.
    params
        :math:`w`: a tensor for every parameter name of ``model`` (differentiable: the loss is built
        with :func:`torch.func.functional_call`).
    anchors
        The :math:`\hat w_j`: mappings holding (at least) every parameter name of ``model``.
    x, y
        One batch (inputs, integer targets), on the device of ``params`` (the model's buffers are copied
        there when they live elsewhere).
    points
        Interpolation weights of ``params`` on each segment (0: the anchor, 1: ``params``).
    loss_fn
        ``loss_fn(outputs, targets)`` returning the batch mean; cross-entropy by default.
    reduction
        ``"mean"`` (default) or ``"sum"`` (the paper's sum over lines and points) of the batch losses.

    Returns
    -------
    Tensor
        A scalar: the mean (or sum) of ``len(anchors) * len(points)`` batch losses.
    """
    if reduction not in REDUCTIONS:
        raise RebasinError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    if not anchors:
        raise RebasinError("line_loss needs at least one anchor")
    if not points:
        raise RebasinError("line_loss needs at least one point per line")
    loss_fn = nn.functional.cross_entropy if loss_fn is None else loss_fn
    names = [name for name, _ in model.named_parameters()]
    missing = [n for n in names if n not in params]
    if missing:
        raise RebasinError(f"line_loss: params miss the model's parameter(s) {missing}")
    buffers = {n: b.to(x.device) for n, b in model.named_buffers()}  # running statistics follow the data
    total = None
    count = 0
    for j, anchor in enumerate(anchors):
        gone = [n for n in names if n not in anchor]
        if gone:
            raise RebasinError(f"line_loss: anchor {j} misses the model's parameter(s) {gone}")
        for t in points:
            point = {n: anchor[n] + float(t) * (params[n] - anchor[n]) for n in names}
            out = functional_call(model, {**buffers, **point}, (x,))
            loss = loss_fn(out, y)
            total = loss if total is None else total + loss
            count += 1
    return total / count if reduction == "mean" else total  # type: ignore[operator, return-value]  # total is a Tensor after the loop: the lines and points are non-empty


@dataclass(frozen=True)
class LineFit:
    """What :func:`fit_on_lines` did.

    Attributes
    ----------
    state
        The fitted parameters (new tensors, detached), keyed like ``model.named_parameters()``.
    loss_before, loss_after
        The line loss over the whole memory at the start and at the end.
    steps
        Optimiser steps taken.
    time_s
        Wall time.
    """

    state: dict[str, Tensor]
    loss_before: float
    loss_after: float
    steps: int
    time_s: float


def _memory_line_loss(model, params, anchors, x, y, *, points, loss_fn, reduction, batch_size) -> float:
    with torch.no_grad():
        total, n = 0.0, 0
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            loss = line_loss(model, params, anchors, xb, yb, points=points, loss_fn=loss_fn, reduction=reduction)
            total += float(loss) * xb.shape[0]
            n += xb.shape[0]
    return total / n


def fit_on_lines(
    model: nn.Module,
    start: State,
    anchors: Sequence[State],
    memory: tuple[Tensor, Tensor],
    *,
    points: Sequence[float],
    lr: float,
    momentum: float = 0.0,
    epochs: int = 1,
    batch_size: int = 64,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    reduction: str = "mean",
    seed: int = 0,
    device: str | torch.device | None = None,
) -> LineFit:
    r"""Minimise :func:`line_loss` over the memory with SGD, starting from ``start`` (MC-SGD's second step).

    Parameters
    ----------
    model
        The architecture (and its buffers); not changed.
    start
        :math:`\bar w_{t-1}`, the initial point (parameters of ``model``, extra keys ignored).
    anchors
        :math:`\hat w_1, \dots, \hat w_t`.
    memory
        ``(x, y)``: the episodic memory of every task so far, current task included.
    points, loss_fn, reduction
        As for :func:`line_loss`.
    lr, momentum
        Of :class:`torch.optim.SGD`.
    epochs
        Passes over the memory (shuffled with a generator seeded by ``seed``; the global RNG is not used).
    batch_size
        Memory samples per step.
    device
        Where to compute; the model's parameters' device when None.

    Returns
    -------
    LineFit
        The fitted parameters on ``device`` and the memory line loss before and after.

    Notes
    -----
    The model runs in evaluation mode throughout (no dropout, so no draw from the global RNG; batch
    norm uses ``model``'s running statistics).
    """
    start_time = time.perf_counter()
    x, y = memory
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise RebasinError(f"the memory must hold the same positive number of inputs and targets, got "
                           f"{tuple(x.shape)} and {tuple(y.shape)}")
    if device is None:
        device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    names = [name for name, _ in model.named_parameters()]
    params = {n: start[n].detach().to(device).clone().requires_grad_(True) for n in names}
    anchors = [{n: a[n].detach().to(device) for n in names} for a in anchors]
    optimizer = torch.optim.SGD(list(params.values()), lr=lr, momentum=momentum)
    kwargs = {"points": points, "loss_fn": loss_fn, "reduction": reduction}
    g = torch.Generator().manual_seed(int(seed))
    steps = 0
    # eval mode: no dropout draws from the global RNG, batch norm uses the model's running statistics
    with evaluating(model):
        before = _memory_line_loss(model, params, anchors, x, y, batch_size=batch_size, **kwargs)
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=g).to(device)
            for i in range(0, x.shape[0], batch_size):
                idx = order[i : i + batch_size]
                optimizer.zero_grad(set_to_none=True)
                line_loss(model, params, anchors, x[idx], y[idx], **kwargs).backward()  # type: ignore[arg-type]  # the options dict mixes value types; each key goes to its own parameter
                optimizer.step()
                steps += 1
        after = _memory_line_loss(model, params, anchors, x, y, batch_size=batch_size, **kwargs)
    state = {n: p.detach().clone() for n, p in params.items()}
    return LineFit(state, before, after, steps, time.perf_counter() - start_time)


def reference_line_loss(
    model: nn.Module,
    params: Mapping[str, Tensor],
    anchor: State,
    x: Tensor,
    y: Tensor,
    *,
    n_points: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    r"""A surrogate whose gradient in ``params`` is the reference MC-SGD update direction :math:`g(a, w)` (module doc).

    Every point :math:`p_k = a + \tfrac{k}{n}(w - a)` (``k = 0..n_points``) enters as
    ``p_k.detach() + (w - w.detach())``: its value is :math:`p_k`, its gradient in :math:`w` the identity.
    The returned value is :math:`\sum_k (n + 1 - k)\, \ell_B(p_k) / |B|`.

    Parameters
    ----------
    model
        Provides the architecture and buffers; its parameters are neither read nor changed.
    params
        :math:`w`, differentiable tensors for every parameter name of ``model``.
    anchor
        :math:`a` (at least every parameter name of ``model``).
    x, y
        One batch, on the device of ``params`` (the model's buffers are copied there when they live elsewhere).
    n_points
        :math:`n`: the segment is sampled at ``k / n`` for ``k = 0..n``.
    loss_fn
        Batch-mean loss; cross-entropy by default.

    Notes
    -----
    The model runs in whatever mode it is in: call it in evaluation mode (as :func:`fit_paired_lines`
    does), or batch norm updates its running statistics and dropout draws from the global RNG.
    """
    points = line_points(n_points)
    loss_fn = nn.functional.cross_entropy if loss_fn is None else loss_fn
    if x.shape[0] == 0:
        raise RebasinError("reference_line_loss needs a non-empty batch")
    names = [name for name, _ in model.named_parameters()]
    missing = [n for n in names if n not in params or n not in anchor]
    if missing:
        raise RebasinError(f"reference_line_loss: params or anchor miss the model's parameter(s) {missing}")
    buffers = {n: b.to(x.device) for n, b in model.named_buffers()}  # running statistics follow the data
    total = None
    for k, t in enumerate((0.0, *points)):
        with torch.no_grad():
            fixed = {n: anchor[n] + t * (params[n] - anchor[n]) for n in names}
        point = {n: fixed[n] + (params[n] - params[n].detach()) for n in names}
        loss = (n_points + 1 - k) * loss_fn(functional_call(model, {**buffers, **point}, (x,)), y)
        total = loss if total is None else total + loss
    return total / x.shape[0]  # type: ignore[operator, return-value]  # total is a Tensor after the loop: it runs at least once (t = 0)


def fit_paired_lines(
    model: nn.Module,
    start: State,
    lines: Sequence[tuple[State, tuple[Tensor, Tensor], int]],
    *,
    n_points: int,
    lr: float,
    momentum: float = 0.0,
    epochs: int = 1,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    step_every: str = "batch",
) -> LineFit:
    r"""The reference implementation's mode-connectivity step: SGD on :func:`reference_line_loss`, one data set per line.

    Parameters
    ----------
    model
        The architecture (and its buffers); not changed.
    start
        The initial point.
    lines
        ``(anchor, (x, y), batch_size)`` for every segment; MC-SGD passes
        :math:`(\bar w_{t-1}, \text{memory}, \cdot)` and :math:`(\hat w_t, \text{current subset}, \cdot)`.
        Each data set is shuffled (seeded) and cut into batches of its own size; step ``i`` adds the
        surrogates of the lines that still have an ``i``-th batch, so an epoch takes as many steps as
        the longest line has batches.
    n_points, loss_fn
        As for :func:`reference_line_loss`.
    lr, momentum, epochs
        Of the :class:`torch.optim.SGD` run (``epochs`` passes).
    seed
        Seeds the shuffling (the global RNG is not used).
    device
        Where to compute; the model's parameters' device when None.
    step_every
        ``"batch"`` (default): one SGD step per batch index, as above (the reference code from its
        Permuted MNIST configuration's commit on). ``"epoch"``: one step per epoch, on the direction summed
        over every batch of every line, each batch weighted by its share of its line's data:
        :math:`\sum_b \sum_k (n + 1 - k)\, \nabla \ell_{B_b}(p_k) / N` per line of :math:`N` samples, for any
        batch sizes (with equal batches, :math:`g` of the whole line's data times :math:`N / |B|`). That is the
        reference code at its Rotated MNIST configuration's commit, which sums the batch-mean losses over the
        whole loader, divides by the number of samples and steps once; its ``lmc_lr`` of 0.15 belongs to
        this step.

    Returns
    -------
    LineFit
        ``loss_before`` / ``loss_after``: the batch-mean loss at ``k / n_points`` (``k = 1..n``) along
        every line on its own data, averaged over the lines.
    """
    start_time = time.perf_counter()
    if not lines:
        raise RebasinError("fit_paired_lines needs at least one line")
    if step_every not in STEPS:
        raise RebasinError(f"unknown step_every {step_every!r}; choose one of {STEPS}")
    per_batch = step_every == "batch"
    if device is None:
        device = next(model.parameters()).device
    names = [name for name, _ in model.named_parameters()]
    points = line_points(n_points)  # checks n_points first
    data = []
    for j, (anchor, (x, y), batch_size) in enumerate(lines):
        gone = [n for n in names if n not in anchor]
        if gone:
            raise RebasinError(f"fit_paired_lines: line {j}'s anchor misses the model's parameter(s) {gone}")
        if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
            raise RebasinError(f"line {j}: the data must hold the same positive number of inputs and targets, "
                               f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise RebasinError(f"line {j}: batch_size must be a positive int, got {batch_size!r}")
        data.append(({n: anchor[n].detach().to(device) for n in names}, x.to(device), y.to(device), batch_size))
    missing = [n for n in names if n not in start]
    if missing:
        raise RebasinError(f"fit_paired_lines: start misses the model's parameter(s) {missing}")
    params = {n: start[n].detach().to(device).clone().requires_grad_(True) for n in names}
    optimizer = torch.optim.SGD(list(params.values()), lr=lr, momentum=momentum)
    g = torch.Generator().manual_seed(int(seed))

    def mean_line_loss() -> float:
        losses = [_memory_line_loss(model, params, [a], x, y, points=points, loss_fn=loss_fn, reduction="mean",
                                    batch_size=1000) for a, x, y, _ in data]
        return sum(losses) / len(losses)

    sizes = [x.shape[0] for _, x, _, _ in data]
    steps = 0
    with evaluating(model):  # as in fit_on_lines
        before = mean_line_loss()
        for _ in range(epochs):
            batches = []
            for anchor, x, y, batch_size in data:
                order = torch.randperm(x.shape[0], generator=g).to(device)
                batches.append([(anchor, x[order[i : i + batch_size]], y[order[i : i + batch_size]])
                                for i in range(0, x.shape[0], batch_size)])
            optimizer.zero_grad(set_to_none=True)
            for i in range(max(len(b) for b in batches)):
                if per_batch:
                    optimizer.zero_grad(set_to_none=True)
                loss = sum(reference_line_loss(model, params, a, xb, yb, n_points=n_points, loss_fn=loss_fn)
                           * (1.0 if per_batch else xb.shape[0] / size)
                           for b, size in zip(batches, sizes) if i < len(b) for a, xb, yb in [b[i]])
                loss.backward()  # type: ignore[union-attr]  # sum() over tensors is typed with its start value 0
                if per_batch:
                    optimizer.step()
                    steps += 1
            if not per_batch:
                optimizer.step()
                steps += 1
        after = mean_line_loss()
    state = {n: p.detach().clone() for n, p in params.items()}
    return LineFit(state, before, after, steps, time.perf_counter() - start_time)
