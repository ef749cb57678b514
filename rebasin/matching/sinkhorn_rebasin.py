r"""Sinkhorn re-basin (Peña et al., CVPR 2023): learn permutations end to end.

One logit matrix :math:`L_P \in \mathbb{R}^{n\times n}` per permutation group; the soft permutation is
:math:`S_P = \mathrm{Sinkhorn}(L_P/\tau)` (doubly stochastic) and model B's weights are mapped by
:func:`rebasin.spec.soft_permute`. The logits are trained by gradient descent on a cost of the soft-permuted
weights :math:`\pi(\theta_B)`:

* ``"l2"``: :math:`\sum_k \|\theta_A^k - \pi(\theta_B)^k\|^2 / \sum_k \|\theta_A^k\|^2` over every
  permuted floating tensor (data-free);
* ``"midpoint"``: :math:`\ell\big(f(\tfrac12\theta_A + \tfrac12\pi(\theta_B))\big)`;
* ``"random"``: :math:`\mathbb{E}_{t\sim U(0,1)}\,\ell\big(f((1-t)\theta_A + t\,\pi(\theta_B))\big)`, one
  :math:`t` per batch, computed as a direct lerp (no division by :math:`1-t`);
* any callable ``cost(module, batch) -> scalar tensor``.

The answer is the hard permutation obtained by linear assignment on the logits.

Structured permutations (``spec.structure``: attention heads, groups) are learned inside their structure:
one ``H x H`` logit matrix per outer permutation (shared by every member of the structure, e.g. q/k and v/o
of one attention layer) and per member one batch of ``H`` inner ``d x d`` logit matrices (one per destination
block). Each goes through Sinkhorn (the inner ones as one batched call) and the member's soft matrix is
:func:`rebasin.spec.structured_matrix` of the two, so every cost sees ordinary flat soft matrices through
:func:`rebasin.spec.soft_permute`. The hard answer keeps the structure: the outer permutation by linear assignment
on the outer logits, the inner permutation of each block by linear assignment on that block's inner logits.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._common import (
    State,
    check_int,
    check_state_for_model,
    cross_entropy_of,
    evaluating,
    forward_with_state,
    model_device,
    nonempty,
    own_global_rng,
    progress_counter,
    state_of,
    to_device,
    training,
)
from .._distributed import fingerprint, guarded, lockstep, reducer, synced_backward
from .._errors import RebasinError
from ..spec.core import (
    PermutationSpec,
    check_permutations,
    join_structured,
    permute,
    random_permutation,
    split_structured,
)
from ..spec.soft import matrix_to_perm, perm_to_matrix, soft_permute, structured_matrix
from ..trace.tracing import spec_from_model
from ._path_costs import task_cost, user_cost
from .sinkhorn_op import SINKHORN_GRADS, sinkhorn
from .weight import weight_matching

__all__ = ["SinkhornRebasin", "sinkhorn_matching", "COSTS"]

COSTS = ("l2", "midpoint", "random")
_INITS = ("identity", "weight_matching", "random")

CostFn = Callable[["SinkhornRebasin", Any], Tensor]


class SinkhornRebasin(nn.Module):
    r"""Learn soft permutations aligning ``model_b`` to ``model_a`` (Sinkhorn re-basin).

    Parameters
    ----------
    model_a, model_b
        Two models of the same architecture, on the same device. Neither is modified; their weights
        are read once (detached) at construction.
    spec
        Permutation spec; traced from ``model_a`` with ``example_input`` when omitted.
    cost
        ``"l2"``, ``"midpoint"``, ``"random"`` or a callable ``cost(module, batch) -> scalar``.
    loss_fn
        Task loss ``loss_fn(outputs, targets)`` for the midpoint / random costs (cross-entropy by
        default).
    tau, n_iter, grad
        Sinkhorn temperature, number of iterations and gradient mode (see :func:`rebasin.matching.sinkhorn`).
    init
        Starting permutation of the logits: ``"identity"``, ``"weight_matching"`` (warm start from
        :func:`rebasin.weight_matching`), ``"random"`` (drawn from ``seed``) or the permutations
        themselves, ``{perm: LongTensor}`` (missing names start at the identity). The logits start as
        ``init_scale`` times that permutation matrix (for a structured permutation: its outer and inner
        permutation matrices).
    init_scale
        Scale of the initial logits (1.0 as in the paper). With ``tau=1`` a wide layer then starts
        close to the uniform doubly-stochastic matrix; raise it to start sharper.
    seed
        Seeds the random init and the per-batch draws of ``t`` for the ``"random"`` cost.
    state_a, state_b
        Align these state_dicts (parameters and buffers) instead of the models' own; the models are then
        only the architecture (run through ``functional_call``; each state must fit its model). Default:
        the models' states. They are copied once, like the models' own.

    Notes
    -----
    BatchNorm: during :meth:`fit` the model runs in train mode, so BatchNorm layers normalise with
    the statistics of each batch and the soft-permuted running statistics are not used (the running
    statistics are computed on copies and discarded: nothing of the user's is written). Calling
    :meth:`forward` in eval mode uses the soft-permuted (or interpolated) running statistics. The
    running statistics of :meth:`aligned_state_dict` follow the hard permutation exactly.

    Examples
    --------
    >>> sr = SinkhornRebasin(model_a, model_b, example_input=x[:1], cost="random")   # doctest: +SKIP
    >>> sr.fit(train_loader, epochs=5, lr=0.1)                                      # doctest: +SKIP
    >>> aligned_b = sr.aligned_model()                                              # doctest: +SKIP
    """

    def __init__(
        self,
        model_a: nn.Module,
        model_b: nn.Module,
        *,
        spec: PermutationSpec | None = None,
        example_input: Any = None,
        cost: str | CostFn = "random",
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        tau: float = 1.0,
        n_iter: int = 20,
        grad: str = "implicit",
        init: str | Mapping[str, Tensor] = "identity",
        init_scale: float = 1.0,
        seed: int = 0,
        state_a: State | None = None,
        state_b: State | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(cost, str) and cost in COSTS) and not callable(cost):
            raise RebasinError(f"unknown cost {cost!r}; choose one of {COSTS} or pass a callable cost(module, batch)")
        if not isinstance(init, Mapping) and init not in _INITS:
            raise RebasinError(f"unknown init {init!r}; choose one of {_INITS}")
        if grad not in SINKHORN_GRADS:
            raise RebasinError(f"unknown grad {grad!r}; choose one of {SINKHORN_GRADS}")
        if not (tau > 0 and float(tau) < float("inf")):
            raise RebasinError(f"tau must be a positive finite number, got {tau}")
        check_int(n_iter, "n_iter")
        for name, model, state in (("state_a", model_a, state_a), ("state_b", model_b, state_b)):
            if state is not None:
                check_state_for_model(model, state, name)
        dev_a = model_device(model_a) if state_a is None else _state_device(state_a)
        dev_b = model_device(model_b) if state_b is None else _state_device(state_b)
        if dev_a != dev_b:
            what = "model" if state_a is None and state_b is None else "state"
            raise RebasinError(f"{what}_a is on {dev_a} but {what}_b is on {dev_b}; move both to one device")
        if spec is None:
            if example_input is None:
                raise RebasinError("SinkhornRebasin needs spec= or example_input= to trace the model")
            spec = spec_from_model(model_a, example_input)
        state_a = state_of(model_a) if state_a is None else {k: v.detach() for k, v in state_a.items()}
        state_b = state_of(model_b) if state_b is None else {k: v.detach() for k, v in state_b.items()}
        sizes = spec.validate_pair(state_a, state_b)
        self.spec = spec
        self.cost = cost
        self.loss_fn = loss_fn if loss_fn is not None else cross_entropy_of
        self.tau = float(tau)
        self.n_iter = int(n_iter)
        self.grad = grad
        self.seed = int(seed)
        # Non-module references: the model is only used as a function through functional_call.
        object.__setattr__(self, "_model", model_b)
        self._state_a = {k: v.clone() for k, v in state_a.items()}
        self._state_b = {k: v.clone() for k, v in state_b.items()}
        self._generator = torch.Generator().manual_seed(self.seed)

        start = self._initial_perms(init, sizes)
        self.logits = nn.ParameterDict(_initial_logits(spec, start, float(init_scale), dev_a))
        self.history: list[float] = []
        self._quiet = False  # fit() checks convergence once at the end instead of every step

    # ------------------------------------------------------------------ set-up helpers
    def _initial_perms(self, init: str | Mapping[str, Tensor], sizes: Mapping[str, int]) -> dict[str, Tensor]:
        if isinstance(init, Mapping):
            check_permutations(self.spec, init, sizes)
            return {p: torch.as_tensor(init[p]).cpu() if p in init else torch.arange(n) for p, n in sizes.items()}
        if init == "identity":
            return {p: torch.arange(n) for p, n in sizes.items()}
        if init == "random":  # drawn inside the structure; for a spec without one, one randperm per perm in order
            return random_permutation(self.spec, seed=self.seed, sizes=sizes)
        start = weight_matching(self.spec, self._state_a, self._state_b, seed=self.seed)
        try:
            check_permutations(self.spec, start, sizes)
        except RebasinError as err:
            raise RebasinError(f"init='weight_matching' returned permutations outside the spec's structure ({err}); "
                               "use init='identity' or 'random'") from err
        return start

    @property
    def device(self) -> torch.device:
        for logits in self.logits.values():
            return logits.device
        return _state_device(self._state_a)  # a spec without permutations has no logits

    def _apply(self, fn, *args, **kwargs):  # keep the stored states with the logits on .to()/.cuda()
        super()._apply(fn, *args, **kwargs)
        self._state_a = {k: fn(v) for k, v in self._state_a.items()}
        self._state_b = {k: fn(v) for k, v in self._state_b.items()}
        return self

    # ------------------------------------------------------------------ soft permutation
    def soft_matrices(self) -> dict[str, Tensor]:
        """``{perm: doubly stochastic n×n matrix}`` = Sinkhorn(logits / tau), differentiable.

        One entry per permutation of the spec. A structured permutation's matrix is
        ``structured_matrix(Sinkhorn(outer logits / tau), Sinkhorn(inner logits / tau))`` (the inner
        logits, shape ``(H, d, d)``, in one batched call); a virtual outer permutation has no entry of its
        own (it is inside its members' matrices).
        """
        for name, logits in self.logits.items():
            if not bool(torch.isfinite(logits).all()):
                raise RebasinError(
                    f"the logits of permutation {name!r} contain NaN or inf; lower the learning rate "
                    "or raise tau"
                )

        def sk(logits: Tensor) -> Tensor:
            return sinkhorn(logits, tau=self.tau, n_iter=self.n_iter, grad=self.grad, warn=not self._quiet)

        outer = {o: sk(self.logits[o]) for o in self.spec.outers}
        out = {}
        for name in self.spec.perms:
            if name in self.spec.structure:
                out[name] = structured_matrix(outer[self.spec.structure[name][0]], sk(self.logits[name]))
            else:
                out[name] = outer[name] if name in outer else sk(self.logits[name])
        return out

    def permuted_state_b(self) -> dict[str, Tensor]:
        """Model B's state_dict with the soft permutations applied (differentiable in the logits)."""
        return soft_permute(self.spec, self.soft_matrices(), self._state_b)

    def state_at(self, t: float | Tensor) -> dict[str, Tensor]:
        """``(1 - t) θ_A + t π(θ_B)`` for floating tensors (integer buffers copied from A)."""
        pb = self.permuted_state_b()
        out = {}
        for k, a in self._state_a.items():
            b = pb[k]
            out[k] = torch.lerp(a, b, t) if a.is_floating_point() else a.clone()
        return out

    def forward(self, x: Any, t: float | Tensor | None = None) -> Any:
        """Run the model with soft-permuted B (``t=None``) or at ``(1-t) θ_A + t π(θ_B)``.

        Uses this module's ``training`` flag for the wrapped model (see the class notes on BatchNorm).
        """
        state = self.permuted_state_b() if t is None else self.state_at(t)
        model = self._model
        # Buffers are handed over as copies: integer counters and (in train mode) the running
        # statistics that BatchNorm updates in place must neither alias the stored states nor
        # carry gradients (train-mode BatchNorm normalises with batch statistics anyway).
        for name, _ in model.named_buffers():  # type: ignore[union-attr]  # nn.Module attributes are typed Tensor | Module
            if name in state and (self.training or not state[name].is_floating_point()):
                state[name] = state[name].detach().clone()
        with training(model) if self.training else evaluating(model):  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
            return forward_with_state(model, state, x)  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module

    # ------------------------------------------------------------------ costs
    def l2_cost(self) -> Tensor:
        """Normalised squared distance between A and soft-permuted B over the permuted tensors."""
        pb = self.permuted_state_b()
        num = self._state_a[next(iter(self._state_a))].new_zeros(())
        den = num.clone()
        for key in self._permuted_float_keys():
            a = self._state_a[key]
            num = num + (a - pb[key]).pow(2).sum()
            den = den + a.pow(2).sum()
        return num / den.clamp_min(1e-12)

    def _permuted_float_keys(self) -> list[str]:
        return [
            k
            for k, ax in self.spec.axes.items()
            if any(p is not None for p in ax) and self._state_a[k].is_floating_point()
        ]

    def compute_cost(self, batch: Any = None) -> Tensor:
        """The configured cost on one batch (``batch`` may be None for ``"l2"``)."""
        if callable(self.cost):
            return user_cost(self.cost, self, batch)
        if self.cost == "l2":
            return self.l2_cost()
        if batch is None:
            raise RebasinError(f"cost {self.cost!r} needs data: pass a loader to fit()")
        return task_cost(self, self.cost, batch, self.loss_fn, self._generator)

    # ------------------------------------------------------------------ training
    def fit(
        self,
        loader: Iterable | None = None,
        *,
        epochs: int = 1,
        steps: int | None = None,
        lr: float = 0.1,
        optimizer: torch.optim.Optimizer | None = None,
        device: Any = None,
        progress: bool | None = None,
        sync: bool = True,
        group: Any = None,
    ) -> list[float]:
        """Train the logits; returns (and appends to ``self.history``) the cost per step.

        With a ``loader`` each epoch is one pass over it (a loader that yields no batch is an error).
        Without one (data-free costs such as ``"l2"`` or a data-free callable) ``steps`` optimisation
        steps are taken (default ``100 * epochs``). ``optimizer`` defaults to Adam over the logits with
        ``lr``. ``progress``: a tqdm bar over the steps; None (default) shows it only when stderr is a
        terminal (or in Jupyter), so a piped or logged run stays clean.

        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default; ``group``
        None: the default group) the logits start from the group's first rank's values, the gradient of the
        logits is averaged over the ranks before every step (so every rank takes the step one process would
        take on the union of the ranks' batches, for equal batch sizes), the recorded cost is the ranks'
        mean, and the logits are broadcast from the first rank at the end, so :meth:`hard_permutations` is
        the same everywhere. Every rank needs as many batches (a ``DistributedSampler`` pads). ``sync=False``:
        this process alone.
        Dropout in the model draws from the global RNG seeded by ``seed`` inside ``fit`` (restored
        afterwards).
        """
        red = reducer(sync, group)
        # every local check runs inside the agreement, so a rank that fails here fails every rank
        with guarded(red, "SinkhornRebasin.fit") as outcome:
            if not self.logits:
                raise RebasinError("SinkhornRebasin.fit: the spec has no permutations, so there is nothing to learn "
                                   "(check spec.axes; spec_from_model names the modules it could not permute)")
            if device is not None:
                self.to(device)
            device = self.device
            params = list(self.logits.parameters())
            if loader is None and isinstance(self.cost, str) and self.cost != "l2":
                raise RebasinError(f"cost {self.cost!r} needs data: pass a loader to fit()")
            outcome.key = fingerprint(self.spec.axes, self._state_a, params, self.cost if isinstance(self.cost, str) else "custom",
                                      loader is None)
        if red is not None:
            red.same_tensors(params)
        opt = optimizer if optimizer is not None else torch.optim.Adam(self.logits.parameters(), lr=lr)
        if loader is None:
            batches_per_epoch = None
            total = steps if steps is not None else 100 * epochs
            epochs_iter: Iterable = [range(total)]
        else:
            batches_per_epoch = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]  # len() only where hasattr(loader, '__len__')
            total = None if batches_per_epoch is None else batches_per_epoch * epochs  # type: ignore[assignment]  # total is None when the loader has no length
            epochs_iter = (lockstep(red, nonempty(loader, "SinkhornRebasin.fit"), "SinkhornRebasin.fit")
                           for _ in range(epochs))
        desc = f"sinkhorn re-basin ({self.cost if isinstance(self.cost, str) else 'custom'})"
        was_training = self.training
        self.train()
        self._quiet = True
        try:
            # the model runs in training mode: its dropout draws from a global RNG seeded by ``seed`` and
            # restored afterwards, so fit is reproducible and leaves the caller's random stream alone
            with own_global_rng(self.seed, device), progress_counter(progress, total, desc=desc) as tick:
                for epoch_batches in epochs_iter:
                    for batch in epoch_batches:
                        batch = None if loader is None else to_device(batch, device)
                        opt.zero_grad(set_to_none=True)
                        value = synced_backward(
                            red, params, lambda batch=batch: self.compute_cost(batch), "SinkhornRebasin.fit"  # type: ignore[misc]  # mypy cannot infer a lambda assigned to a typed variable
                        )
                        opt.step()
                        self.history.append(value)
                        tick(cost=f"{self.history[-1]:.4f}")
        finally:
            self._quiet = False
            self.train(was_training)
        if red is not None:  # decided once: every rank holds the first rank's logits
            red.same_tensors(params)
        with torch.no_grad():
            self.soft_matrices()  # one convergence warning (if any) for the final logits
        return self.history

    # ------------------------------------------------------------------ results
    @torch.no_grad()
    def hard_permutations(self) -> dict[str, Tensor]:
        """Linear assignment on the logits: ``{perm: LongTensor}`` with ``permute(spec, perms, state_b) ≈ state_a``.

        Structured permutations stay inside their structure: the outer permutation is the assignment on
        the outer logits (shared by the structure's members), each block's inner permutation the assignment
        on that block's inner logits, joined with :func:`rebasin.spec.join_structured`.
        """
        outer = {o: matrix_to_perm(self.logits[o].detach()).cpu() for o in self.spec.outers}
        out = {}
        for name in self.spec.perms:
            if name in self.spec.structure:
                inner = matrix_to_perm(self.logits[name].detach()).cpu()
                out[name] = join_structured(outer[self.spec.structure[name][0]], inner)
            else:
                out[name] = outer[name] if name in outer else matrix_to_perm(self.logits[name].detach()).cpu()
        return out

    def aligned_state_dict(self) -> dict[str, Tensor]:
        """Model B's full state_dict permuted by the hard permutations (BN statistics included)."""
        return permute(self.spec, self.hard_permutations(), {k: v.clone() for k, v in self._state_b.items()})

    def aligned_model(self) -> nn.Module:
        """A fresh copy of model B carrying the aligned weights.

        Its parameters keep model B's ``requires_grad`` flags (this class never freezes the user's
        parameters; it trains only its own logits), so the result trains like any module.
        """
        model = copy.deepcopy(self._model)
        model.load_state_dict(self.aligned_state_dict())  # type: ignore[union-attr]  # nn.Module attributes are typed Tensor | Module
        return model  # type: ignore[return-value]  # nn.Module attributes are typed Tensor | Module


def _initial_logits(
    spec: PermutationSpec, start: Mapping[str, Tensor], scale: float, device: torch.device
) -> dict[str, nn.Parameter]:
    """``scale`` times the permutation matrices of ``start``: ``(n, n)`` per free permutation, ``(H, H)`` per
    outer permutation (virtual or not) and ``(H, d, d)`` inner logits per structured permutation."""
    def onehot(p: Tensor) -> Tensor:
        return scale * perm_to_matrix(p.cpu(), dtype=torch.get_default_dtype(), device=device)

    logits: dict[str, nn.Parameter] = {}
    for name in spec.perms:
        if name in spec.structure:
            outer, d = spec.structure[name]
            outer_p, inner_p = split_structured(start[name].cpu(), d)
            if outer not in logits:
                logits[outer] = nn.Parameter(onehot(start.get(outer, outer_p)))
            logits[name] = nn.Parameter(torch.stack([onehot(r) for r in inner_p]))
        elif name not in logits:
            logits[name] = nn.Parameter(onehot(start[name]))
    return logits


def _state_device(state: State) -> torch.device:
    """Device of the state's first tensor (CPU for an empty state)."""
    for t in state.values():
        return t.device
    return torch.device("cpu")


def sinkhorn_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    model_a: nn.Module | None = None,
    model_b: nn.Module | None = None,
    loader: Iterable[Any] | None = None,
    seed: int = 0,
    cost: str | CostFn = "random",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    tau: float = 1.0,
    n_iter: int = 20,
    grad: str = "implicit",
    init: str | Mapping[str, Tensor] = "identity",
    init_scale: float = 1.0,
    fit: Mapping[str, Any] | None = None,
    device: Any = None,
    progress: bool | None = None,
    sync: bool = True,
    group: Any = None,
    return_info: bool = False,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[float]]:
    """Sinkhorn re-basin of the given states in one call: :class:`SinkhornRebasin` fitted, hard permutations out.

    The states are aligned as given (the models are only the architecture, run through
    ``torch.func.functional_call``; neither is copied or changed). This is the function registered as
    ``"sinkhorn"``.

    Parameters
    ----------
    spec, state_a, state_b
        The permutation spec and the two full state_dicts.
    model_a, model_b
        The architecture (``model_b`` defaults to ``model_a``).
    loader
        Data for the task-loss costs (``"midpoint"``, ``"random"``); ``"l2"`` needs none.
    seed, cost, loss_fn, tau, n_iter, grad, init, init_scale
        As :class:`SinkhornRebasin` (``init`` may also be the starting permutations ``{perm: LongTensor}``).
    fit
        Options of :meth:`SinkhornRebasin.fit` (``epochs``, ``steps``, ``lr``, ...).
    device, progress, sync, group
        As :meth:`SinkhornRebasin.fit` (given in ``fit`` too, ``fit``'s value wins).
    return_info
        Also return the cost history (one float per step).

    Returns
    -------
    dict[str, Tensor] or (dict[str, Tensor], list[float])
        ``{perm: LongTensor}`` with ``permute(spec, perms, state_b) ≈ state_a``.

    Raises
    ------
    RebasinError
        Without ``model_a``, for an unknown ``fit`` option, and for every error of :class:`SinkhornRebasin`.
    """
    if model_a is None:
        raise RebasinError("sinkhorn needs model_a (the architecture to run the states through)")
    fit = {"sync": sync, "group": group, "progress": progress, **(fit or {})}
    unknown = sorted(set(fit) - _FIT_OPTIONS)
    if unknown:
        raise RebasinError(
            f"unknown fit option(s) {unknown} for matcher 'sinkhorn'; SinkhornRebasin.fit accepts {sorted(_FIT_OPTIONS)}"
        )
    module = SinkhornRebasin(
        model_a,
        model_b if model_b is not None else model_a,
        spec=spec,
        cost=cost,
        loss_fn=loss_fn,
        tau=tau,
        n_iter=n_iter,
        grad=grad,
        init=init,
        init_scale=init_scale,
        seed=seed,
        state_a=state_a,
        state_b=state_b,
    )
    history = module.fit(loader, device=device, **fit)
    perms = module.hard_permutations()
    return (perms, history) if return_info else perms


# what ``fit={...}`` may hold: SinkhornRebasin.fit's options (``loader`` and ``device`` come from the matcher's
# own arguments), read from its signature so that the two cannot drift apart
_FIT_OPTIONS = frozenset(inspect.signature(SinkhornRebasin.fit).parameters) - {"self", "loader", "device"}
