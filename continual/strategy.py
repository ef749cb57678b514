r"""``RebasinIL``: Peña et al.'s incremental learning by re-basin (CVPR 2023) as a thin Avalanche strategy.

A :class:`~avalanche.training.templates.SupervisedTemplate` with two plugins: an experience-balanced
:class:`~avalanche.training.plugins.ReplayPlugin` (the paper's "new data + replay") and
:class:`continual.RebasinILPlugin`, which holds the method (the logic itself, in plain objects, is in
:mod:`continual.incremental`). Everything the strategy does, ``Naive(plugins=[ReplayPlugin(mem_size),
RebasinILPlugin(...)])`` does too, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from avalanche.training.plugins import ReplayPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from rebasin import PermutationSpec, RebasinError

from .il_plugin import ILRecord, RebasinILPlugin

__all__ = ["RebasinIL"]


class RebasinIL(SupervisedTemplate):
    r"""Peña et al.'s incremental learning by re-basin: ``SupervisedTemplate`` + replay + :class:`RebasinILPlugin`.

    Parameters
    ----------
    model, optimizer, criterion, train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator,
    eval_every, peval_mode
        As for :class:`avalanche.training.templates.SupervisedTemplate` (keyword-only);
        ``criterion`` defaults to cross-entropy. ``optimizer`` trains the model on the first
        experience; on later ones it stays the strategy's optimizer but has nothing to update (the
        plugin trains the logits and the residual with its own), and its per-parameter state is
        dropped when the merge changes the weights. ``plugins`` is not mutated: the strategy runs
        ``[*plugins, replay_plugin, rebasin_plugin]``.
    replay_mem_size
        Size of the replay buffer (an Avalanche :class:`ReplayPlugin`, experience balanced) whose
        samples are mixed into every batch after the first experience; 0 disables replay.
    alpha, perm_lr, residual_lr, residual_weight_decay, tau, n_iter, init, init_scale, seed
        As for :class:`continual.RebasinILPlugin`. ``alpha`` is the weight of the permuted copy
        :math:`\pi_{\hat P}(\theta_{\text{prev}})` in the merge :math:`(1-\alpha)\,\theta_{\text{prev}}
        + \alpha\,\pi_{\hat P}(\theta_{\text{prev}}) + \delta` (the project's convention: weight of
        B); until the convention was unified it was the weight of the previous model and defaulted
        to 0.8, which is today's 0.2.
    spec, example_input
        The permutation spec, or an input batch to trace it from ``model`` at construction; one of
        the two is required (a model that cannot be traced raises :class:`RebasinError` here,
        before any training).

    Attributes
    ----------
    rebasin_plugin : RebasinILPlugin
        The plugin holding the method; ``spec``, ``alpha`` and ``history`` read from it.
    replay_plugin : ReplayPlugin or None
        The replay plugin (None when ``replay_mem_size=0``).

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
        replay_mem_size: int = 1000,
        alpha: float = 0.2,
        perm_lr: float = 0.1,
        residual_lr: float = 1e-3,
        residual_weight_decay: float = 1e-2,
        tau: float = 1.0,
        n_iter: int = 20,
        init: str = "identity",
        init_scale: float = 1.0,
        spec: PermutationSpec | None = None,
        example_input: Any = None,
        seed: int = 0,
    ) -> None:
        if isinstance(replay_mem_size, bool) or not isinstance(replay_mem_size, int) or replay_mem_size < 0:
            raise RebasinError(f"replay_mem_size must be an int >= 0, got {replay_mem_size!r}")
        self.rebasin_plugin = RebasinILPlugin(
            alpha=alpha, perm_lr=perm_lr, residual_lr=residual_lr, residual_weight_decay=residual_weight_decay,
            tau=tau, n_iter=n_iter, init=init, init_scale=init_scale, spec=spec, model=model,
            example_input=example_input, seed=seed,
        )
        self.replay_plugin = ReplayPlugin(mem_size=replay_mem_size) if replay_mem_size > 0 else None
        own = [p for p in (self.replay_plugin, self.rebasin_plugin) if p is not None]
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss() if criterion is None else criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=[*(plugins or []), *own],
            evaluator=evaluator,
            eval_every=eval_every,
            peval_mode=peval_mode,
        )

    @property
    def spec(self) -> PermutationSpec:
        """The model's permutation spec (``rebasin_plugin.spec``)."""
        return self.rebasin_plugin.spec  # type: ignore[return-value]  # Optional narrowed by earlier logic mypy cannot follow

    @property
    def alpha(self) -> float:
        """Weight of the permuted copy in the merge (``rebasin_plugin.alpha``)."""
        return self.rebasin_plugin.alpha

    @property
    def history(self) -> list[ILRecord]:
        """One :class:`ILRecord` per experience after the first (``rebasin_plugin.history``)."""
        return self.rebasin_plugin.history
