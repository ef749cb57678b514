"""Weight matching over checkpoints on disk, holding about one tensor of each model at a time.

The engine behind :func:`rebasin.weight_matching` when either model is a
:class:`rebasin.spec.checkpoint.Checkpoint` (from :func:`rebasin.open_checkpoint`). It runs the same
coordinate descent as the in-memory engine (:mod:`rebasin.matching.weight`), step for step
(:func:`rebasin.matching._descent.coordinate_descent`, shared by both): the same visiting order of
``spec.units`` drawn from ``seed``, the same acceptance rule, the same skipped solves (a permutation whose
similarity has not changed since its last solve), the same cached similarities corrected by the same
low-rank updates, so it returns the same permutations. What differs is where things live:

* the tensors stay on disk. A plain similarity ``S_P`` (keys whose axes carry distinct free permutations)
  is built from the tensors ``P`` touches, reading one tensor of A and the same tensor of B at a time;
  B's tensor gets every current permutation but ``P`` (:func:`rebasin.permute_unchecked` on a one-key dict
  with ``skip=P``, so blocks follow the spec's own rules) and ``S_P += rows(A_k) rows(B'_k)^T``;
* the cached ``n x n`` similarities are kept in an anonymous scratch file (page cache, not process memory)
  and read back one at a time. When a permutation ``Q`` changes at ``m <= n / 4`` units, each cached
  neighbouring similarity gets the exact correction ``A[:, J] (B'_new[:, J] - B'_old[:, J])^T``, which reads
  the one tensor they share again; above that the cache is dropped and rebuilt on the next visit;
* structured units (heads, groups: ``spec.structure``) and the *complex* keys (a concatenation such as a
  packed q;k;v or LSTM gates, a grouped convolution, one unit on two axes of a tensor: ``P W P^T``) go
  through the in-memory engine's own :class:`~rebasin.matching._descent.StructuredSteps`, whose
  :class:`~rebasin.matching._structured_terms.ComplexTerms` here read each complex tensor from the
  checkpoints when a similarity or an objective needs it (``lazy=True``) instead of holding them: at each
  visit of a unit, one tensor of A and B at a time, the other permutations' current estimates applied
  (``axis_index`` / ``index_select``), then :func:`~rebasin.matching.assignment.structured_assignment` and
  the same acceptance test.

A tensor larger than :data:`rebasin.spec.checkpoint.ROW_CHUNK_BYTES` whose first axis no permutation acts on
(a token embedding, a tied LM head) is read in slices of rows (:meth:`Checkpoint.read_rows
<rebasin.spec.checkpoint.Checkpoint.read_rows>`): each similarity, low-rank correction, objective and
finite-value check adds its slices one at a time (the sums over its rows split over the slices), so A's and
B's copies of it are never whole in memory.

Memory: two tensors or two such slices (and float32 / float64 copies of one complex tensor), one ``n x n``
similarity per member of the unit being solved and its float64 cost matrix.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._common import check_int
from .._errors import RebasinError
from ..spec.checkpoint import fresh_buffer, meta_state, read_rows, row_ranges
from ..spec.core import Occurrence, PermutationSpec, block_index, check_permutations, permute_unchecked
from ._descent import LOWRANK_FRACTION, StructuredSteps, match_from_starts
from ._start import Access, check_start
from ._structured_terms import ComplexTerms, complex_keys, dot64

__all__ = ["weight_matching_lazy"]

def _validate(spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> tuple[dict[str, int], dict[str, Tensor]]:
    """Keys, shapes and sizes from the meta views (no data read); returns the sizes and A's meta view."""
    meta_a, meta_b = meta_state(state_a), meta_state(state_b)
    sizes = spec.validate(meta_a, name="state_a")
    spec.validate(meta_b, name="state_b")
    diff = [f"{k}: {tuple(meta_a[k].shape)} vs {tuple(meta_b[k].shape)}" for k in spec.axes if meta_a[k].shape != meta_b[k].shape]
    if diff:
        raise RebasinError("state_a and state_b have different shapes: " + "; ".join(diff[:12]))
    return sizes, meta_a


