"""Weight matching over checkpoints on disk, holding about one tensor of each model at a time.

The engine behind :func:`rebasin.weight_matching` when either model is a
:class:`rebasin.spec.checkpoint.Checkpoint` (from :func:`rebasin.open_checkpoint`). It runs the same
coordinate descent as the in-memory engine (:mod:`rebasin.matching.weight`), step for step: the same
visiting order drawn from ``seed``, the same acceptance rule, the same skipped solves (a permutation whose
similarity has not changed since its last solve), the same cached similarities corrected by the same
low-rank updates, so it returns the same permutations. What differs is where things live:

* the tensors stay on disk. A similarity ``S_P`` is built from the tensors ``P`` touches
  (``spec.occurrences``: direct axes, concatenation parts, block axes), reading one tensor of A and the same
  tensor of B at a time; B's tensor gets every current permutation but ``P``
  (:func:`rebasin.permute_unchecked` on a one-key dict with ``skip=P``, so concatenations and blocks follow
  the spec's own rules) and ``S_P += rows(A_k) rows(B'_k)^T``;
* the cached ``n x n`` similarities are kept in an anonymous scratch file (page cache, not process memory)
  and read back one at a time. When a permutation ``Q`` changes at ``m <= n / 4`` units, each cached
  neighbouring similarity gets the exact correction ``A[:, J] (B'_new[:, J] - B'_old[:, J])^T``, which reads
  the one tensor they share again; above that the cache is dropped and rebuilt on the next visit.

Where ``P`` also acts on another axis of the same tensor (``P W P^T``) the tensor is permuted by every
permutation and the product's columns are put back in B's order with ``P``'s inverse; such a similarity is
rebuilt instead of corrected (that path is kept, but such specs are refused for now: the in-memory engine
solves those units jointly, differently). Memory: two tensors (and float32 copies), one ``n x n`` similarity
and its float64 cost matrix. Structured permutations (heads, groups) are refused too.
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
from ..spec.checkpoint import meta_state
from ..spec.core import Occurrence, PermutationSpec, block_index, check_permutations, permute_unchecked
from .assignment import cost_from_similarity, solve_cost

__all__ = ["weight_matching_lazy"]

# Same constants as the in-memory engine (rebasin.matching.weight): keep them equal, or the results differ.
_GAIN_RTOL = 1e-6
_LOWRANK_FRACTION = 0.25


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



@dataclass(frozen=True)
class _Term:
    """One stretch of one tensor axis that ``perm`` acts on, with the permutations on the tensor's other axes."""

    perm: str
    occ: Occurrence
    twice: bool  # perm also acts on another axis of this tensor (P W P^T)
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
        view, off, done = memoryview(data), self.slots[key][0], 0
        while done < len(view):
            done += os.pwrite(self.file.fileno(), view[done:], off + done)

    def get(self, key: tuple[str, str], device: torch.device) -> Tensor:
        off, n = self.slots[key]
        buf = torch.empty(n * n * 4, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):
            got = os.preadv(self.file.fileno(), [view[done:]], off + done)
            if got == 0:  # pragma: no cover - our own file
                raise RebasinError("the scratch file of the similarity cache was truncated")
            done += got
        return buf.view(torch.float32).reshape(n, n).to(device)

    def close(self) -> None:
        self.file.close()


