r"""MC-SGD (Mirzadeh et al., 2021) as an Avalanche plugin, :class:`MCSGDPlugin`, and strategy, :class:`MCSGD`.

Mode Connectivity SGD, from "Linear Mode Connectivity in Multitask and Continual Learning" (ICLR 2021).
For every experience :math:`t`:

1. **continual step** — the strategy trains as usual (its own optimizer, plain fine-tuning like
   ``Naive``) from :math:`\bar w_{t-1}`, the previous MC-SGD solution, and reaches the continual
   minimum :math:`\hat w_t`; the plugin keeps :math:`\hat w_t` and ``mem_size`` samples of the
   experience in its episodic memory;
2. **mode-connectivity step** — starting again from :math:`\bar w_{t-1}` (by default a tenth of the
   way from it towards :math:`\hat w_t`, ``start_position``), SGD minimises the memory
   loss sampled along the segments from every :math:`\hat w_j` (:math:`j \le t`) to :math:`w`
   (:func:`continual.lines.line_loss`); the result :math:`\bar w_t` is written into the model's
   parameters (the optimizer keeps holding them; its per-parameter state is dropped).

For the first experience :math:`\bar w_1 = \hat w_1`. Nothing from the memory is mixed into the
continual step: the memory is only used by the mode-connectivity step.

Defaults (``mem_size=200`` per experience, ``line_points=10``, ``mc_lr=0.05``, ``mc_momentum=0.8``,
``mc_batch_size=64``, ``mc_epochs=1``, ``start_position=0.1``) are the reference implementation's
configuration for Rotated MNIST as we recall it (imirzadeh/MCSGD; its source could not be consulted when
this was written, so treat them as our reading, not a verified copy). One departure: the batch losses
at the sampled points are averaged (``reduction="mean"``), not summed; the sum makes the step grow with
the number of tasks and points, and with these learning rates it diverged on 5-task Rotated MNIST
(docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn

from rebasin import RebasinError

from ._checks import positive_float, positive_int
from ._data import concat_tensors, sample_tensors
from .lines import REDUCTIONS, fit_on_lines
from .lines import line_points as line_points_of
from .merging import reset_optimizer_state_, write_state_

__all__ = ["MCSGDPlugin", "MCSGD", "MCSGDRecord"]

_OPTIMIZER_STATES = ("reset", "keep")


@dataclass(frozen=True)
class MCSGDRecord:
    """What the mode-connectivity step did after one experience.

    Attributes
    ----------
    experience
        ``current_experience`` of the experience just trained.
    n_memory
        Memory samples (every experience so far, this one included).
    n_lines
        Segments in the objective (the experiences seen so far).
    loss_before, loss_after
        Memory line loss at :math:`\\bar w_{t-1}` and at :math:`\\bar w_t` (NaN for the first experience,
        where :math:`\\bar w_1 = \\hat w_1`).
    steps
        SGD steps of the mode-connectivity step.
    time_s
        Its wall time.
    """

    experience: int
    n_memory: int
    n_lines: int
    loss_before: float
    loss_after: float
    steps: int
    time_s: float


class MCSGDPlugin(SupervisedPlugin):
    r"""MC-SGD's episodic memory and mode-connectivity step, for any supervised strategy (see the module doc).

    Parameters
    ----------
    mem_size
        Samples kept from every experience (a seeded random subset of its training data, read through
        its evaluation transforms).
    line_points
        Points sampled on every segment: :math:`w` is weighted ``k / line_points`` for ``k = 1..line_points``
        (the anchor itself, ``k = 0``, does not depend on :math:`w`).
    mc_lr, mc_momentum
        SGD of the mode-connectivity step.
    mc_epochs
        Passes over the memory in the mode-connectivity step.
    mc_batch_size
        Memory samples per step.
    start_position
        Where the mode-connectivity step starts on the segment from :math:`\bar w_{t-1}` (0) to
        :math:`\hat w_t` (1). The paper's equation starts from :math:`\bar w_{t-1}`; the reference
        implementation's configuration, as we read it, starts a tenth of the way (0.1, the default).
    reduction
        How the batch losses at the sampled points of every line are combined: ``"mean"`` or
        ``"sum"`` (the paper's; the step then grows with the number of tasks and points).
    loss_fn
        ``loss_fn(outputs, targets)`` returning the batch mean; cross-entropy by default.
    optimizer_state
        ``"reset"`` (default): drop the strategy optimizer's per-parameter state (Adam moments computed
        at :math:`\hat w_t`) after writing :math:`\bar w_t`; ``"keep"``: leave it.
    seed
        Seeds the memory subsets and the shuffling of the memory. The plugin never draws from the
        global torch RNG (the model runs in evaluation mode in the mode-connectivity step, so dropout
        draws nothing), so the strategy's own training draws exactly what it would without it.

    Attributes
    ----------
    history : list[MCSGDRecord]
        One record per experience.
    anchors : list[dict[str, Tensor]]
        The continual minima :math:`\hat w_j` (parameters only).

    Examples
    --------
    >>> from avalanche.training import Naive                                           # doctest: +SKIP
    >>> strategy = Naive(model=model, optimizer=opt, plugins=[MCSGDPlugin(mem_size=10)])  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        mem_size: int = 200,
        line_points: int = 10,
        mc_lr: float = 0.05,
        mc_momentum: float = 0.8,
        mc_epochs: int = 1,
        mc_batch_size: int = 64,
        start_position: float = 0.1,
        reduction: str = "mean",
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        optimizer_state: str = "reset",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.mem_size = positive_int(mem_size, "mem_size")
        self.points = line_points_of(line_points)
        self.mc_lr = positive_float(mc_lr, "mc_lr")
        if isinstance(mc_momentum, bool) or not isinstance(mc_momentum, (int, float)) or not 0 <= mc_momentum < 1:
            raise RebasinError(f"mc_momentum must be a number in [0, 1), got {mc_momentum!r}")
        self.mc_momentum = float(mc_momentum)
        self.mc_epochs = positive_int(mc_epochs, "mc_epochs")
        self.mc_batch_size = positive_int(mc_batch_size, "mc_batch_size")
        if isinstance(start_position, bool) or not isinstance(start_position, (int, float)) \
                or not 0 <= start_position <= 1:
            raise RebasinError(f"start_position must be a number in [0, 1], got {start_position!r}")
        self.start_position = float(start_position)
        if optimizer_state not in _OPTIMIZER_STATES:
            raise RebasinError(f"unknown optimizer_state {optimizer_state!r}; choose one of {_OPTIMIZER_STATES}")
        if reduction not in REDUCTIONS:
            raise RebasinError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
        self.reduction = reduction
        if loss_fn is not None and not callable(loss_fn):
            raise RebasinError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RebasinError(f"seed must be an int, got {seed!r}")
        self.loss_fn = loss_fn
        self.optimizer_state = optimizer_state
        self.seed = seed
        self.history: list[MCSGDRecord] = []
        self.anchors: list[dict[str, Tensor]] = []
        self._memory: list[tuple[Tensor, Tensor]] = []
        self._start: dict[str, Tensor] | None = None

    def _rng_seed(self, salt: int) -> int:
        return self.seed * 1_000_003 + len(self.history) * 101 + salt

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._start = {n: p.detach().clone() for n, p in strategy.model.named_parameters()}

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        model: nn.Module = strategy.model
        if self._start is None:  # trained outside strategy.train's callbacks
            raise RebasinError("MCSGDPlugin: after_training_exp without before_training_exp")
        exp = getattr(getattr(strategy, "experience", None), "current_experience", -1)
        self.anchors.append({n: p.detach().clone() for n, p in model.named_parameters()})
        self._memory.append(
            sample_tensors(strategy.experience.dataset, self.mem_size, seed=self._rng_seed(0),
                           batch_size=max(self.mem_size, 1))
        )
        memory = concat_tensors(self._memory)
        start, self._start = self._start, None
        if len(self.anchors) == 1:
            self.history.append(MCSGDRecord(int(exp), int(memory[0].shape[0]), 1, math.nan, math.nan, 0, 0.0))
            return
        if self.start_position:
            hat = self.anchors[-1]
            start = {n: w + self.start_position * (hat[n] - w) for n, w in start.items()}
        fit = fit_on_lines(
            model, start, self.anchors, memory, points=self.points, lr=self.mc_lr, momentum=self.mc_momentum,
            epochs=self.mc_epochs, batch_size=self.mc_batch_size, loss_fn=self.loss_fn,
            reduction=self.reduction, seed=self._rng_seed(1),
            device=torch.device(strategy.device),
        )
        write_state_(model, {**model.state_dict(), **fit.state})
        if self.optimizer_state == "reset" and getattr(strategy, "optimizer", None) is not None:
            reset_optimizer_state_(strategy.optimizer, model.parameters())
        self.history.append(
            MCSGDRecord(int(exp), int(memory[0].shape[0]), len(self.anchors), fit.loss_before, fit.loss_after,
                        fit.steps, fit.time_s)
        )


