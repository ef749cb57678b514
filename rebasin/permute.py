"""Applying, inverting and drawing permutations; pure functions over state_dicts.

Convention (shared by every matcher in the toolkit): ``perms`` maps model B onto model A, i.e.
``permute(spec, perms, state_b)`` is close to ``state_a``. Along an axis carrying permutation
``p``, the permuted tensor's slice ``i`` is the input's slice ``p[i]`` (``index_select(axis, p)``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ._errors import RebasinError
from .spec import PermutationSpec

__all__ = [
    "permute",
    "invert",
    "compose",
    "random_permutation",
    "identity_permutation",
    "check_permutations",
    "block_index",
]


def check_permutations(
    spec: PermutationSpec, perms: Mapping[str, Tensor], sizes: Mapping[str, int] | None = None
) -> None:
    """Raise :class:`RebasinError` unless every entry of ``perms`` is a permutation of the right size."""
    for name, p in perms.items():
        if name not in spec.perm_to_axes:
            raise RebasinError(f"unknown permutation {name!r}; the spec has {list(spec.perms)}")
        if not isinstance(p, Tensor) or p.ndim != 1 or p.dtype not in (torch.int64, torch.int32):
            desc = f"{type(p).__name__} {getattr(p, 'dtype', '')} of shape {tuple(getattr(p, 'shape', ()))}"
            raise RebasinError(f"permutation {name!r} must be a 1-D integer tensor, got {desc}")
        n = None if sizes is None else sizes.get(name)
        if n is not None and p.numel() != n:
            raise RebasinError(f"permutation {name!r} has {p.numel()} entries but the axes it acts on have size {n}")
        m = p.numel()
        in_range = m == 0 or (int(p.min()) >= 0 and int(p.max()) < m)
        if not in_range or bool((torch.bincount(p.long(), minlength=m) != 1).any()):
            raise RebasinError(f"perms[{name!r}] is not a permutation of 0..{p.numel() - 1}")


def permute(
    spec: PermutationSpec, perms: Mapping[str, Tensor], state_dict: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Return a new state_dict with every axis permuted as the spec says.

    Parameters
    ----------
    spec
        The permutation spec of the architecture.
    perms
        ``{perm: LongTensor of shape (n,)}``. Permutations missing from ``perms`` are left as the
        identity.
    state_dict
        Parameters *and* buffers (BatchNorm running statistics are permuted too). Not mutated.

    Returns
    -------
    dict
        A new dict; tensors that no permutation touches are the input tensors themselves
        (not copies), every other tensor is new. Computed on each tensor's own device.

    Examples
    --------
    >>> import torch
    >>> spec = PermutationSpec({"w1": ("P", None), "w2": (None, "P")})
    >>> s = {"w1": torch.arange(6.).reshape(3, 2), "w2": torch.arange(3.).reshape(1, 3)}
    >>> p = {"P": torch.tensor([2, 0, 1])}
    >>> permute(spec, p, s)["w2"]
    tensor([[2., 0., 1.]])
    """
    sizes = spec.validate(state_dict)
    check_permutations(spec, perms, sizes)
    return _permute_unchecked(spec, perms, state_dict)


def _permute_unchecked(
    spec: PermutationSpec, perms: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], skip: str | None = None
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, t in state_dict.items():
        for axis, name in enumerate(spec.axes[key]):
            if name is not None and name != skip and name in perms:
                index = block_index(perms[name], spec.blocks.get((key, axis), 1)).to(t.device)
                t = torch.index_select(t, axis, index)
        out[key] = t
    return out


def block_index(perm: Tensor, block: int) -> Tensor:
    """Expand a permutation of ``n`` blocks to one of ``n * block`` entries (``c*k+s -> p[c]*k+s``)."""
    perm = perm.long()
    if block == 1:
        return perm
    offsets = torch.arange(block, device=perm.device)
    return (perm[:, None] * block + offsets).reshape(-1)


def invert(perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse permutations: ``permute(spec, invert(p), permute(spec, p, s)) == s``."""
    return {k: torch.argsort(p) for k, p in perms.items()}


def compose(first: Mapping[str, Tensor], then: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The permutations equal to applying ``first`` and then ``then``.

    ``permute(spec, compose(p, q), s) == permute(spec, q, permute(spec, p, s))``.
    A name missing from one side is the identity there.
    """
    out = dict(first)
    for k, q in then.items():
        out[k] = first[k][q.to(first[k].device)] if k in first else q
    return out


def random_permutation(
    spec: PermutationSpec,
    *,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, Tensor]:
    """Draw one uniformly random permutation per permutation name (on the CPU).

    Deterministic: the same ``seed`` gives the same permutations, drawn in ``spec.perms`` order.
    Pass a ``generator`` instead of ``seed`` to continue an existing random stream.
    """
    sizes = dict(sizes) if sizes is not None else spec.resolved_sizes()
    if generator is None:
        if seed is None:
            raise RebasinError("random_permutation needs seed= or generator=")
        generator = torch.Generator().manual_seed(int(seed))
    return {p: torch.randperm(sizes[p], generator=generator) for p in spec.perms}


def identity_permutation(spec: PermutationSpec, sizes: Mapping[str, int] | None = None) -> dict[str, Tensor]:
    """The identity permutation for every permutation name of the spec."""
    sizes = dict(sizes) if sizes is not None else spec.resolved_sizes()
    return {p: torch.arange(sizes[p]) for p in spec.perms}