def _stretch_rows(t: Tensor, axis: int, lo: int, hi: int, n: int) -> Tensor:
    """Entries ``lo:hi`` of ``axis`` as an ``(n, -1)`` matrix (a block of ``k`` joins the columns)."""
    return t.narrow(axis, lo, hi - lo).movedim(axis, 0).reshape(n, -1)



# Elements per chunk of the finite-value check: its temporaries stay small
# next to the tensor itself (an embedding of 50257 x 768 floats is 154 MB).
_CHUNK = 1 << 20


def _all_finite(t: Tensor) -> bool:
    """``torch.isfinite(t).all()`` chunk by chunk (the one-shot call allocates several copies' worth)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(c).all()) for c in flat.split(_CHUNK))


@dataclass(frozen=True)
class _Term:
    """One stretch of one tensor axis that ``perm`` acts on, with the permutations on the tensor's other axes."""

    perm: str
    occ: Occurrence
    nbrs: dict[str, tuple[Occurrence, ...]]  # other axes' permutations and where they act


class _Scratch:
    """``n x n`` float32 matrices kept in an anonymous temporary file, read back one at a time."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(prefix="rebasin-wm-")
        self.slots: dict[tuple[str, str], tuple[int, int]] = {}  # (perm, kind) -> (offset, n)
        self.end = 0

    def put(self, key: tuple[str, str], mat: Tensor) -> None:
        n = mat.shape[0]
        if key not in self.slots:
            self.slots[key] = (self.end, n)
            self.end += n * n * 4
        data = mat.detach().to("cpu", torch.float32).contiguous().reshape(-1).view(torch.uint8).numpy()
        view, off, done = memoryview(data), self.slots[key][0], 0  # type: ignore[arg-type]  # numpy's stubs omit the buffer protocol
        while done < len(view):
            done += os.pwrite(self.file.fileno(), view[done:], off + done)

    def get(self, key: tuple[str, str], device: torch.device) -> Tensor:
        off, n = self.slots[key]
        buf = fresh_buffer(n * n * 4)  # its own mapping from 1 MiB up: no heap holes once dropped
        view, done = memoryview(buf.numpy()), 0  # type: ignore[arg-type]  # numpy's stubs omit the buffer protocol
        while done < len(view):
            got = os.preadv(self.file.fileno(), [view[done:]], off + done)
            if got == 0:  # pragma: no cover - our own file
                raise RebasinError("the scratch file of the similarity cache was truncated")
            done += got
        return buf.view(torch.float32).reshape(n, n).to(device)

    def close(self) -> None:
        self.file.close()


class _LazyEngine:
    """The plain terms of the descent (keys with distinct free permutations on their axes), read from disk.

    Same interface and arithmetic as the in-memory ``_Engine`` of :mod:`rebasin.matching.weight`
    (see :mod:`rebasin.matching._descent`); similarities are cached in a :class:`_Scratch` file.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        meta: Mapping[str, Tensor],
        sizes: Mapping[str, int],
        perms: dict[str, np.ndarray],
        device: torch.device,
        skip_keys: frozenset[str],
        chunk_bytes: int,
    ) -> None:
        self.spec, self.state_a, self.state_b = spec, state_a, state_b
        self.sizes, self.perms, self.device = dict(sizes), perms, device

        def floating(key: str) -> bool:
            return key not in skip_keys and meta[key].is_floating_point() and meta[key].numel() > 0

        self.on_key: dict[str, list[tuple[str, Occurrence]]] = {}
        # big tensors whose first axis no permutation acts on are read in slices of rows (None: whole)
        self.rows: dict[str, list[tuple[int, int]] | None] = {
            k: (row_ranges(spec, k, meta[k], chunk_bytes) if floating(k) else None) for k in spec.axes}
        for p, occs in spec.occurrences.items():
            for o in occs:
                if floating(o.key):
                    self.on_key.setdefault(o.key, []).append((p, o))
        self.static: dict[str, list[_Term]] = {p: [] for p in spec.perms}
        self.dynamic: dict[str, list[_Term]] = {p: [] for p in spec.perms}
        self.by_nbr: dict[str, list[_Term]] = {p: [] for p in spec.perms}
        for p, occs in spec.occurrences.items():
            for o in occs:
                if not floating(o.key):
                    continue
                nbrs: dict[str, list[Occurrence]] = {}
                for q, qo in self.on_key[o.key]:
                    if qo.axis != o.axis:
                        nbrs.setdefault(q, []).append(qo)
                term = _Term(p, o, {q: tuple(v) for q, v in nbrs.items()})
                (self.dynamic if nbrs else self.static)[p].append(term)
                for q in nbrs:
                    self.by_nbr[q].append(term)
        self.plain_keys = frozenset(self.on_key)
        self.partial: dict[str, list[_Term]] = {}  # the layer-wise start's sums (in the scratch file), see start_similarity
        self.complete: set[str] = set()  # permutations whose start similarity had every term
        self.scratch = _Scratch()
        self.has_static: set[str] = set()
        self.cached: set[str] = set()  # permutations whose similarity is in the scratch file ("cache", p)
        self.stale = {p: True for p in spec.perms}
        self.n_full_builds = 0
        self.n_lowrank_updates = 0

    def active(self) -> list[str]:
        """Permutations worth visiting: size above one and at least one floating tensor."""
        return [p for p in self.spec.perms if self.sizes[p] > 1 and (self.static[p] or self.dynamic[p])]

    def current(self) -> dict[str, Tensor]:
        return {q: torch.from_numpy(v).to(self.device) for q, v in self.perms.items()}

    def slices(self, key: str) -> list[tuple[int, int] | None]:
        """The row slices ``key`` is read in: ``[None]`` (the whole tensor) unless it is cut into rows."""
        return list(self.rows[key] or [None])  # type: ignore[list-item]  # [None] stands for one read of the whole tensor

    def load(self, state: Mapping[str, Tensor], key: str, rows: tuple[int, int] | None = None) -> Tensor:
        """A's or B's tensor ``key`` (or its rows ``rows``) in float32 on the device."""
        t = state[key] if rows is None else read_rows(state, key, *rows)
        return t.detach().to(device=self.device, dtype=torch.float32)

    def b_prime(self, t: _Term, cur: Mapping[str, Tensor], rows: tuple[int, int] | None = None) -> Tensor:
        """B's tensor (or its rows ``rows``) with every permutation but ``t.perm`` applied."""
        return permute_unchecked(self.spec, cur, {t.occ.key: self.load(self.state_b, t.occ.key, rows)}, t.perm)[t.occ.key]

    def build(self, terms: list[_Term], out: Tensor | None) -> Tensor:
        """``out + sum_t A_t B'_t^T`` (``out`` updated in place when given); a tensor cut into rows adds
        its slices one at a time (the sum over its columns splits over the slices)."""
        cur = self.current()
        for t in terms:
            n = self.sizes[t.perm]
            lo, hi = t.occ.start * t.occ.block, (t.occ.start + n) * t.occ.block
            for rows in self.slices(t.occ.key):
                f_rows = _stretch_rows(self.b_prime(t, cur, rows), t.occ.axis, lo, hi, n)
                a_rows = _stretch_rows(self.load(self.state_a, t.occ.key, rows), t.occ.axis, lo, hi, n)
                if out is None:
                    out = torch.mm(a_rows, f_rows.T)
                else:
                    out.addmm_(a_rows, f_rows.T)
                del a_rows, f_rows
        assert out is not None  # every caller passes at least one term or a base
        return out

    def similarity(self, p: str, force: bool = False) -> Tensor | None:
        """``S_P`` of the plain terms, or ``None`` if unchanged since the last solve (with ``force``: only
        if ``P`` has no plain term). The result is a fresh tensor read from the scratch file."""
        if not (self.static[p] or self.dynamic[p]):
            return None
        if not self.stale[p] and not force:
            return None
        self.stale[p] = False
        if p in self.cached:
            return self.scratch.get(("cache", p), self.device)
        base = self._static(p)
        if self.dynamic[p]:
            self.n_full_builds += 1
            base = self.build(self.dynamic[p], base)
        assert base is not None
        self.scratch.put(("cache", p), base)
        self.cached.add(p)
        return base

    def update(self, q: str, new: np.ndarray, changed: np.ndarray) -> None:
        """Set permutation ``q`` to ``new`` (it differs from the current one at rows ``changed``)."""
        spec, dev = self.spec, self.device
        old = self.perms[q]
        inv_old = np.empty_like(old)
        inv_old[old] = np.arange(old.size)
        src_units = torch.from_numpy(inv_old[new[changed]]).to(dev)
        dst_units = torch.from_numpy(changed).to(dev)
        lowrank = changed.size <= LOWRANK_FRACTION * old.size
        cur = self.current()  # before the change
        for t in self.by_nbr[q]:
            r = t.perm
            if r in self.cached:
                if lowrank and len(t.nbrs[q]) == 1:
                    qo = t.nbrs[q][0]
                    dst = block_index(dst_units + qo.start, qo.block)
                    src = block_index(src_units + qo.start, qo.block)
                    n = self.sizes[r]
                    lo, hi = t.occ.start * t.occ.block, (t.occ.start + n) * t.occ.block
                    sim = self.scratch.get(("cache", r), dev)
                    for rows in self.slices(t.occ.key):  # a tensor cut into rows: its slices one at a time
                        if spec.axes[t.occ.key][qo.axis] == q:  # direct axis: permute only the two slabs of m units
                            full = block_index(cur[q], qo.block)
                            rest = {k: v for k, v in cur.items() if k != q}
                            b = self.load(self.state_b, t.occ.key, rows)
                            slabs = [permute_unchecked(spec, rest, {t.occ.key: b.index_select(qo.axis, full[i])}, r)[t.occ.key]
                                     for i in (src, dst)]
                            delta = slabs[0] - slabs[1]
                            del b, slabs
                        else:
                            b = self.b_prime(t, cur, rows)
                            delta = b.index_select(qo.axis, src) - b.index_select(qo.axis, dst)
                            del b
                        a_sel = self.load(self.state_a, t.occ.key, rows).index_select(qo.axis, dst)
                        sim.addmm_(_stretch_rows(a_sel, t.occ.axis, lo, hi, n), _stretch_rows(delta, t.occ.axis, lo, hi, n).T)
                        del delta, a_sel
                    self.scratch.put(("cache", r), sim)
                    del sim
                    self.n_lowrank_updates += 1
                else:
                    self.cached.discard(r)
            self.stale[r] = True
        self.perms[q] = new

    def _static(self, p: str) -> Tensor | None:
        """The static terms' similarity (constant: computed once, kept in the scratch file)."""
        if not self.static[p]:
            return None
        if p not in self.has_static:
            self.scratch.put(("static", p), self.build(self.static[p], None))
            self.has_static.add(p)
        return self.scratch.get(("static", p), self.device)

    def start_similarity(self, p: str, settled: set[str]) -> Tensor | None:
        """The layer-wise start's similarity of ``p``: its terms whose neighbours are all ``settled``; the sum
        is kept and completed by :meth:`finish_start`, as the in-memory engine does."""
        used = [t for t in self.dynamic[p] if set(t.nbrs) <= settled]
        if len(used) == len(self.dynamic[p]):
            self.complete.add(p)
        base = self._static(p)
        if not used:
            return base
        out = self.build(used, base)
        self.scratch.put(("cache", p), out)
        self.partial[p] = used
        return out

    def finish_start(self) -> None:
        """Complete the similarities the start summed in part: the descent's caches."""
        for p, used in self.partial.items():
            rest = [t for t in self.dynamic[p] if all(t is not u for u in used)]
            sim = self.scratch.get(("cache", p), self.device)
            self.scratch.put(("cache", p), self.build(rest, sim) if rest else sim)
            self.cached.add(p)
            self.n_full_builds += 1
        for p in self.complete:  # a similarity the start summed whole was solved as it is now
            self.stale[p] = False
        self.partial.clear()
        self.complete.clear()

    def reset(self, perms: Mapping[str, np.ndarray]) -> None:
        """Move to ``perms``; the cached similarities are dropped."""
        self.perms.update({p: np.asarray(v) for p, v in perms.items()})
        self.cached.clear()
        self.stale = {p: True for p in self.spec.perms}

    def objective(self) -> float:
        """``sum_k <A_k, perm(B_k)>`` over the plain keys at the current permutations, one key at a time."""
        start, total = self.current(), 0.0
        for key in self.on_key:
            for rows in self.slices(key):
                moved = permute_unchecked(self.spec, start, {key: self.load(self.state_b, key, rows)})[key]  # B's copy dropped
                total += dot64(self.load(self.state_a, key, rows), moved)
                del moved
        return total