class MCSGD(SupervisedTemplate):
    r"""MC-SGD (Mirzadeh et al., 2021): ``SupervisedTemplate`` + :class:`MCSGDPlugin` (see the module doc).

    Parameters
    ----------
    model, optimizer, criterion, train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator,
    eval_every, peval_mode
        As for :class:`avalanche.training.templates.SupervisedTemplate` (keyword-only); ``criterion``
        defaults to cross-entropy and is also the loss of the mode-connectivity step. ``optimizer``
        runs the continual step. ``plugins`` is not mutated: the strategy runs ``[*plugins,
        mcsgd_plugin]``.
    mem_size
        Samples of every experience kept in the episodic memory.
    line_points, mc_lr, mc_momentum, mc_epochs, mc_batch_size, start_position, reduction, optimizer_state,
    seed
        As for :class:`MCSGDPlugin`.

    Attributes
    ----------
    mcsgd_plugin : MCSGDPlugin
        Holds the method; ``history`` reads from it.

    Examples
    --------
    >>> strategy = MCSGD(model=model, optimizer=torch.optim.SGD(model.parameters(), 0.1),
    ...                  train_mb_size=10, train_epochs=1, mem_size=10)   # doctest: +SKIP
    >>> for exp in benchmark.train_stream:                                # doctest: +SKIP
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
        mem_size: int = 200,
        line_points: int = 10,
        mc_lr: float = 0.05,
        mc_momentum: float = 0.8,
        mc_epochs: int = 1,
        mc_batch_size: int = 64,
        start_position: float = 0.1,
        reduction: str = "mean",
        optimizer_state: str = "reset",
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise RebasinError(f"MCSGD: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise RebasinError(f"MCSGD: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if plugins is not None and (isinstance(plugins, (str, bytes)) or not isinstance(plugins, Sequence)):
            raise RebasinError(f"MCSGD: plugins must be a list of plugins, got {type(plugins).__name__}")
        criterion = nn.CrossEntropyLoss() if criterion is None else criterion
        self.mcsgd_plugin = MCSGDPlugin(
            mem_size=mem_size, line_points=line_points, mc_lr=mc_lr, mc_momentum=mc_momentum, mc_epochs=mc_epochs,
            mc_batch_size=mc_batch_size, start_position=start_position, reduction=reduction,
            loss_fn=criterion,
            optimizer_state=optimizer_state, seed=seed,
        )
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=[*(plugins or []), self.mcsgd_plugin],
            evaluator=evaluator,
            eval_every=eval_every,
            peval_mode=peval_mode,
        )

    @property
    def history(self) -> list[MCSGDRecord]:
        """One :class:`MCSGDRecord` per experience (``mcsgd_plugin.history``)."""
        return self.mcsgd_plugin.history
