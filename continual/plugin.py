"""``RebasinMergePlugin``: after each experience, re-basin and merge with the previous experience's model.

A thin Avalanche :class:`~avalanche.training.plugins.SupervisedPlugin` over the plain functions of
:mod:`continual.merging` and :func:`rebasin.align`; how the merge weight is chosen is an
:class:`continual.AlphaPolicy` (:mod:`continual.policy`).
"""

from __future__ import annotations

import copy
import functools
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import Tensor, nn

from rebasin import PermutationSpec, RebasinError, RebasinWarning, align
from rebasin.datasets import tensor_loader
from rebasin.matching import get_matcher

from ._data import (
    concat_tensors,
    find_replay_buffer,
    first_input,
    sample_tensors,
    spec_at_experience,
    subset,
    tensor_batches,
    tensors_at,
    trace_spec,
)
from .merging import (
    AlphaChoice,
    LayerAlphaChoice,
    conservative_alpha,
    merge_states,
    reset_optimizer_state_,
    select_alpha,
    select_layer_alphas,
    write_state_,
)
from .policy import ALPHA_SOURCES, AlphaPolicy, as_alpha, holdout_size

__all__ = ["RebasinMergePlugin", "MergeRecord", "ALPHA_SOURCES", "TRAIN_FROM", "DEPRECATED_OPTIONS", "DEFAULT_ALPHA",
           "FALLBACK_ALPHA"]

#: Where each experience's training starts (see ``RebasinMergePlugin``'s ``train_from``).
TRAIN_FROM = ("merged", "sequential")
_OPTIMIZER_STATES = ("reset", "keep")
#: The 0.2 keywords that only mattered with ``alpha=None``, and the :class:`AlphaPolicy` field each became.
DEPRECATED_OPTIONS = {
    "select_alpha_on": "source", "select_alpha_by": "criterion", "old_weight": "old_weight",
    "alpha_grid": "grid", "new_samples": "new_samples", "old_samples": "old_samples",
    "memory_per_experience": "samples",
}


@dataclass(frozen=True)
class MergeRecord:
    """What the plugin did after one experience.

    Attributes
    ----------
    experience
        ``current_experience`` of the experience just trained.
    alpha
        Weight of the freshly trained model in the merge (1.0: untouched); with
        ``AlphaPolicy(granularity="layer")`` the single alpha the layers' search started from.
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
    refit_steps
        Optimizer steps taken on the held-out slice after the choice (``AlphaPolicy(refit=True)``), else 0.
    transforms
        With ``matcher="transform_matching"``: every class's transform (signed permutations, orthogonal maps;
        :attr:`rebasin.Alignment.transforms`), else None.
    layers
        With ``AlphaPolicy(granularity="layer")``: the per-layer search, whose ``alphas`` weighted the merge,
        else None.
    """

    experience: int
    alpha: float
    choice: AlphaChoice | None
    perms: dict[str, Tensor]
    n_old: int
    n_new: int
    time_s: float
    old_weight: float | None = None
    refit_steps: int = 0
    transforms: dict[str, Any] | None = None
    layers: LayerAlphaChoice | None = None

    @property
    def layer_alphas(self) -> dict[str, float] | None:
        """``{layer: alpha}`` of a per-layer merge, else None."""
        return None if self.layers is None else self.layers.alphas


def _state_new(model: nn.Module, result: Any) -> dict[str, Tensor]:
    """A copy of the fresh model's state in the parametrisation the alignment used (``result.state_a``).

    Transform matching with ``symmetry="orthogonal"`` folds RMSNorm scales into their readers (the same
    architecture: the merge is written back as it is); a LayerNorm model would be rewritten into another
    architecture, which cannot be written into the strategy's model.
    """
    own = model.state_dict()
    state = own if result.state_a is None else result.state_a
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise RebasinError(
            "RebasinMergePlugin: the matcher aligned a rewritten architecture (transform matching with "
            "symmetry='orthogonal' turns LayerNorms into RMSNorms), which cannot be written into the strategy's "
            "model; use symmetry='signed' or 'permutation', or a model whose norms are RMSNorms")
    return {k: v.detach().clone() for k, v in state.items()}


