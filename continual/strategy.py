r"""``RebasinIL``: incremental learning by re-basin (Peña et al., CVPR 2023), as an Avalanche strategy.

The first experience is trained normally. For every later experience the network's own weights are
frozen at :math:`\theta_{\text{prev}}` and only two things are learned, on the new data plus a small
replay buffer:

* one Sinkhorn logit matrix per permutation group, giving soft permutations :math:`P`;
* a residual :math:`\delta` on every parameter (zero at the start, with weight decay),

minimising the task loss of the network at the midpoint of the path between the previous model and
a permuted copy of itself:

.. math::

    \min_{P,\delta}\; \ell\Big(f\big(\tfrac12(\theta_{\text{prev}} + \pi_P(\theta_{\text{prev}})) + \delta\big)\Big).

Because :math:`\pi_P(\theta_{\text{prev}})` computes the same function as :math:`\theta_{\text{prev}}`,
the model "re-basins itself": it searches for the permutation of its own hidden units whose average with
the unpermuted weights also solves the new task. At the end of the experience the hard permutation
:math:`\hat P` (linear assignment on the logits) gives the new weights

.. math::

    \theta = (1-\alpha)\,\theta_{\text{prev}} + \alpha\,\pi_{\hat P}(\theta_{\text{prev}}) + \delta,

written into the model's existing parameters; the user's optimizer state is then reset. ``alpha`` is
the weight of B, the permuted copy (the project's convention); Peña et al.'s :math:`\alpha` is
``1 - alpha``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from avalanche.training.plugins import ReplayPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn
from torch.func import functional_call

from rebasin import PermutationSpec, RebasinError, matrix_to_perm, sinkhorn

from ._data import trace_spec
from .merging import check_alpha, midpoint_state, rebasin_il_state, reset_optimizer_state_, write_state_

__all__ = ["RebasinIL", "ILRecord"]

_INITS = ("identity", "random")


@dataclass(frozen=True)
class ILRecord:
    """What :class:`RebasinIL` did on one experience after the first.

    Attributes
    ----------
    experience
        ``current_experience`` of the experience.
    perms
        The hard permutations :math:`\\hat P` (``{perm: LongTensor}``).
    n_moved
        Units each permutation moved (entries differing from the identity).
    delta_norm
        L2 norm of the residual over all parameters.
    time_s
        Wall time of the merge.
    """

    experience: int
    perms: dict[str, Tensor]
    n_moved: dict[str, int]
    delta_norm: float
    time_s: float


class RebasinIL(SupervisedTemplate):
    r"""Peña et al.'s incremental learning by re-basin (see the module docstring for the method).

    Parameters
    ----------
    model, optimizer, criterion, train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator,
    eval_every, peval_mode
        As for :class:`avalanche.training.templates.SupervisedTemplate`. ``optimizer`` trains the
        model on the first experience only. ``plugins`` is not mutated (a copy is extended with the
        replay plugin).
    alpha
        Weight of the permuted copy in the final merge (``1 - alpha`` goes to the previous,
        unpermuted model): the project's convention, ``alpha`` is the weight of B. Until the
        convention was unified it was the weight of the previous model, defaulting to 0.8 (today's
        0.2).
    perm_lr
        Learning rate of the permutation logits (Adam).
    residual_lr, residual_weight_decay
        Learning rate and decoupled weight decay of the residual :math:`\delta` (AdamW).
    replay_mem_size
        Size of the replay buffer (an Avalanche :class:`ReplayPlugin`, experience balanced) whose
        samples are mixed into every batch after the first experience; 0 disables replay.
    tau, n_iter
        Sinkhorn temperature and iterations (:func:`rebasin.sinkhorn`, implicit backward).
    init, init_scale
        Initial logits: ``init_scale`` times the identity (``"identity"``, start at the previous
        model) or times a random permutation matrix drawn from ``seed`` (``"random"``).
    spec
        Permutation spec; traced from ``model`` and ``example_input`` at construction when omitted
        (a model that cannot be traced raises :class:`RebasinError` here, before any training).
    example_input
        An input batch for tracing.
    seed
        Seeds the random init.

    Attributes
    ----------
    history : list[ILRecord]
        One record per experience after the first.

    Notes
    -----
    While an experience after the first trains, ``strategy.optimizer`` is the internal optimizer
    of the logits and the residual, and the model's parameters stay at :math:`\theta_{\text{prev}}`
    (the training forward runs the model on the midpoint weights through ``functional_call``); a
    periodic evaluation during that time sees :math:`\theta_{\text{prev}}`. After the merge the
    model carries the merged weights and ``strategy.optimizer`` is the user's optimizer again.
    Models with task-label inputs (``MultiTaskModule``) are not supported.

    Examples
    --------
    >>> strategy = RebasinIL(model=model, optimizer=torch.optim.AdamW(model.parameters(), 1e-3),
    ...                      train_mb_size=500, train_epochs=5, example_input=x[:2])  # doctest: +SKIP
    >>> for exp in benchmark.train_stream:                                             # doctest: +SKIP
    ...     strategy.train(exp)
    ...     strategy.eval(benchmark.test_stream)
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Any = None,
        train_mb_size: int = 1,
        train_epochs: int = 1,
        eval_mb_size: int | None = None,
        device: str | torch.device = "cpu",
        plugins: Sequence[Any] | None = None,
        evaluator: Any = default_evaluator,
        eval_every: int = -1,
        peval_mode: str = "epoch",
        alpha: float = 0.2,
        perm_lr: float = 0.1,
        residual_lr: float = 1e-3,
        residual_weight_decay: float = 1e-2,
        replay_mem_size: int = 1000,
        tau: float = 1.0,
        n_iter: int = 20,
        init: str = "identity",
        init_scale: float = 1.0,
        spec: PermutationSpec | None = None,
        example_input: Any = None,
        seed: int = 0,
    ) -> None:
        self.alpha = check_alpha(alpha)
        for name, value in (("perm_lr", perm_lr), ("residual_lr", residual_lr), ("tau", tau)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise RebasinError(f"{name} must be a positive number, got {value!r}")
        if not (isinstance(residual_weight_decay, (int, float)) and residual_weight_decay >= 0):
            raise RebasinError(f"residual_weight_decay must be a number >= 0, got {residual_weight_decay!r}")
        if isinstance(replay_mem_size, bool) or not isinstance(replay_mem_size, int) or replay_mem_size < 0:
            raise RebasinError(f"replay_mem_size must be an int >= 0, got {replay_mem_size!r}")
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise RebasinError(f"n_iter must be an int >= 1, got {n_iter!r}")
        if init not in _INITS:
            raise RebasinError(f"unknown init {init!r}; choose one of {_INITS}")
        if spec is None:
            if example_input is None:
                raise RebasinError(
                    "RebasinIL needs spec= or example_input= (an input batch) to trace the model's "
                    "permutation spec at construction"
                )
            spec = trace_spec(model, example_input)
        spec.validate(model.state_dict())
        self.spec = spec
        self.perm_lr = float(perm_lr)
        self.residual_lr = float(residual_lr)
        self.residual_weight_decay = float(residual_weight_decay)
        self.replay_mem_size = replay_mem_size
        self.tau = float(tau)
        self.n_iter = n_iter
        self.init = init
        self.init_scale = float(init_scale)
        self.seed = int(seed)
        self.history: list[ILRecord] = []
        self._prev_state: dict[str, Tensor] | None = None
        self._logits: dict[str, Tensor] | None = None
        self._delta: dict[str, Tensor] | None = None
        self._user_optimizer = optimizer
        all_plugins = list(plugins or [])
        if replay_mem_size > 0:
            all_plugins.append(ReplayPlugin(mem_size=replay_mem_size))
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss() if criterion is None else criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=all_plugins,
            evaluator=evaluator,
            eval_every=eval_every,
            peval_mode=peval_mode,
        )

    # ------------------------------------------------------------------ phases
    @property
    def rebasin_phase(self) -> bool:
        """True while an experience after the first trains (logits and residual are live)."""
        return self._logits is not None

    def check_model_and_optimizer(self, reset_optimizer_state: bool = False, **kwargs: Any) -> None:
        if self._prev_state is None:
            super().check_model_and_optimizer(reset_optimizer_state=reset_optimizer_state, **kwargs)
            return
        self.model = self.model_adaptation()
        self._start_rebasin_phase()

    def _start_rebasin_phase(self) -> None:
        device = torch.device(self.device)
        prev = {k: v.to(device) for k, v in self._prev_state.items()}
        self._prev_state = prev
        sizes = self.spec.validate(prev)
        g = torch.Generator().manual_seed(self.seed * 7919 + self.clock.train_exp_counter)
        logits = {}
        for name in self.spec.perms:
            n = sizes[name]
            start = torch.randperm(n, generator=g) if self.init == "random" else torch.arange(n)
            m = torch.zeros(n, n, device=device)
            m[torch.arange(n, device=device), start.to(device)] = self.init_scale
            logits[name] = m.requires_grad_()
        params = dict(self.model.named_parameters())
        delta = {k: torch.zeros_like(prev[k]).requires_grad_() for k in params if prev[k].is_floating_point()}
        self._logits, self._delta = logits, delta
        groups = [{"params": list(logits.values()), "lr": self.perm_lr, "weight_decay": 0.0}]
        if delta:
            groups.append(
                {"params": list(delta.values()), "lr": self.residual_lr, "weight_decay": self.residual_weight_decay}
            )
        self.optimizer = torch.optim.AdamW(groups)

    def soft_matrices(self) -> dict[str, Tensor]:
        """Current soft permutations ``Sinkhorn(logits / tau)`` (only during the re-basin phase)."""
        if self._logits is None:
            raise RebasinError("RebasinIL has no permutation logits outside the training of a later experience")
        return {k: sinkhorn(v, tau=self.tau, n_iter=self.n_iter, grad="implicit") for k, v in self._logits.items()}

    def training_state(self) -> dict[str, Tensor]:
        """``½(θ_prev + π_P(θ_prev)) + δ``, differentiable in the logits and the residual."""
        return midpoint_state(self.spec, self._prev_state, self.soft_matrices(), self._delta)

    def forward(self) -> Tensor:
        if self._logits is not None and self.is_training:
            return functional_call(self.model, self.training_state(), (self.mb_x,), strict=True)
        return super().forward()

    def _after_training_exp(self, **kwargs: Any) -> None:
        if self._logits is not None:
            self._finish_rebasin_phase()
        super()._after_training_exp(**kwargs)
        self._prev_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def _finish_rebasin_phase(self) -> None:
        start = time.perf_counter()
        perms = {k: matrix_to_perm(v.detach()).cpu() for k, v in self._logits.items()}
        delta = {k: v.detach() for k, v in self._delta.items()}
        merged = rebasin_il_state(self.spec, self._prev_state, perms, self.alpha, delta)
        write_state_(self.model, merged)
        self.optimizer = self._user_optimizer
        reset_optimizer_state_(self.optimizer, self.model.parameters())
        exp = self.experience
        norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values()))) if delta else 0.0
        self.history.append(
            ILRecord(
                int(getattr(exp, "current_experience", -1)),
                perms,
                {k: int((p != torch.arange(p.numel())).sum()) for k, p in perms.items()},
                norm,
                time.perf_counter() - start,
            )
        )
        self._logits = None
        self._delta = None
