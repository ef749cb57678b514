"""``RebasinMergePlugin``: after each experience, re-basin and merge with the previous experience's model.

A thin Avalanche :class:`~avalanche.training.plugins.SupervisedPlugin` over the plain functions of
:mod:`continual.merging` and :func:`rebasin.align`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import Tensor, nn

from rebasin import PermutationSpec, RebasinError, align, get_matcher
from rebasin.apps.data import tensor_loader

from ._data import concat_tensors, sample_tensors, spec_at_experience, subset, tensor_batches, tensors_at, trace_spec
from .merging import CRITERIA, AlphaChoice, check_alpha, merge_states, reset_optimizer_state_, select_alpha, write_state_
from .merging import alpha_grid as _alpha_grid

__all__ = ["RebasinMergePlugin", "MergeRecord", "ALPHA_SOURCES", "TRAIN_FROM"]

ALPHA_SOURCES = ("holdout", "replay_holdout", "replay", "memory")
#: Where each experience's training starts (see ``RebasinMergePlugin``'s ``train_from``).
TRAIN_FROM = ("merged", "sequential")
_OPTIMIZER_STATES = ("reset", "keep")


@dataclass(frozen=True)
class MergeRecord:
    """What the plugin did after one experience.

    Attributes
    ----------
    experience
        ``current_experience`` of the experience just trained.
    alpha
        Weight of the freshly trained model in the merge (1.0: untouched).
    choice
        The grid search behind ``alpha`` (None for a fixed alpha).
    perms
        The permutations that aligned the previous model to the new one (empty when skipped).
    n_old, n_new
        Samples of old / new data used for the alignment and the choice of alpha.
    old_weight
        Weight of the old-data loss in the choice of alpha (None for a fixed alpha).
    time_s
        Wall time of alignment plus merge.
    """

    experience: int
    alpha: float
    choice: AlphaChoice | None
    perms: dict[str, Tensor]
    n_old: int
    n_new: int
    time_s: float
    old_weight: float | None = None


def _find_replay_buffer(strategy: Any) -> Any | None:
    """The replay buffer dataset of the strategy's first plugin that has one (ReplayPlugin and kin)."""
    for plugin in getattr(strategy, "plugins", []):
        policy = getattr(plugin, "storage_policy", None)
        if policy is not None and hasattr(policy, "buffer"):
            return policy
    return None


