r"""Proximal alternating minimisation (PAM): learn a curve's bend and B's permutation together.

Tatro et al. (2020) generalise curve finding to account for the permutation symmetry of the
second endpoint:

.. math::

    \min_{\theta,\;P}\; \mathbb{E}_{t \sim U(0,1)}\,
    \ell\big(f(x;\ \phi_\theta(t;\ \theta_A,\ P\theta_B)),\ y\big),

where :math:`\phi_\theta` is a Bezier or polygonal-chain curve from :math:`\theta_A` to the
permuted :math:`P\theta_B` with trainable bend :math:`\theta` and :math:`P` holds one permutation
matrix per permutation group of the spec. PAM alternates a block step on each variable:

* **bend step** (:math:`P` fixed): ``theta_steps`` Adam steps on :math:`\theta`, one batch and one
  :math:`t \sim U(0,1)` each, exactly as :func:`rebasin.fit_curve` trains a curve;
* **permutation step** (:math:`\theta` fixed): a linearised proximal step
  :math:`P \leftarrow \mathrm{Proj}(P - \eta\,\nabla_P L)`.

The paper's step projects onto the permutation matrices, i.e. solves the linear assignment
:math:`\arg\max_{Q \in \Pi}\langle Q,\ P - \eta\nabla_P L\rangle`. Here :math:`P` is relaxed to a
doubly stochastic matrix :math:`S` (a point of the Birkhoff polytope) and the projection is its
entropy-smoothed version, computed by :func:`rebasin.sinkhorn`:

.. math::

    S \leftarrow \operatorname*{arg\,max}_{S' \in \mathcal{B}_n}\;
    \langle S',\ S - \eta\,\hat G\rangle - \tau \sum_{ij} S'_{ij}(\log S'_{ij} - 1)
    \;=\; \mathrm{Sinkhorn}\big((S - \eta \hat G)/\tau\big),

with :math:`\hat G` the gradient :math:`\nabla_S L` made doubly centred (row and column means
removed: the components Sinkhorn ignores) and divided by its largest absolute entry, so that
``perm_lr`` is in the units of the entries of :math:`S` (a swap of two assignments needs a step
of about 1 or more). As :math:`\tau \to 0` this is exactly the paper's update; a small
:math:`\tau` keeps :math:`S` close to a permutation, so the curve's endpoint stays close to a real
network, while a wrong assignment can still be left when the gradient says so (the previous
:math:`S` enters only linearly, with weight :math:`1/\tau`). Only the forward map is needed
(``grad="detach"``): the gradient is taken with respect to :math:`S` itself, through
:func:`rebasin.soft_permute`, so there is no custom backward here.

Step acceptance. :math:`\nabla_S L` is averaged over ``perm_batches`` batches whose :math:`t` are
stratified over :math:`[0, 1]` (batch :math:`i` of :math:`m` draws :math:`t \in [i/m, (i+1)/m)`),
and the step is accepted only if it does not raise the loss on those same batches, positions and
dropout masks; otherwise :math:`\eta` is halved up to ``max_backtracks`` times and then the step
is skipped (a backtracking proximal-gradient step: the block objective never increases on the
sample). Without this guard the linearised move, which predicts a full swap of units from a
first-order expansion, drifts away even from a correct permutation.

What to expect. The permutation step is local: started from weight matching it changes few units
and the loss barely moves (the paper's observation that alignment is close to locally optimal);
started from the identity it does *not* find a good alignment of two unrelated networks (nor a
planted permutation of A): the loss along a curve whose bend is being trained is nearly flat in
single swaps. Start from an alignment (``init="weight_matching"``, the default).

At the end :math:`S` is rounded to the nearest permutation by linear assignment
(:func:`rebasin.matrix_to_perm`), the curve is rebuilt between A and the hard-permuted B with the
learned bend, and optionally fine-tuned for ``finetune_steps`` more bend steps.

The bend lives in A's basis (A is never permuted), so it needs no change when :math:`P` changes.

Reference: N. J. Tatro, P.-Y. Chen, P. Das, I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode
Connectivity via Neuron Alignment", NeurIPS 2020 (section on proximal alternating minimisation).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .._common import (
    as_state,
    check_float,
    check_int,
    check_pair,
    check_state_for_model,
    forward_with_state,
    resolve_device,
    split_batch,
    to_device,
    training,
)
from .._errors import RebasinError
from ..matching.sinkhorn_op import sinkhorn
from ..spec.core import PermutationSpec, check_permutations, permute
from ..spec.soft import matrix_to_perm, perm_to_matrix, soft_permute
from .curves import CURVE_KINDS, BezierCurve, PolyChainCurve

__all__ = ["PAM_CURVES", "PAM_INITS", "PAMResult", "proximal_alternating_minimization"]

#: Curve kinds accepted by ``curve=``.
PAM_CURVES: tuple[str, ...] = tuple(CURVE_KINDS)
#: Named starting permutations accepted by ``init=`` (a dict of permutations is accepted too).
PAM_INITS: tuple[str, ...] = ("identity", "weight_matching")

# Warn when the final soft permutations' row sums are off by more than this.
_MARGINAL_WARN = 1e-2
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class PAMResult:
    r"""What :func:`proximal_alternating_minimization` found.

    Attributes
    ----------
    perms
        ``{perm: int64 CPU tensor (n,)}`` in the toolkit's convention: ``permute(spec, perms,
        state_b)`` is B aligned to A.
    curve
        A :class:`~rebasin.BezierCurve` or :class:`~rebasin.PolyChainCurve` from ``state_a`` to
        ``permute(spec, perms, state_b)`` (exactly, at ``t = 0`` and ``t = 1``) with the learned
        bend; pass it to :func:`rebasin.evaluate_path` as ``path=``.
    history
        Mean training loss of each round (bend steps and permutation-step batches together).
    changed
        After each round, how many units' rounded (hard) assignment differ from the round before.
    perm_steps
        The step :math:`\eta` each round's permutation step took after backtracking (0: rejected).
    soft
        The final doubly stochastic matrices ``{perm: (n, n)}`` before rounding.
    finetune_loss
        Mean training loss of the fine-tuning steps with the hard permutation (NaN without them).
    time_s
        Wall time in seconds.
    """

    perms: dict[str, Tensor]
    curve: BezierCurve | PolyChainCurve
    history: tuple[float, ...]
    changed: tuple[int, ...]
    perm_steps: tuple[float, ...]
    soft: dict[str, Tensor]
    finetune_loss: float
    time_s: float


def _cycle(loader: Iterable[Any]) -> Iterator[Any]:
    """Batches of ``loader`` forever, pass after pass (a new ``iter`` each pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RebasinError("proximal_alternating_minimization: the loader yielded no batches")


def _curve_state(curve: BezierCurve | PolyChainCurve, end: Mapping[str, Tensor], t: float) -> dict[str, Tensor]:
    """``curve.state_dict_at(t)`` with its far endpoint replaced by ``end`` (possibly differentiable).

    The curve's own formula is reused: its endpoint buffers are swapped for ``end`` through
    :func:`torch.func.functional_call` for this one call. Entries the curve does not train
    (BatchNorm running statistics, placeholders in training mode) are detached.
    """
    swap = {f"end.t{curve._index[k]}": end[k] for k in curve.keys}
    state = functional_call(curve, swap, (t,), strict=False, tie_weights=False)
    return {k: (v if k in curve._trainable_index else v.detach()) for k, v in state.items()}


def _initial_perms(
    init: str | Mapping[str, Tensor], spec: PermutationSpec, sizes: Mapping[str, int],
    state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], seed: int,
) -> dict[str, Tensor]:
    if isinstance(init, str):
        if init == "identity":
            return {p: torch.arange(sizes[p]) for p in spec.perms}
        if init == "weight_matching":
            from ..matching.weight import weight_matching

            return weight_matching(spec, state_a, state_b, seed=seed)
        raise RebasinError(f"unknown init {init!r}; valid: {list(PAM_INITS)} or a dict of permutations")
    if not isinstance(init, Mapping):
        raise RebasinError(f"init must be one of {list(PAM_INITS)} or a dict of permutations, got {type(init).__name__}")
    check_permutations(spec, init, sizes)
    return {p: (init[p].detach().long().cpu() if p in init else torch.arange(sizes[p])) for p in spec.perms}


