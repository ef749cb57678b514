r"""The arc path of Anokhin & Yarotsky (2020): a great circle around the mean instead of a chord.

.. math:: \theta(t) = \mu + \cos(\pi t / 2)\,(\theta_A - \mu) + \sin(\pi t / 2)\,(\theta_B - \mu)

with :math:`\mu` the permutation-invariant centre of the two networks' neurons: along the way each layer's
neurons keep their spread around the centre instead of collapsing towards it as on the straight line.
"""

from __future__ import annotations

import itertools
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
    """The mean of ``x``'s entries over their orbit under the spec's permutations (see :func:`arc_interpolate`)."""
    axes = spec.axes[key]
    plain = all(n is None or n not in spec.concat for n in axes)
    named = [n for n in axes if n is not None]
    if plain and len(set(named)) == len(named):
        # a block_inner axis: heads and the units inside them both move, so its orbit is the whole axis
        return _axis_means(x, key, spec, [(axis, n, 1 if (key, axis) in spec.block_inner else spec.blocks.get((key, axis), 1))
                                          for axis, n in enumerate(axes)])
    # concatenations: each stretch of each axis carries one permutation (or none); average stretch by stretch
    segments = []
    for axis, name in enumerate(axes):
        k = spec.blocks.get((key, axis), 1)
        if name is None or name not in spec.concat:
            segments.append([(name, 0, x.shape[axis], k)])
        else:
            segs, start = [], 0
            for part, n in spec.concat[name]:
                segs.append((part, start * k, n * k, k))
                start += n
            segments.append(segs)
    out = torch.empty_like(x)
    for combo in itertools.product(*segments):
        index = tuple(slice(s0, s0 + n) for _, s0, n, _ in combo)
        out[index] = _axis_means(x[index], key, spec, [(axis, q, k) for axis, (q, _, _, k) in enumerate(combo)])
    return out


def _axis_means(x: Tensor, key: str, spec: PermutationSpec, axes: list[tuple[int, str | None, int]]) -> Tensor:
    """Orbit mean of ``x`` whose axis ``axis`` carries permutation ``name`` (None: none) in blocks of ``k``.

    Different permutations move independent indices: the mean over each permuted axis. One permutation on
    two axes (``P W P^T``) moves index pairs together: its diagonal and off-diagonal entries are averaged
    separately. Cases whose orbits are finer still are refused.
    """
    named = [(axis, name, k) for axis, name, k in axes if name is not None]
    seen: dict[str, list[tuple[int, int]]] = {}
    for axis, name, k in named:
        seen.setdefault(name, []).append((axis, k))
    outers = [spec.structure[n][0] if n in spec.structure else n for n in seen if n in spec.structure or n in spec.outers]
    grouped = any((key, axis) in spec.grouped for axis, _, _ in named)
    for name, where in seen.items():
        if len(where) > 2 or (len(where) == 2 and (name in spec.structure or name in spec.outers)):
            raise RebasinError(
                f"arc_interpolate: permutation {name!r} acts on {len(where)} axes of {key!r}"
                + (" and is structured (heads or groups)" if len(where) == 2 else "")
                + "; the permutation-invariant centre of such a tensor is not supported. Use the linear path"
            )
    if not grouped and len(outers) != len(set(outers)):
        raise RebasinError(
            f"arc_interpolate: two permutations of {key!r} share an outer permutation (heads or groups move "
            "together on two axes); the permutation-invariant centre of such a tensor is not supported. "
            "Use the linear path"
        )
    for _name, where in seen.items():
        if len(where) == 2:
            x = _pair_mean(x, where[0], where[1])
        else:
            axis, k = where[0]
            shape = x.shape
            n = shape[axis] // k
            blocked = x.reshape(*shape[:axis], n, k, *shape[axis + 1 :])
            x = blocked.mean(dim=axis, keepdim=True).expand_as(blocked).reshape(shape)
    return x


def _pair_mean(x: Tensor, first: tuple[int, int], second: tuple[int, int]) -> Tensor:
    """Orbit mean under one permutation acting on two axes: diagonal and off-diagonal averaged apart."""
    (i, ki), (j, kj) = first, second
    y = torch.movedim(x, (i, j), (0, 1))
    moved = y.shape
    n = moved[0] // ki
    y = y.reshape(n, ki, n, kj, *moved[2:])
    eye = torch.eye(n, dtype=x.dtype, device=x.device).reshape(n, 1, n, 1, *([1] * (len(moved) - 2)))
    diag = (y * eye).sum(dim=(0, 2), keepdim=True) / n
    off = (y * (1 - eye)).sum(dim=(0, 2), keepdim=True) / max(n * (n - 1), 1)
    y = eye * diag + (1 - eye) * off
    return torch.movedim(y.expand(n, ki, n, kj, *moved[2:]).reshape(moved), (0, 1), (i, j))


def arc_interpolate(state_a: State, state_b: State, t: float, *, spec: PermutationSpec) -> dict[str, Tensor]:
    r"""The arc path of Anokhin & Yarotsky (2020) between two (aligned) networks at ``t``.

    For every floating entry touched by a permutation, :math:`\mu` is the mean of the pooled A and
    B neurons over the permuted axes (the permutation-invariant centre: :math:`\mu =
    \tfrac12(\bar\theta_A + \bar\theta_B)` with :math:`\bar\theta` the average over each permuted
    axis, per block offset for channel-major block axes, broadcast back; in general the mean of each
    entry over its orbit under the spec's permutations: each part of a concatenation is averaged on
    its own stretch of the axis, parts left in place are not averaged, and a permutation on two axes
    of one tensor, ``P W P^T``, averages the diagonal and the off-diagonal entries apart), and

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

    Raises
    ------
    RebasinError
        For tensors whose orbits are finer than the rules above: a structured permutation (heads,
        groups) on two axes of one tensor, two permutations sharing an outer permutation on two axes
        of a tensor that is not a grouped weight, or one permutation on three or more axes.

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
    """The arc between ``state_a`` and ``state_b`` as a path object for ``evaluate_path(model, path, loader)``.

    Examples
    --------
    >>> res = evaluate_path(model, BNResetPath(ArcPath(sa, sb, spec=spec), model, train), test)  # doctest: +SKIP
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
