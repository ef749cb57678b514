"""``AlphaPolicy``: how :class:`continual.RebasinMergePlugin` chooses its merge weight (plain data, no Avalanche).

The plugin's ``alpha`` is either a number (a fixed weight of the new model) or an :class:`AlphaPolicy`,
as Avalanche's ``ReplayPlugin`` takes a storage policy. The policy says where the samples for the choice
come from (``source``) and what they cost in storage, what the choice minimises (``criterion``), on which
candidates (``grid``) and with how many samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rebasin import RebasinError
from rebasin.checks import check_int, check_number_in

from .merging import CRITERIA, GRANULARITIES, alpha_grid, check_alpha

__all__ = ["AlphaPolicy", "ALPHA_SOURCES", "HOLDING_OUT", "as_alpha", "holdout_size"]

#: Where the samples for choosing alpha come from (see :class:`AlphaPolicy`).
ALPHA_SOURCES = ("holdout", "buffer_fold", "current", "replay_holdout", "replay", "memory")
#: The sources that keep a slice of every experience out of its training (the new data of the choice).
HOLDING_OUT = ("holdout", "buffer_fold", "current", "replay_holdout")


@dataclass(frozen=True)
class AlphaPolicy:
    """How the merge weight ``alpha`` (of the new model) is chosen after every experience.

    Parameters
    ----------
    source
        Where the samples of the choice come from, and what that stores besides a replay buffer:

        * ``"holdout"`` (default): ``samples`` samples of every experience are held out of its training and
          **kept** (the current slice is the new data, the earlier slices the old data). Stores
          ``samples`` per experience besides the buffer.
        * ``"buffer_fold"``: the old data are a rotating fold (one in ``folds`` of the replay buffer's
          samples, a different fold at every experience) that the experience does **not** train on; the new
          data are a held-out slice of the experience that is not kept (it may enter the replay buffer, which
          Avalanche fills from the whole experience). Stores nothing besides the buffer; needs a replay buffer
          (``Replay`` or a ``ReplayPlugin`` placed after the merge plugin).
        * ``"current"``: zero storage, no old data: the smallest ``alpha`` of the grid whose accuracy on a
          held-out slice of the current experience (not kept) is within ``tolerance`` of the freshly trained
          model's (keep as much of the old model as the new task allows).
        * ``"replay_holdout"``: old data from the replay buffer (trained on), new data a held-out slice (not
          kept).
        * ``"replay"``: old data from the replay buffer, new data training samples.
        * ``"memory"``: the plugin keeps ``samples`` training samples of every experience (old data); new
          data are training samples. Stores ``samples`` per experience.
    criterion
        ``"loss"`` (default) or ``"accuracy"`` (:func:`continual.merging.select_alpha`).
    grid
        Number of evenly spaced candidates in ``[0, 1]`` (both ends included), or explicit values.
    samples
        Samples held out (or kept, ``"memory"``) per experience. A hold-out never takes more than
        ``max_fraction`` of an experience.
    max_fraction
        Largest share of an experience a hold-out may take, in ``(0, 1)``; a ``samples`` above it is lowered
        to it with one :class:`rebasin.RebasinWarning`.
    old_weight
        Weight of the old-data loss in ``[0, 1]``; None: ``k / (k + 1)`` after ``k`` earlier experiences.
    new_samples, old_samples
        At most this many samples of new / old data in the choice (seeded random subsets).
    folds
        ``"buffer_fold"``: the buffer is cut into this many folds (at least 2).
    tolerance
        ``"current"``: accuracy the new task may lose against the freshly trained model, in ``[0, 1]``.
    refit
        The sources that hold a slice out (:data:`HOLDING_OUT`): once alpha is chosen, the freshly trained
        model takes one more pass over the held-out slice (batches of the strategy's size, each with as many
        replay-buffer samples when the strategy has a buffer, as Avalanche's replay batches) with the
        strategy's optimizer and criterion, and the merge is built from those weights with the chosen
        alpha. The slice then costs the experience no training sample, and nothing more is stored (it is
        dropped after the experience, as without ``refit``).
    granularity
        ``"model"`` (default): one alpha for every weight. ``"layer"``: one alpha per layer
        (:func:`continual.merging.layer_groups`: a module's weight and bias together, a norm layer with the
        layer before it), by a coordinate search from the best single alpha on the same samples and criterion
        (:func:`continual.merging.select_layer_alphas`): layer by layer from input to output, each value of the
        grid with the other layers fixed, kept when it lowers the objective. Not with ``source="current"``
        (whose rule picks one alpha). With ``refit`` the layers' alphas, chosen before the refit, weight the
        refit weights.
    layer_passes
        ``granularity="layer"``: sweeps of the coordinate search over the layers (at least 1; it stops after a
        sweep that changed nothing).

    Notes
    -----
    The plugin's default is ``AlphaPolicy(source="buffer_fold", refit=True)``
    (:data:`continual.plugin.DEFAULT_ALPHA`); ``AlphaPolicy()``, this class's own defaults, was the plugin's
    default until the grid of protocols measured both at equal storage (docs/benchmarks.md).

    Examples
    --------
    >>> AlphaPolicy(source="buffer_fold", folds=4).stores_samples
    False
    """

    source: str = "holdout"
    criterion: str = "loss"
    grid: int | Sequence[float] = 11
    samples: int = 200
    max_fraction: float = 0.2
    old_weight: float | None = None
    new_samples: int = 1000
    old_samples: int = 1000
    folds: int = 5
    tolerance: float = 0.02
    refit: bool = False
    granularity: str = "model"
    layer_passes: int = 1
    candidates: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.source not in ALPHA_SOURCES:
            raise RebasinError(f"AlphaPolicy: unknown source {self.source!r}; choose one of {ALPHA_SOURCES}")
        if self.criterion not in CRITERIA:
            raise RebasinError(f"AlphaPolicy: unknown criterion {self.criterion!r}; choose one of {CRITERIA}")
        if not isinstance(self.grid, int) and not isinstance(self.grid, bool) and len(list(self.grid)) == 0:
            raise RebasinError("AlphaPolicy: grid is empty; give at least one value in [0, 1] or an int >= 2")
        object.__setattr__(self, "candidates", alpha_grid(self.grid))
        for name in ("samples", "new_samples", "old_samples"):
            check_int(getattr(self, name), f"AlphaPolicy: {name}")
        check_number_in(self.max_fraction, "AlphaPolicy: max_fraction", 0, 1, low_open=True, high_open=True)
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise RebasinError(f"AlphaPolicy: folds must be an int >= 2 (one fold is held out), got {self.folds!r}")
        check_number_in(self.tolerance, "AlphaPolicy: tolerance", 0, 1)
        if self.old_weight is not None:
            check_alpha(self.old_weight, "AlphaPolicy: old_weight")
        if not isinstance(self.refit, bool):
            raise RebasinError(f"AlphaPolicy: refit must be True or False, got {self.refit!r}")
        if self.refit and self.source not in HOLDING_OUT:
            raise RebasinError(
                f"AlphaPolicy(source={self.source!r}, refit=True): refit trains on the held-out slice after the "
                f"choice, and source {self.source!r} holds nothing out; use one of {HOLDING_OUT} or refit=False"
            )

        if self.granularity not in GRANULARITIES:
            raise RebasinError(
                f"AlphaPolicy: unknown granularity {self.granularity!r}; choose one of {GRANULARITIES} (one alpha "
                "for the whole model, or one per layer)"
            )
        check_int(self.layer_passes, "AlphaPolicy: layer_passes")
        if self.granularity == "layer" and self.source == "current":
            raise RebasinError(
                "AlphaPolicy(source='current', granularity='layer'): source 'current' keeps as much of the old "
                "model as the new task's tolerance allows, one alpha for all layers; use granularity='model' or a "
                "source with old data"
            )

    @property
    def stores_samples(self) -> bool:
        """Whether the policy keeps samples of its own besides any replay buffer (``"holdout"``, ``"memory"``)."""
        return self.source in ("holdout", "memory")

    @property
    def holds_out(self) -> bool:
        """Whether a slice of every experience is kept out of its training."""
        return self.source in HOLDING_OUT

    @property
    def uses_buffer(self) -> bool:
        """Whether the old data come from the strategy's replay buffer."""
        return self.source in ("buffer_fold", "replay_holdout", "replay")


def as_alpha(alpha: Any) -> float | AlphaPolicy:
    """A fixed alpha (a float in ``[0, 1]``), an :class:`AlphaPolicy` (given, or built from a mapping of its
    fields, e.g. from JSON), or :class:`RebasinError`."""
    if isinstance(alpha, AlphaPolicy):
        return alpha
    if isinstance(alpha, Mapping):
        try:
            return AlphaPolicy(**alpha)
        except TypeError as err:
            raise RebasinError(f"alpha={dict(alpha)!r} is not an AlphaPolicy: {err}") from None
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        return check_alpha(alpha)
    raise RebasinError(
        f"alpha must be a number in [0, 1] or an AlphaPolicy (or a mapping of its fields), got {alpha!r}"
    )


def holdout_size(n: int, policy: AlphaPolicy) -> tuple[int, bool]:
    """``(samples held out of an experience of n samples, whether max_fraction lowered it)``.

    Raises :class:`RebasinError` when the experience has no more samples than the policy's ``samples``.
    """
    m = policy.samples
    if n <= m:
        raise RebasinError(
            f"AlphaPolicy(source={policy.source!r}, samples={m}): the experience has {n} training samples, no "
            f"more than the hold-out of {m}; give samples= below {n} (at most max_fraction={policy.max_fraction} "
            "of it is held out), or a fixed alpha"
        )
    cap = max(1, math.floor(policy.max_fraction * n))
    return (cap, True) if m > cap else (m, False)