def _centred_direction(g: Tensor) -> Tensor:
    """``g`` minus its row and column means (the part Sinkhorn sees), scaled to max |entry| 1."""
    g = g - g.mean(-1, keepdim=True) - g.mean(-2, keepdim=True) + g.mean()
    scale = g.abs().max()
    return g / scale if float(scale) > 0 else g


def proximal_alternating_minimization(
    model: nn.Module,
    state_a: Mapping[str, Tensor] | nn.Module,
    state_b: Mapping[str, Tensor] | nn.Module,
    loader: Iterable[Any],
    *,
    spec: PermutationSpec | None = None,
    example_input: Any = None,
    curve: str = "bezier",
    num_bends: int = 3,
    rounds: int = 10,
    theta_steps: int = 20,
    lr: float = 1e-3,
    perm_lr: float = 1.0,
    perm_batches: int = 2,
    max_backtracks: int = 3,
    tau: float = 0.05,
    sinkhorn_iters: int = 1000,
    init: str | Mapping[str, Tensor] = "weight_matching",
    finetune_steps: int = 0,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> PAMResult:
    r"""Jointly learn a low-loss curve's bend and the permutation of B (Tatro et al. 2020, PAM).

    Minimises :math:`\mathbb{E}_{t\sim U(0,1)}\,\ell(f(x; \phi_\theta(t; \theta_A, P\theta_B)), y)`
    over the bend :math:`\theta` and the permutations :math:`P` by alternating, for ``rounds``
    rounds, ``theta_steps`` Adam steps on :math:`\theta` with :math:`P` fixed and one proximal step
    on the relaxed (doubly stochastic) :math:`S`,

    .. math::

        S \leftarrow \mathrm{Sinkhorn}\big((S - \eta\,\hat G)/\tau\big),\qquad
        \hat G = \frac{\mathrm{dc}(\nabla_S L)}{\lVert \mathrm{dc}(\nabla_S L)\rVert_\infty},

    where :math:`\mathrm{dc}` removes row and column means and :math:`\nabla_S L` is averaged over
    ``perm_batches`` batches with stratified :math:`t`; the step is halved (up to
    ``max_backtracks`` times) until it does not raise the loss on those batches, else skipped.
    This is the entropy-smoothed form of the paper's projected step
    :math:`P \leftarrow \mathrm{Proj}_\Pi(P - \eta\nabla_P L)` (the limit :math:`\tau\to 0`); see
    the module documentation. Each soft :math:`S` acts on B through :func:`rebasin.soft_permute`.
    Finally :math:`S` is rounded by linear assignment, the curve is rebuilt between A and the
    hard-permuted B with the learned bend, and fine-tuned for ``finetune_steps`` bend steps.

    The curve starts as the one :class:`~rebasin.BezierCurve` builds between A and the initially
    permuted B: bends evenly spaced on the segment (the midpoint for one bend). The model runs in
    training mode on :math:`\phi(t)` like :func:`rebasin.fit_curve`: BatchNorm normalises with
    batch statistics, dropout is active and seeded by ``seed``; the global RNG state is restored.

    Parameters
    ----------
    model
        The architecture. Unchanged (parameters, buffers, ``training`` flags).
    state_a, state_b
        Full state_dicts (or modules) of the two endpoints. Not mutated.
    loader
        Yields ``(inputs, targets)``; cycled through as often as needed. Batches are drawn in
        the loader's order: for reproducible results give it a fixed shuffling generator.
    spec
        Permutation spec; traced with :func:`rebasin.spec_from_model` from ``example_input``
        (or the loader's first inputs) when omitted.
    example_input
        Input used to trace the spec.
    curve
        ``"bezier"`` or ``"polychain"``.
    num_bends
        Control points including both endpoints (3: one bend).
    rounds
        Alternation rounds (``>= 1``).
    theta_steps
        Bend steps per round (``>= 0``; 0 learns only the permutation along the initial curve).
    lr
        Adam learning rate of the bend (as in :func:`rebasin.fit_curve`).
    perm_lr
        :math:`\eta`, the permutation step in units of :math:`S`'s entries (``> 0``).
    perm_batches
        Batches (one stratified :math:`t` each) whose gradients are averaged for each permutation
        step and on which the step is checked (``>= 1``).
    max_backtracks
        Halvings of ``perm_lr`` tried before a permutation step is skipped (``>= 0``).
    tau
        Sinkhorn temperature of the projection (``> 0``; small keeps :math:`S` near a permutation).
    sinkhorn_iters
        Sinkhorn iterations per projection (``>= 1``; stops early at marginal error 1e-6). A
        warning says so when the final matrices are still off by more than 1e-2.
    init
        Starting permutations: ``"weight_matching"`` (:func:`rebasin.weight_matching`, seeded by
        ``seed``), ``"identity"``, or a dict ``{perm: LongTensor}`` (missing names: identity).
    finetune_steps
        Bend steps after rounding to a hard permutation (``>= 0``).
    loss_fn
        ``loss_fn(outputs, targets) -> batch mean``; default cross-entropy.
    seed
        Seeds the draws of :math:`t`, dropout and weight matching's visiting order.
    device
        Where to compute; default the model's device.
    progress
        Show a tqdm bar over rounds.

    Returns
    -------
    PAMResult

    Raises
    ------
    RebasinError
        Unknown ``curve`` or ``init`` (the valid ones are listed), a count or step size out of
        range, state_dicts that do not match each other, the model or the spec, NaN or inf in
        them, a loader yielding no or unlabelled batches, or a non-finite loss.

    Warns
    -----
    UserWarning
        When the final soft permutations are off the doubly stochastic set by more than 1e-2
        (raise ``sinkhorn_iters`` or ``tau``).

    Examples
    --------
    >>> res = proximal_alternating_minimization(model, sa, sb, train_loader, example_input=x[:2])  # doctest: +SKIP
    >>> evaluate_path(model, None, None, test_loader, path=res.curve).barrier()                  # doctest: +SKIP
    """
    start_time = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise RebasinError(f"model must be an nn.Module, got {type(model).__name__}")
    if curve not in PAM_CURVES:
        raise RebasinError(f"unknown curve {curve!r}; valid: {list(PAM_CURVES)}")
    check_int(rounds, "rounds", 1)
    check_int(theta_steps, "theta_steps", 0)
    check_int(perm_batches, "perm_batches", 1)
    check_int(max_backtracks, "max_backtracks", 0)
    check_int(sinkhorn_iters, "sinkhorn_iters", 1)
    check_int(finetune_steps, "finetune_steps", 0)
    for name, value in (("lr", lr), ("perm_lr", perm_lr), ("tau", tau)):
        if not check_float(value, name) > 0:
            raise RebasinError(f"{name} must be positive, got {value!r}")
    if loader is None:
        raise RebasinError("proximal_alternating_minimization needs a loader of (inputs, targets) batches")
    a, b = as_state(state_a, "state_a"), as_state(state_b, "state_b")
    check_pair(a, b)
    check_state_for_model(model, a, name="state_a")
    if spec is None:
        from ..trace.tracing import spec_for

        spec = spec_for(model, example_input=example_input, loader=loader)
    if not isinstance(spec, PermutationSpec):
        raise RebasinError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    sizes = spec.validate_pair(a, b)
    device = resolve_device(model, device=device)
    a = {k: v.to(device) for k, v in a.items()}
    b = {k: v.to(device) for k, v in b.items()}
    start_perms = _initial_perms(init, spec, sizes, a, b, seed)
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn

    dtype = next((v.dtype for v in a.values() if v.is_floating_point()), torch.float32)
    soft = {p: perm_to_matrix(start_perms[p], dtype=dtype, device=device) for p in spec.perms}
    path = CURVE_KINDS[curve](a, permute(spec, start_perms, b), num_bends=num_bends).to(device)
    gen = torch.Generator().manual_seed(int(seed))
    batches = _cycle(loader)

    def _draw(stratum: int = 0, strata: int = 1) -> tuple[Any, Any, float]:
        x, y = split_batch(next(batches))
        if y is None:
            raise RebasinError("proximal_alternating_minimization needs (inputs, targets) batches; got inputs only")
        t = (stratum + float(torch.rand((), generator=gen, dtype=torch.float64))) / strata
        return to_device(x, device), to_device(y, device), t

    def _loss(
        end: Mapping[str, Tensor], on: BezierCurve | PolyChainCurve, x: Any, y: Any, t: float, rng: int | None = None
    ) -> Tensor:
        if rng is not None:  # the same dropout masks for the step's base and trial evaluations
            torch.manual_seed(rng)
        loss = loss_fn(forward_with_state(model, _curve_state(on, end, t), x), y)
        if not bool(torch.isfinite(loss.detach())):
            raise RebasinError(f"the training loss became {float(loss)} at t={t:.3g}; lower lr or perm_lr")
        return loss

    def next_loss(end: Mapping[str, Tensor], on: BezierCurve | PolyChainCurve) -> tuple[Tensor, int]:
        x, y, t = _draw()
        return _loss(end, on, x, y, t), int(y.shape[0])

    def bend_steps(on: BezierCurve | PolyChainCurve, end: Mapping[str, Tensor], opt: Any, n: int) -> tuple[float, int]:
        total, count = 0.0, 0
        for _ in range(n):
            loss, m = next_loss(end, on)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            total, count = total + float(loss.detach()) * m, count + m
        return total, count

    def make_opt(on: nn.Module) -> torch.optim.Optimizer | None:
        params = [p for p in on.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=lr) if params else None

    history: list[float] = []
    changed: list[int] = []
    steps: list[float] = []
    hard = {p: v.clone() for p, v in start_perms.items()}
    opt = make_opt(path)
    round_iter: Iterable[int] = range(rounds)
    if progress:
        from tqdm.auto import tqdm

        round_iter = tqdm(round_iter, desc="PAM", unit="round")
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), training(model):
        torch.manual_seed(int(seed))
        for _ in round_iter:
            # (a) bend steps with the (soft) permutation fixed
            with torch.no_grad():
                end = soft_permute(spec, soft, b)
            total, count = bend_steps(path, end, opt, theta_steps)
            # (b) one entropic proximal step on the soft permutations with the bend fixed
            leaves = {p: s.detach().clone().requires_grad_(True) for p, s in soft.items()}
            grads = {p: torch.zeros_like(s) for p, s in soft.items()}
            draws = [(*_draw(i, perm_batches), int(torch.randint(2**62, (), generator=gen))) for i in range(perm_batches)]
            base = 0.0
            for x, y, t, rng in draws:
                loss = _loss(soft_permute(spec, leaves, b), path, x, y, t, rng)
                got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                for p, g in zip(leaves, got):
                    if g is not None:
                        grads[p] += g / perm_batches
                base += float(loss.detach()) / perm_batches
                total, count = total + float(loss.detach()) * int(y.shape[0]), count + int(y.shape[0])
            direction = {p: _centred_direction(g) for p, g in grads.items()}
            step = float(perm_lr)
            for _ in range(max_backtracks + 1):
                trial = {
                    p: sinkhorn(soft[p] - step * direction[p], tau=float(tau), n_iter=sinkhorn_iters,
                                grad="detach", tol=1e-6, warn=False)
                    for p in spec.perms
                }
                with torch.no_grad():
                    end = soft_permute(spec, trial, b)
                    value = sum(float(_loss(end, path, *draw)) for draw in draws) / perm_batches
                if value <= base:
                    soft = trial
                    break
                step *= 0.5
            steps.append(step if value <= base else 0.0)
            now = {p: matrix_to_perm(s).cpu() for p, s in soft.items()}
            changed.append(sum(int((now[p] != hard[p]).sum()) for p in spec.perms))
            hard = now
            history.append(total / count)

        err = max((float((s.sum(-1) - 1).abs().max()) for s in soft.values()), default=0.0)
        if err > _MARGINAL_WARN:
            warnings.warn(
                f"proximal_alternating_minimization: the last Sinkhorn projection is off the doubly "
                f"stochastic set by {err:.3g} (row sums); raise sinkhorn_iters or tau",
                UserWarning,
                stacklevel=2,
            )
        perms = hard
        final = CURVE_KINDS[curve](a, permute(spec, perms, b), num_bends=num_bends).to(device)
        with torch.no_grad():
            for mine, learned in zip(final.parameters(), path.parameters()):
                mine.copy_(learned)
        finetune_loss = float("nan")
        if finetune_steps:
            end = {k: final.end[final._index[k]] for k in final.keys}
            total, count = bend_steps(final, end, make_opt(final), finetune_steps)
            finetune_loss = total / count
    return PAMResult(
        perms=perms,
        curve=final,
        history=tuple(history),
        changed=tuple(changed),
        perm_steps=tuple(steps),
        soft={p: s.detach() for p, s in soft.items()},
        finetune_loss=finetune_loss,
        time_s=time.perf_counter() - start_time,
    )
