r"""Learned orthogonal transforms: train the orthogonal maps of some classes end to end on the path loss.

:func:`rebasin.matching.transform_matching` finds an orthogonal map of a class (the residual stream of a
folded model) in closed form, by Procrustes on the weights. This module refines such maps on the task
loss along the linear path, as :class:`rebasin.SinkhornRebasin` learns soft permutations (Theus et al.
2025's learned variant; Li & Shen 2026). Each learned class ``p`` starts from ``Q0`` (by default
transform_matching's answer) and is parametrised by a free matrix ``M`` (``n x n``, starting at zero):

.. math::

    S = M - M^\top, \qquad
    Q = Q_0 \, \mathrm{cayley}(S) = Q_0 (I - S)(I + S)^{-1}
    \quad\text{or}\quad Q = Q_0 \exp(S),

orthogonal for every ``M`` (``I + S`` is invertible for a real skew ``S``). Every other class stays fixed
at its starting transform (a permutation or signed permutation). The cost of a step is

* ``"random"``: :math:`\ell\big(f((1-t)\theta_A + t\,T_Q(\theta_B))\big)` with one :math:`t \sim U(0,1)` per
  step drawn from a generator seeded by ``seed`` (a direct lerp, no division by :math:`1-t`);
* ``"midpoint"``: the same at :math:`t = 1/2`;
* a callable ``cost(module, batch) -> scalar tensor`` (``module`` is the :class:`TransformRebasin`:
  ``module(x, t=...)``, ``module.state_at(t)``, ``module.transformed_state_b()``).

:math:`T_Q(\theta_B)` is :func:`rebasin.spec.apply_transforms` with the current maps, which is
differentiable in them; the model runs through ``torch.func.functional_call``, so neither model is changed.
The answer is each map projected onto the orthogonal group once more (``U V^T`` from its SVD in float64),
a plain transform dict for :func:`rebasin.spec.apply_transforms`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._common import (
    State,
    check_int,
    check_positive,
    check_state_for_model,
    cross_entropy_of,
    cycle_batches,
    forward_with_state,
    nonempty,
    own_global_rng,
    progress_counter,
    state_of,
    to_device,
    training,
)
from .._errors import RebasinError
from ..spec.core import PermutationSpec
from ..spec.heads import HeadMaps
from ..spec.transforms import SymmetryKinds, Transform, apply_transforms, transform_matrix, why_structured
from ._path_costs import task_cost, user_cost
from .generalized import transform_matching

__all__ = ["TransformRebasin", "learn_transforms", "LearnedTransforms", "cayley", "PARAMETRIZATIONS", "COSTS"]

PARAMETRIZATIONS = ("cayley", "expm")
COSTS = ("random", "midpoint")

CostFn = Callable[["TransformRebasin", Any], Tensor]


def cayley(s: Tensor) -> Tensor:
    """The Cayley transform ``(I - S)(I + S)^{-1}`` of a skew-symmetric ``S`` (orthogonal), differentiable.

    Parameters
    ----------
    s
        ``(n, n)`` skew-symmetric matrix (``S^T = -S``); not checked.

    Returns
    -------
    Tensor
        ``(n, n)``, orthogonal up to rounding; the identity at ``S = 0``.

    Raises
    ------
    RebasinError
        When ``I + S`` is singular (only for a non-finite or non-skew ``S``).

    Examples
    --------
    >>> m = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> q = cayley(m - m.T)
    >>> torch.allclose(q.T @ q, torch.eye(4, dtype=torch.float64))
    True
    """
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    try:  # (I + S)^{-1} and (I - S) commute, so the product is a solve
        return torch.linalg.solve(eye + s, eye - s)
    except RuntimeError as err:  # torch.linalg.LinAlgError is a RuntimeError
        raise RebasinError(f"the Cayley map is singular (I + S cannot be inverted: {err}); the learned map diverged. "
                           "Lower lr") from err


@dataclass(frozen=True)
class LearnedTransforms:
    """What :func:`learn_transforms` returns.

    Attributes
    ----------
    transforms
        ``{class: transform}`` for every class of the spec: the learned orthogonal maps (float32 ``(n, n)``,
        ``Q^T Q = I`` to rounding) and the fixed permutations / signed permutations, for
        :func:`rebasin.spec.apply_transforms`.
    history
        The cost of every step.
    state_b
        Model B's full state_dict with ``transforms`` applied (detached).
    init
        The starting transforms (transform_matching's result unless ``init=`` was given).
    learned
        The classes whose orthogonal maps were learned.
    """

    transforms: dict[str, Transform | HeadMaps]
    history: list[float]
    state_b: dict[str, Tensor]
    init: dict[str, Transform | HeadMaps]
    learned: tuple[str, ...]


class TransformRebasin(nn.Module):
    r"""Learn orthogonal maps of some classes aligning ``model_b`` to ``model_a`` on the path loss.

    See the module documentation for the parametrisation and the costs; :func:`learn_transforms` is the
    one-call form.

    Parameters
    ----------
    model_a, model_b
        Two models of the same architecture on one device (typically both folded: :func:`rebasin.trace.fold_layernorm`,
        :func:`rebasin.spec.fold_rmsnorm`). Neither is modified; their states are copied once (detached).
    spec
        The spec of the architecture (with ``sizes``).
    kinds
        Which classes admit orthogonal maps (:func:`rebasin.trace.symmetry_kinds` of a folded model).
    learn
        The classes whose orthogonal maps are learned. Default: every class that admits an orthogonal map
        and is not structured.
    init
        Starting transforms ``{class: transform}`` (a learned class may start from a permutation or a
        signed permutation: its matrix is used). Default: :func:`rebasin.matching.transform_matching` with
        an orthogonal map for every learned class (permutations elsewhere), at its default start: weight
        matching's permutations, refined, and never below their weight objective.
    parametrization
        ``"cayley"`` or ``"expm"`` (matrix exponential).
    cost
        ``"random"``, ``"midpoint"`` or a callable ``cost(module, batch) -> scalar tensor``.
    loss_fn
        Task loss ``loss_fn(outputs, targets)`` of the built-in costs (cross-entropy by default).
    seed
        Seeds the per-step draws of ``t`` (``"random"``), transform_matching's visiting order and the
        global RNG inside :meth:`fit` (dropout; restored afterwards).
    state_a, state_b
        Align these state_dicts instead of the models' own (the models are then only the architecture).

    Raises
    ------
    RebasinError
        For a class in ``learn`` that does not admit an orthogonal map (the message of
        :class:`~rebasin.spec.SymmetryKinds`: module path and op), a structured class, an unknown class,
        parametrisation or cost, unfolded norm scales, states that do not fit, models on two devices.
    """

    def __init__(
        self,
        model_a: nn.Module,
        model_b: nn.Module,
        *,
        spec: PermutationSpec,
        kinds: SymmetryKinds,
        learn: Sequence[str] | None = None,
        init: Mapping[str, Transform | HeadMaps] | None = None,
        parametrization: str = "cayley",
        cost: str | CostFn = "random",
        loss_fn: Callable[[Any, Tensor], Tensor] | None = None,
        seed: int = 0,
        state_a: State | None = None,
        state_b: State | None = None,
    ) -> None:
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            raise RebasinError(f"unknown parametrization {parametrization!r}; choose one of {PARAMETRIZATIONS}")
        if not (isinstance(cost, str) and cost in COSTS) and not callable(cost):
            raise RebasinError(f"unknown cost {cost!r}; choose one of {COSTS} or pass a callable cost(module, batch)")
        for name, model, state in (("state_a", model_a, state_a), ("state_b", model_b, state_b)):
            if state is not None:
                check_state_for_model(model, state, name)
        a = state_of(model_a) if state_a is None else {k: v.detach() for k, v in state_a.items()}
        b = state_of(model_b) if state_b is None else {k: v.detach() for k, v in state_b.items()}
        dev_a, dev_b = _device(a), _device(b)
        if dev_a != dev_b:
            raise RebasinError(f"state_a is on {dev_a} but state_b is on {dev_b}; move both to one device")
        sizes = spec.validate_pair(a, b)
        if learn is None:
            learn = [p for p in spec.perms if kinds.admits(p, "orthogonal") and why_structured(spec, p) is None]
            if not learn:
                raise RebasinError("TransformRebasin: no class of the spec admits an orthogonal map, so there is nothing "
                                   f"to learn ({dict(kinds.reasons)}); fold the norms first (rebasin.trace.fold_layernorm, "
                                   "rebasin.spec.fold_rmsnorm) or align by permutations")
        learn = list(dict.fromkeys(learn))
        for p in learn:
            if p not in spec.perm_to_axes:
                raise RebasinError(f"learn names the unknown class {p!r}; the spec has {list(spec.perms)}")
            if not kinds.admits(p, "orthogonal"):
                raise RebasinError(kinds.why_not(p, "orthogonal"))
            why = why_structured(spec, p)
            if why is not None:
                raise RebasinError(f"class {p!r} takes only permutations: {why}")
        self.spec, self.kinds, self.learned = spec, kinds, tuple(learn)
        self.parametrization, self.cost, self.seed = parametrization, cost, int(seed)
        self.loss_fn = loss_fn if loss_fn is not None else cross_entropy_of
        object.__setattr__(self, "_model", model_b)  # only a function, through functional_call
        self._state_a = {k: v.clone() for k, v in a.items()}
        self._state_b = {k: v.clone() for k, v in b.items()}
        self._generator = torch.Generator().manual_seed(self.seed)
        if init is None:
            init = transform_matching(spec, self._state_a, self._state_b, kinds=kinds,
                                      use={p: "orthogonal" for p in learn}, seed=self.seed)
        unknown = sorted(set(init) - set(spec.perm_to_axes) - set(kinds.heads))
        if unknown:
            raise RebasinError(f"init names unknown classes {unknown}; the spec has {list(spec.perms)}")
        dtype = next((self._state_b[k].dtype for k, _ in spec.perm_to_axes[learn[0]]
                      if self._state_b[k].is_floating_point()), torch.get_default_dtype())
        start = {p: (transform_matrix(_class_transform(init[p], p), sizes[p], dtype) if p in init
                     else torch.eye(sizes[p], dtype=dtype)) for p in learn}
        self.init: dict[str, Transform | HeadMaps] = {p: init[p] for p in init}
        fixed = {p: t for p, t in init.items() if p not in start}
        # validates every starting transform (kinds, orthogonality, folded scales) once; the fixed ones are applied here
        apply_transforms(spec, {**fixed, **start}, self._state_b, kinds=kinds)
        for p in learn:
            for key in kinds.scales.get(p, ()):
                if not bool((self._state_a[key] == 1).all()):
                    raise RebasinError(f"class {p!r} is learned as an orthogonal map, but state_a[{key!r}] is a norm "
                                       "scale that is not all ones; fold the scales of both models first "
                                       "(rebasin.fold_rmsnorm)")
        self._base_b = apply_transforms(spec, fixed, self._state_b, kinds=kinds) if fixed else dict(self._state_b)
        self._fixed = fixed
        self._q0 = {p: q.to(dev_a) for p, q in start.items()}
        self.free = nn.ParameterDict({f"c{i}": nn.Parameter(torch.zeros(sizes[p], sizes[p], dtype=dtype, device=dev_a))
                                      for i, p in enumerate(learn)})
        self.history: list[float] = []

    def _apply(self, fn, *args, **kwargs):  # keep the stored states with the parameters on .to()/.cuda()
        super()._apply(fn, *args, **kwargs)
        for name in ("_state_a", "_state_b", "_base_b", "_q0"):
            setattr(self, name, {k: fn(v) for k, v in getattr(self, name).items()})
        return self

    # ------------------------------------------------------------------ the maps
    def orthogonal_maps(self) -> dict[str, Tensor]:
        """``{class: Q0 · cayley(S)}`` (or ``Q0 · exp(S)``) for every learned class, differentiable."""
        out = {}
        for i, p in enumerate(self.learned):
            m = self.free[f"c{i}"]
            if not bool(torch.isfinite(m).all()):
                raise RebasinError(f"the learned map of class {p!r} has non-finite parameters; the fit diverged. "
                                   "Lower lr")
            s = m - m.T
            r = cayley(s) if self.parametrization == "cayley" else torch.linalg.matrix_exp(s)
            if not bool(torch.isfinite(r).all()):
                raise RebasinError(f"the learned map of class {p!r} is not finite ({self.parametrization}); the fit "
                                   "diverged. Lower lr")
            out[p] = self._q0[p] @ r
        return out

    def transformed_state_b(self) -> dict[str, Tensor]:
        """Model B's state with every transform applied (differentiable in the learned maps)."""
        return apply_transforms(self.spec, self.orthogonal_maps(), self._base_b, kinds=self.kinds)

    def state_at(self, t: float | Tensor) -> dict[str, Tensor]:
        """``(1 - t) θ_A + t T(θ_B)`` for floating tensors (other entries copied from A)."""
        tb = self.transformed_state_b()
        return {k: torch.lerp(a, tb[k], t) if a.is_floating_point() else a.clone() for k, a in self._state_a.items()}

    def forward(self, x: Any, t: float | Tensor | None = None) -> Any:
        """Run the model with transformed B (``t=None``) or at ``(1 - t) θ_A + t T(θ_B)``, in this module's mode."""
        state = self.transformed_state_b() if t is None else self.state_at(t)
        model = self._model
        for name, _ in model.named_buffers():  # type: ignore[union-attr]  # nn.Module attributes are typed Tensor | Module
            if name in state:  # copies: a model that updates a buffer in place must not reach the stored states
                state[name] = state[name].detach().clone()
        return forward_with_state(model, state, x, eval_mode=not self.training)  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module

    def compute_cost(self, batch: Any = None) -> Tensor:
        """The configured cost on one batch."""
        if callable(self.cost):
            return user_cost(self.cost, self, batch)
        return task_cost(self, self.cost, batch, self.loss_fn, self._generator)

    # ------------------------------------------------------------------ training
    def fit(
        self,
        loader: Iterable[Any] | None = None,
        *,
        epochs: int = 1,
        steps: int | None = None,
        lr: float = 1e-2,
        optimizer: torch.optim.Optimizer | None = None,
        progress: bool | None = None,
    ) -> list[float]:
        """Train the maps; returns (and appends to ``self.history``) the cost of every step.

        ``epochs`` passes over ``loader``, or, with ``steps``, that many steps (the loader cycled). A
        data-free callable cost may run without a loader for ``steps`` steps. ``optimizer`` defaults to
        Adam over the free parameters with ``lr``.

        Raises
        ------
        RebasinError
            When a cost or a map becomes non-finite (or singular): the fit stops, this module's maps are
            left as they were after the last good step, and the users' models are untouched.
        """
        check_int(epochs, "epochs")
        check_positive(lr, "lr")
        if steps is not None:
            check_int(steps, "steps")
        if loader is None and (not callable(self.cost) or steps is None):
            raise RebasinError("TransformRebasin.fit needs a loader (or, for a data-free callable cost, steps=)")
        if loader is None:
            batches: Iterable[Any] = (None for _ in range(steps))  # type: ignore[arg-type]  # steps is an int here
        elif steps is not None:
            it = cycle_batches(loader, "TransformRebasin.fit")
            batches = (next(it) for _ in range(steps))
        else:
            batches = (b for _ in range(epochs) for b in nonempty(loader, "TransformRebasin.fit"))
        total = steps if steps is not None else (len(loader) * epochs if hasattr(loader, "__len__") else None)  # type: ignore[arg-type]  # len() only where hasattr
        params = list(self.free.parameters())
        opt = optimizer if optimizer is not None else torch.optim.Adam(params, lr=lr)
        device = _device(self._state_a)
        desc = f"learned transforms ({self.cost if isinstance(self.cost, str) else 'custom'})"
        was = self.training
        self.train()
        try:
            model: nn.Module = self._model  # type: ignore[assignment]  # nn.Module attributes are typed Tensor | Module
            with own_global_rng(self.seed, device), training(model), progress_counter(progress, total, desc=desc) as tick:
                for batch in batches:
                    batch = None if batch is None else to_device(batch, device)
                    opt.zero_grad(set_to_none=True)
                    value = self.compute_cost(batch)
                    if not bool(torch.isfinite(value)):
                        raise RebasinError(f"TransformRebasin.fit: the cost is {float(value.detach())} at step "
                                           f"{len(self.history) + 1}; the fit stopped (the models are untouched). "
                                           "Lower lr, check the loss and the data")
                    value.backward()
                    saved = [q.detach().clone() for q in params]
                    opt.step()
                    if not all(bool(torch.isfinite(q).all()) for q in params):
                        with torch.no_grad():
                            for q, s in zip(params, saved):
                                q.copy_(s)
                        raise RebasinError(f"TransformRebasin.fit: the learned maps became non-finite at step "
                                           f"{len(self.history) + 1}; the fit stopped (the models are untouched). "
                                           "Lower lr")
                    self.history.append(float(value.detach()))
                    tick(cost=f"{self.history[-1]:.4f}")
        finally:
            self.train(was)
        return self.history

    # ------------------------------------------------------------------ results
    @torch.no_grad()
    def transforms(self) -> dict[str, Transform | HeadMaps]:
        """``{class: transform}`` for every class: the learned maps projected onto the orthogonal group
        (``U V^T`` of their SVD in float64, float32 on the CPU) and the fixed starting transforms (with any
        :class:`HeadMaps` of ``init``)."""
        out: dict[str, Transform | HeadMaps] = {p: t for p, t in self._fixed.items()}
        for p, q in self.orthogonal_maps().items():
            u, _, vh = torch.linalg.svd(q.detach().double().cpu())
            out[p] = (u @ vh).float()
        return out

    @torch.no_grad()
    def aligned_state_dict(self) -> dict[str, Tensor]:
        """Model B's full state_dict with :meth:`transforms` applied (a new dict)."""
        return apply_transforms(self.spec, self.transforms(), {k: v.clone() for k, v in self._state_b.items()},
                                kinds=self.kinds)

    def aligned_model(self) -> nn.Module:
        """A fresh copy of model B carrying the aligned weights."""
        model = copy.deepcopy(self._model)
        model.load_state_dict(self.aligned_state_dict())  # type: ignore[union-attr]  # nn.Module attributes are typed Tensor | Module
        return model  # type: ignore[return-value]  # nn.Module attributes are typed Tensor | Module


def _device(state: Mapping[str, Tensor]) -> torch.device:
    for t in state.values():
        return t.device
    return torch.device("cpu")


def learn_transforms(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable[Any] | None,
    *,
    spec: PermutationSpec,
    kinds: SymmetryKinds,
    learn: Sequence[str] | None = None,
    init: Mapping[str, Transform | HeadMaps] | None = None,
    parametrization: str = "cayley",
    cost: str | CostFn = "random",
    loss_fn: Callable[[Any, Tensor], Tensor] | None = None,
    epochs: int = 1,
    steps: int | None = None,
    lr: float = 1e-2,
    seed: int = 0,
    state_a: State | None = None,
    state_b: State | None = None,
    progress: bool | None = None,
) -> LearnedTransforms:
    """Learn orthogonal maps of B's classes on the loss along the linear path to A, in one call.

    :class:`TransformRebasin` built with the keyword options, fitted with ``epochs`` / ``steps`` / ``lr``
    on ``loader``; see the module documentation for the parametrisation and the costs.

    Parameters
    ----------
    model_a, model_b
        Two models of the same architecture (typically both folded); not modified.
    loader
        Batches ``(inputs, targets)`` for the built-in costs (None only for a data-free callable cost).
    spec, kinds, learn, init, parametrization, cost, loss_fn, seed, state_a, state_b
        As :class:`TransformRebasin`.
    epochs, steps, lr, progress
        As :meth:`TransformRebasin.fit`.

    Returns
    -------
    LearnedTransforms
        The transforms (``apply_transforms(spec, result.transforms, state_b, kinds=kinds)``), the cost
        history and B's transformed state.

    Raises
    ------
    RebasinError
        For every error of :class:`TransformRebasin` and :meth:`TransformRebasin.fit` (a non-finite cost or
        map during the fit included; the models are untouched).

    Examples
    --------
    >>> res = learn_transforms(model_a, model_b, loader, spec=spec, kinds=kinds, steps=50)  # doctest: +SKIP
    >>> aligned_b = res.state_b                                                             # doctest: +SKIP
    """
    module = TransformRebasin(model_a, model_b, spec=spec, kinds=kinds, learn=learn, init=init,
                              parametrization=parametrization, cost=cost, loss_fn=loss_fn, seed=seed,
                              state_a=state_a, state_b=state_b)
    history = module.fit(loader, epochs=epochs, steps=steps, lr=lr, progress=progress)
    return LearnedTransforms(module.transforms(), list(history), module.aligned_state_dict(), dict(module.init),
                             module.learned)


def _class_transform(t: Transform | HeadMaps, perm: str) -> Transform:
    """``t`` as one class's transform; :class:`HeadMaps` belong to an attention layout, not to a class."""
    if isinstance(t, HeadMaps):
        raise RebasinError(f"init[{perm!r}] is HeadMaps, but {perm!r} is a class of the spec: maps inside heads are "
                           "given under the attention layout's name (SymmetryKinds.heads)")
    return t