class RebasinMergePlugin(SupervisedPlugin):
    r"""Align the freshly trained model to the previous experience's model and merge along the line.

    After training on experience :math:`k \ge 1` (the first experience a strategy trains is only
    remembered), with :math:`\theta_{\text{prev}}` the model the strategy held before experience :math:`k`
    (the previous merge) and :math:`\theta_{\text{new}}` the weights its training reached:

    1. :func:`rebasin.align` finds the permutation :math:`\pi` of the hidden units of
       :math:`\theta_{\text{prev}}` that best matches :math:`\theta_{\text{new}}`;
    2. the strategy's model gets :math:`(1-\alpha)\,\pi(\theta_{\text{prev}}) + \alpha\,\theta_{\text{new}}`,
       written **into the existing parameter objects** (the optimizer keeps holding them);
    3. the optimizer's per-parameter state is dropped (``optimizer_state="reset"``), so no Adam moment
       or momentum computed for the pre-merge weights is applied to the merged ones.

    By default (``train_from="sequential"``) the next experience trains from :math:`\theta_{\text{new}}`,
    the weights before the merge, not from the merge: two chains of weights, as in MC-SGD — a sequential one
    that keeps learning each task in full, and the merged one, which the model holds between experiences
    (what is evaluated) and which is the previous end of the next merge. ``train_from="merged"`` trains
    every experience from the merge (one chain). docs/benchmarks.md ("Choosing alpha: a grid of protocols")
    measures both.

    ``alpha`` is the weight of the **new** model: ``alpha=1`` leaves the model untouched (bitwise), with
    either chain. With two chains the plugin keeps a copy of the unmerged state (one more model's worth of
    memory on its device), and ``optimizer_state="reset"`` also drops the sequential chain's optimizer state
    after every merge with ``alpha < 1`` (``"keep"`` keeps it: with two chains the kept state belongs to the
    weights training resumes from). Plugins that snapshot the model after an experience and run after this
    one (Avalanche's ``EWC`` and ``LwF`` append theirs after the user's plugins) see the merge, while training
    resumes from the unmerged weights; use ``train_from="merged"`` to keep them on one chain.
    The previous model is permuted into the new model's basis, so the optimizer state that is kept
    (``optimizer_state="keep"``) still belongs to the parameter it was computed for.

    Parameters
    ----------
    matcher
        Any registered matcher (``rebasin.matcher_names()``, including one added with
        :func:`rebasin.register_matcher`): ``"weight_matching"`` (data-free), ``"activation_matching"``,
        ``"sinkhorn"``, ... Matchers that read data (registered with ``needs_data`` or ``uses_data``) get
        the old + new samples described below.
    alpha
        A fixed weight of the new model in ``[0, 1]``, or None (default) to choose it on a grid for
        each experience: the candidate minimising ``old_weight`` times the mean loss on old data plus
        ``1 - old_weight`` times the mean loss on new data (:func:`continual.merging.select_alpha`; the
        error rate instead of the loss with ``select_alpha_by="accuracy"``).
    select_alpha_on
        Where the data for choosing alpha comes from:

        * ``"holdout"`` (default): data the model was not trained on. The plugin holds out
          ``memory_per_experience`` samples of every experience (seeded; removed from the strategy's
          ``adapted_dataset`` before its dataloader is built, so neither the training pass nor a
          replay plugin's dataloader of that experience sees them) and keeps them: the current
          experience's slice is the new data, the earlier slices the old data. Choosing on data the
          model was trained on favours the freshly trained model; the grid in docs/benchmarks.md
          ("Choosing alpha: a grid of protocols") measures the sources against each other. Costs: the
          strategy trains on ``memory_per_experience`` fewer samples per experience, and the plugin
          **stores** ``memory_per_experience`` samples of every experience besides any replay buffer
          (the grid also reports Replay given that storage as extra buffer). A replay buffer, which
          Avalanche fills from ``experience.dataset``, may store and later replay a few held-out
          samples. Plugins placed before this one that add old data to ``adapted_dataset`` (or a
          cumulative strategy) mix old samples into the "new" slice. Only with ``alpha=None``.
        * ``"replay_holdout"``: old data from the replay buffer (as ``"replay"``), new data from a
          held-out slice of the current experience that is not kept: no storage besides the buffer, but
          the buffer is trained on and the choice tends to ``alpha = 1`` (the grid's
          "replay buffer + new held-out" runs).
        * ``"replay"``: the strategy's replay buffer (the ``storage_policy.buffer`` of a
          :class:`~avalanche.training.plugins.ReplayPlugin`, e.g. inside ``Replay``), as it was at the
          start of the experience. A strategy without a replay buffer is rejected before the first
          experience trains; a buffer that is empty when a merge needs it raises
          :class:`RebasinError` (no silent fallback). The buffer's samples are mixed into every
          training batch of ``Replay``, so their loss favours the freshly trained model and the
          choice tends to ``alpha = 1`` (no merge). The new data are training samples.
        * ``"memory"``: the plugin keeps its own ``memory_per_experience`` samples of every
          experience it has seen (training samples; nothing is added to or removed from the
          strategy's training data). The new data are training samples.
    select_alpha_by
        ``"loss"`` (default): the candidate with the lowest weighted mean loss; ``"accuracy"``: the lowest
        weighted error rate, ties to the lower loss (:func:`continual.merging.select_alpha`'s ``criterion``).
    old_weight
        Weight of the old-data loss when choosing alpha, in ``[0, 1]``. None (default): every task
        counts the same, ``k / (k + 1)`` at the merge after ``k`` earlier experiences (the average
        accuracy over all tasks seen is what a continual learner is judged by); 0.5: old and new
        data count the same.
    alpha_grid
        Number of evenly spaced candidates in ``[0, 1]`` (both ends included) or explicit values.
    new_samples
        Samples of the current experience used as "new data" (seeded random subset; with
        ``"holdout"`` the held-out slice, at most this many).
    old_samples
        At most this many samples of old data (seeded random subset of the buffer / memory).
    memory_per_experience
        Samples kept per experience by ``select_alpha_on="memory"`` and held out per experience by
        ``"holdout"``. An experience with no more samples than this is refused (nothing left to train on).
    spec
        Permutation spec of the model. If None it is traced with :func:`rebasin.trace.spec_from_model`:
        at construction when ``model`` and ``example_input`` are given, otherwise before the first
        experience trains (from ``example_input`` or the experience's first samples). A model that
        cannot be traced raises :class:`RebasinError` there, before any training.
    model, example_input
        Optional, to trace the spec at construction.
    matcher_options
        Extra keyword arguments for the matcher (see :func:`rebasin.align`).
    loss_fn
        Loss for choosing alpha, ``loss_fn(outputs, targets)`` returning the batch mean;
        cross-entropy by default.
    optimizer_state
        ``"reset"`` (default) or ``"keep"``.
    train_from
        ``"sequential"`` (default): every experience trains from the previous experience's weights *before*
        its merge, as MC-SGD's continual step does; the merged model, held between experiences (for
        evaluation), is the "previous" end of the next merge. ``"merged"``: every experience trains from the
        merged model (one chain of weights; the default until the grid of protocols preferred two chains).
    batch_size
        Batch size of the evaluation passes.
    seed
        Seeds the subsets, the loaders and the matcher. The plugin never draws from the global torch
        RNG (private generators only, also for every DataLoader it iterates), so it does not change
        the training it observes: ``alpha=1.0`` inside ``Replay`` trains what ``Replay`` alone does.

    Attributes
    ----------
    history : list[MergeRecord]
        One record per experience after the first.

    Examples
    --------
    >>> from avalanche.training import Replay                                   # doctest: +SKIP
    >>> plugin = RebasinMergePlugin()  # weight matching, alpha chosen on held-out samples  # doctest: +SKIP
    >>> strategy = Replay(model=model, optimizer=opt, mem_size=1000, plugins=[plugin])    # doctest: +SKIP
    >>> for exp in benchmark.train_stream:                                      # doctest: +SKIP
    ...     strategy.train(exp)
    """

    def __init__(
        self,
        *,
        matcher: str = "weight_matching",
        alpha: float | None = None,
        select_alpha_on: str = "holdout",
        select_alpha_by: str = "loss",
        old_weight: float | None = None,
        alpha_grid: int | Sequence[float] = 11,
        new_samples: int = 1000,
        old_samples: int = 1000,
        memory_per_experience: int = 200,
        spec: PermutationSpec | None = None,
        model: nn.Module | None = None,
        example_input: Any = None,
        matcher_options: Mapping[str, Any] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        optimizer_state: str = "reset",
        train_from: str = "sequential",
        batch_size: int = 500,
        seed: int = 0,
    ) -> None:
        super().__init__()
        registered = get_matcher(matcher)  # an unknown name lists the registered matchers
        registered.check_options(matcher_options or {})  # a typo fails here, not after the first experience
        if select_alpha_on not in ALPHA_SOURCES:
            raise RebasinError(f"unknown select_alpha_on {select_alpha_on!r}; choose one of {ALPHA_SOURCES}")
        if optimizer_state not in _OPTIMIZER_STATES:
            raise RebasinError(f"unknown optimizer_state {optimizer_state!r}; choose one of {_OPTIMIZER_STATES}")
        if train_from not in TRAIN_FROM:
            raise RebasinError(f"unknown train_from {train_from!r}; choose one of {TRAIN_FROM}")
        if select_alpha_by not in CRITERIA:
            raise RebasinError(f"unknown select_alpha_by {select_alpha_by!r}; choose one of {CRITERIA}")
        for name, value in (("new_samples", new_samples), ("old_samples", old_samples),
                            ("memory_per_experience", memory_per_experience), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RebasinError(f"{name} must be a positive int, got {value!r}")
        self.matcher = matcher
        self.alpha = None if alpha is None else check_alpha(alpha)
        self.select_alpha_on = select_alpha_on
        self.select_alpha_by = select_alpha_by
        self.train_from = train_from
        self._sequential: dict[str, Tensor] | None = None
        self.old_weight = None if old_weight is None else check_alpha(old_weight, "old_weight")
        self.alpha_grid = _alpha_grid(alpha_grid)
        self.new_samples = new_samples
        self.old_samples = old_samples
        self.memory_per_experience = memory_per_experience
        self.matcher_options = dict(matcher_options or {})
        self.loss_fn = loss_fn
        self.optimizer_state = optimizer_state
        self.batch_size = batch_size
        self.seed = int(seed)
        self.example_input = example_input
        if spec is None and model is not None:
            if example_input is None:
                raise RebasinError("RebasinMergePlugin: pass example_input= with model= to trace the spec")
            spec = trace_spec(model, example_input)
        self.spec = spec
        self.history: list[MergeRecord] = []
        self._prev_state: dict[str, Tensor] | None = None
        self._old_buffer: Any = None
        self._memory: list[tuple[Tensor, Tensor]] = []
        self._heldout: tuple[Tensor, Tensor] | None = None
        self._n_seen = 0

    # ------------------------------------------------------------------ helpers
    @property
    def _needs_data(self) -> bool:
        return self.alpha is None or get_matcher(self.matcher).uses_data

    def _rng_seed(self, salt: int) -> int:
        return self.seed * 1_000_003 + self._n_seen * 101 + salt

    @property
    def _holds_out(self) -> bool:
        return self.alpha is None and self.select_alpha_on in ("holdout", "replay_holdout")

    def _old_data(self, strategy: Any) -> tuple[Tensor, Tensor] | None:
        if self.select_alpha_on in ("memory", "holdout"):
            data = concat_tensors(self._memory)
            if data is not None and data[0].shape[0] > self.old_samples:
                g = torch.Generator().manual_seed(self._rng_seed(1))
                idx = torch.randperm(data[0].shape[0], generator=g)[: self.old_samples]
                data = (data[0][idx], data[1][idx])
            return data
        buffer = self._old_buffer
        if buffer is None or len(buffer) == 0:
            raise RebasinError(
                f"RebasinMergePlugin(select_alpha_on={self.select_alpha_on!r}): the replay buffer is empty at experience "
                f"{_exp_id(strategy)}, so alpha cannot be chosen on old data. Give the replay plugin a "
                "positive mem_size, put the replay plugin in the strategy, use select_alpha_on='memory', "
                "or pass a fixed alpha."
            )
        return sample_tensors(buffer, self.old_samples, seed=self._rng_seed(1), batch_size=self.batch_size)

    # ------------------------------------------------------------------ Avalanche callbacks
    def after_train_dataset_adaptation(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Hold out ``memory_per_experience`` samples of the experience (``select_alpha_on="holdout"``).

        Runs after Avalanche adapted the experience's dataset and before the training dataloader
        (the strategy's own or a replay plugin's) is built from ``strategy.adapted_dataset``.
        """
        self._heldout = None
        if not self._holds_out:
            return
        dataset = strategy.adapted_dataset
        n, m = len(dataset), self.memory_per_experience
        if n <= m:
            raise RebasinError(
                f"RebasinMergePlugin(select_alpha_on='holdout'): experience {_exp_id(strategy)} has {n} training "
                f"samples; holding out memory_per_experience={m} would leave nothing to train on. Lower "
                "memory_per_experience, use select_alpha_on='memory', or pass a fixed alpha."
            )
        g = torch.Generator().manual_seed(self._rng_seed(5))
        order = torch.randperm(n, generator=g)
        held, kept = order[:m].sort().values.tolist(), order[m:].sort().values.tolist()
        self._heldout = tensors_at(dataset, held, seed=self._rng_seed(5), batch_size=self.batch_size)
        strategy.adapted_dataset = subset(dataset, kept)

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.spec is None:
            self.spec = spec_at_experience(strategy, self.example_input)
        if self.select_alpha_on in ("replay", "replay_holdout") and self._needs_data and self.alpha is None:
            policy = _find_replay_buffer(strategy)
            if policy is None:
                raise RebasinError(
                    f"RebasinMergePlugin(select_alpha_on={self.select_alpha_on!r}) needs a replay buffer in the strategy "
                    "(the Replay strategy or a ReplayPlugin in plugins=); none was found. Use "
                    "select_alpha_on='memory' or a fixed alpha."
                )
            # The buffer as it is now: old experiences only, whatever the order of the plugins.
            self._old_buffer = policy.buffer
        self._prev_state = {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}
        state = strategy.model.state_dict()
        if self.train_from == "sequential" and self._sequential is not None and any(
            not torch.equal(v, state[k]) for k, v in self._sequential.items()
        ):
            # the model holds the merge (the previous end of the next one); training goes on from the weights before
            # it. Nothing is written (nor the optimizer reset) when the last merge kept the new model (alpha = 1).
            write_state_(strategy.model, self._sequential)
            if self.optimizer_state == "reset" and getattr(strategy, "optimizer", None) is not None:
                reset_optimizer_state_(strategy.optimizer, strategy.model.parameters())

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        try:
            if self.train_from == "sequential":
                self._sequential = {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}
            if self._n_seen > 0 and self._prev_state is not None:
                self._merge(strategy)
            if self.select_alpha_on == "holdout" and self._holds_out and self._heldout is not None:
                self._memory.append(self._heldout)
            elif self.select_alpha_on == "memory" and self._needs_data:
                self._memory.append(
                    sample_tensors(
                        strategy.experience.dataset, self.memory_per_experience,
                        seed=self._rng_seed(2), batch_size=self.batch_size,
                    )
                )
        finally:
            self._n_seen += 1
            self._prev_state = None
            self._old_buffer = None
            self._heldout = None

    # ------------------------------------------------------------------ the merge
    def _merge(self, strategy: Any) -> None:
        start = time.perf_counter()
        model: nn.Module = strategy.model
        exp = _exp_id(strategy)
        if self.alpha == 1.0:
            self.history.append(MergeRecord(exp, 1.0, None, {}, 0, 0, time.perf_counter() - start))
            return
        device = torch.device(strategy.device)
        new_data = old_data = None
        if self._needs_data:
            if self._holds_out:
                new_data = self._heldout
                if new_data is None:
                    raise RebasinError(
                        "RebasinMergePlugin(select_alpha_on='holdout'): no held-out samples for this experience; "
                        "the strategy did not call after_train_dataset_adaptation (a custom training loop?). "
                        "Use select_alpha_on='memory' or a fixed alpha."
                    )
                if new_data[0].shape[0] > self.new_samples:  # a seeded random subset, not the first rows
                    g = torch.Generator().manual_seed(self._rng_seed(0))
                    idx = torch.randperm(new_data[0].shape[0], generator=g)[: self.new_samples].sort().values
                    new_data = (new_data[0][idx], new_data[1][idx])
            else:
                new_data = sample_tensors(
                    strategy.experience.dataset, self.new_samples, seed=self._rng_seed(0), batch_size=self.batch_size
                )
            if self.alpha is None or self.select_alpha_on == "memory":
                old_data = self._old_data(strategy)
        prev_model = copy.deepcopy(model)
        prev_model.load_state_dict(self._prev_state)
        loader = None
        if new_data is not None:
            both = concat_tensors([d for d in (old_data, new_data) if d is not None])
            loader = tensor_loader(both[0], both[1], batch_size=self.batch_size, shuffle=True, seed=self._rng_seed(3))
        matcher = get_matcher(self.matcher)
        options = dict(self.matcher_options)
        if self.matcher == "sinkhorn" and matcher.accepts("fit"):  # a replacement "sinkhorn" may not take fit=
            options.setdefault("fit", {"progress": False})
        result = align(
            model, prev_model, method=self.matcher, loader=loader, spec=self.spec, seed=self._rng_seed(4),
            device=device if matcher.accepts("device") else None, **options,
        )
        state_new = {k: v.detach().clone() for k, v in model.state_dict().items()}
        prev_aligned = {k: v.to(device) for k, v in result.state_b.items()}
        choice = None
        alpha = self.alpha
        old_weight = None
        if alpha is None:
            k = self._n_seen  # experiences before this one
            old_weight = self.old_weight if self.old_weight is not None else k / (k + 1)
            new_loader = tensor_batches(new_data[0], new_data[1], self.batch_size)
            old_loader = tensor_batches(old_data[0], old_data[1], self.batch_size)
            choice = select_alpha(
                model, prev_aligned, state_new, new_loader=new_loader, old_loader=old_loader,
                grid=self.alpha_grid, loss_fn=self.loss_fn, device=device, old_weight=old_weight,
                criterion=self.select_alpha_by,
            )
            alpha = choice.alpha
        if alpha != 1.0:
            write_state_(model, merge_states(prev_aligned, state_new, alpha))
            if self.optimizer_state == "reset" and getattr(strategy, "optimizer", None) is not None:
                reset_optimizer_state_(strategy.optimizer, model.parameters())
        self.history.append(
            MergeRecord(
                exp, float(alpha), choice, {k: v.cpu() for k, v in result.perms.items()},
                0 if old_data is None else int(old_data[0].shape[0]),
                0 if new_data is None else int(new_data[0].shape[0]),
                time.perf_counter() - start,
                old_weight,
            )
        )


def _exp_id(strategy: Any) -> int:
    exp = getattr(strategy, "experience", None)
    return int(getattr(exp, "current_experience", -1) if exp is not None else -1)

