r"""CLeWI (Kozal et al., 2024) as a baseline: :class:`CLeWIPlugin` and the thin strategy :class:`CLeWI`.

"Continual Learning with Weight Interpolation" (Kozal, Wasilewski, Krawczyk, Woźniak, CVPR workshops 2024;
code: jedrzejkozal/weight-interpolation-cl, read, not copied): experience replay, and after every task the
previous model is permutation-aligned to the freshly trained one, the two are interpolated with a fixed
weight (0.5 in the reference code) and the interpolated network is REPAIRed on samples of the buffer; the
next task trains from the result. Here: :class:`continual.RebasinMergePlugin` with ``alpha=0.5``,
``train_from="merged"`` and the merge replaced by :func:`rebasin.repair` on replay-buffer samples
plus samples of the current experience (the reference's buffer is filled during the task, so it holds
both). Assumed: weight matching as the alignment (the reference offers several), the
interpolation at ``alpha`` as the weight of the new model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from avalanche.training.plugins import ReplayPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn

from rebasin import PermutationSpec, RebasinError, repair
from rebasin.checks import check_int

from ._data import concat_tensors, find_replay_buffer, sample_tensors, tensor_batches
from .plugin import MergeRecord, RebasinMergePlugin
from .policy import AlphaPolicy

__all__ = ["CLeWIPlugin", "CLeWI"]


class CLeWIPlugin(RebasinMergePlugin):
    """CLeWI's step: align, interpolate at a fixed ``alpha``, REPAIR on buffer + current samples (module doc).

    Parameters
    ----------
    alpha
        Weight of the freshly trained model in the interpolation (fixed; the reference's 0.5).
    repair_samples
        At most this many samples of the replay buffer, and as many of the current experience, for REPAIR's
        statistics (seeded subsets). Without a replay buffer in the strategy only the current experience's.
    matcher, spec, model, example_input, matcher_options, optimizer_state, batch_size, seed
        As for :class:`continual.RebasinMergePlugin`; training goes on from the interpolated model
        (``train_from="merged"``), as in the reference.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        repair_samples: int = 500,
        matcher: str = "weight_matching",
        spec: PermutationSpec | None = None,
        model: nn.Module | None = None,
        example_input: Any = None,
        matcher_options: dict[str, Any] | None = None,
        optimizer_state: str = "reset",
        batch_size: int = 500,
        seed: int = 0,
    ) -> None:
        if isinstance(alpha, AlphaPolicy) or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise RebasinError(f"CLeWIPlugin: alpha must be a fixed number in [0, 1], got {alpha!r}")
        check_int(repair_samples, "repair_samples")
        super().__init__(
            matcher=matcher, alpha=float(alpha), spec=spec, model=model, example_input=example_input,
            matcher_options=matcher_options, optimizer_state=optimizer_state, train_from="merged",
            batch_size=batch_size, seed=seed,
        )
        self.repair_samples = repair_samples
        self._repair_buffer: Any = None

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        super().before_training_exp(strategy, *args, **kwargs)
        _, policy = find_replay_buffer(strategy)
        self._repair_buffer = None if policy is None else policy.buffer  # old experiences only

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().after_training_exp(strategy, *args, **kwargs)
        finally:
            self._repair_buffer = None

    def _merged_state(
        self, strategy: Any, prev_aligned: dict[str, Tensor], state_new: dict[str, Tensor],
        alpha: float | dict[str, float], data: tuple[Tensor, Tensor] | None,
    ) -> dict[str, Tensor]:
        if isinstance(alpha, dict):  # the plugin takes a fixed alpha only; REPAIR here weighs the two models once
            raise RebasinError("CLeWIPlugin merges with one fixed alpha; per-layer alphas are not supported")
        parts = [sample_tensors(strategy.experience.dataset, self.repair_samples, seed=self._rng_seed(7),
                                batch_size=self.batch_size)]
        if self._repair_buffer is not None and len(self._repair_buffer) > 0:
            parts.append(sample_tensors(self._repair_buffer, self.repair_samples, seed=self._rng_seed(8),
                                        batch_size=self.batch_size))
        x, y = concat_tensors(parts)  # type: ignore[misc]  # Optional narrowed by earlier logic mypy cannot follow
        return repair(
            strategy.model, [prev_aligned, state_new], [1.0 - alpha, alpha], tensor_batches(x, y, self.batch_size),
            spec=self.spec, device=torch.device(strategy.device), sync=False,
        )


class CLeWI(SupervisedTemplate):
    """CLeWI as a strategy: ``SupervisedTemplate`` + :class:`CLeWIPlugin` + an experience-balanced ``ReplayPlugin``.

    Parameters
    ----------
    model, optimizer, criterion, train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator,
    eval_every, peval_mode
        As for :class:`avalanche.training.templates.SupervisedTemplate` (keyword-only); ``criterion``
        defaults to cross-entropy. ``plugins`` is not mutated: the strategy runs
        ``[*plugins, clewi_plugin, replay_plugin]`` (the interpolation sees the buffer of the earlier tasks).
    mem_size
        Size of the replay buffer (the reference's 500 on its benchmarks); at least 1.
    alpha, repair_samples, matcher, spec, example_input, matcher_options, seed
        As for :class:`CLeWIPlugin`; without ``spec`` and ``example_input`` the spec is traced on the first
        experience's samples.

    Attributes
    ----------
    clewi_plugin : CLeWIPlugin
    replay_plugin : ReplayPlugin
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
        mem_size: int = 500,
        alpha: float = 0.5,
        repair_samples: int = 500,
        matcher: str = "weight_matching",
        spec: PermutationSpec | None = None,
        example_input: Any = None,
        matcher_options: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        check_int(mem_size, "mem_size")
        self.clewi_plugin = CLeWIPlugin(
            alpha=alpha, repair_samples=repair_samples, matcher=matcher, spec=spec,
            model=None if example_input is None else model, example_input=example_input, matcher_options=matcher_options, seed=seed,
        )
        self.replay_plugin = ReplayPlugin(mem_size=mem_size)
        super().__init__(
            model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss() if criterion is None else criterion,
            train_mb_size=train_mb_size, train_epochs=train_epochs, eval_mb_size=eval_mb_size, device=device,
            plugins=[*(plugins or []), self.clewi_plugin, self.replay_plugin], evaluator=evaluator,
            eval_every=eval_every, peval_mode=peval_mode,
        )

    @property
    def history(self) -> list[MergeRecord]:
        """One :class:`MergeRecord` per experience after the first (``clewi_plugin.history``)."""
        return self.clewi_plugin.history
