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
  :math:`t \sim U(0,1)` each, exactly as :func:`rebasin.fit_curve` trains a curve (``_pam_steps.bend_steps``);
* **permutation step** (:math:`\theta` fixed): a linearised proximal step
  :math:`P \leftarrow \mathrm{Proj}(P - \eta\,\nabla_P L)` (``_pam_steps.proximal_step``, its
  options in :class:`ProximalStep`).

The paper's step projects onto the permutation matrices, i.e. solves the linear assignment
:math:`\arg\max_{Q \in \Pi}\langle Q,\ P - \eta\nabla_P L\rangle`. Here :math:`P` is relaxed to a
doubly stochastic matrix :math:`S` (a point of the Birkhoff polytope) and the projection is its
entropy-smoothed version, computed by :func:`rebasin.matching.sinkhorn`:

.. math::

    S \leftarrow \operatorname*{arg\,max}_{S' \in \mathcal{B}_n}\;
    \langle S',\ S - \eta\,\hat G\rangle - \tau \sum_{ij} S'_{ij}(\log S'_{ij} - 1)
    \;=\; \mathrm{Sinkhorn}\big((S - \eta \hat G)/\tau\big),

with :math:`\hat G` the gradient :math:`\nabla_S L` made doubly centred (row and column means
removed: the components Sinkhorn ignores) and divided by its largest absolute entry, so that
:math:`\eta` (``ProximalStep.lr``) is in the units of the entries of :math:`S` (a swap of two
assignments needs a step of about 1 or more). As :math:`\tau \to 0` this is exactly the paper's update; a small
:math:`\tau` keeps :math:`S` close to a permutation, so the curve's endpoint stays close to a real
network, while a wrong assignment can still be left when the gradient says so (the previous
:math:`S` enters only linearly, with weight :math:`1/\tau`). Only the forward map is needed
(``grad="detach"``): the gradient is taken with respect to :math:`S` itself, through
:func:`rebasin.spec.soft_permute`, so there is no custom backward here.

Step acceptance. :math:`\nabla_S L` is averaged over ``ProximalStep.batches`` batches whose
:math:`t` are stratified over :math:`[0, 1]` (batch :math:`i` of :math:`m` draws
:math:`t \in [i/m, (i+1)/m)`), and the step is accepted only if it does not raise the loss on
those same batches, positions and dropout masks; otherwise :math:`\eta` is halved up to
``ProximalStep.max_backtracks`` times and then the step is skipped (a backtracking proximal-gradient step: the block objective never increases on the
sample). Without this guard the linearised move, which predicts a full swap of units from a
first-order expansion, drifts away even from a correct permutation.

What to expect. The permutation step is local: started from weight matching it changes few units
and the loss barely moves (the paper's observation that alignment is close to locally optimal);
started from the identity it does *not* find a good alignment of two unrelated networks (nor a
planted permutation of A): the loss along a curve whose bend is being trained is nearly flat in
single swaps. Start from an alignment (``init="weight_matching"``, the default).

At the end :math:`S` is rounded to the nearest permutation by linear assignment
(:func:`rebasin.spec.matrix_to_perm`), the curve is rebuilt between A and the hard-permuted B with the
learned bend, and optionally fine-tuned for ``finetune_steps`` more bend steps.

The bend lives in A's basis (A is never permuted), so it needs no change when :math:`P` changes.

Reference: N. J. Tatro, P.-Y. Chen, P. Das, I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode
Connectivity via Neuron Alignment", NeurIPS 2020 (section on proximal alternating minimisation).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .._common import (
    as_state,
    check_float,
    check_int,
    check_pair,
    check_state_for_model,
    cross_entropy_of,
    own_global_rng,
    progress_bar,
    resolve_device,
    training,
)
from .._distributed import fingerprint, guarded, reducer
from .._errors import RebasinError
from ..matching.weight import weight_matching
from ..spec.core import PermutationSpec, check_permutations, permute
from ..spec.soft import matrix_to_perm, perm_to_matrix, soft_permute
from ..trace.tracing import spec_for
from ._pam_steps import Curve, Objective, ProximalStep, RunningMean, adam, bend_steps, proximal_step
from .curves import CURVE_KINDS
from .running import LossFn

__all__ = ["PAM_INITS", "PAMResult", "ProximalStep", "proximal_alternating_minimization"]

#: Named starting permutations accepted by ``init=`` (a dict of permutations is accepted too).
PAM_INITS: tuple[str, ...] = ("identity", "weight_matching")

# Warn when the final soft permutations' row sums are off by more than this.
_MARGINAL_WARN = 1e-2
Fn = TypeVar("Fn", bound=Callable[..., Any])

# The 0.1 keywords of proximal_alternating_minimization that are now fields of ProximalStep.
_FLAT_STEP_OPTIONS = {
    "perm_lr": "lr",
    "perm_batches": "batches",
    "max_backtracks": "max_backtracks",
    "tau": "tau",
    "sinkhorn_iters": "n_iter",
}


def _flat_step_options(func: Fn) -> Fn:
    """Keep ``perm_lr=`` and the other 0.1 flat options working for one release, with a warning."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flat = {name: kwargs.pop(name) for name in list(kwargs) if name in _FLAT_STEP_OPTIONS}
        if flat:
            fields = {_FLAT_STEP_OPTIONS[name]: value for name, value in flat.items()}
            new = ", ".join(f"{field}=..." for field in fields)
            warnings.warn(
                f"{func.__name__}({', '.join(f'{name}=...' for name in flat)}) is deprecated and will be removed "
                f"in the next release; use {func.__name__}(perm_step=ProximalStep({new}))",
                DeprecationWarning,
                stacklevel=2,
            )
            kwargs["perm_step"] = dataclasses.replace(kwargs.get("perm_step", ProximalStep()), **fields)
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the wrapped function's signature


@dataclass(frozen=True)
class PAMResult:
    r"""What :func:`proximal_alternating_minimization` found.

    Attributes
    ----------
    perms
        ``{perm: int64 CPU tensor (n,)}`` in the toolkit's convention: ``permute(spec, perms,
        state_b)`` is B aligned to A.
    curve
        A :class:`~rebasin.BezierCurve` or :class:`~rebasin.paths.PolyChainCurve` from ``state_a`` to
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
    curve: Curve
    history: tuple[float, ...]
    changed: tuple[int, ...]
    perm_steps: tuple[float, ...]
    soft: dict[str, Tensor]
    finetune_loss: float
    time_s: float


# ----------------------------------------------------------------------------------------------
# set-up


def _initial_perms(
    init: str | Mapping[str, Tensor], spec: PermutationSpec, sizes: Mapping[str, int],
    state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], seed: int,
) -> dict[str, Tensor]:
    if isinstance(init, str):
        if init == "identity":
            return {p: torch.arange(sizes[p]) for p in spec.perms}
        if init == "weight_matching":
            return weight_matching(spec, state_a, state_b, seed=seed)
        raise RebasinError(f"unknown init {init!r}; valid: {list(PAM_INITS)} or a dict of permutations")
    if not isinstance(init, Mapping):
        raise RebasinError(f"init must be one of {list(PAM_INITS)} or a dict of permutations, got {type(init).__name__}")
    check_permutations(spec, init, sizes)
    return {p: (init[p].detach().long().cpu().clone() if p in init else torch.arange(sizes[p])) for p in spec.perms}


