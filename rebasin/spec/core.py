"""Permutation specs: which permutation acts on which axis of which state_dict entry.

A spec is plain data. ``axes[key]`` has one entry per axis of ``state_dict[key]``: the name of
the permutation acting on that axis, or ``None``. PyTorch axis order is used throughout, so a
``Linear.weight`` of shape ``(out, in)`` between permutations ``P0`` and ``P1`` is
``("P1", "P0")`` and a ``Conv2d.weight`` is ``("P1", "P0", None, None)``.

Applying, inverting and drawing permutations are pure functions over state_dicts, in this module
because the spec's own :meth:`PermutationSpec.check` uses them. Convention (shared by every matcher):
``perms`` maps model B onto model A, i.e. ``permute(spec, perms, state_b)`` is close to ``state_a``.
Along an axis carrying permutation ``p``, the permuted tensor's slice ``i`` is the input's slice ``p[i]``
(``index_select(axis, p)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._common import describe_tensors, first_line, forward_with_state, require_state, state_of
from .._errors import RebasinError

__all__ = [
    "PermutationSpec",
    "SpecCoverage",
    "Pin",
    "Axes",
    "permute",
    "permute_unchecked",
    "invert",
    "compose",
    "random_permutation",
    "identity_permutation",
    "check_permutations",
    "block_index",
    "Occurrence",
    "split_structured",
    "join_structured",
    "axis_index",
    "full_axis_index",
]

Axes = tuple["str | None", ...]


class Occurrence(NamedTuple):
    """One stretch of one axis a permutation acts on (see :attr:`PermutationSpec.occurrences`)."""

    key: str
    axis: int
    start: int = 0
    block: int = 1
    groups: int = 1


class Pin(NamedTuple):
    """Units a traced spec keeps in place (see :class:`SpecCoverage`).

    ``module``: the path of the module whose units are pinned (``""``: the model itself); ``units``: how
    many; ``where``: the construct that pinned them, by module path and what it calls (``""`` when the
    module's own weights have no rule); ``line``: its source line ``"file:line"`` in the model's
    ``forward`` (None when unknown); ``reason``: why the tracer could not let them move.
    """

    module: str
    units: int
    where: str
    line: str | None
    reason: str


@dataclass(frozen=True)
class SpecCoverage:
    """How much of a traced model is permutable: hidden units per module, free or pinned to the identity.

    :func:`rebasin.spec_from_model` fills :attr:`PermutationSpec.coverage`. A module's *hidden units* are
    the units it makes (a Linear's or Conv's output features, the units inside a rule's module) that do
    not reach the model output; each is either *permutable* or *pinned* (kept in place because some
    construct could not be proven safe for a permutation of it, see :attr:`pins`). Plain data:
    :meth:`as_dict` / :meth:`from_dict` round-trip through JSON.

    Attributes
    ----------
    modules
        ``{module path: (permutable units, pinned units)}`` (``""`` is the model itself).
    pins
        One :class:`Pin` per (pinned module, cause), in graph order.
    model
        The model's class name (how the model itself is shown).

    Examples
    --------
    >>> cov = SpecCoverage({"l1": (32, 0), "l2": (0, 16)}, (Pin("l2", 16, "add", "net.py:9", "..."),))
    >>> cov.permutable, cov.pinned
    (32, 16)
    >>> SpecCoverage.from_dict(cov.as_dict()) == cov
    True
    """

    modules: Mapping[str, tuple[int, int]]
    pins: tuple[Pin, ...] = ()
    model: str = "model"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", MappingProxyType({str(k): (int(a), int(b))
                                                              for k, (a, b) in dict(self.modules).items()}))
        object.__setattr__(self, "pins", tuple(Pin(*p) for p in self.pins))

    @property
    def permutable(self) -> int:
        """Hidden units that may move, over all modules."""
        return sum(a for a, _ in self.modules.values())

    @property
    def pinned(self) -> int:
        """Hidden units pinned to the identity, over all modules."""
        return sum(b for _, b in self.modules.values())

    def label(self, module: str) -> str:
        """How a module path is shown (the model itself by its class name)."""
        return module or f"{self.model} (the model itself)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SpecCoverage):
            return NotImplemented
        return dict(self.modules) == dict(other.modules) and self.pins == other.pins and self.model == other.model

    __hash__ = None  # type: ignore[assignment]  # __hash__ = None: compared by value and mutable, so unhashable on purpose

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"model", "permutable", "pinned", "modules": {path: [free, pinned]}, "pins": [{...}]}``."""
        return {"model": self.model, "permutable": self.permutable, "pinned": self.pinned,
                "modules": {k: list(v) for k, v in self.modules.items()},
                "pins": [p._asdict() for p in self.pins]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpecCoverage:
        """Inverse of :meth:`as_dict`."""
        return cls({k: tuple(v) for k, v in data["modules"].items()},
                   tuple(Pin(**p) for p in data.get("pins", ())), data.get("model", "model"))

    def summary(self, limit: int = 12) -> str:
        """Lines for people: the totals, then the modules with pinned units (at most ``limit``)."""
        total = self.permutable + self.pinned
        share = f" ({100 * self.permutable / total:.1f}%)" if total else ""
        lines = [f"coverage: {self.permutable} of {total} hidden units permutable{share}, {self.pinned} pinned"]
        hit = [(m, b) for m, (_, b) in self.modules.items() if b]
        for m, b in hit[:limit]:
            reasons = sorted({p.reason for p in self.pins if p.module == m})
            lines.append(f"  pinned {b:>6} in {self.label(m)}: {reasons[0] if reasons else ''}"
                         + (f" (+{len(reasons) - 1} more reasons)" if len(reasons) > 1 else ""))
        if len(hit) > limit:
            lines.append(f"  ... and {len(hit) - limit} more module(s) with pinned units")
        return "\n".join(lines)


def _fmt_keys(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass(frozen=True, eq=False)
class PermutationSpec:
    """Which permutation acts on each axis of each state_dict entry.

    Parameters
    ----------
    axes
        ``{key: (perm_or_None, ...)}`` with one entry per tensor axis, for *every* key of the
        state_dict (parameters and buffers; scalar buffers such as ``num_batches_tracked``
        map to ``()``).
    sizes
        Optional ``{perm: n}``. Filled in by :func:`rebasin.spec_from_model`; otherwise
        :meth:`validate` derives it from a state_dict.
    blocks
        Optional ``{(key, axis): k}`` for axes of size ``n * k`` on which a permutation of size
        ``n`` acts on consecutive blocks of ``k`` entries: index ``c * k + s`` goes to
        ``p[c] * k + s``. This is the input axis of a ``Linear`` after flattening a
        ``(C, H, W)`` feature map (channel-major, ``k = H * W``).
    structure
        Optional ``{perm: (outer, d)}``: ``perm`` (size ``H * d``) permutes *whole blocks* of ``d``
        consecutive units by the permutation ``outer`` (size ``H``) and the units inside each block
        freely: ``p[a * d + i] = outer[a] * d + inner_a[i]``. Attention heads (``outer`` moves heads,
        ``inner_a`` the units of head ``a``), grouped convolutions and GroupNorm groups use it.
        Permutations with the same ``outer`` share it (q/k and v/o of one attention layer share the
        head permutation). ``outer`` is either a name used nowhere else (a *virtual* permutation,
        never in :attr:`perms`) or a permutation of the spec (a depthwise convolution's channel
        multiplier); an ``outer`` is not itself structured.
    concat
        Optional ``{name: ((part, n), ...)}``: the permutation ``name`` used on some axes is the
        block-diagonal union of its parts, in order: ``n`` units permuted by ``part`` (a permutation
        of the spec) or left in place (``part=None``). Concatenation along the feature axis
        (``torch.cat``, DenseNet), packed projections (``nn.MultiheadAttention.in_proj_weight`` is
        ``q; k; v``, a GPT-2 ``c_attn`` likewise) and recurrent gates (``nn.LSTM`` stacks four gate
        blocks permuted by one permutation) use it. ``name`` is derived, never in :attr:`perms`;
        parts are not themselves concatenations.
    grouped
        Optional ``{(key, axis): g}``: axis ``axis`` of ``key`` holds only the diagonal blocks of a
        grouped layer with ``g`` groups (a grouped convolution's weight has shape
        ``(C_out, C_in / g, kh, kw)``): its permutation (size ``C_in``) must be structured with ``g``
        blocks, axis 0 of ``key`` must carry a permutation structured with the same ``outer``, and
        row ``r`` of axis 0 uses the block of its group.
    coverage
        Optional :class:`SpecCoverage`: for a traced spec, which hidden units are permutable and which
        the tracer pinned to the identity, by module. Reporting only: not part of equality.
    block_inner
        Optional ``{(key, axis): perm}``: the *inside* of the blocks of a blocked axis (see :attr:`blocks`,
        whose entries inside a block otherwise stay in place) is permuted by the inner permutations of the
        structured permutation ``perm`` (block size ``k``, the axis's block size). The axis's own
        permutation ``P`` must be ``perm``'s outer or structured with the same outer (``g`` blocks of ``P``
        per block of the outer; ``g = 1`` for the outer itself); block ``a`` of the axis uses ``perm``'s
        inner block ``a // g``: ``index[a * k + i] = P[a] * k + inner_perm[a // g, i]``. Grouped-query
        attention uses it: the output projection's columns (query heads of width ``k``) move with the
        query-head permutation ``P``, and each head's units with the value units of its key/value head
        ``perm`` (one value head feeds ``g`` query heads, so their column blocks share its inner
        permutation). An unstructured ``perm`` (size ``k``: multi-query attention's one value head) permutes
        the inside of every block alike. ``perm`` is a permutation of the spec even where it acts on no
        axis itself (a :meth:`subset` holding only the output projection). Engines that cannot take it
        refuse it (:meth:`refuse_block_inner`); :meth:`without_block_inner` is the coarser spec for them.

    Notes
    -----
    A permutation may act on several axes of one tensor: ``("P", "P")`` is ``P W P^T`` (a
    single-layer residual block ``h + f(W h)``, a recurrent weight).

    Examples
    --------
    >>> spec = PermutationSpec({
    ...     "0.weight": ("P0", None), "0.bias": ("P0",),
    ...     "2.weight": (None, "P0"), "2.bias": (None,),
    ... })
    >>> spec.perms
    ('P0',)
    >>> spec.perm_to_axes["P0"]
    (('0.weight', 0), ('0.bias', 0), ('2.weight', 1))
    """

    axes: Mapping[str, Axes]
    sizes: Mapping[str, int] | None = field(default=None)
    blocks: Mapping[tuple[str, int], int] = field(default_factory=dict)
    structure: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    concat: Mapping[str, tuple[tuple[str | None, int], ...]] = field(default_factory=dict)
    grouped: Mapping[tuple[str, int], int] = field(default_factory=dict)
    coverage: SpecCoverage | None = field(default=None)
    block_inner: Mapping[tuple[str, int], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean: dict[str, Axes] = {}
        for key, ax in dict(self.axes).items():
            if not isinstance(key, str):
                raise RebasinError(f"spec keys must be state_dict key strings, got {key!r}")
            if isinstance(ax, str) or not isinstance(ax, Sequence):
                raise RebasinError(
                    f"spec entry for {key!r} must be a tuple with one permutation name or None "
                    f"per axis, got {ax!r}"
                )
            ax = tuple(ax)
            for p in ax:
                if p is not None and not isinstance(p, str):
                    raise RebasinError(f"spec entry for {key!r}: axis names must be str or None, got {p!r}")
            clean[key] = ax
        object.__setattr__(self, "axes", MappingProxyType(clean))
        blocks: dict[tuple[str, int], int] = {}
        for (key, axis), k in dict(self.blocks).items():
            if key not in clean or not (0 <= axis < len(clean[key])) or clean[key][axis] is None:
                raise RebasinError(
                    f"spec blocks entry ({key!r}, {axis}) does not name a permuted axis of the spec"
                )
            if int(k) < 1:
                raise RebasinError(f"spec blocks entry ({key!r}, {axis}) must be a positive integer, got {k}")
            if int(k) > 1:
                blocks[(key, int(axis))] = int(k)
        object.__setattr__(self, "blocks", MappingProxyType(blocks))
        _check_structure(self, clean)
        if self.sizes is not None:
            sizes = {str(k): int(v) for k, v in dict(self.sizes).items()}
            unknown = set(sizes) - set(self.perm_to_axes)
            missing = set(self.perm_to_axes) - set(sizes)
            if unknown or missing:
                raise RebasinError(
                    f"spec sizes do not match the permutations in axes: missing sizes for "
                    f"[{_fmt_keys(list(missing))}], sizes for unknown permutations [{_fmt_keys(list(unknown))}]"
                )
            object.__setattr__(self, "sizes", MappingProxyType(sizes))

    # ------------------------------------------------------------------ derived views
    @cached_property
    def perm_to_axes(self) -> Mapping[str, tuple[tuple[str, int], ...]]:
        """``{perm: ((key, axis), ...)}``: every tensor axis each permutation acts on, in key order.

        Use ``spec.blocks.get((key, axis), 1)`` for the block size of each axis.
        """
        out: dict[str, list[tuple[str, int]]] = {}
        for key, ax in self.axes.items():
            for i, p in enumerate(ax):
                if p is None:
                    continue
                if p in self.concat:
                    for part, _ in self.concat[p]:
                        if part is not None:
                            out.setdefault(part, [])
                else:
                    out.setdefault(p, []).append((key, i))
        for v in self.block_inner.values():  # a value class may act only inside blocks (a subset's o_proj)
            out.setdefault(v, [])
        return MappingProxyType({p: tuple(v) for p, v in out.items()})

    @cached_property
    def occurrences(self) -> Mapping[str, tuple[Occurrence, ...]]:
        """``{perm: (Occurrence, ...)}``: every stretch of every axis each permutation acts on.

        Unlike :attr:`perm_to_axes` this includes the parts of :attr:`concat` names (with their
        ``start``) and grouped axes (``groups > 1``). The axis entries ``start * block`` to
        ``(start + n) * block`` are permuted in blocks of ``block`` (``n`` the permutation's size;
        on a grouped axis the axis holds ``n / groups`` entries, see :attr:`grouped`).
        """
        out: dict[str, list[Occurrence]] = {p: [] for p in self.perm_to_axes}
        for key, ax in self.axes.items():
            for i, p in enumerate(ax):
                if p is None:
                    continue
                k = self.blocks.get((key, i), 1)
                if p in self.concat:
                    start = 0
                    for part, n in self.concat[p]:
                        if part is not None:
                            out[part].append(Occurrence(key, i, start, k, 1))
                        start += n
                else:
                    out[p].append(Occurrence(key, i, 0, k, self.grouped.get((key, i), 1)))
        return MappingProxyType({p: tuple(v) for p, v in out.items()})

    @cached_property
    def outers(self) -> Mapping[str, tuple[str, ...]]:
        """``{outer: (perm, ...)}``: the structured permutations sharing each outer (head/group) permutation."""
        out: dict[str, list[str]] = {}
        for p in self.perms:
            if p in self.structure:
                out.setdefault(self.structure[p][0], []).append(p)
        return MappingProxyType({o: tuple(v) for o, v in out.items()})

    @cached_property
    def units(self) -> tuple[tuple[str, ...], ...]:
        """The permutations that must be chosen together, in :attr:`perms` order.

        Each unit is one unstructured permutation, or an outer permutation's members (with the outer
        itself first when it is a permutation of the spec). Matchers solve one unit at a time.
        """
        seen: set[str] = set()
        out: list[tuple[str, ...]] = []
        for p in self.perms:
            if p in seen:
                continue
            outer = self.structure[p][0] if p in self.structure else (p if p in self.outers else None)
            if outer is None:
                unit: tuple[str, ...] = (p,)
            else:
                unit = ((outer,) if outer in self.perm_to_axes else ()) + self.outers[outer]
            seen.update(unit)
            out.append(unit)
        return tuple(out)

    def inner_groups(self, key: str, axis: int) -> int | None:
        """For a :attr:`block_inner` axis, how many of its blocks share one inner block (``g``): 1 when the
        axis carries the inner class's outer itself, the group size of the axis's permutation when that is
        structured with the same outer, None when the inner class is not structured (one block: all share it)."""
        p, v = self.axes[key][axis], self.block_inner[(key, axis)]
        if v not in self.structure:
            return None
        return 1 if p == self.structure[v][0] else self.structure[p][1]  # type: ignore[index]  # checked at construction

    def refuse_block_inner(self, what: str) -> None:
        """Raise :class:`RebasinError` when the spec has :attr:`block_inner` axes, which ``what`` cannot handle."""
        if self.block_inner:
            (key, axis), v = next(iter(self.block_inner.items()))
            raise RebasinError(
                f"{what} does not support block_inner axes (units inside the blocks of an axis permuted by another "
                f"class's inner permutations: grouped-query attention's output projection), e.g. axis {axis} of "
                f"{key!r} with the insides of its blocks following {v!r}. Use weight_matching, or pass "
                "spec.without_block_inner() (those units then stay in place)")

    def without_block_inner(self) -> PermutationSpec:
        """The coarser spec in which the insides of :attr:`block_inner` axes stay in place.

        Each inner class ``v`` structured as ``(outer, k)`` is replaced on its axes by ``outer`` acting on
        blocks of ``k`` (whole heads move, their units do not); an unstructured one is left out (its axes
        carry nothing). For engines that do not take :attr:`block_inner` (soft permutations, OT, signed or
        orthogonal maps). The spec itself if it has no such axes.
        """
        if not self.block_inner:
            return self
        inner = set(self.block_inner.values())
        if any(q in inner for parts in self.concat.values() for q, _ in parts):
            raise RebasinError("spec.without_block_inner: an inner class is part of a concatenation; "
                               "write the coarser spec by hand")
        axes: dict[str, Axes] = {}
        blocks = dict(self.blocks)
        for key, ax in self.axes.items():
            new = list(ax)
            for i, p in enumerate(ax):
                if p in inner:
                    if p in self.structure:
                        outer, k = self.structure[p]
                        new[i] = outer
                        blocks[(key, i)] = blocks.get((key, i), 1) * k
                    else:
                        new[i] = None
                        blocks.pop((key, i), None)
            axes[key] = tuple(new)
        structure = {p: s for p, s in self.structure.items() if p not in inner}
        sizes = None
        if self.sizes is not None:
            sizes = {p: n for p, n in self.sizes.items() if p not in inner}
            for v in inner & set(self.structure):
                outer, k = self.structure[v]
                if any(outer in ax for ax in axes.values()):
                    sizes.setdefault(outer, self.sizes[v] // k)
        return PermutationSpec(axes, sizes, blocks, structure, self.concat, self.grouped, self.coverage)

    def outer_size(self, outer: str, sizes: Mapping[str, int]) -> int:
        """Size of an outer permutation (virtual or not) from the sizes of the spec's permutations."""
        if outer in sizes:
            return int(sizes[outer])
        member = self.outers[outer][0]
        return int(sizes[member]) // self.structure[member][1]

    @property
    def perms(self) -> tuple[str, ...]:
        """Permutation names in order of first appearance in ``axes``."""
        return tuple(self.perm_to_axes)

    def __len__(self) -> int:
        return len(self.perm_to_axes)

    def __repr__(self) -> str:
        sizes = dict(self.sizes) if self.sizes is not None else "unknown"
        return f"PermutationSpec({len(self.axes)} keys, {len(self)} permutations, sizes={sizes})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PermutationSpec):
            return NotImplemented
        return all(dict(getattr(self, f)) == dict(getattr(other, f))
                   for f in ("axes", "blocks", "structure", "concat", "grouped", "block_inner"))

    def _extras(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "structure": self.structure, "concat": self.concat, "grouped": self.grouped,
                "coverage": self.coverage, "block_inner": self.block_inner}

    __hash__ = None  # type: ignore[assignment]  # __hash__ = None: compared by value and mutable, so unhashable on purpose

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready plain data (lists for tuples, ``[key, axis, value]`` rows for the per-axis fields);
        :meth:`from_dict` rebuilds an equal spec (sizes and coverage included).

        Examples
        --------
        >>> import json
        >>> spec = PermutationSpec({"w1": ("P", None), "w2": (None, "P")}, {"P": 3})
        >>> PermutationSpec.from_dict(json.loads(json.dumps(spec.as_dict()))) == spec
        True
        """
        return {
            "axes": {k: list(ax) for k, ax in self.axes.items()},
            "sizes": None if self.sizes is None else dict(self.sizes),
            "blocks": [[k, a, n] for (k, a), n in self.blocks.items()],
            "structure": {p: [o, d] for p, (o, d) in self.structure.items()},
            "concat": {c: [[q, n] for q, n in parts] for c, parts in self.concat.items()},
            "grouped": [[k, a, g] for (k, a), g in self.grouped.items()],
            "block_inner": [[k, a, v] for (k, a), v in self.block_inner.items()],
            "coverage": None if self.coverage is None else self.coverage.as_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PermutationSpec:
        """Inverse of :meth:`as_dict` (validated as at construction)."""
        if not isinstance(data, Mapping) or "axes" not in data:
            raise RebasinError(f"PermutationSpec.from_dict needs a mapping with 'axes' (from as_dict), got "
                               f"{type(data).__name__}{' with keys ' + str(sorted(data)) if isinstance(data, Mapping) else ''}")
        try:
            return cls(
                {k: tuple(ax) for k, ax in data["axes"].items()},
                data.get("sizes"),
                {(k, int(a)): int(n) for k, a, n in data.get("blocks", ())},
                {p: (o, int(d)) for p, (o, d) in data.get("structure", {}).items()},
                {c: tuple((q, int(n)) for q, n in parts) for c, parts in data.get("concat", {}).items()},
                {(k, int(a)): int(g) for k, a, g in data.get("grouped", ())},
                None if data.get("coverage") is None else SpecCoverage.from_dict(data["coverage"]),
                {(k, int(a)): v for k, a, v in data.get("block_inner", ())},
            )
        except (TypeError, ValueError, AttributeError) as err:
            raise RebasinError(f"PermutationSpec.from_dict: malformed data ({type(err).__name__}: {err}); pass what "
                               "PermutationSpec.as_dict returned") from None

    def with_sizes(self, state_dict: Mapping[str, Tensor]) -> PermutationSpec:
        """Return a copy of this spec with ``sizes`` filled in from ``state_dict`` (validated)."""
        return PermutationSpec(self.axes, self.validate(state_dict), **self._extras())

    def renamed(self, mapping: Mapping[str, str]) -> PermutationSpec:
        """Rename permutations (names missing from ``mapping`` are kept)."""
        def r(p: str | None) -> str | None:
            return None if p is None else mapping.get(p, p)
        axes = {k: tuple(r(p) for p in ax) for k, ax in self.axes.items()}
        sizes = None if self.sizes is None else {r(p): n for p, n in self.sizes.items()}
        structure = {r(p): (r(o), d) for p, (o, d) in self.structure.items()}
        concat = {r(c): tuple((r(p), n) for p, n in parts) for c, parts in self.concat.items()}
        block_inner = {ka: r(v) for ka, v in self.block_inner.items()}
        return PermutationSpec(axes, sizes, self.blocks, structure, concat, self.grouped,  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
                               self.coverage, block_inner)  # type: ignore[arg-type]  # r maps a name to a name

    def subset(self, keys: Iterable[str] | Mapping[str, str]) -> PermutationSpec:
        """The spec of only ``keys`` (in this spec's order), or with ``{key: new key}``, of those keys renamed.

        For a part of a state_dict (one shard of a checkpoint, a state_dict that stores one of two tied
        weights) or a state_dict stored under other names (a ``transformers`` model saves some of its
        weights under their historical names). Block sizes, structure, concatenations and groups are kept
        where they concern what is left; sizes of permutations that no longer act on any axis are dropped.

        Raises
        ------
        RebasinError
            If a key is not in the spec, or two keys get one new name.

        Examples
        --------
        >>> from rebasin import PermutationSpec
        >>> spec = PermutationSpec({"a.weight": ("P", None), "a.bias": ("P",), "b.weight": (None, "P")})
        >>> dict(spec.subset({"a.weight": "first.weight", "b.weight": "second.weight"}).axes)
        {'first.weight': ('P', None), 'second.weight': (None, 'P')}
        """
        names = dict(keys) if isinstance(keys, Mapping) else {k: k for k in keys}
        unknown = sorted(set(names) - set(self.axes))
        if unknown:
            raise RebasinError(f"cannot take a subset of the spec: keys [{_fmt_keys(unknown)}] are not in it")
        if len(set(names.values())) != len(names):
            raise RebasinError("cannot rename the spec's keys: two keys get the same new name")
        axes = {names[k]: ax for k, ax in self.axes.items() if k in names}
        block_inner = {(names[k], a): v for (k, a), v in self.block_inner.items() if k in names}
        used = {p for ax in axes.values() for p in ax if p is not None} | set(block_inner.values())
        concat = {c: parts for c, parts in self.concat.items() if c in used}
        free = (used - set(concat)) | {q for parts in concat.values() for q, _ in parts if q is not None}
        structure = {p: s for p, s in self.structure.items() if p in free}
        sizes = None if self.sizes is None else {p: n for p, n in self.sizes.items() if p in free}
        blocks = {(names[k], a): b for (k, a), b in self.blocks.items() if k in names}
        grouped = {(names[k], a): g for (k, a), g in self.grouped.items() if k in names}
        return PermutationSpec(axes, sizes, blocks, structure, concat, grouped, self.coverage, block_inner)

    # ------------------------------------------------------------------ validation
    def validate(self, state_dict: Mapping[str, Tensor], *, finite: bool = False, name: str = "state_dict") -> dict[str, int]:
        """Check ``state_dict`` against the spec and return ``{perm: size}``.

        Raises :class:`RebasinError` listing missing and unexpected keys, tensors whose number of
        axes differs from the spec, and permutations whose axes disagree in size (with the keys and
        shapes involved). With ``finite=True`` floating tensors containing NaN or inf are rejected, and so are
        meta tensors (they have no values to compute with).
        """
        require_state(state_dict, name)
        missing = [k for k in self.axes if k not in state_dict]
        unexpected = [k for k in state_dict if k not in self.axes]
        if missing or unexpected:
            raise RebasinError(
                f"{name} does not match the permutation spec: missing key(s) [{_fmt_keys(missing)}]; "
                f"unexpected key(s) [{_fmt_keys(unexpected)}]. Build the spec from the same architecture "
                "(rebasin.spec_from_model) or add the keys to the spec."
            )
        seen: dict[str, tuple[int, str, tuple[int, ...]]] = {}
        for key, ax in self.axes.items():
            t = state_dict[key]
            if not isinstance(t, Tensor):
                raise RebasinError(f"{name}[{key!r}] is a {type(t).__name__}, expected a Tensor")
            shape = tuple(t.shape)
            if len(shape) != len(ax):
                raise RebasinError(
                    f"{name}[{key!r}] has shape {shape} ({len(shape)} axes) but the spec gives "
                    f"{len(ax)} axes {ax}"
                )
            for i, p in enumerate(ax):
                if p is None:
                    continue
                k = self.blocks.get((key, i), 1)
                if shape[i] % k:
                    raise RebasinError(
                        f"{name}[{key!r}] has shape {shape}: axis {i} (size {shape[i]}) is not a multiple "
                        f"of the block size {k} the spec gives for permutation {p!r}"
                    )
                n = shape[i] // k * self.grouped.get((key, i), 1)
                if p in self.concat:
                    total = sum(m for _, m in self.concat[p])
                    if total != n:
                        raise RebasinError(
                            f"{name}[{key!r}] has shape {shape}: axis {i} has {n} units but the concatenation "
                            f"{p!r} = {list(self.concat[p])} has {total}"
                        )
                    parts = [(q, m) for q, m in self.concat[p] if q is not None]
                else:
                    parts = [(p, n)]
                for q, m in parts:
                    if q in seen and seen[q][0] != m:
                        n0, k0, s0 = seen[q]
                        raise RebasinError(
                            f"permutation {q!r} has inconsistent sizes: {name}[{k0!r}] has shape {s0} "
                            f"(size {n0}) but {name}[{key!r}] has shape {shape} (axis {i}: size {m}"
                            + (f" = {shape[i]} / block {k})" if k > 1 else ")")
                        )
                    seen.setdefault(q, (m, key, shape))
                v = self.block_inner.get((key, i))
                if v is not None:  # the inner permutations' class: per block of its outer, k units
                    g = self.inner_groups(key, i)
                    m = k if g is None else n // g * k
                    if v in seen and seen[v][0] != m:
                        raise RebasinError(
                            f"permutation {v!r} has inconsistent sizes: {name}[{seen[v][1]!r}] has shape {seen[v][2]} "
                            f"(size {seen[v][0]}) but the blocks of {name}[{key!r}] (shape {shape}, axis {i}) "
                            f"hold {m} of its units")
                    seen.setdefault(v, (m, key, shape))
            if finite and t.is_meta:
                raise RebasinError(
                    f"{name}[{key!r}] (shape {shape}) is on meta (a shape without values, e.g. from a model built "
                    "under torch.device('meta')): matching and paths need real weights; a meta state can only be "
                    "traced (spec_from_model) and permuted (permute)"
                )
            if finite and t.is_floating_point() and t.numel() and not _all_finite(t):
                raise RebasinError(f"{name}[{key!r}] (shape {shape}) contains NaN or inf values")
        sizes = {p: v[0] for p, v in seen.items()}
        missing_parts = [p for p in self.perm_to_axes if p not in sizes]
        if missing_parts:  # only possible for parts of a concatenation used on no axis
            raise RebasinError(f"permutation(s) {missing_parts} act on no axis of {name}")
        _check_structure_sizes(self, sizes, name)
        if self.sizes is not None:
            for p, n in self.sizes.items():
                if sizes.get(p) != n:
                    k0 = seen[p][1] if p in seen else "?"
                    raise RebasinError(
                        f"permutation {p!r} has size {n} in the spec but {sizes.get(p)} in {name} "
                        f"(key {k0!r})"
                    )
        return sizes

    def validate_pair(self, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> dict[str, int]:
        """Validate two state_dicts of the same architecture (finite values, equal shapes)."""
        sizes = self.validate(state_a, finite=True, name="state_a")
        self.validate(state_b, finite=True, name="state_b")
        diff = [
            f"{k}: {tuple(state_a[k].shape)} vs {tuple(state_b[k].shape)}"
            for k in self.axes
            if state_a[k].shape != state_b[k].shape
        ]
        if diff:
            raise RebasinError("state_a and state_b have different shapes: " + "; ".join(diff[:12]))
        return sizes

    def resolved_sizes(self, state_dict: Mapping[str, Tensor] | None = None) -> dict[str, int]:
        """``sizes`` if known, else derived from ``state_dict``; error if neither is available."""
        if state_dict is not None:
            return self.validate(state_dict)
        if self.sizes is None:
            raise RebasinError(
                "this spec does not know its permutation sizes; pass a state_dict or build the spec "
                "with spec.with_sizes(state_dict)"
            )
        return dict(self.sizes)

    # ------------------------------------------------------------------ functional check
    def check(
        self,
        model: nn.Module,
        example_input: Any,
        *,
        seed: int = 0,
        atol: float = 1e-5,
        rtol: float = 1e-4,
    ) -> float:
        """Assert that permuting ``model``'s weights by a random permutation leaves its outputs unchanged.

        The check runs on a copy of the state whose normalisation parameters and statistics
        (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm: weight, bias, running mean and
        variance), and any other floating entry whose values are all equal, are replaced by random
        values near the originals (variances stay positive): in a freshly built model those entries
        are constants (ones and zeros), which every permutation leaves unchanged, so a spec that
        forgets to permute them would otherwise pass. The model is run in eval mode (its training
        flags are restored) through :func:`torch.func.functional_call`, so it is not mutated.
        Returns the largest absolute output difference; raises :class:`RebasinError` if it exceeds
        ``atol + rtol * max|y|``, or if the model or ``example_input`` is on meta (it needs values).
        """
        state = state_of(model)
        meta = [k for k, v in state.items() if v.is_meta]
        if meta or any(t.is_meta for t in _tensor_leaves(example_input)):
            where = f"its state ({meta[0]!r}) is" if meta else "example_input is"
            raise RebasinError(
                f"spec.check needs real weights and inputs: it compares the outputs of {type(model).__name__} "
                f"before and after a permutation, but {where} on meta (shapes without values). Run the check on "
                "a model with values (e.g. model.to_empty(device='cpu') then load a state_dict)"
            )
        state = _randomised_norms(model, state, seed)
        sizes = self.validate(state)
        perms = random_permutation(self, seed=seed, sizes=sizes)
        permuted = permute(self, perms, state)
        try:
            y0 = forward_with_state(model, state, example_input, eval_mode=True)
        except RuntimeError as err:
            raise RebasinError(
                f"spec.check could not run {type(model).__name__} on example_input {describe_tensors(example_input)}: "
                f"{type(err).__name__}: {first_line(err)}. Pass an input the model accepts"
            ) from err
        y1 = forward_with_state(model, permuted, example_input, eval_mode=True)
        leaves0, _ = torch.utils._pytree.tree_flatten(y0)
        leaves1, _ = torch.utils._pytree.tree_flatten(y1)
        worst, scale = 0.0, 0.0
        for a, b in zip(leaves0, leaves1):
            if isinstance(a, Tensor) and a.is_floating_point():
                worst = max(worst, float((a - b).abs().max()) if a.numel() else 0.0)
                scale = max(scale, float(a.abs().max()) if a.numel() else 0.0)
        if not math.isfinite(worst) or worst > atol + rtol * scale:
            raise RebasinError(
                f"the spec is wrong for this model: permuting the weights changed the outputs by up to "
                f"{worst:.3g} (output scale {scale:.3g}); some permutation is missing or misplaced. "
                "Inspect spec.axes or build it with rebasin.spec_from_model."
            )
        return worst


def _tensor_leaves(x: Any) -> list[Tensor]:
    return [v for v in torch.utils._pytree.tree_leaves(x) if isinstance(v, Tensor)]


_NORMS: tuple[type[nn.Module], ...] = tuple(
    c for c in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None))
    if c is not None
)


def _randomised_norms(model: nn.Module, state: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """``state`` with norm entries and constant floating entries replaced by random values near them (new dict).

    Each chosen entry ``v`` becomes ``v * (1 + u / 2)`` for a variance (stays positive) and
    ``v + s * u / 2`` otherwise, with ``u ~ U(-1, 1)`` elementwise and ``s`` the mean of ``|v|`` (1 when
    ``v`` is zero), drawn from a generator seeded by ``seed``.
    """
    norm_keys = {
        f"{name}.{k}" if name else k
        for name, m in model.named_modules()
        if isinstance(m, _NORMS)
        for k in m.state_dict(keep_vars=True)
    }
    g = torch.Generator().manual_seed(int(seed) + 1)
    out = dict(state)
    for key, v in state.items():
        if not v.is_floating_point() or v.numel() < 2 or v.device.type == "meta":
            continue
        flat = v.detach().reshape(-1)
        head = flat[:64]  # a cheap look first: a large weight matrix is rarely constant in its first entries
        constant = bool((head == flat[0]).all()) and bool(torch.isfinite(flat).all()) and bool((flat == flat[0]).all())
        if key not in norm_keys and not constant:
            continue
        u = (torch.rand(v.shape, generator=g, dtype=torch.float64) * 2 - 1).to(v.device)
        base = v.detach().to(torch.float64)
        if key.rsplit(".", 1)[-1] == "running_var":
            new = base * (1 + u / 2)
        else:
            scale = float(base.abs().mean())
            new = base + (scale if scale > 0 and math.isfinite(scale) else 1.0) * u / 2
        out[key] = new.to(v.dtype)
    return out


def _check_structure(spec: PermutationSpec, axes: Mapping[str, Axes]) -> None:
    """Construction-time checks of ``structure``, ``concat`` and ``grouped`` (plain data, names only)."""
    on_axes = {p for ax in axes.values() for p in ax if p is not None} | {str(v) for v in dict(spec.block_inner).values()}
    concat: dict[str, tuple[tuple[str | None, int], ...]] = {}
    for name, parts in dict(spec.concat).items():
        if not isinstance(name, str) or name not in on_axes:
            raise RebasinError(f"spec concat entry {name!r} is not a permutation used on any axis")
        try:
            clean = tuple((None if q is None else str(q), int(m)) for q, m in parts)
        except (TypeError, ValueError):
            raise RebasinError(f"spec concat[{name!r}] must be a tuple of (part or None, size) pairs, got {parts!r}") from None
        for q, m in clean:
            if m < 1:
                raise RebasinError(f"spec concat[{name!r}]: part {q!r} has size {m}; sizes must be positive")
        nested = [q for q, _ in clean if q is not None and q in spec.concat]
        if nested:
            raise RebasinError(f"spec concat[{name!r}] has concatenations {nested} as parts; flatten them")
        concat[name] = clean
    object.__setattr__(spec, "concat", MappingProxyType(concat))
    free = {p for p in on_axes if p not in concat} | {q for parts in concat.values() for q, _ in parts if q is not None}
    structure: dict[str, tuple[str, int]] = {}
    for p, val in dict(spec.structure).items():
        if p not in free:
            raise RebasinError(f"spec structure entry {p!r} is not a permutation of the spec (derived names cannot be structured)")
        try:
            outer, d = val
            outer, d = str(outer), int(d)
        except (TypeError, ValueError):
            raise RebasinError(f"spec structure[{p!r}] must be (outer name, block size), got {val!r}") from None
        if d < 1 or outer == p or outer in concat:
            raise RebasinError(f"spec structure[{p!r}] = {val!r}: the block size must be positive and the outer "
                               "permutation another, non-derived name")
        structure[p] = (outer, d)
    nested = sorted({o for o, _ in structure.values() if o in structure})
    if nested:
        raise RebasinError(f"spec structure: outer permutation(s) {nested} are themselves structured; nested "
                           "structures (groups inside groups) are not supported")
    object.__setattr__(spec, "structure", MappingProxyType(structure))
    grouped: dict[tuple[str, int], int] = {}
    for (key, axis), g in dict(spec.grouped).items():
        ax = axes.get(key)
        p = ax[axis] if ax is not None and 0 < axis < len(ax) else None  # type: ignore[assignment]  # Optional narrowed by earlier logic mypy cannot follow
        if p is None or p in concat or p not in structure or int(g) < 2:
            raise RebasinError(
                f"spec grouped entry ({key!r}, {axis}) = {g}: the axis (not axis 0) must carry a structured, "
                "non-derived permutation and the group count must be at least 2")
        rows = ax[0]  # type: ignore[index]  # Optional narrowed by earlier logic mypy cannot follow
        if rows is None or rows not in structure or structure[rows][0] != structure[p][0]:
            raise RebasinError(
                f"spec grouped entry ({key!r}, {axis}): axis 0 must carry a permutation structured with the same "
                f"outer permutation {structure[p][0]!r} as {p!r} (the groups of a grouped layer move together)")
        if (key, axis) in spec.blocks:
            raise RebasinError(f"spec grouped entry ({key!r}, {axis}) cannot also have a block size")
        grouped[(key, int(axis))] = int(g)
    object.__setattr__(spec, "grouped", MappingProxyType(grouped))
    block_inner: dict[tuple[str, int], str] = {}
    for (key, axis), v in dict(spec.block_inner).items():
        ax = axes.get(key)
        p = ax[axis] if ax is not None and isinstance(axis, int) and 0 <= axis < len(ax) else None  # type: ignore[assignment]  # a str or None here
        where = f"spec block_inner entry ({key!r}, {axis}) = {v!r}"
        if p is None or (key, axis) not in spec.blocks or (key, axis) in grouped or p in concat:
            raise RebasinError(f"{where}: the axis must carry a permutation with a block size (spec.blocks), "
                               "not a concatenation or a grouped axis")
        if v in concat or v == p or (v in structure and structure[v][1] != spec.blocks[(key, axis)]):
            raise RebasinError(f"{where}: {v!r} must be another permutation, not a concatenation, and if structured "
                               f"its block size must be the axis's block size {spec.blocks[(key, axis)]}")
        v_outer = structure[v][0] if v in structure else None
        if v_outer is not None and p != v_outer and (p not in structure or structure[p][0] != v_outer):
            raise RebasinError(f"{where}: the axis's permutation {p!r} must be {v!r}'s outer permutation {v_outer!r} "
                               f"or structured with it (its blocks then share the inner block of their group)")
        block_inner[(key, int(axis))] = str(v)
    object.__setattr__(spec, "block_inner", MappingProxyType(block_inner))


def _check_structure_sizes(spec: PermutationSpec, sizes: Mapping[str, int], name: str) -> None:
    outer_n: dict[str, tuple[int, str]] = {}
    for p, (outer, d) in spec.structure.items():
        n = sizes[p]
        if n % d:
            raise RebasinError(f"permutation {p!r} has size {n} in {name}, not a multiple of its block size {d} "
                               f"(outer {outer!r})")
        h = n // d
        if outer in sizes and sizes[outer] != h:
            raise RebasinError(f"permutation {p!r} has {h} blocks of {d} but its outer permutation {outer!r} "
                               f"has size {sizes[outer]}")
        if outer in outer_n and outer_n[outer][0] != h:
            raise RebasinError(f"permutations {outer_n[outer][1]!r} and {p!r} share the outer permutation "
                               f"{outer!r} but have {outer_n[outer][0]} and {h} blocks")
        outer_n.setdefault(outer, (h, p))
    for (key, axis), g in spec.grouped.items():
        p = spec.axes[key][axis]  # type: ignore[assignment]  # Optional narrowed by earlier logic mypy cannot follow
        h = sizes[p] // spec.structure[p][1]
        if h != g:
            raise RebasinError(f"spec grouped entry ({key!r}, {axis}) has {g} groups but {p!r} has {h} blocks")


def split_structured(perm: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``(outer, inner)`` of a structured permutation: ``perm[a*d + i] == outer[a]*d + inner[a, i]``."""
    view = perm.long().reshape(-1, block)
    return view[:, 0] // block, view % block


def join_structured(outer: Tensor, inner: Tensor) -> Tensor:
    """The flat permutation of ``outer`` (size ``H``) and ``inner`` (shape ``(H, d)``); see :func:`split_structured`."""
    d = inner.shape[1]
    return (outer.long()[:, None] * d + inner.long()).reshape(-1)


def axis_index(spec: PermutationSpec, name: str, perms: Mapping[str, Tensor], skip: str | None = None) -> Tensor | None:
    """The flat index a spec name (a permutation or a concatenation) applies to an axis; None for the identity.

    Permutations missing from ``perms`` (or equal to ``skip``) are the identity.
    """
    if name not in spec.concat:
        return None if name == skip else perms.get(name)
    pieces, start, moved = [], 0, False
    device = next((perms[q].device for q, _ in spec.concat[name] if q is not None and q in perms), None)
    for q, m in spec.concat[name]:
        p = perms.get(q) if q is not None and q != skip else None
        moved = moved or p is not None
        pieces.append((p.long() if p is not None else torch.arange(m, device=device)) + start)
        start += m
    return torch.cat(pieces) if moved else None


def full_axis_index(spec: PermutationSpec, key: str, axis: int, length: int, perms: Mapping[str, Tensor],
                    skip: str | None = None) -> Tensor | None:
    """The index along axis ``axis`` (of ``length`` entries) of ``key``, with its block size and
    :attr:`~PermutationSpec.block_inner` applied; None for the identity. Permutations missing from ``perms``
    (or equal to ``skip``) are the identity."""
    name = spec.axes[key][axis]
    if name is None:
        return None
    k = spec.blocks.get((key, axis), 1)
    p = axis_index(spec, name, perms, skip)
    v = spec.block_inner.get((key, axis))
    q = perms.get(v) if v is not None and v != skip else None
    if q is None:
        return None if p is None else block_index(p, k)
    inner = split_structured(q, k)[1]  # (blocks of the inner class, k)
    inner = inner.repeat_interleave(length // k // inner.shape[0], 0)  # (blocks of the axis, k)
    if p is None:
        p = torch.arange(inner.shape[0], device=q.device)
    return join_structured(p.to(q.device), inner)


# ---------------------------------------------------------------------------------------- algebra
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
    for outer, members in spec.outers.items():
        given = [q for q in members if q in perms]
        if not given and outer not in perms:
            continue
        implied: list[tuple[str, Tensor]] = [(outer, perms[outer].long().cpu())] if outer in perms else []
        for q in members:
            d = spec.structure[q][1]
            if q not in perms:
                if implied:
                    raise RebasinError(
                        f"perms gives {implied[0][0]!r} but not {q!r}, which shares its outer permutation {outer!r} "
                        "(heads or groups move together); give every permutation of the structure or none")
                continue
            p = perms[q].long().cpu()
            if p.numel() % d:
                raise RebasinError(f"perms[{q!r}] has {p.numel()} entries, not a multiple of its block size {d}")
            view = p.reshape(-1, d)
            lead = view[:, :1] // d
            if bool((view // d != lead).any()):
                raise RebasinError(f"perms[{q!r}] moves units between blocks of {d}: the spec structures it as whole "
                                   f"blocks (heads or groups) permuted by {outer!r} and units permuted inside each block")
            implied.append((q, lead[:, 0]))
        for q, o in implied[1:]:
            if o.shape != implied[0][1].shape or not torch.equal(o, implied[0][1]):
                raise RebasinError(f"perms[{q!r}] and perms[{implied[0][0]!r}] move the blocks of their shared outer "
                                   f"permutation {outer!r} differently; they must move heads/groups together")


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
    return permute_unchecked(spec, perms, state_dict)


def permute_unchecked(
    spec: PermutationSpec, perms: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], skip: str | None = None
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, t in state_dict.items():
        grouped = []
        for axis, name in enumerate(spec.axes[key]):
            if name is None:
                continue
            if (key, axis) in spec.grouped:
                p = axis_index(spec, name, perms, skip)
                if p is not None:
                    grouped.append((axis, p))
                continue
            index = full_axis_index(spec, key, axis, t.shape[axis], perms, skip)
            if index is not None:
                t = torch.index_select(t, axis, index.to(t.device))
        for axis, p in grouped:  # after axis 0: each row reads the block of its (new) group
            t = _gather_grouped(t, axis, p.to(t.device), spec.grouped[(key, axis)])
        out[key] = t
    return out


def _gather_grouped(t: Tensor, axis: int, p: Tensor, groups: int) -> Tensor:
    """Permute the grouped axis ``axis`` of ``t``: row ``r`` (group ``r // (rows / groups)``) uses its group's block of ``p``."""
    rows, m = t.shape[0], t.shape[axis]
    local = (p.long() % m).reshape(groups, m)  # block b of p, as offsets inside the source block
    idx = local.repeat_interleave(rows // groups, dim=0)  # (rows, m)
    shape = [1] * t.ndim
    shape[0], shape[axis] = rows, m
    return torch.gather(t, axis, idx.reshape(shape).expand(t.shape))


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

    Structured permutations are drawn inside their structure (a uniform outer permutation, shared by
    the permutations it structures, and uniform permutations inside each block). Deterministic: the same ``seed`` gives the same permutations, drawn in ``spec.perms`` order.
    Pass a ``generator`` instead of ``seed`` to continue an existing random stream.
    """
    sizes = dict(sizes) if sizes is not None else spec.resolved_sizes()
    if generator is None:
        if seed is None:
            raise RebasinError("random_permutation needs seed= or generator=")
        generator = torch.Generator().manual_seed(int(seed))
    out: dict[str, Tensor] = {}
    outer_draw: dict[str, Tensor] = {}
    for p in spec.perms:
        if p in spec.structure:
            outer, d = spec.structure[p]
            if outer not in outer_draw:
                outer_draw[outer] = torch.randperm(spec.outer_size(outer, sizes), generator=generator)
                if outer in spec.perm_to_axes:
                    out[outer] = outer_draw[outer]
            h = sizes[p] // d
            inner = torch.stack([torch.randperm(d, generator=generator) for _ in range(h)])
            out[p] = join_structured(outer_draw[outer], inner)
        elif p in spec.outers:
            if p not in outer_draw:
                outer_draw[p] = torch.randperm(sizes[p], generator=generator)
            out[p] = outer_draw[p]
        else:
            out[p] = torch.randperm(sizes[p], generator=generator)
    return out


def identity_permutation(spec: PermutationSpec, sizes: Mapping[str, int] | None = None) -> dict[str, Tensor]:
    """The identity permutation for every permutation name of the spec."""
    sizes = dict(sizes) if sizes is not None else spec.resolved_sizes()
    return {p: torch.arange(sizes[p]) for p in spec.perms}


def _all_finite(t: Tensor) -> bool:
    """No NaN or infinity in ``t`` (non-empty): its min and max are finite (both propagate NaN). One pass and two
    scalars, where ``isfinite(t).all()`` allocates a boolean copy of the tensor (seconds on an LLM's weights)."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
