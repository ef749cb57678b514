r"""``RebasinILPlugin``: Peña et al.'s incremental learning by re-basin as an Avalanche plugin.

Thin glue between an Avalanche training loop and :class:`continual.incremental.IncrementalRebasin`,
which holds the method (see :mod:`continual.incremental` for the math). Add it to any supervised
strategy (``Naive``, or ``Naive`` with a :class:`~avalanche.training.plugins.ReplayPlugin` for the
paper's "new data + replay"); :class:`continual.RebasinIL` is that combination as a strategy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from avalanche.models import MultiTaskModule
from avalanche.training.plugins import SupervisedPlugin
from torch import Tensor, nn

from rebasin import PermutationSpec, RebasinError

from ._data import spec_at_experience, trace_spec
from .incremental import ILSettings, IncrementalRebasin
from .merging import reset_optimizer_state_, write_state_

__all__ = ["RebasinILPlugin", "ILRecord"]


@dataclass(frozen=True)
class ILRecord:
    """What :class:`RebasinILPlugin` did on one experience after the first.

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


class RebasinILPlugin(SupervisedPlugin):
    r"""Peña et al.'s incremental learning by re-basin, added to a stock Avalanche strategy.

    The first experience the strategy trains is trained by the strategy as usual. On every later
    one, with :math:`\theta_{\text{prev}}` the model's weights when the experience starts:

    * ``before_training_exp`` builds an :class:`~continual.incremental.IncrementalRebasin`: logits
      per permutation group and a zero residual :math:`\delta` per parameter, with **their own**
      AdamW (``perm_lr``, ``residual_lr``, ``residual_weight_decay``);
    * every iteration, ``after_forward`` replaces ``strategy.mb_output`` by the model run on
      :math:`\tfrac12(\theta_{\text{prev}} + \pi_P(\theta_{\text{prev}})) + \delta` (through
      :func:`torch.func.functional_call`), so the strategy's criterion and backward train the
      logits and :math:`\delta`; ``before_update`` steps their optimizer;
    * ``after_training_exp`` writes :math:`(1-\alpha)\,\theta_{\text{prev}} + \alpha\,\pi_{\hat P}
      (\theta_{\text{prev}}) + \delta` into the model's existing parameters and drops the strategy
      optimizer's per-parameter state (Adam moments, momenta), which belonged to the old weights.

    The strategy's optimizer is never swapped nor given new parameter groups: the model's parameters
    receive no gradient during the phase, so its ``step()`` leaves them and its state untouched.
    ``alpha`` is the weight of the permuted copy (the project's convention ``(1 − t)·A + t·B``);
    Peña et al.'s :math:`\alpha` is ``1 - alpha``, hence the default 0.2 (their 0.8). Before the
    convention was unified, ``RebasinIL(alpha=...)`` meant the weight of the previous model.

    Parameters
    ----------
    alpha, perm_lr, residual_lr, residual_weight_decay, tau, n_iter, init, init_scale
        See :class:`~continual.incremental.ILSettings` (validated here, before any training).
    spec
        Permutation spec of the model. If None it is traced with :func:`rebasin.spec_from_model`:
        at construction when ``model`` is given (then ``example_input`` is required), otherwise
        before the first experience trains (from ``example_input`` or the experience's first
        samples). A model that cannot be traced raises :class:`RebasinError` before any training.
    model, example_input
        Optional, to trace (or, with ``spec``, validate) the spec at construction.
    seed
        Seeds the ``init="random"`` logits (a private generator per experience). The plugin never
        draws from the global torch RNG.

    Attributes
    ----------
    settings : ILSettings
        The hyperparameters.
    history : list[ILRecord]
        One record per experience after the first.
    step : IncrementalRebasin or None
        The live logits and residual while an experience after the first trains, else None.

    Notes
    -----
    The strategy's own forward pass (on :math:`\theta_{\text{prev}}`) still runs before
    ``after_forward`` replaces its output — Avalanche lets a plugin change the output, not skip the
    call — so each iteration costs one extra forward of the model; it builds no graph that the
    loss uses. A periodic evaluation during the phase sees :math:`\theta_{\text{prev}}`. Models that
    take task labels (``MultiTaskModule``) are rejected.

    Examples
    --------
    >>> from avalanche.training import Naive                                          # doctest: +SKIP
    >>> from avalanche.training.plugins import ReplayPlugin                           # doctest: +SKIP
    >>> il = RebasinILPlugin(model=model, example_input=x[:2])                        # doctest: +SKIP
    >>> strategy = Naive(model=model, optimizer=opt, train_mb_size=500,
    ...                  plugins=[ReplayPlugin(mem_size=1000), il])                     # doctest: +SKIP
    >>> for exp in benchmark.train_stream:                                            # doctest: +SKIP
    ...     strategy.train(exp)
    """

    def __init__(
        self,
        *,
        alpha: float = 0.2,
        perm_lr: float = 0.1,
        residual_lr: float = 1e-3,
        residual_weight_decay: float = 1e-2,
        tau: float = 1.0,
        n_iter: int = 20,
        init: str = "identity",
        init_scale: float = 1.0,
        spec: PermutationSpec | None = None,
        model: nn.Module | None = None,
        example_input: Any = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.settings = ILSettings(
            alpha=alpha, perm_lr=perm_lr, residual_lr=residual_lr, residual_weight_decay=residual_weight_decay,
            tau=tau, n_iter=n_iter, init=init, init_scale=init_scale,
        )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RebasinError(f"seed must be an int, got {seed!r}")
        if model is not None:
            if spec is None:
                if example_input is None:
                    raise RebasinError(
                        "RebasinILPlugin (and RebasinIL) need spec= or example_input= (an input batch) with "
                        "model= to trace the model's permutation spec at construction"
                    )
                spec = trace_spec(model, example_input)
            spec.validate(model.state_dict())
        self.spec = spec
        self.example_input = example_input
        self.seed = seed
        self.history: list[ILRecord] = []
        self.step: IncrementalRebasin | None = None
        self._n_seen = 0

    @property
    def alpha(self) -> float:
        """Weight of the permuted copy in the final merge (``settings.alpha``)."""
        return self.settings.alpha

    @property
    def rebasin_phase(self) -> bool:
        """True while an experience after the first trains (logits and residual are live)."""
        return self.step is not None

    # ------------------------------------------------------------------ Avalanche callbacks
    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        model: nn.Module = strategy.model
        if isinstance(model, MultiTaskModule):
            raise RebasinError(
                f"RebasinILPlugin does not support models that take task labels ({type(model).__name__} is a "
                "MultiTaskModule): the re-basin forward passes the inputs alone"
            )
        if self.spec is None:
            self.spec = spec_at_experience(strategy, self.example_input)
        self.step = None
        if self._n_seen > 0:
            self.step = IncrementalRebasin(
                self.spec, model.state_dict(), self.settings,
                trainable=[k for k, _ in model.named_parameters()],
                seed=self.seed * 7919 + self._n_seen, device=torch.device(strategy.device),
            )

    def before_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.step is not None:
            self.step.zero_grad()

    def after_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.step is not None:
            strategy.mb_output = self.step.forward(strategy.model, strategy.mb_x)

    def before_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.step is not None:
            self.step.step()

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        try:
            if self.step is not None:
                self._merge(strategy)
        finally:
            self.step = None
            self._n_seen += 1

    @torch.no_grad()
    def _merge(self, strategy: Any) -> None:
        start = time.perf_counter()
        step = self.step
        perms = step.hard_perms()  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
        write_state_(strategy.model, step.merged_state(perms))  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
        optimizer = getattr(strategy, "optimizer", None)
        if optimizer is not None:
            reset_optimizer_state_(optimizer, strategy.model.parameters())
        exp = getattr(strategy, "experience", None)
        self.history.append(
            ILRecord(
                int(getattr(exp, "current_experience", -1)),
                perms,
                {k: int((p != torch.arange(p.numel())).sum()) for k, p in perms.items()},
                step.delta_norm(),  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
                time.perf_counter() - start,
            )
        )
