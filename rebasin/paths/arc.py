r"""The arc path of Anokhin & Yarotsky (2020): a great circle around the mean instead of a chord.

.. math:: \theta(t) = \mu + \cos(\pi t / 2)\,(\theta_A - \mu) + \sin(\pi t / 2)\,(\theta_B - \mu)

with :math:`\mu` the permutation-invariant centre of the two networks' neurons: along the way each layer's
neurons keep their spread around the centre instead of collapsing towards it as on the straight line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .._common import check_float, check_pair
from .._errors import RebasinError
from ..spec.core import PermutationSpec

__all__ = ["arc_interpolate", "ArcPath"]

State = Mapping[str, Tensor]


def _perm_mean(x: Tensor, key: str, spec: PermutationSpec) -> Tensor:
    """Average ``x`` over every permuted axis (over the blocks' channel index for block axes)."""
    for axis, name in enumerate(spec.axes[key]):
        if name is None:
            continue
        k = spec.blocks.get((key, axis), 1)
        n = x.shape[axis] // k
        shape = x.shape
        blocked = x.reshape(*shape[:axis], n, k, *shape[axis + 1 :])
        x = blocked.mean(dim=axis, keepdim=True).expand_as(blocked).reshape(shape)
    return x


def arc_interpolate(state_a: State, state_b: State, t: float, *, spec: PermutationSpec) -> dict[str, Tensor]:
    r"""The arc path of Anokhin & Yarotsky (2020) between two (aligned) networks at ``t``.

    For every floating entry touched by a permutation, :math:`\mu` is the mean of the pooled A and
    B neurons over the permuted axes (the permutation-invariant centre: :math:`\mu =
    \tfrac12(\bar\theta_A + \bar\theta_B)` with :math:`\bar\theta` the average over each permuted
    axis, per block offset for channel-major block axes, broadcast back), and

    .. math::

        \theta(t) = \mu + \cos(\tfrac{\pi t}{2})\,(\theta_A - \mu) + \sin(\tfrac{\pi t}{2})\,(\theta_B - \mu).

    Along the way each layer's neurons keep their spread around the centre instead of collapsing
    to it as on the straight line. Entries no permutation touches are linearly interpolated;
    integer entries are copies of A's. At ``t = 0`` and ``t = 1`` the result is exactly A and B.
    BatchNorm running statistics follow the same formula; recompute them at ``t`` with
    ``bn_loader=`` in :func:`rebasin.evaluate_path`.

    Parameters
    ----------
    state_a, state_b
        Full state_dicts of one architecture (B aligned to A for the intended use). Not mutated.
    t
        Position, finite (0 is A, 1 is B).
    spec
        The permutation spec of the architecture.

    Returns
    -------
    dict
        New tensors, differentiable with respect to both inputs.

    Examples
    --------
    >>> import torch
    >>> from rebasin import PermutationSpec
    >>> spec = PermutationSpec({"w": ("P", None)})
    >>> a, b = {"w": torch.randn(4, 3)}, {"w": torch.randn(4, 3)}
    >>> torch.equal(arc_interpolate(a, b, 1.0, spec=spec)["w"], b["w"])
    True
    """
    if not isinstance(spec, PermutationSpec):
        raise RebasinError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    t = check_float(t, "t")
    check_pair(state_a, state_b)
    spec.validate_pair(state_a, state_b)
    out: dict[str, Tensor] = {}
    c, s = math.cos(math.pi * t / 2.0), math.sin(math.pi * t / 2.0)
    for key, a in state_a.items():
        b = state_b[key].to(a.device)
        if not a.is_floating_point():
            out[key] = a.clone()
        elif t == 0.0:
            out[key] = a.clone()
        elif t == 1.0:
            out[key] = b.clone()
        elif all(p is None for p in spec.axes[key]):
            out[key] = torch.lerp(a, b, t)
        else:
            mu = 0.5 * (_perm_mean(a, key, spec) + _perm_mean(b, key, spec))
            out[key] = mu + c * (a - mu) + s * (b - mu)
    return out


class ArcPath:
    """The arc between ``state_a`` and ``state_b`` as a path object for ``evaluate_path(path=...)``.

    Examples
    --------
    >>> res = evaluate_path(model, None, None, test, path=ArcPath(sa, sb, spec=spec), bn_loader=train)  # doctest: +SKIP
    """

    __name__ = "arc"

    def __init__(self, state_a: State, state_b: State, *, spec: PermutationSpec) -> None:
        check_pair(state_a, state_b)
        spec.validate_pair(state_a, state_b)
        self.state_a, self.state_b, self.spec = dict(state_a), dict(state_b), spec

    def state_dict_at(self, t: float) -> dict[str, Tensor]:
        """:func:`arc_interpolate` at ``t``."""
        return arc_interpolate(self.state_a, self.state_b, t, spec=self.spec)

    __call__ = state_dict_at