def weight_matching_lazy(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    n_iter: int = 100,
    init: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weight matching reading one tensor of each model at a time (see the module docstring).

    Parameters are those of :func:`rebasin.weight_matching`; ``state_a`` / ``state_b`` are any
    mappings (usually :class:`rebasin.spec.checkpoint.Checkpoint`), read key by key and never held
    whole. ``device`` defaults to the CPU.

    Returns
    -------
    (dict[str, Tensor], dict)
        The permutations (as :func:`rebasin.weight_matching`) and the fields of a
        :class:`rebasin.WeightMatchingInfo`.

    Raises
    ------
    RebasinError
        As :func:`rebasin.weight_matching` (mismatching keys or shapes, NaN or inf, bad ``init`` or
        ``n_iter``), and for a spec with structured permutations (heads or groups), which this engine
        does not solve.
    """
    check_int(n_iter, "n_iter", 0)
    sizes, meta = _validate(spec, state_a, state_b)
    if spec.structure:
        raise RebasinError(
            f"weight matching over checkpoints does not support structured permutations (heads or groups: "
            f"{sorted(spec.structure)[:6]}); load the state_dicts into memory (dict(ckpt)) to match this spec")
    twice = sorted({p for key, ax in spec.axes.items() for p in ax if p is not None and ax.count(p) > 1})
    if twice:
        raise RebasinError(
            f"weight matching over checkpoints does not support a permutation on two axes of one tensor (P W P^T: "
            f"{twice[:6]}); the in-memory engine solves those units differently. Load the state_dicts into memory "
            "(dict(ckpt)) to match this spec")
    if init is not None:
        check_permutations(spec, init, sizes)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    perms: dict[str, np.ndarray] = {}
    for name in spec.perms:
        if init is not None and name in init:
            perms[name] = init[name].detach().to("cpu", torch.int64).numpy().copy()
        else:
            perms[name] = np.arange(sizes[name], dtype=np.int64)

    def floating(key: str) -> bool:
        return meta[key].is_floating_point() and meta[key].numel() > 0

    on_key: dict[str, list[tuple[str, Occurrence]]] = {}
    for p, occs in spec.occurrences.items():
        for o in occs:
            if floating(o.key):
                on_key.setdefault(o.key, []).append((p, o))
    static: dict[str, list[_Term]] = {p: [] for p in spec.perms}
    dynamic: dict[str, list[_Term]] = {p: [] for p in spec.perms}
    by_nbr: dict[str, list[_Term]] = {p: [] for p in spec.perms}
    for p, occs in spec.occurrences.items():
        for o in occs:
            if not floating(o.key):
                continue
            nbrs: dict[str, list[Occurrence]] = {}
            for q, qo in on_key[o.key]:
                if qo.axis != o.axis:
                    nbrs.setdefault(q, []).append(qo)
            term = _Term(p, o, p in nbrs, {q: tuple(v) for q, v in nbrs.items()})
            (dynamic if nbrs else static)[p].append(term)
            for q in nbrs:
                by_nbr[q].append(term)
    active = [p for p in spec.perms if sizes[p] > 1 and (static[p] or dynamic[p])]

    def current() -> dict[str, Tensor]:
        return {q: torch.from_numpy(v).to(dev) for q, v in perms.items()}

    def load(state: Mapping[str, Tensor], key: str) -> Tensor:
        return state[key].detach().to(device=dev, dtype=torch.float32)

    def b_prime(t: _Term, cur: Mapping[str, Tensor]) -> Tensor:
        """B's tensor with every permutation but ``t.perm`` applied (all of them when ``t.twice``)."""
        return permute_unchecked(spec, cur, {t.occ.key: load(state_b, t.occ.key)}, None if t.twice else t.perm)[t.occ.key]

    def build(terms: list[_Term], out: Tensor | None) -> Tensor:
        """``out + sum_t A_t B'_t^T`` (``out`` updated in place when given)."""
        cur = current()
        for t in terms:
            n = sizes[t.perm]
            lo, hi = t.occ.start * t.occ.block, (t.occ.start + n) * t.occ.block
            f_rows = _stretch_rows(b_prime(t, cur), t.occ.axis, lo, hi, n)
            a_rows = _stretch_rows(load(state_a, t.occ.key), t.occ.axis, lo, hi, n)
            if t.twice:  # columns in the current order of t.perm: put them back in B's order
                prod = torch.mm(a_rows, f_rows.T).index_select(1, torch.argsort(cur[t.perm]))
                out = prod if out is None else out.add_(prod)
            elif out is None:
                out = torch.mm(a_rows, f_rows.T)
            else:
                out.addmm_(a_rows, f_rows.T)
            del a_rows, f_rows
        assert out is not None  # every caller passes at least one term or a base
        return out

    scratch = _Scratch()
    has_static: set[str] = set()
    cached: set[str] = set()  # permutations whose similarity is in the scratch file ("cache", p)
    stale = {p: True for p in spec.perms}
    counts = {"builds": 0, "lowrank": 0}

    def similarity(p: str) -> Tensor | None:
        if not stale[p]:
            return None
        stale[p] = False
        if p in cached:
            return scratch.get(("cache", p), dev)
        base = None
        if static[p]:
            if p not in has_static:
                scratch.put(("static", p), build(static[p], None))  # constant: computed once
                has_static.add(p)
            base = scratch.get(("static", p), dev)
        if dynamic[p]:
            counts["builds"] += 1
            base = build(dynamic[p], base)
        assert base is not None
        scratch.put(("cache", p), base)
        cached.add(p)
        return base

    def update(q: str, new: np.ndarray, changed: np.ndarray) -> None:
        old = perms[q]
        inv_old = np.empty_like(old)
        inv_old[old] = np.arange(old.size)
        src_units = torch.from_numpy(inv_old[new[changed]]).to(dev)
        dst_units = torch.from_numpy(changed).to(dev)
        lowrank = changed.size <= _LOWRANK_FRACTION * old.size
        cur = current()  # before the change
        for t in by_nbr[q]:
            r = t.perm
            if r in cached:
                if lowrank and not t.twice and len(t.nbrs[q]) == 1:
                    qo = t.nbrs[q][0]
                    dst = block_index(dst_units + qo.start, qo.block)
                    src = block_index(src_units + qo.start, qo.block)
                    n = sizes[r]
                    lo, hi = t.occ.start * t.occ.block, (t.occ.start + n) * t.occ.block
                    if spec.axes[t.occ.key][qo.axis] == q:  # direct axis: permute only the two slabs of m units
                        full = block_index(cur[q], qo.block)
                        rest = {k: v for k, v in cur.items() if k != q}
                        b = load(state_b, t.occ.key)
                        slabs = [permute_unchecked(spec, rest, {t.occ.key: b.index_select(qo.axis, full[i])}, r)[t.occ.key]
                                 for i in (src, dst)]
                        delta = slabs[0] - slabs[1]
                        del b, slabs
                    else:
                        b = b_prime(t, cur)
                        delta = b.index_select(qo.axis, src) - b.index_select(qo.axis, dst)
                        del b
                    a_sel = load(state_a, t.occ.key).index_select(qo.axis, dst)
                    sim = scratch.get(("cache", r), dev)
                    sim.addmm_(_stretch_rows(a_sel, t.occ.axis, lo, hi, n), _stretch_rows(delta, t.occ.axis, lo, hi, n).T)
                    scratch.put(("cache", r), sim)
                    del delta, a_sel, sim
                    counts["lowrank"] += 1
                else:
                    cached.discard(r)
            stale[r] = True
        perms[q] = new

    try:
        with torch.no_grad():
            # one pass over every key: finite values (as the in-memory path checks) and the initial objective
            start = current()
            initial = 0.0
            for key in spec.axes:
                if not meta[key].is_floating_point():
                    continue
                a, b = state_a[key], state_b[key]
                for t, which in ((a, "state_a"), (b, "state_b")):
                    if not isinstance(t, Tensor):
                        raise RebasinError(f"{which}[{key!r}] is a {type(t).__name__}, expected a Tensor")
                    if t.numel() and not bool(torch.isfinite(t).all()):
                        raise RebasinError(f"{which}[{key!r}] (shape {tuple(t.shape)}) contains NaN or inf values")
                if key in on_key:
                    moved = permute_unchecked(spec, start, {key: b.detach().to(device=dev, dtype=torch.float32)})[key]
                    initial += float((a.detach().to(device=dev, dtype=torch.float32) * moved).sum(dtype=torch.float64))
                    del moved
                del a, b

            generator = torch.Generator().manual_seed(int(seed))
            objective = initial
            history: list[float] = []
            n_solves = n_skipped = 0
            buffers: dict[int, np.ndarray] = {}
            converged = False
            for _ in range(n_iter):
                improved = False
                for idx in torch.randperm(len(active), generator=generator).tolist():
                    name = active[idx]
                    sim = similarity(name)
                    if sim is None:
                        n_skipped += 1
                        continue
                    n = sizes[name]
                    if n not in buffers:
                        buffers[n] = np.empty((n, n), dtype=np.float64)
                    cost = cost_from_similarity(sim, out=buffers[n])
                    del sim
                    new = solve_cost(cost, name=name)
                    n_solves += 1
                    old = perms[name]
                    changed = np.flatnonzero(new != old)
                    if changed.size == 0:
                        continue
                    gained = -cost[changed, new[changed]]
                    lost = -cost[changed, old[changed]]
                    gain = float(gained.sum() - lost.sum())
                    if gain > _GAIN_RTOL * float(np.abs(gained).sum() + np.abs(lost).sum()):
                        update(name, new, changed)
                        objective += gain
                        improved = True
                history.append(objective)
                if not improved:
                    converged = True
                    break
    finally:
        scratch.close()

    out = {name: torch.from_numpy(p.copy()) for name, p in perms.items()}
    info = {
        "objective": history,
        "initial_objective": initial,
        "n_sweeps": len(history),
        "converged": converged,
        "n_solves": n_solves,
        "n_skipped": n_skipped,
        "n_full_builds": counts["builds"],
        "n_lowrank_updates": counts["lowrank"],
    }
    return out, info
