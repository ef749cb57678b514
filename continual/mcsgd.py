r"""MC-SGD (Mirzadeh et al., 2021) as an Avalanche plugin, :class:`MCSGDPlugin`, and strategy, :class:`MCSGD`.

Mode Connectivity SGD, from "Linear Mode Connectivity in Multitask and Continual Learning" (ICLR 2021).
Two weight vectors are carried from task to task: the continual (sequential) minimum :math:`\hat w_t`
and the MC-SGD solution :math:`\bar w_t`, the one that is evaluated. For every experience :math:`t`:

1. **continual step** — the strategy trains as usual (its own optimizer, plain fine-tuning like
   ``Naive``) from :math:`\hat w_{t-1}` and reaches :math:`\hat w_t`; the plugin keeps
   :math:`\hat w_t` and ``mem_size`` samples of the experience in its episodic memory, and draws
   ``subset_size`` samples of it (independently; not kept) for the step below;
2. **mode-connectivity step** — from :math:`\bar w_{t-1} + s\,(\hat w_t - \bar w_{t-1})`
   (``start_position`` :math:`s`), SGD with momentum moves :math:`w` so that the segment from
   :math:`\bar w_{t-1}` to :math:`w` has low loss on the memory (every task so far, this one
   included) and the segment from :math:`\hat w_t` to :math:`w` low loss on the current subset
   (:func:`continual.lines.fit_paired_lines`, with the reference code's update direction); the result
   :math:`\bar w_t` is written into the model's parameters for evaluation, and :math:`\hat w_t` is
   written back before the next experience trains.

For the first experience :math:`\bar w_1 = \hat w_1`.

``variant="reference"`` (the default) is the reference implementation as we read it
(imirzadeh/CL-LinearModeConnectivity, ``experiment_2.py``, ``core/train_methods.py``,
``core/mode_connectivity.py``; read, not copied). The defaults are its 20-task Rotated MNIST
configuration as committed (commit 06046cc) — 10 memory samples per task (its "memory 200" over 20 tasks), a
current-task subset of 200, 5 segments per line (6 points), ``mc_lr=0.15``, momentum 0.8, batch 16, one
pass, start 5% of the way from :math:`\bar w_{t-1}` to :math:`\hat w_t` — with the step that code takes: **one**
SGD step per pass, on the direction summed over every batch (``mc_step_every="epoch"``).
Its Permuted MNIST configuration (commit 73355dd) steps after every batch: ``mc_step_every="batch"``,
``mc_lr=0.0006``, ``start_position=0.25``, ``subset_size=2000``. docs/benchmarks.md ("MC-SGD's protocol")
reproduces the paper's numbers with both.
The continual step of the reference uses SGD (momentum 0.8, batch 16) with the learning rate
decayed per task; give the strategy that optimizer and :class:`continual.optim.ExperienceLRDecay`
(``python -m continual.compare --optimizer sgd --lr-decay``). Assumed or changed: the memory is a
seeded subset without replacement (the reference samples the memory and the subset with replacement) and
its batches (``min(mem_size, mc_batch_size)`` samples) mix tasks (the reference's hold one task each; with
one step per pass, the default, and ``mem_size <= mc_batch_size``, every batch has ``mem_size`` samples either
way and the batching changes nothing but the rounding).
The chains hold parameters only: with batch norm, :math:`\bar w_t` is evaluated with the running
statistics of :math:`\hat w_t`. Evaluations during an experience (``eval_every > 0``) see the
:math:`\hat w` chain.

``variant="all_lines"`` is our earlier reading of the paper's equation: every experience trains from
:math:`\bar w_{t-1}`, and the step minimises the memory loss averaged over the segments from every
:math:`\hat w_j` (:math:`j \le t`) to :math:`w` (:func:`continual.lines.fit_on_lines`; ``reduction``,
``mc_batch_size`` on the memory). It is kept for comparison (docs/benchmarks.md): it learns each new
task only partly and lands far below the reference.
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
from rebasin.checks import check_int, check_number_in, check_positive

from ._data import concat_tensors, sample_tensors
from .lines import REDUCTIONS, STEPS, fit_on_lines, fit_paired_lines
from .lines import line_points as line_points_of
from .merging import reset_optimizer_state_, write_state_

__all__ = ["MCSGDPlugin", "MCSGD", "MCSGDRecord", "VARIANTS"]

_OPTIMIZER_STATES = ("reset", "keep")
#: The two MC-SGD steps :class:`MCSGDPlugin` implements (module doc).
VARIANTS = ("reference", "all_lines")


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
        Segments in the objective (2 in ``"reference"``; the experiences seen so far in ``"all_lines"``).
    loss_before, loss_after
        The step's objective as reported by :class:`continual.lines.LineFit` at its start point (on the
        segment from :math:`\\bar w_{t-1}` towards :math:`\\hat w_t`) and at :math:`\\bar w_t`: the mean batch
        loss at the points ``k / line_points``, ``k = 1..line_points``, of every line on its own data (NaN for
        the first experience, where :math:`\\bar w_1 = \\hat w_1`).
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
    variant
        ``"reference"`` (default) or ``"all_lines"`` (see the module doc).
    mem_size
        Samples kept from every experience in the episodic memory (a seeded random subset of its
        training data, read through its evaluation transforms); in ``"reference"`` the memory line is
        batched ``min(mem_size, mc_batch_size)`` samples at a time (the reference batches every task's
        memory at its batch size).
    subset_size
        ``"reference"`` only: samples of the current experience for the :math:`\hat w_t` line (drawn
        with another seed than the memory's; the whole experience when it is smaller).
    line_points
        Segments per line: points ``k / line_points``, ``k = 0..line_points`` in ``"reference"`` (the
        anchor counts there), ``k = 1..line_points`` in ``"all_lines"``.
    mc_lr, mc_momentum
        SGD of the mode-connectivity step. The default step size, 0.15, belongs to ``mc_step_every="epoch"``
        (one step per pass); stepping after every batch it diverges on Rotated MNIST (docs/benchmarks.md):
        the reference's per-batch configuration uses 0.0006, ``variant="all_lines"``'s documented runs 0.05.
    mc_epochs
        Passes of the mode-connectivity step.
    mc_batch_size
        Batch size of the current subset (``"reference"``) or of the memory (``"all_lines"``).
    mc_step_every
        ``"reference"`` only: ``"epoch"`` (default), one step per pass on the direction summed over all the
        batches (the reference code's step at its Rotated MNIST configuration's commit), or ``"batch"``, a
        step per batch (at its Permuted MNIST configuration's commit); :func:`continual.lines.fit_paired_lines`'s
        ``step_every``.
    start_position
        Where the mode-connectivity step starts on the segment from :math:`\bar w_{t-1}` (0) to
        :math:`\hat w_t` (1).
    reduction
        ``"all_lines"`` only: ``"mean"`` or ``"sum"`` of the batch losses over points and lines.
    loss_fn
        ``loss_fn(outputs, targets)`` returning the batch mean; cross-entropy by default.
    optimizer_state
        ``"reset"`` (default): drop the strategy optimizer's per-parameter state (momenta, Adam moments)
        whenever the plugin writes weights into the model (the reference builds a new optimizer per
        task); ``"keep"``: leave it.
    seed
        Seeds the memory subsets, the current-task subsets and their shuffling. The plugin never draws from the
        global torch RNG (the model runs in evaluation mode in the mode-connectivity step, so dropout
        draws nothing), so the strategy's own training draws exactly what it would without it.

    Attributes
    ----------
    history : list[MCSGDRecord]
        One record per experience.
    anchors : list[dict[str, Tensor]]
        The continual minima :math:`\hat w_j` (parameters only).
    solution : dict[str, Tensor] or None
        :math:`\bar w_t`, the last MC-SGD solution (parameters only; None before the first experience).

    Examples
    --------
    >>> from avalanche.training import Naive                                           # doctest: +SKIP
    >>> strategy = Naive(model=model, optimizer=opt, plugins=[MCSGDPlugin(mem_size=10)])  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        variant: str = "reference",
        mem_size: int = 10,
        subset_size: int = 200,
        line_points: int = 5,
        mc_lr: float = 0.15,
        mc_momentum: float = 0.8,
        mc_epochs: int = 1,
        mc_batch_size: int = 16,
        mc_step_every: str = "epoch",
        start_position: float = 0.05,
        reduction: str = "mean",
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        optimizer_state: str = "reset",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise RebasinError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
        self.variant = variant
        self.mem_size = check_int(mem_size, "mem_size")
        self.subset_size = check_int(subset_size, "subset_size")
        self.points = line_points_of(line_points)  # checks line_points
        self.line_points = line_points
        self.mc_lr = check_positive(mc_lr, "mc_lr")
        self.mc_momentum = check_number_in(mc_momentum, "mc_momentum", 0, 1, high_open=True)
        self.mc_epochs = check_int(mc_epochs, "mc_epochs")
        self.mc_batch_size = check_int(mc_batch_size, "mc_batch_size")
        if mc_step_every not in STEPS:
            raise RebasinError(f"unknown mc_step_every {mc_step_every!r}; choose one of {STEPS}")
        self.mc_step_every = mc_step_every
        self.start_position = check_number_in(start_position, "start_position", 0, 1)
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
        self.solution: dict[str, Tensor] | None = None

    def _rng_seed(self, salt: int) -> int:
        return self.seed * 1_000_003 + len(self.history) * 101 + salt

    def storage(self) -> dict[str, int]:
        """What the method keeps besides the model: its episodic memory (``memory_samples``) and the model-sized
        states it needs (``model_copies``: the other chain, 1, in ``"reference"``; every :math:`\\hat w_j` in
        ``"all_lines"``)."""
        copies = 1 if self.variant == "reference" else len(self.anchors)
        return {"memory_samples": sum(int(x.shape[0]) for x, _ in self._memory), "model_copies": copies}

    def _reset_optimizer(self, strategy: Any) -> None:
        if self.optimizer_state == "reset" and getattr(strategy, "optimizer", None) is not None:
            reset_optimizer_state_(strategy.optimizer, strategy.model.parameters())

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        model: nn.Module = strategy.model
        self._start = {n: p.detach().clone() for n, p in model.named_parameters()}
        if self.variant == "reference" and self.anchors:
            # the continual step goes on from \hat w_{t-1}; the model holds \bar w_{t-1} for evaluation
            write_state_(model, {**model.state_dict(), **self.anchors[-1]})
            self._reset_optimizer(strategy)

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        model: nn.Module = strategy.model
        if self._start is None:  # trained outside strategy.train's callbacks
            raise RebasinError("MCSGDPlugin: after_training_exp without before_training_exp")
        exp = getattr(getattr(strategy, "experience", None), "current_experience", -1)
        hat = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.anchors.append(hat)
        dataset = strategy.experience.dataset
        self._memory.append(sample_tensors(dataset, self.mem_size, seed=self._rng_seed(0),
                                           batch_size=max(self.mem_size, 1)))
        memory = concat_tensors(self._memory)
        start, self._start = self._start, None
        if len(self.anchors) == 1:
            self.solution = {n: w.clone() for n, w in hat.items()}
            self.history.append(MCSGDRecord(int(exp), int(memory[0].shape[0]), 1, math.nan, math.nan, 0, 0.0))  # type: ignore[index]  # Optional narrowed by earlier logic mypy cannot follow
            return
        device = torch.device(strategy.device)
        if self.variant == "reference":
            prev = self.solution  # set at the first experience
            init = {n: w + self.start_position * (hat[n] - w) for n, w in prev.items()}  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
            current = sample_tensors(dataset, self.subset_size, seed=self._rng_seed(2),
                                     batch_size=min(self.subset_size, 1000))
            fit = fit_paired_lines(
                model, init,
                [(prev, memory, min(self.mem_size, self.mc_batch_size)), (hat, current, self.mc_batch_size)],  # type: ignore[list-item]  # Optional narrowed by earlier logic mypy cannot follow
                n_points=self.line_points, lr=self.mc_lr, momentum=self.mc_momentum, epochs=self.mc_epochs,
                loss_fn=self.loss_fn, seed=self._rng_seed(1), device=device, step_every=self.mc_step_every,
            )
            n_lines = 2
        else:
            if self.start_position:
                start = {n: w + self.start_position * (hat[n] - w) for n, w in start.items()}
            fit = fit_on_lines(
                model, start, self.anchors, memory, points=self.points, lr=self.mc_lr, momentum=self.mc_momentum,  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
                epochs=self.mc_epochs, batch_size=self.mc_batch_size, loss_fn=self.loss_fn,
                reduction=self.reduction, seed=self._rng_seed(1), device=device,
            )
            n_lines = len(self.anchors)
        self.solution = {n: w.detach().clone() for n, w in fit.state.items()}
        write_state_(model, {**model.state_dict(), **fit.state})
        self._reset_optimizer(strategy)
        self.history.append(
            MCSGDRecord(int(exp), int(memory[0].shape[0]), n_lines, fit.loss_before, fit.loss_after,  # type: ignore[index]  # Optional narrowed by earlier logic mypy cannot follow
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
    variant, subset_size, line_points, mc_lr, mc_momentum, mc_epochs, mc_batch_size, mc_step_every, start_position,
    reduction, optimizer_state, seed
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
        variant: str = "reference",
        mem_size: int = 10,
        subset_size: int = 200,
        line_points: int = 5,
        mc_lr: float = 0.15,
        mc_momentum: float = 0.8,
        mc_epochs: int = 1,
        mc_batch_size: int = 16,
        mc_step_every: str = "epoch",
        start_position: float = 0.05,
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
            variant=variant, mem_size=mem_size, subset_size=subset_size, line_points=line_points, mc_lr=mc_lr,
            mc_momentum=mc_momentum, mc_epochs=mc_epochs, mc_batch_size=mc_batch_size, mc_step_every=mc_step_every,
            start_position=start_position, reduction=reduction, loss_fn=criterion, optimizer_state=optimizer_state,
            seed=seed,
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