#: How the plugin chooses alpha when ``alpha`` is not given (issue 27; chosen on the grid of protocols in
#: docs/benchmarks.md, "Continual learning at equal storage"): on a rotating fold of the replay buffer that the
#: experience does not train on, then one more pass over the held-out slice; nothing stored besides the buffer.
DEFAULT_ALPHA = AlphaPolicy(source="buffer_fold", refit=True)
#: What the default becomes, with one warning, in a strategy without a replay buffer placed after the plugin (the
#: plugin's defaults until issue 27: 200 held-out samples of every experience, kept besides any buffer).
FALLBACK_ALPHA = AlphaPolicy()


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

    What the plugin stores over the stream (samples and model copies) is reported by :meth:`storage`;
    ``python -m continual.compare`` puts it in every table next to an equal-storage Replay control.

    Parameters
    ----------
    matcher
        Any registered matcher (``rebasin.matcher_names()``, including one added with
        :func:`rebasin.register_matcher`): ``"weight_matching"`` (data-free), ``"activation_matching"``,
        ``"sinkhorn"``, ... Matchers that read data (registered with ``needs_data`` or ``uses_data``) get
        the samples of the choice of alpha (with a fixed alpha: ``new_samples`` training samples of the
        experience, and the kept samples of ``source="memory"``).
    alpha
        A fixed weight of the new model in ``[0, 1]`` (``0.5``: the midpoint), or an
        :class:`~continual.policy.AlphaPolicy` saying how to choose it for every merge: where its samples
        come from (``source``: held out and kept, a fold of the replay buffer, the current task only, ...),
        what it minimises, on which grid, with how many samples. A mapping of the policy's fields (e.g. from
        JSON) is read as one. Default (:data:`DEFAULT_ALPHA`): ``AlphaPolicy(source="buffer_fold",
        refit=True)`` — alpha chosen on a rotating fifth of the replay buffer that the experience does not
        train on and a held-out slice of the experience that is trained on after the choice; it stores
        nothing besides the buffer. It needs a replay buffer placed after the plugin (``Replay(plugins=
        [plugin])``); in a strategy without one the default becomes :data:`FALLBACK_ALPHA` (``AlphaPolicy()``:
        200 held-out samples of every experience, at most 20% of it, **kept** besides any buffer; the default
        until issue 27) with one :class:`rebasin.RebasinWarning` when training starts; pass
        ``alpha=AlphaPolicy()`` for that without the warning. The policy's fields were separate keywords
        until 0.3 (``select_alpha_on``, ``select_alpha_by``, ``old_weight``, ``alpha_grid``, ``new_samples``,
        ``old_samples``, ``memory_per_experience``); they still work for one release with a
        :class:`DeprecationWarning`, as does ``alpha=None`` (the policy given by them).
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
        merged model (one chain of weights).
    batch_size
        Batch size of the evaluation passes.
    seed
        Seeds the subsets, the folds, the loaders and the matcher. The plugin never draws from the global
        torch RNG (private generators only, also for every DataLoader it iterates), so it does not change
        the training it observes: ``alpha=1.0`` inside ``Replay`` trains what ``Replay`` alone does.

    Notes
    -----
    The sources of :class:`~continual.policy.AlphaPolicy` and their costs: ``"holdout"`` trains on
    ``samples`` fewer samples per experience and **stores** them besides any replay buffer (Replay given
    that storage as extra buffer is the fair control; docs/benchmarks.md). ``"buffer_fold"`` stores
    nothing more than the buffer: at every experience one fold of the buffer is taken out of the replay
    plugin's storage while the training dataloader is built (and put back before the buffer is updated),
    so the merge is judged on old samples this experience did not train on; it needs the replay plugin to
    come after this one in ``plugins`` (``Replay(plugins=[plugin])`` does that). Should training raise while
    the fold is out, the buffer gets it back before the exception leaves ``strategy.train`` (the plugin wraps
    the strategy's ``_before_training_exp`` and ``_train_exp`` for the length of each ``train`` call). ``"current"`` keeps no
    old sample at all. A hold-out is cut from ``strategy.adapted_dataset`` after Avalanche adapted the
    experience and before any dataloader is built, and never takes more than ``max_fraction`` of it.
    Plugins placed before this one that add old data to ``adapted_dataset`` (or a cumulative strategy) mix
    old samples into the "new" slice.

    Attributes
    ----------
    history : list[MergeRecord]
        One record per experience after the first.
    policy : AlphaPolicy
        How alpha is chosen (with a fixed ``alpha``: the sample counts a data-reading matcher uses).

    Examples
    --------
    >>> from avalanche.training import Replay                                   # doctest: +SKIP
    >>> plugin = RebasinMergePlugin(alpha=AlphaPolicy(source="buffer_fold"))   # doctest: +SKIP
    >>> strategy = Replay(model=model, optimizer=opt, mem_size=1000, plugins=[plugin])    # doctest: +SKIP
    >>> for exp in benchmark.train_stream:                                      # doctest: +SKIP
    ...     strategy.train(exp)
    """

    def __init__(
        self,
        *,
        matcher: str = "weight_matching",
        alpha: float | AlphaPolicy | Mapping[str, Any] | None = DEFAULT_ALPHA,
        spec: PermutationSpec | None = None,
        model: nn.Module | None = None,
        example_input: Any = None,
        matcher_options: Mapping[str, Any] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        optimizer_state: str = "reset",
        train_from: str = "sequential",
        batch_size: int = 500,
        seed: int = 0,
        **deprecated: Any,
    ) -> None:
        super().__init__()
        registered = get_matcher(matcher)  # an unknown name lists the registered matchers
        registered.check_options(matcher_options or {})  # a typo fails here, not after the first experience
        if optimizer_state not in _OPTIMIZER_STATES:
            raise RebasinError(f"unknown optimizer_state {optimizer_state!r}; choose one of {_OPTIMIZER_STATES}")
        if train_from not in TRAIN_FROM:
            raise RebasinError(f"unknown train_from {train_from!r}; choose one of {TRAIN_FROM}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise RebasinError(f"batch_size must be a positive int, got {batch_size!r}")
        self.alpha, self.policy = _alpha_and_policy(alpha, deprecated)
        # alpha left at its default: checked for a replay buffer once, when training starts
        self._default = alpha is DEFAULT_ALPHA and not deprecated
        self.matcher = matcher
        self.train_from = train_from
        self._sequential: dict[str, Tensor] | None = None
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
        self._fold: tuple[Tensor, Tensor] | None = None
        self._taken: list[tuple[Any, Any]] = []  # (buffer group, its dataset before the fold was taken out)
        self._memory: list[tuple[Tensor, Tensor]] = []
        self._heldout: tuple[Tensor, Tensor] | None = None
        self._warned_cap = False
        self._n_seen = 0

    # ------------------------------------------------------------------ what it stores
    def storage(self) -> dict[str, int]:
        """What the plugin keeps over the stream besides the model (and any replay buffer, which is the strategy's).

        Returns
        -------
        dict
            ``held_out_samples`` (kept held-out samples, ``source="holdout"``), ``memory_samples`` (kept
            training samples, ``source="memory"``) and ``model_copies`` (state_dicts kept between experiences:
            the previous model while an experience trains; with ``train_from="sequential"`` the unmerged
            weights between experiences, while the model holds the merge: one at a time either way).
        """
        kept = sum(int(x.shape[0]) for x, _ in self._memory)
        holdout = self.alpha is None and self.policy.source == "holdout"
        return {"held_out_samples": kept if holdout else 0, "memory_samples": 0 if holdout else kept,
                "model_copies": 1}

    # ------------------------------------------------------------------ helpers
    @property
    def _needs_data(self) -> bool:
        return self.alpha is None or get_matcher(self.matcher).uses_data

    def __getattr__(self, name: str) -> Any:
        """The 0.2 attributes (``plugin.select_alpha_on``, ...) read the policy's field, with a DeprecationWarning."""
        if name in DEPRECATED_OPTIONS and "policy" in self.__dict__:
            field_name = DEPRECATED_OPTIONS[name]
            warnings.warn(f"RebasinMergePlugin.{name} is deprecated and will be removed in the next release; use "
                          f"RebasinMergePlugin.policy.{field_name}", DeprecationWarning, stacklevel=2)
            return getattr(self.__dict__["policy"], field_name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _rng_seed(self, salt: int) -> int:
        return self.seed * 1_000_003 + self._n_seen * 101 + salt

    @property
    def _holds_out(self) -> bool:
        return self.alpha is None and self.policy.holds_out

    @property
    def _keeps_memory(self) -> bool:
        source = self.policy.source
        return (source == "holdout" and self._holds_out) or (source == "memory" and self._needs_data)

    def _old_data(self, strategy: Any) -> tuple[Tensor, Tensor] | None:
        source, cap = self.policy.source, self.policy.old_samples
        if source == "current":
            return None
        if source in ("memory", "holdout"):
            return _subsample(concat_tensors(self._memory), cap, self._rng_seed(1))
        if source == "buffer_fold":
            if self._fold is None:
                raise RebasinError(
                    f"RebasinMergePlugin(alpha=AlphaPolicy(source='buffer_fold')): the fold of the replay buffer is "
                    f"empty at experience {_exp_id(strategy)} (a buffer with fewer samples than folds="
                    f"{self.policy.folds}?); give the replay plugin a larger mem_size or lower folds="
                )
            return _subsample(self._fold, cap, self._rng_seed(1))
        buffer = self._old_buffer
        if buffer is None or len(buffer) == 0:
            raise RebasinError(
                f"RebasinMergePlugin(alpha=AlphaPolicy(source={source!r})): the replay buffer is empty at experience "
                f"{_exp_id(strategy)}, so alpha cannot be chosen on old data. Give the replay plugin a "
                "positive mem_size, put the replay plugin in the strategy, use source='holdout', "
                "or pass a fixed alpha."
            )
        return sample_tensors(buffer, cap, seed=self._rng_seed(1), batch_size=self.batch_size)

    def _take_fold(self, strategy: Any, owner: Any, policy: Any) -> None:
        """Take this experience's fold out of the replay buffer (restored by :meth:`_put_fold_back`)."""
        plugins = list(getattr(strategy, "plugins", []))
        if plugins.index(owner) < plugins.index(self):
            raise RebasinError(
                f"RebasinMergePlugin(alpha=AlphaPolicy(source='buffer_fold')) must come before {type(owner).__name__} "
                "in the strategy's plugins (it takes the fold out of the buffer before the replay dataloader is built); "
                "Replay(plugins=[merge_plugin]) puts it there"
            )
        folds = self.policy.folds
        size = getattr(policy, "max_size", None)
        if isinstance(size, int) and size < folds:
            raise RebasinError(
                f"RebasinMergePlugin(alpha=AlphaPolicy(source='buffer_fold', folds={folds})): the replay buffer holds at "
                f"most {size} samples, too few to cut into {folds} folds; give the replay plugin mem_size >= {folds} or "
                "lower folds="
            )
        groups = list(policy.buffer_groups.values()) if hasattr(policy, "buffer_groups") else [policy]
        k, offset, parts = self._n_seen % folds, 0, []
        for group in groups:  # position p of the whole buffer is in fold p % folds
            data = group.buffer
            in_fold = [(offset + i) % folds == k for i in range(len(data))]
            offset += len(data)
            if any(in_fold):
                fold = [i for i, f in enumerate(in_fold) if f]
                parts.append(tensors_at(data, fold, seed=self._rng_seed(6), batch_size=self.batch_size))
                self._taken.append((group, data))
                group.buffer = subset(data, [i for i, f in enumerate(in_fold) if not f])
        self._fold = concat_tensors(parts)

    def _put_fold_back(self) -> None:
        for group, data in self._taken:
            group.buffer = data
        self._taken = []

    # ------------------------------------------------------------------ Avalanche callbacks
    def after_train_dataset_adaptation(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Hold out a slice of the experience (the sources that do; see :class:`~continual.policy.AlphaPolicy`).

        Runs after Avalanche adapted the experience's dataset and before the training dataloader
        (the strategy's own or a replay plugin's) is built from ``strategy.adapted_dataset``.
        """
        self._heldout = None
        if not self._holds_out:
            return
        dataset = strategy.adapted_dataset
        n = len(dataset)
        m, capped = holdout_size(n, self.policy)
        if capped and not self._warned_cap:
            self._warned_cap = True
            warnings.warn(
                f"RebasinMergePlugin: holding out {self.policy.samples} of the {n} samples of experience "
                f"{_exp_id(strategy)} would take more than max_fraction={self.policy.max_fraction} of it; holding out "
                f"{m} (the cap applies to every experience; this warning is given once)",
                RebasinWarning, stacklevel=2,
            )
        g = torch.Generator().manual_seed(self._rng_seed(5))
        order = torch.randperm(n, generator=g)
        held, kept = order[:m].sort().values.tolist(), order[m:].sort().values.tolist()
        self._heldout = tensors_at(dataset, held, seed=self._rng_seed(5), batch_size=self.batch_size)
        strategy.adapted_dataset = subset(dataset, kept)

    def before_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self._default:
            self._default = False
            self._fall_back_without_buffer(strategy)
        # the fold is out of the buffer from this plugin's before_training_exp to the first before_training_epoch;
        # Avalanche has no callback for an exception in between, so the steps that span it put the fold back
        if self.alpha is None and self.policy.source == "buffer_fold":
            _guard(strategy, self._put_fold_back)

    def after_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        _unguard(strategy)

    def _fall_back_without_buffer(self, strategy: Any) -> None:
        """The default policy in a strategy without a replay buffer after the plugin: :data:`FALLBACK_ALPHA`."""
        owner, _ = find_replay_buffer(strategy)
        plugins = list(getattr(strategy, "plugins", []))
        if owner is not None and (owner not in plugins or self not in plugins
                                  or plugins.index(owner) > plugins.index(self)):
            return
        where = ("no replay buffer" if owner is None
                 else f"its replay buffer ({type(owner).__name__}) before the merge plugin in plugins=")
        warnings.warn(
            f"RebasinMergePlugin(): the default chooses alpha on a fold of the replay buffer ({DEFAULT_ALPHA!r}), "
            f"and this strategy has {where}; choosing alpha on {FALLBACK_ALPHA.samples} held-out samples of every "
            "experience instead, which are kept besides any buffer (AlphaPolicy(), the earlier default). Pass "
            "alpha=AlphaPolicy() for this without the warning, put the plugin in Replay(plugins=[plugin]) (or "
            "before the ReplayPlugin) for the default, or alpha=AlphaPolicy(source='current') to store nothing",
            RebasinWarning, stacklevel=2,
        )
        self.policy = FALLBACK_ALPHA

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.spec is None:
            self.spec = spec_at_experience(strategy, self.example_input)
        if self.example_input is None and get_matcher(self.matcher).prepare is not None:  # it traces the models
            example = first_input(strategy.experience.dataset)
            self.example_input = example.to(strategy.device) if isinstance(example, Tensor) else example
        if self.alpha is None and self.policy.uses_buffer:
            owner, policy = find_replay_buffer(strategy)
            if policy is None:
                raise RebasinError(
                    f"RebasinMergePlugin(alpha=AlphaPolicy(source={self.policy.source!r})) needs a replay buffer in the "
                    "strategy (the Replay strategy or a ReplayPlugin in plugins=); none was found. Use "
                    "source='holdout', source='current' or a fixed alpha."
                )
            if self.policy.source == "buffer_fold":
                self._take_fold(strategy, owner, policy)
            else:  # the buffer as it is now: old experiences only, whatever the order of the plugins
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
        self._sequential = None  # the model holds it now: one stored copy (the previous model) at a time

    def before_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        # the replay dataloader was built without the fold: the buffer gets it back before anything else reads it
        self._put_fold_back()

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        try:
            self._put_fold_back()  # before the replay plugin (after this one) updates the buffer
            if self.train_from == "sequential":
                self._sequential = {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}
            if self._n_seen > 0 and self._prev_state is not None:
                self._merge(strategy)
            elif self._holds_out and self.policy.refit:  # nothing to merge yet: the first slice is trained on anyway
                self._refit(strategy, torch.device(strategy.device))
            if self._keeps_memory and self.policy.source == "holdout" and self._heldout is not None:
                self._memory.append(self._heldout)
            elif self._keeps_memory and self.policy.source == "memory":
                self._memory.append(
                    sample_tensors(
                        strategy.experience.dataset, self.policy.samples,
                        seed=self._rng_seed(2), batch_size=self.batch_size,
                    )
                )
        finally:
            self._n_seen += 1
            self._prev_state = None
            self._old_buffer = None
            self._fold = None
            self._heldout = None

    # ------------------------------------------------------------------ the merge
    def _new_data(self, strategy: Any) -> tuple[Tensor, Tensor]:
        if not self._holds_out:
            return sample_tensors(
                strategy.experience.dataset, self.policy.new_samples, seed=self._rng_seed(0), batch_size=self.batch_size
            )
        if self._heldout is None:
            raise RebasinError(
                f"RebasinMergePlugin(alpha=AlphaPolicy(source={self.policy.source!r})): no held-out samples for this "
                "experience; the strategy did not call after_train_dataset_adaptation (a custom training loop?). Use "
                "source='memory' or a fixed alpha."
            )
        return _subsample(self._heldout, self.policy.new_samples, self._rng_seed(0))  # type: ignore[return-value]  # Optional narrowed by earlier logic mypy cannot follow

    def _merged_state(
        self, strategy: Any, prev_aligned: dict[str, Tensor], state_new: dict[str, Tensor],
        alpha: float | dict[str, float], data: tuple[Tensor, Tensor] | None,
    ) -> dict[str, Tensor]:
        """The state written into the model for a merge with ``alpha < 1`` (or per-layer alphas; subclasses add a
        correction)."""
        return merge_states(prev_aligned, state_new, alpha)

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
            new_data = self._new_data(strategy)
            if self.alpha is None or self.policy.source == "memory":
                old_data = self._old_data(strategy)
        prev_model = copy.deepcopy(model)
        prev_model.load_state_dict(self._prev_state)  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
        both = concat_tensors([d for d in (old_data, new_data) if d is not None])
        loader = None
        if both is not None:
            loader = tensor_loader(both[0], both[1], batch_size=self.batch_size, shuffle=True, seed=self._rng_seed(3))
        result = self._align(model, prev_model, loader, device)
        state_new = _state_new(model, result)
        prev_aligned = {k: v.to(device) for k, v in result.state_b.items()}
        choice = layers = None
        alpha = self.alpha
        old_weight = None
        if alpha is None:
            policy = self.policy
            k = self._n_seen  # experiences before this one
            old_weight = policy.old_weight if policy.old_weight is not None else k / (k + 1)
            choice_args: dict[str, Any] = {  # the samples and settings of the choice, single or per layer
                "new_loader": tensor_batches(new_data[0], new_data[1], self.batch_size),  # type: ignore[index]  # Optional narrowed by earlier logic mypy cannot follow
                "old_loader": None if old_data is None else tensor_batches(old_data[0], old_data[1], self.batch_size),
                "grid": policy.candidates, "loss_fn": self.loss_fn, "device": device, "old_weight": old_weight,
                "criterion": "accuracy" if policy.source == "current" else policy.criterion,
            }
            choice = select_alpha(model, prev_aligned, state_new, **choice_args)
            alpha = conservative_alpha(choice, policy.tolerance) if policy.source == "current" else choice.alpha
            if policy.source == "current":
                old_weight = None
            if policy.granularity == "layer":
                layers = select_layer_alphas(model, prev_aligned, state_new, passes=policy.layer_passes, start=choice,
                                             **choice_args)
        steps = 0
        if self.alpha is None and self.policy.refit:
            steps = self._refit(strategy, device)  # the merge is of the weights the refit reached, aligned again
            result = self._align(model, prev_model, loader, device)
            state_new = _state_new(model, result)
            prev_aligned = {k: v.to(device) for k, v in result.state_b.items()}
        weights = alpha if layers is None else layers.alphas
        if any(a != 1.0 for a in ([alpha] if layers is None else layers.alphas.values())):  # 1.0: the new model kept
            write_state_(model, self._merged_state(strategy, prev_aligned, state_new, weights, both))
            if self.optimizer_state == "reset" and getattr(strategy, "optimizer", None) is not None:
                reset_optimizer_state_(strategy.optimizer, model.parameters())
        self.history.append(
            MergeRecord(
                exp, float(alpha), choice, {k: v.cpu() for k, v in result.perms.items()},
                0 if old_data is None else int(old_data[0].shape[0]),
                0 if new_data is None else int(new_data[0].shape[0]),
                time.perf_counter() - start,
                old_weight,
                steps,
                result.transforms,
                layers,
            )
        )

    def _align(self, model: nn.Module, prev_model: nn.Module, loader: Any, device: torch.device) -> Any:
        """:func:`rebasin.align` of the previous model to ``model`` with the plugin's matcher."""
        options = {"progress": False, **self.matcher_options}  # standard keywords: only matchers declaring them get them
        return align(
            model, prev_model, method=self.matcher, loader=loader, spec=self.spec, seed=self._rng_seed(4),
            device=device, example_input=self.example_input, **options,
        )

    def _refit(self, strategy: Any, device: torch.device) -> int:
        """One pass of the model over the held-out slice, with replay-buffer samples in every batch; the steps taken.

        Batches of ``strategy.train_mb_size`` held-out samples (seeded order), each with as many samples drawn
        from the replay buffer (old experiences only at this point) when the strategy has one; the strategy's
        optimizer and criterion. With ``train_from="sequential"`` the refit weights are the chain's.
        """
        if self._heldout is None:
            return 0
        model: nn.Module = strategy.model
        optimizer = getattr(strategy, "optimizer", None)
        if optimizer is None:
            raise RebasinError(
                "RebasinMergePlugin(alpha=AlphaPolicy(refit=True)) needs the strategy's optimizer (strategy.optimizer); "
                "none found. Use refit=False"
            )
        criterion = getattr(strategy, "_criterion", None) or nn.functional.cross_entropy
        old = None
        _, buffer_policy = find_replay_buffer(strategy)
        if buffer_policy is not None and len(buffer_policy.buffer) > 0:
            old = sample_tensors(buffer_policy.buffer, None, seed=self._rng_seed(8), batch_size=self.batch_size)
        x_new, y_new = self._heldout
        size = max(1, int(getattr(strategy, "train_mb_size", self.batch_size)))
        g = torch.Generator().manual_seed(self._rng_seed(7))
        order = torch.randperm(x_new.shape[0], generator=g)
        was_training, steps = model.training, 0
        model.train()
        # dropout in the refit draws from a forked RNG seeded by the plugin, never from the global one
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self._rng_seed(9))
            try:
                steps = self._refit_steps(model, optimizer, criterion, x_new, y_new, old, order, size, g, device)
            finally:
                model.train(was_training)
        if self.train_from == "sequential":
            self._sequential = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return steps

    @staticmethod
    def _refit_steps(model: nn.Module, optimizer: Any, criterion: Any, x_new: torch.Tensor, y_new: torch.Tensor,
                     old: Any, order: torch.Tensor, size: int, g: torch.Generator, device: torch.device) -> int:
        steps = 0
        for i in range(0, order.numel(), size):
            idx = order[i : i + size]
            x, y = x_new[idx], y_new[idx]
            if old is not None:
                j = torch.randint(old[0].shape[0], (idx.numel(),), generator=g)
                x, y = torch.cat([x, old[0][j]]), torch.cat([y, old[1][j]])
            optimizer.zero_grad()
            criterion(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
            steps += 1
        return steps


def _alpha_and_policy(alpha: Any, deprecated: dict[str, Any]) -> tuple[float | None, AlphaPolicy]:
    """``(fixed alpha or None, policy)`` from ``alpha=`` and the deprecated keywords (one warning each)."""
    unknown = sorted(set(deprecated) - set(DEPRECATED_OPTIONS))
    if unknown:
        raise TypeError(f"RebasinMergePlugin() got unexpected keyword argument(s) {unknown}")
    fields = {}
    for old, value in deprecated.items():
        new = DEPRECATED_OPTIONS[old]
        warnings.warn(
            f"RebasinMergePlugin({old}=...) is deprecated and will be removed in the next release; use "
            f"RebasinMergePlugin(alpha=AlphaPolicy({new}=...))", DeprecationWarning, stacklevel=3,
        )
        fields[new] = value
    if alpha is None:
        warnings.warn(
            "RebasinMergePlugin(alpha=None) is deprecated and will be removed in the next release; use "
            "RebasinMergePlugin(alpha=AlphaPolicy(...))", DeprecationWarning, stacklevel=3,
        )
        alpha = FALLBACK_ALPHA  # what alpha=None meant (the policy of the 0.2 keywords, on the defaults then)
    if fields and alpha is DEFAULT_ALPHA:  # the 0.2 keywords configured the policy that was the default then
        alpha = FALLBACK_ALPHA
    value = as_alpha(alpha)
    if isinstance(value, AlphaPolicy):
        return None, replace(value, **fields) if fields else value
    return value, AlphaPolicy(**fields)


#: the strategy's steps between taking the fold out of the buffer and putting it back (Avalanche's templates)
_GUARDED = ("_before_training_exp", "_train_exp")


def _guard(strategy: Any, on_error: Callable[[], None]) -> None:
    """Wrap the strategy's steps in ``_GUARDED`` (instance attributes) so that an exception first calls ``on_error``.

    An exception also removes the wrappers (``strategy.train`` does not reach ``after_training``); so does
    :func:`_unguard`. A strategy already wrapped is left as it is.
    """
    for name in _GUARDED:
        method = getattr(strategy, name, None)
        if method is None or getattr(method, "_fold_guard", False):
            continue

        def guarded(*args: Any, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            try:
                return _method(*args, **kwargs)
            except BaseException:
                on_error()
                _unguard(strategy)
                raise

        functools.update_wrapper(guarded, method)
        guarded._fold_guard = True  # type: ignore[attr-defined]
        setattr(strategy, name, guarded)


def _unguard(strategy: Any) -> None:
    """Remove the wrappers :func:`_guard` put on the strategy (the class's methods show through again)."""
    for name in _GUARDED:
        if getattr(vars(strategy).get(name), "_fold_guard", False):
            delattr(strategy, name)


def _subsample(data: tuple[Tensor, Tensor] | None, cap: int, seed: int) -> tuple[Tensor, Tensor] | None:
    """At most ``cap`` rows of ``data``: a seeded random subset in index order, not the first rows."""
    if data is None or data[0].shape[0] <= cap:
        return data
    idx = torch.randperm(data[0].shape[0], generator=torch.Generator().manual_seed(seed))[:cap].sort().values
    return data[0][idx], data[1][idx]

def _exp_id(strategy: Any) -> int:
    exp = getattr(strategy, "experience", None)
    return int(getattr(exp, "current_experience", -1) if exp is not None else -1)