def _warn_if_off_the_polytope(soft: Mapping[str, Tensor]) -> None:
    err = max((float((s.sum(-1) - 1).abs().max()) for s in soft.values()), default=0.0)
    if err > _MARGINAL_WARN:
        warnings.warn(
            f"proximal_alternating_minimization: the last Sinkhorn projection is off the doubly "
            f"stochastic set by {err:.3g} (row sums); raise ProximalStep.n_iter or ProximalStep.tau",
            UserWarning,
            stacklevel=4,  # the caller of proximal_alternating_minimization (through its deprecation wrapper)
        )


# ----------------------------------------------------------------------------------------------
# the algorithm


@_flat_step_options
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
    perm_step: ProximalStep = ProximalStep(),  # noqa: B008 - ProximalStep is a frozen dataclass: one shared default is safe
    init: str | Mapping[str, Tensor] = "weight_matching",
    finetune_steps: int = 0,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    sync: bool = True,
    group: Any = None,
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
    ``perm_step.batches`` batches with stratified :math:`t`; the step is halved (up to
    ``perm_step.max_backtracks`` times) until it does not raise the loss on those batches, else
    skipped. This is the entropy-smoothed form of the paper's projected step
    :math:`P \leftarrow \mathrm{Proj}_\Pi(P - \eta\nabla_P L)` (the limit :math:`\tau\to 0`); see
    the module documentation. Each soft :math:`S` acts on B through :func:`rebasin.spec.soft_permute`.
    Finally :math:`S` is rounded by linear assignment, the curve is moved onto the hard-permuted B
    with the learned bend, and fine-tuned for ``finetune_steps`` bend steps.

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
        The kind of curve: ``"bezier"`` or ``"polychain"``.
    num_bends
        Control points including both endpoints (3: one bend).
    rounds
        Alternation rounds (``>= 1``).
    theta_steps
        Bend steps per round (``>= 0``; 0 learns only the permutation along the initial curve).
    lr
        Adam learning rate of the bend (as in :func:`rebasin.fit_curve`).
    perm_step
        The permutation step's options (:class:`ProximalStep`: :math:`\eta`, batches,
        backtracking, :math:`\tau`, Sinkhorn iterations). The 0.1 keywords ``perm_lr``,
        ``perm_batches``, ``max_backtracks``, ``tau`` and ``sinkhorn_iters`` still work for one
        release, with a :class:`DeprecationWarning`.
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
        Show a tqdm bar over rounds; None (default): only when stderr is a terminal (or in Jupyter), so a piped or logged run stays clean.
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default) the starting
        permutations and bends are the group's first rank's, the bend's gradients, the permutation step's
        gradient and its backtracking losses are averaged over the ranks of ``group`` (None: the default group),
        and ``history`` and ``finetune_loss`` are over every rank's examples. Every rank draws the same
        :math:`t` (same ``seed``), so for equal batch sizes each step is the one a single process takes on the
        union of the ranks' batches (BatchNorm's batch statistics and dropout masks stay per rank), and every
        rank returns the same permutations and curve. A rank whose shard is empty, or whose arguments differ,
        makes every rank raise. ``sync=False``: this process alone. See docs/distributed.md.

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
        (raise ``perm_step.n_iter`` or ``perm_step.tau``).

    Examples
    --------
    >>> res = proximal_alternating_minimization(model, sa, sb, train_loader, example_input=x[:2])  # doctest: +SKIP
    >>> evaluate_path(model, res.curve, test_loader).barrier()                  # doctest: +SKIP
    """
    start_time = time.perf_counter()
    red = reducer(sync, group)
    with guarded(red, "proximal_alternating_minimization") as outcome:  # every rank's arguments agree
        a, b, spec, sizes, device = _checked_inputs(
            model, state_a, state_b, loader, spec=spec, example_input=example_input, curve=curve, rounds=rounds,
            theta_steps=theta_steps, lr=lr, perm_step=perm_step, finetune_steps=finetune_steps, device=device,
        )  # fmt: skip
        hard = _initial_perms(init, spec, sizes, a, b, seed)
        outcome.key = fingerprint(a, b, sorted(sizes.items()), spec.axes, curve, num_bends, rounds, theta_steps,
                                  lr, perm_step, finetune_steps, seed, hard)
    if red is not None:  # decided once: the first rank's starting permutations
        hard = red.broadcast(hard)
    dtype = next((v.dtype for v in a.values() if v.is_floating_point()), torch.float32)
    soft = {p: perm_to_matrix(hard[p], dtype=dtype, device=device) for p in spec.perms}
    path = CURVE_KINDS[curve](a, permute(spec, hard, b), num_bends=num_bends).to(device)
    if red is not None:
        red.same_tensors([p for p in path.parameters() if p.requires_grad])
    opt = adam(path, lr)
    objective = Objective(model, loader, cross_entropy_of if loss_fn is None else loss_fn, device, seed)
    history: list[float] = []
    changed: list[int] = []
    etas: list[float] = []
    with own_global_rng(seed, device), training(model):
        for _ in progress_bar(range(rounds), progress, desc="PAM", unit="round"):
            seen = RunningMean()
            with torch.no_grad():
                end = soft_permute(spec, soft, b)
            bend_steps(objective, path, end, opt, theta_steps, seen, red)  # (a) the bend, P fixed
            soft, eta = proximal_step(objective, path, spec, soft, b, perm_step, seen, red)  # (b) P, the bend fixed
            rounded = {p: matrix_to_perm(s).cpu() for p, s in soft.items()}
            changed.append(sum(int((rounded[p] != hard[p]).sum()) for p in spec.perms))
            hard = rounded
            etas.append(eta)
            history.append(seen.over_ranks(red))
        _warn_if_off_the_polytope(soft)
        final = path.with_end(permute(spec, hard, b))
        finetune_loss = float("nan")
        if finetune_steps:
            seen = RunningMean()
            bend_steps(objective, final, None, adam(final, lr), finetune_steps, seen, red)  # type: ignore[arg-type]  # _Curve is the protocol both curve classes satisfy
            finetune_loss = seen.over_ranks(red)
        if red is not None:  # bitwise the first rank's curve on every rank
            red.same_tensors([p for p in final.parameters() if p.requires_grad])
    return PAMResult(
        perms=hard,
        curve=final,  # type: ignore[arg-type]  # _Curve is the protocol both curve classes satisfy
        history=tuple(history),
        changed=tuple(changed),
        perm_steps=tuple(etas),
        soft={p: s.detach() for p, s in soft.items()},
        finetune_loss=finetune_loss,
        time_s=time.perf_counter() - start_time,
    )


def _checked_inputs(
    model: nn.Module,
    state_a: Mapping[str, Tensor] | nn.Module,
    state_b: Mapping[str, Tensor] | nn.Module,
    loader: Iterable[Any],
    *,
    spec: PermutationSpec | None,
    example_input: Any,
    curve: str,
    rounds: int,
    theta_steps: int,
    lr: float,
    perm_step: ProximalStep,
    finetune_steps: int,
    device: torch.device | str | None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], PermutationSpec, dict[str, int], torch.device]:
    """Every argument check of :func:`proximal_alternating_minimization`.

    Returns the endpoints on ``device``, the spec, the size of each permutation and the device.
    """
    if not isinstance(model, nn.Module):
        raise RebasinError(f"model must be an nn.Module, got {type(model).__name__}")
    if curve not in CURVE_KINDS:
        raise RebasinError(f"unknown curve {curve!r}; valid: {list(CURVE_KINDS)}")
    check_int(rounds, "rounds", 1)
    check_int(theta_steps, "theta_steps", 0)
    check_int(finetune_steps, "finetune_steps", 0)
    if not check_float(lr, "lr") > 0:
        raise RebasinError(f"lr must be positive, got {lr!r}")
    if not isinstance(perm_step, ProximalStep):
        raise RebasinError(f"perm_step must be a ProximalStep, got {type(perm_step).__name__}")
    if loader is None:
        raise RebasinError("proximal_alternating_minimization needs a loader of (inputs, targets) batches")
    a, b = as_state(state_a, "state_a"), as_state(state_b, "state_b")
    check_pair(a, b)
    check_state_for_model(model, a, name="state_a")
    if spec is None:
        spec = spec_for(model, example_input=example_input, loader=loader)
    if not isinstance(spec, PermutationSpec):
        raise RebasinError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    sizes = spec.validate_pair(a, b)
    spec.refuse_block_inner("proximal_alternating_minimization")
    if spec.structure:
        raise RebasinError(
            f"proximal_alternating_minimization learns one free n x n permutation matrix per permutation; the spec "
            f"structures {sorted(spec.structure)} (heads or groups moved as blocks), which it does not support. "
            "Align with SinkhornRebasin or a matcher that honours the structure first"
        )
    device = resolve_device(model, device=device)
    return {k: v.to(device) for k, v in a.items()}, {k: v.to(device) for k, v in b.items()}, spec, sizes, device