def weight_matching_lazy(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    n_iter: int = 100,
    init: Mapping[str, Tensor] | None = None,
    start: str = "auto",
    seed: int = 0,
    device: torch.device | str | None = None,
    chunk_bytes: int | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weight matching reading one tensor of each model at a time (see the module docstring).

    Parameters are those of :func:`rebasin.weight_matching`; ``state_a`` / ``state_b`` are any
    mappings (usually :class:`rebasin.spec.checkpoint.Checkpoint`), read key by key and never held
    whole. ``device`` defaults to the CPU. ``chunk_bytes`` (default
    :data:`rebasin.spec.checkpoint.ROW_CHUNK_BYTES`, read at call time) bounds the slices of rows that a big
    tensor is read in when no permutation acts on its first axis (:func:`rebasin.spec.checkpoint.row_ranges`):
    A's and B's copies of such a tensor are then never whole in memory.

    Returns
    -------
    (dict[str, Tensor], dict)
        The permutations (as :func:`rebasin.weight_matching`) and the fields of a
        :class:`rebasin.matching.WeightMatchingInfo`.

    Raises
    ------
    RebasinError
        As :func:`rebasin.weight_matching` (mismatching keys or shapes, NaN or inf, bad ``init`` or
        ``n_iter``).
    """
    check_int(n_iter, "n_iter", 0)
    check_start(start, init)
    if chunk_bytes is None:  # the module's constant at call time (tests shrink it)
        from ..spec import checkpoint

        chunk_bytes = checkpoint.ROW_CHUNK_BYTES
    check_int(chunk_bytes, "chunk_bytes", 1)
    sizes, meta = _validate(spec, state_a, state_b)
    if init is not None:
        check_permutations(spec, init, sizes)
    dev = torch.device(device) if device is not None else torch.device("cpu")

    with torch.no_grad():
        # one pass over every key: tensors, finite values (as the in-memory path checks)
        for key in spec.axes:
            if not meta[key].is_floating_point():
                continue
            ranges = row_ranges(spec, key, meta[key], chunk_bytes)
            for state, which in ((state_a, "state_a"), (state_b, "state_b")):
                for rows in ranges or [None]:  # type: ignore[list-item]  # [None] stands for one read of the whole tensor; a big tensor in slices of rows
                    t = state[key] if rows is None else read_rows(state, key, *rows)
                    if not isinstance(t, Tensor):
                        raise RebasinError(f"{which}[{key!r}] is a {type(t).__name__}, expected a Tensor")
                    if t.numel() and not _all_finite(t):
                        shape = tuple(meta[key].shape)
                        raise RebasinError(f"{which}[{key!r}] (shape {shape}) contains NaN or inf values")
                    del t
        ranges = {k: row_ranges(spec, k, meta[k], chunk_bytes) for k in spec.axes}  # type: ignore[assignment]  # the name is rebound from one key's row ranges to the table over keys

        def read(which: str, key: str, rows: tuple[int, int] | None) -> Tensor:
            state = state_a if which == "a" else state_b
            t = state[key] if rows is None else read_rows(state, key, *rows)
            return t.detach().to(device=dev, dtype=torch.float32)

        def floating(key: str) -> bool:
            return meta[key].is_floating_point() and meta[key].numel() > 0

        access = Access(meta, floating, read, lambda k: list(ranges[k] or [None]), dev)  # type: ignore[call-overload, index]  # ranges is the table over keys here; [None] reads the whole tensor
        cx_keys = complex_keys(spec, meta)
        identity = {p: np.arange(sizes[p], dtype=np.int64) for p in spec.perms}
        engine = _LazyEngine(spec, state_a, state_b, meta, sizes, identity, dev, cx_keys, chunk_bytes)
        try:
            terms = ComplexTerms(spec, state_a, state_b, cx_keys, sizes, dev, lazy=True)
            cx = StructuredSteps(spec, engine, terms, dev)
            perms, info = match_from_starts(spec, engine, cx, access, start=start, init=init, n_iter=n_iter, seed=seed)
        finally:
            engine.scratch.close()

    return {name: torch.from_numpy(p) for name, p in perms.items()}, info
