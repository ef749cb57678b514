"""Weight matching over checkpoints on disk, holding about one tensor of each model at a time.

The engine behind :func:`rebasin.weight_matching` when either model is a
:class:`rebasin.spec.checkpoint.Checkpoint` (from :func:`rebasin.open_checkpoint`). It runs the same
coordinate descent as the in-memory engine (:mod:`rebasin.matching.weight`): the same visiting order drawn
from ``seed``, the same acceptance rule, and a permutation whose similarity cannot have changed since its
last solve is not solved again, so it returns the same permutations (up to float32 summation order in the
similarities). What differs is where the similarity comes from: instead of keeping both models laid out in
memory with cached similarities, each visit of a permutation ``P`` rebuilds its ``n x n`` similarity from the
tensors it touches (``spec.occurrences``: direct axes, concatenation parts, block axes), reading one tensor of
A and the same tensor of B at a time. B's tensor gets every current permutation
(:func:`rebasin.permute_unchecked` on a one-key dict, so concatenations, blocks and ``P W P^T`` follow the
spec's own rules); the stretch of ``P`` is then un-permuted by indexing the columns of the product with
``P``'s inverse:

.. math::

    S_P = \\mathrm{rows}(A_k)\\, \\mathrm{rows}(\\pi(B_k))^\\top [:, P^{-1}]

Memory: two tensors (and a float32 copy of each), one ``n x n`` similarity and its float64 cost matrix.
Time: every visit reads and multiplies its tensors again (no cache, no low-rank updates), so a sweep costs
about what the in-memory engine's first sweep costs. Structured permutations (heads, groups) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._common import check_int
from .._errors import RebasinError
from ..spec.checkpoint import meta_state
from ..spec.core import PermutationSpec, check_permutations, permute_unchecked
from .assignment import cost_from_similarity, solve_cost

__all__ = ["weight_matching_lazy"]

# Same acceptance threshold as the in-memory engine (rebasin.matching.weight._GAIN_RTOL): keep them equal.
_GAIN_RTOL = 1e-6


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
        :class:`rebasin.WeightMatchingInfo` (``n_full_builds`` counts similarity builds; there are no
        low-rank updates).

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

    # which permutations' similarities change when a permutation changes (it is on another axis of a tensor)
    on_key: dict[str, list[tuple[str, int]]] = {}
    for p, occs in spec.occurrences.items():
        for o in occs:
            if floating(o.key):
                on_key.setdefault(o.key, []).append((p, o.axis))
    by_nbr: dict[str, set[str]] = {p: set() for p in spec.perms}
    for pairs in on_key.values():
        for q, qa in pairs:
            by_nbr[q].update(r for r, ra in pairs if ra != qa)
    active = [p for p in spec.perms if sizes[p] > 1 and any(floating(o.key) for o in spec.occurrences[p])]

    def current() -> dict[str, Tensor]:
        return {q: torch.from_numpy(v).to(dev) for q, v in perms.items()}

    def load(state: Mapping[str, Tensor], key: str, which: str) -> Tensor:
        t = state[key]
        if not isinstance(t, Tensor):
            raise RebasinError(f"{which}[{key!r}] is a {type(t).__name__}, expected a Tensor")
        return t.detach().to(device=dev, dtype=torch.float32)

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

        def similarity(p: str) -> Tensor:
            n = sizes[p]
            cur = current()
            total = torch.zeros(n, n, dtype=torch.float32, device=dev)
            for o in spec.occurrences[p]:
                if not floating(o.key):
                    continue
                lo, hi = o.start * o.block, (o.start + n) * o.block
                f = permute_unchecked(spec, cur, {o.key: load(state_b, o.key, "state_b")})[o.key]
                f_rows = _stretch_rows(f, o.axis, lo, hi, n)
                del f
                a_rows = _stretch_rows(load(state_a, o.key, "state_a"), o.axis, lo, hi, n)
                total.addmm_(a_rows, f_rows.T)
                del a_rows, f_rows
            inv = torch.argsort(cur[p])
            return total.index_select(1, inv)  # undo p on its own stretch: column j is B's unit j

        generator = torch.Generator().manual_seed(int(seed))
        stale = {p: True for p in spec.perms}
        objective = initial
        history: list[float] = []
        n_solves = n_skipped = n_builds = 0
        buffers: dict[int, np.ndarray] = {}
        converged = False
        for _ in range(n_iter):
            improved = False
            for idx in torch.randperm(len(active), generator=generator).tolist():
                name = active[idx]
                if not stale[name]:
                    n_skipped += 1
                    continue
                stale[name] = False
                sim = similarity(name)
                n_builds += 1
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
                    perms[name] = new
                    for r in by_nbr[name]:
                        stale[r] = True
                    objective += gain
                    improved = True
            history.append(objective)
            if not improved:
                converged = True
                break

    out = {name: torch.from_numpy(p.copy()) for name, p in perms.items()}
    info = {
        "objective": history,
        "initial_objective": initial,
        "n_sweeps": len(history),
        "converged": converged,
        "n_solves": n_solves,
        "n_skipped": n_skipped,
        "n_full_builds": n_builds,
        "n_lowrank_updates": 0,
    }
    return out, info
