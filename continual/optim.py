"""Optimizer schedules across experiences, as Avalanche plugins (imports Avalanche)."""

from __future__ import annotations

from typing import Any

from avalanche.training.plugins import SupervisedPlugin

from rebasin import RebasinError
from rebasin.checks import check_number_in

__all__ = ["ExperienceLRDecay"]


class ExperienceLRDecay(SupervisedPlugin):
    """Set every parameter group's learning rate to ``max(min_lr, base * decay ** k)`` before experience ``k``.

    ``base`` is each group's learning rate when the first experience starts. The schedule of MC-SGD's
    reference code (Mirzadeh et al. 2021: ``decay`` 0.8 on Rotated MNIST, 0.7 on Permuted MNIST), for
    any strategy, so that every strategy of a comparison can train under it. ``k`` counts the
    experiences this plugin has seen start (0 for the first). Draws no random number.

    Examples
    --------
    >>> from avalanche.training import Naive                                              # doctest: +SKIP
    >>> Naive(model=m, optimizer=torch.optim.SGD(m.parameters(), 0.05, momentum=0.8),
    ...       plugins=[ExperienceLRDecay(0.8, min_lr=5e-4)])                               # doctest: +SKIP
    """

    def __init__(self, decay: float, *, min_lr: float = 0.0) -> None:
        super().__init__()
        self.decay = check_number_in(decay, "decay", 0, 1, low_open=True)
        if isinstance(min_lr, bool) or not isinstance(min_lr, (int, float)) or not min_lr >= 0:
            raise RebasinError(f"min_lr must be a number >= 0, got {min_lr!r}")
        self.min_lr = float(min_lr)
        self.experiences = 0
        self._base: list[float] | None = None

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        groups = strategy.optimizer.param_groups
        if self._base is None:
            self._base = [float(g["lr"]) for g in groups]
        if len(groups) != len(self._base):
            raise RebasinError(f"ExperienceLRDecay: the optimizer has {len(groups)} parameter groups, "
                               f"it had {len(self._base)} at the first experience")
        for group, base in zip(groups, self._base):
            group["lr"] = max(self.min_lr, base * self.decay ** self.experiences)
        self.experiences += 1
