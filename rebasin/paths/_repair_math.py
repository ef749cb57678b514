"""REPAIR, part 2: the correction math, written once (the formulas are stated in :func:`rebasin.repair`).

* :func:`target_stats`: the statistics every channel should have, the ``w``-weighted endpoint means and
  standard deviations;
* :func:`predicted_stats`: the closed-form statistics of the combined unit ``sum_i w_i a_i`` from the
  endpoints' moments and cross moments;
* :func:`correction`: the per-channel ``(scale, shift)`` taking the actual statistics to the target;
* :func:`fold`: that affine map folded into the producer's ``weight`` rows and ``bias``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._repair_stats import ChannelStats, Producer

__all__ = ["DEAD_STD", "target_stats", "predicted_stats", "correction", "fold"]

# A channel whose measured std is below this (relative to its target std, or absolutely) is
# treated as dead: it is shifted to the target mean but not rescaled.
DEAD_STD = 1e-8


def target_stats(stats: Sequence[ChannelStats], weights: Sequence[float]) -> ChannelStats:
    """``(sum_i w_i mu_i, sum_i w_i sigma_i)`` over the endpoints' statistics of one layer."""
    mean = sum(w * s.mean for w, s in zip(weights, stats))
    std = sum(w * s.std for w, s in zip(weights, stats))
    return ChannelStats(mean, std)  # type: ignore[arg-type]  # sum() over tensors is typed with its start value 0


def predicted_stats(
    stats: Sequence[ChannelStats], cross: Mapping[tuple[int, int], Tensor], weights: Sequence[float]
) -> ChannelStats:
    """Mean and std of ``sum_i w_i a_i`` from each ``E[a_i]``, ``Var[a_i]`` and every ``E[a_i a_j]`` (i < j)."""
    mean = sum(w * s.mean for w, s in zip(weights, stats))
    second = sum(w * w * (s.std**2 + s.mean**2) for w, s in zip(weights, stats))
    for (i, j), e_ij in cross.items():
        second = second + 2.0 * weights[i] * weights[j] * e_ij
    var = (second - mean * mean).clamp_min(0.0)  # type: ignore[union-attr]  # sum() over tensors is typed with its start value 0
    return ChannelStats(mean, var.sqrt())  # type: ignore[arg-type]  # sum() over tensors is typed with its start value 0


def correction(target: ChannelStats, actual: ChannelStats) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``scale * y + shift`` having the target statistics (dead channels: scale 1)."""
    dead = actual.std <= DEAD_STD * torch.clamp(target.std, min=1.0)
    scale = torch.where(dead, torch.ones_like(actual.std), target.std / torch.where(dead, torch.ones_like(actual.std), actual.std))
    shift = target.mean - scale * actual.mean
    return scale, shift


def fold(state: dict[str, Tensor], prod: Producer, scale: Tensor, shift: Tensor) -> None:
    """``weight``'s output slices times ``scale``, ``bias`` to ``bias * scale + shift`` (in ``state``; warns without bias)."""
    w = state[prod.weight_key]
    s = scale.to(device=w.device, dtype=w.dtype)
    shape = [1] * w.ndim
    shape[prod.out_axis] = -1
    state[prod.weight_key] = w * s.reshape(shape)
    if prod.bias_key is not None:
        b = state[prod.bias_key]
        state[prod.bias_key] = b * s + shift.to(device=b.device, dtype=b.dtype)
    elif bool((shift.abs() > 1e-12).any()):
        warnings.warn(
            f"REPAIR: layer {prod.name!r} has no bias, so only its scale was corrected (the mean shift "
            "cannot be folded in); give the layer a bias for a full correction",
            stacklevel=4,
        )
