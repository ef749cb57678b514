"""Reductions across ``torch.distributed`` ranks: the one private API every data-reading function uses.

Under ``torchrun`` with a ``DistributedSampler`` each rank sees a shard of the data. A function that
accumulates statistics over a loader must reduce them across ranks, or it silently returns per-shard
numbers. The rule, for every such function of the toolkit:

* ``sync=True`` (the default) and an initialised default process group: the function's sums and counts
  are added across the ranks of ``group`` (``None``: the default group) in float64, so the result equals
  the single-process result on the union of the shards; permutations are decided once and broadcast from
  the group's first rank, so every rank holds the same ones.
* ``sync=False``, or no process group: nothing is communicated (per-process results, as before).

:func:`reducer` turns ``(sync, group)`` into a :class:`Reducer` or None. Before its sums are reduced a
function calls :meth:`Reducer.agree` — one ``all_gather_object`` of a fingerprint of what is about to be
reduced (keys, shapes, dtypes), the local number of batches and the local error, if any. A rank whose
spec or model shapes differ, a rank with an empty shard, or a rank that failed, makes every rank raise
:class:`RebasinError` (instead of one rank raising and the others waiting in a collective forever).
:func:`guarded` runs a block of local work and then :meth:`Reducer.agree` s on its outcome.

Training loops (STE, Sinkhorn, curve fitting) iterate with :func:`lockstep` — every step first checks that
every rank has a batch — and step with :func:`synced_backward`, which averages the learned tensors'
gradients over the ranks (one collective carrying a failure flag), so each rank takes the step one process
would take on the union batch; the final permutations or tensors are broadcast from the group's first rank
(:meth:`Reducer.broadcast`, :meth:`Reducer.same_tensors`). Reductions run on the CPU for gloo and on the
current CUDA device for NCCL; every sum is float64.

A rank that never reaches the collective at all (it crashed outside the toolkit, or skipped the call) is
caught only by the process group's own timeout: ``init_process_group(timeout=...)``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._errors import RebasinError

__all__ = ["Outcome", "Reducer", "fingerprint", "guarded", "lockstep", "reducer", "synced_backward"]


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def reducer(sync: bool, group: Any = None) -> Reducer | None:
    """A :class:`Reducer` over ``group`` when ``sync`` and a default process group is initialised, else None.

    A ``group`` passed with ``sync=False`` is an error (the two contradict each other); a ``group`` passed
    without an initialised process group is an error too (there is nothing to reduce over).
    """
    if not isinstance(sync, bool):
        raise RebasinError(f"sync must be True or False, got {sync!r}")
    dist = _dist()
    ready = dist.is_available() and dist.is_initialized()
    if not sync:
        if group is not None:
            raise RebasinError("group= was given with sync=False: pass one or the other")
        return None
    if not ready:
        if group is not None:
            raise RebasinError("group= was given but torch.distributed has no initialised process group")
        return None
    return Reducer(group)


def fingerprint(*parts: Any) -> str:
    """A short digest of nested data (tensors by shape and dtype only): equal on ranks that agree."""

    def norm(x: Any) -> Any:
        if isinstance(x, Tensor):
            return ("tensor", tuple(x.shape), str(x.dtype))
        if isinstance(x, Mapping):
            return tuple((str(k), norm(v)) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return tuple(norm(v) for v in x)
        return repr(x)

    return hashlib.sha1(repr(norm(parts)).encode()).hexdigest()[:16]


class Reducer:
    """Collectives over one process group, for one function call.

    Attributes
    ----------
    group
        The process group (None: the default one).
    rank, world
        This process's rank within ``group`` and the group's size.
    """

    def __init__(self, group: Any = None) -> None:
        dist = _dist()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.src = 0 if group is None else dist.get_global_rank(group, 0)
        backend = dist.get_backend(group)
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )

    # -------------------------------------------------------------------------------- agreement
    def agree(self, what: str, *, key: str, count: int | None, error: BaseException | None = None) -> None:
        """Raise :class:`RebasinError` on every rank if any rank failed, differs in ``key``, or has no data.

        ``count`` is the number of batches this rank read (None: not a data-reading step). On the rank that
        failed, its own exception is re-raised (a :class:`RebasinError` keeps its message); the others get a
        :class:`RebasinError` naming that rank and its message.
        """
        gathered = self.gather((key, count, None if error is None else f"{type(error).__name__}: {error}"))
        failed = [(r, g[2]) for r, g in enumerate(gathered) if g[2] is not None]
        if failed:
            if error is not None:
                raise error
            r, msg = failed[0]
            first = msg.splitlines()[0] if msg else msg
            raise RebasinError(f"{what}: rank {r} of {self.world} failed, so every rank stops: {first}")
        empty = [r for r, g in enumerate(gathered) if g[1] is not None and g[1] == 0]
        if empty:
            raise RebasinError(
                f"{what}: rank(s) {empty} of {self.world} have an empty shard (their loader yielded no batches); "
                "give every rank data (DistributedSampler(drop_last=False) pads), or pass sync=False"
            )
        keys = [g[0] for g in gathered]
        if len(set(keys)) > 1:
            groups: dict[str, list[int]] = {}
            for r, k in enumerate(keys):
                groups.setdefault(k, []).append(r)
            raise RebasinError(
                f"{what}: the ranks of the process group disagree on the spec or the model/state shapes "
                f"(ranks grouped by fingerprint: {sorted(groups.values())}); every rank must pass the same "
                "architecture, states and options"
            )

    # -------------------------------------------------------------------------------- reductions
    def sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The element-wise sums over ranks of ``tensors``, as float64 tensors on each input's device.

        One collective for all of them (flattened into one float64 buffer). Integers up to 2**53 are exact.
        """
        dist = _dist()
        if not tensors:
            return []
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        out, i = [], 0
        for t in tensors:
            n = t.numel()
            out.append(flat[i : i + n].reshape(t.shape).to(t.device))
            i += n
        return out

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (a picklable object; CPU tensors for gloo)."""
        gathered: list[Any] = [None] * self.world
        _dist().all_gather_object(gathered, obj, group=self.group)
        return gathered

    def sum_numbers(self, *values: float) -> list[float]:
        """Python numbers summed over ranks (float64)."""
        (total,) = self.sum([torch.tensor(values, dtype=torch.float64)])
        return total.tolist()

    def broadcast(self, perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``perms`` as decided on the group's first rank, on every rank (same keys, dtypes and devices)."""
        dist = _dist()
        out = {}
        for name, p in perms.items():
            buf = p.detach().to(self.device, copy=True).contiguous()
            dist.broadcast(buf, src=self.src, group=self.group)
            out[name] = buf.to(p.device)
        return out

    def average_grads(self, tensors: Sequence[Tensor], value: float = 0.0, error: BaseException | None = None,
                      what: str = "") -> float:
        """Replace each tensor's ``.grad`` by its mean over ranks; return the mean of ``value`` over ranks.

        A missing grad counts as zero. One collective, which also carries a failure flag: if any rank passes
        an ``error`` (its step failed), every rank raises (its own error, or a :class:`RebasinError`).
        """
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
        flags = torch.tensor([float(value) if error is None else 0.0, 0.0 if error is None else 1.0],
                             dtype=torch.float64)
        *summed, total = self.sum([*grads, flags])
        if total[1] > 0:
            self.fail(what, error)
        for t, g in zip(tensors, summed, strict=True):
            t.grad = (g / self.world).to(dtype=t.dtype, device=t.device)
        return float(total[0]) / self.world

    def fail(self, what: str, error: BaseException | None) -> None:
        """Called by every rank once all know that some rank failed: raise there, and name it elsewhere."""
        gathered = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        r, msg = next((r, m) for r, m in enumerate(gathered) if m is not None)
        raise RebasinError(f"{what}: rank {r} of {self.world} failed, so every rank stops: {msg.splitlines()[0]}")

    def same_tensors(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` (in place, without autograd) with the group's first rank's values."""
        dist = _dist()
        with torch.no_grad():
            for t in tensors:
                buf = t.detach().to(self.device, copy=True).contiguous()
                dist.broadcast(buf, src=self.src, group=self.group)
                t.copy_(buf.to(t.device))


def lockstep(red: Reducer | None, batches: Iterable[Any], what: str) -> Iterator[Any]:
    """``batches`` while every rank has one (a plain iteration when ``red`` is None).

    Each step first sums "I have a batch" flags over the ranks (one tiny collective): when no rank has a
    batch the pass ends on all of them; when only some have one — shards of different lengths — or a rank's
    loader failed, every rank raises. A training loop whose steps all-reduce gradients needs this: a rank
    that stops early would leave the others waiting in the next all-reduce.
    """
    if red is None:
        yield from batches
        return
    it = iter(batches)
    step = 0
    while True:
        error: BaseException | None = None
        batch: Any = None
        try:
            batch, has = next(it), 1.0
        except StopIteration:
            has = 0.0
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks know
            error, has = err, 0.0
        n, failed = red.sum_numbers(has, 0.0 if error is None else 1.0)
        if failed:
            red.fail(f"{what} (step {step})", error)
        if n == 0:
            return
        if n < red.world:
            raise RebasinError(
                f"{what}: the ranks' shards have different numbers of batches (at step {step} only {int(n)} of "
                f"{red.world} ranks have one); gradients are averaged over the ranks at every step, so every rank "
                "needs as many batches (a DistributedSampler pads the shards to equal length), or pass sync=False"
            )
        yield batch
        step += 1


def synced_backward(red: Reducer | None, params: Sequence[Tensor], loss: Callable[[], Tensor], what: str) -> float:
    """``loss().backward()``; with ``red``, the gradients of ``params`` (and the loss) averaged over the ranks.

    Returns the loss value (its mean over the ranks). For shards of equal batch size the averaged gradient
    is the gradient of the loss of the union batch, so every rank takes the same step as one process would.
    A failure on one rank raises on every rank (no rank is left waiting).
    """
    if red is None:
        value = loss()
        value.backward()
        return float(value.detach())
    try:
        value = loss()
        value.backward()
    except Exception as err:  # raised on every rank by average_grads
        red.average_grads(params, error=err, what=what)
        raise
    return red.average_grads(params, float(value.detach()), what=what)


class Outcome:
    """What a :func:`guarded` block reports: set ``count`` (batches read) and ``key`` (a fingerprint)."""

    def __init__(self) -> None:
        self.count: int | None = None
        self.key: str = ""


@contextlib.contextmanager
def guarded(red: Reducer | None, what: str) -> Iterator[Outcome]:
    """Run local work, then agree across ranks on its outcome (a no-op wrapper when ``red`` is None).

    An exception inside the block is held back until every rank has reported, then raised on every rank
    (see :meth:`Reducer.agree`); so is a rank with ``count == 0`` or a ``key`` that differs.
    """
    out = Outcome()
    if red is None:
        yield out
        return
    try:
        yield out
    except Exception as err:  # re-raised on this rank by agree, reported on the others
        red.agree(what, key="", count=None, error=err)
        raise
    red.agree(what, key=out.key, count=out.count)
