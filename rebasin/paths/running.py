"""Running a model on explicit states over a loader: evaluation and BatchNorm statistics.

The user's model is only run through :func:`torch.func.functional_call` and is unchanged afterwards
(parameters, buffers and every submodule's ``training`` flag).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._common import (
    State,
    check_int,
    check_state_for_model,
    cross_entropy_of,
    evaluating,
    find_logits,
    forward_with_state,
    only_training,
    resolve_device,
    split_batch,
    state_of,
    to_device,
)
from .._distributed import fingerprint, guarded, reducer
from .._errors import RebasinError

# evaluating (every submodule in eval mode for a block, each flag restored) is defined with the other
# train/eval-mode helpers in rebasin._common (the tracer uses it too) and made public here
__all__ = ["evaluate_state", "reset_bn_stats", "reset_bn_stats_", "BNResetPath", "LossFn", "evaluating"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def evaluate_state(
    model: nn.Module,
    state: State,
    loader: Iterable[Any],
    *,
    loss_fn: LossFn | None,
    device: torch.device,
    name: str = "state",
    sync: bool = True,
    group: Any = None,
) -> tuple[float, float | None, int]:
    """Mean loss, accuracy (None unless every batch looks like classification) and example count.

    ``loss_fn(output, target)`` returns the batch *mean*; it is weighted by the batch size. It receives the
    model's output as it is; the default (cross-entropy) and the accuracy read the logits in it (a tensor,
    a ``ModelOutput``/dict's ``"logits"``, a tuple's first element: :func:`rebasin._common.logits_of`).
    This is the single evaluation routine behind :func:`evaluate_path` and ``rebasin.apps.training.evaluate``.
    Under ``torch.distributed`` (``sync=True`` and an initialised process group) the loss sum, the correct
    count and the example counts are summed over the ranks of ``group``: every rank gets the numbers of the
    union of the shards.
    """
    red = reducer(sync, group)
    with guarded(red, f"evaluating {name}") as outcome:
        loss_sum, correct, n_examples, n_targets, classification, n_batches = _evaluate_local(
            model, state, loader, loss_fn=loss_fn, device=device, name=name, allow_empty=red is not None
        )
        outcome.count, outcome.key = n_batches, fingerprint(state)
    if red is not None:
        loss_sum, correct, n_examples, n_targets, not_classification = red.sum_numbers(  # type: ignore[assignment]  # Reducer.sum_numbers returns floats; these are whole counts
            loss_sum, correct, n_examples, n_targets, float(not classification)
        )
        classification = not_classification == 0
        n_examples, n_targets = int(n_examples), int(n_targets)
    accuracy = float(correct) / n_targets if classification and n_targets else None
    return float(loss_sum) / n_examples, accuracy, n_examples


def _evaluate_local(
    model: nn.Module,
    state: State,
    loader: Iterable[Any],
    *,
    loss_fn: LossFn | None,
    device: torch.device,
    name: str,
    allow_empty: bool,
) -> tuple[float, float, int, int, bool, int]:
    """This process's ``(loss sum, correct, examples, targets, classification, batches)``."""
    check_state_for_model(model, state, name=name)
    state = {k: v.to(device) for k, v in state.items()}
    loss_fn = cross_entropy_of if loss_fn is None else loss_fn
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n_examples = n_targets = n_batches = 0
    classification = True
    with torch.no_grad():
        for batch in loader:
            n_batches += 1
            x, y = split_batch(batch)
            if y is None:
                raise RebasinError("evaluation needs (inputs, targets) batches; the loader yielded inputs only")
            x, y = to_device(x, device), to_device(y, device)
            out = forward_with_state(model, state, x, eval_mode=True)
            n = int(y.shape[0])
            loss_sum += loss_fn(out, y).detach().to(torch.float64) * n
            n_examples += n
            logits = find_logits(out)  # a ModelOutput's or a dict's "logits", a tuple's first element
            classification = classification and (
                logits is not None
                and not y.is_floating_point()
                and y.dtype != torch.bool
                and logits.ndim == y.ndim + 1
                and logits.shape[0] == y.shape[0]
                and tuple(logits.shape[2:]) == tuple(y.shape[1:])  # classes on axis 1, as cross_entropy reads them
            )
            if classification:
                correct += (logits.argmax(dim=1) == y).sum()  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
                n_targets += y.numel()
    if n_examples == 0 and not allow_empty:
        raise RebasinError("the evaluation loader yielded no batches")
    return float(loss_sum), float(correct), n_examples, n_targets, classification, n_batches


def reset_bn_stats(
    model: nn.Module,
    state: State,
    loader: Iterable[Any],
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    sync: bool = True,
    group: Any = None,
) -> dict[str, Tensor]:
    r"""Recompute every BatchNorm's running statistics for ``state`` over a loader.

    The result equals what PyTorch's cumulative average (``momentum=None``) stores after
    ``reset_running_stats()`` and one training-mode forward pass per batch: ``running_mean``
    and ``running_var`` are the averages over batches of each batch's mean and unbiased
    variance of the BatchNorm input, and ``num_batches_tracked`` is the number of batches.
    Averages are accumulated in float64. Only the BatchNorm layers run in training mode
    (dropout and the like stay in eval mode, so the statistics are deterministic).

    Parameters
    ----------
    model
        The architecture; its parameters, buffers, ``momentum`` and ``training`` flags are
        unchanged afterwards.
    state
        Full state_dict for ``model`` (parameters and buffers). Not mutated.
    loader
        Yields ``(inputs, targets)`` or bare inputs; targets are ignored.
    max_batches
        Use at most this many batches (all when None).
    device
        Where to run; defaults to the model's device.
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default) the
        per-batch sums and batch counts are added over the ranks of ``group`` (None: the default group),
        so every rank gets the statistics of all the ranks' batches together — what one process reading
        every shard would compute. ``max_batches`` then counts per rank. ``sync=False``: this process's
        batches only. See docs/distributed.md.

    Returns
    -------
    dict
        A new state_dict: BatchNorm buffers are new tensors (same dtype and device as in
        ``state``), every other entry is ``state``'s tensor itself. A model without
        BatchNorm layers (tracking running statistics) gets ``dict(state)`` back.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> x = torch.randn(32, 3)
    >>> new = reset_bn_stats(model, model.state_dict(), [x[:16], x[16:]])
    >>> int(new["1.num_batches_tracked"])
    2
    """
    red = reducer(sync, group)
    check_state_for_model(model, state)
    bns = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}
    out = dict(state)
    if not bns:
        # Nothing to compute here, but a rank whose model has BatchNorm would now wait in this call's
        # collectives: compare the fingerprint first, so a BN-vs-no-BN mismatch raises on every rank.
        with guarded(red, "reset_bn_stats") as outcome:
            outcome.key = fingerprint(state, list(bns))
        return out
    if max_batches is not None:
        check_int(max_batches, "max_batches")
    device = resolve_device(model, device=device)
    prefix = {name: f"{name}." if name else "" for name in bns}
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    # BatchNorm updates its buffers in place during the forward pass: give it scratch copies.
    work = {k: v.to(device) for k, v in state.items()}
    for name in bns:
        for buf in buffers:
            key = prefix[name] + buf
            if key in work:
                work[key] = state[key].to(device, copy=True)

    sums: dict[str, list[Tensor]] = {}
    calls = dict.fromkeys(bns, 0)

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().to(torch.float64)
            dims = [0, *range(2, x.ndim)]
            mean, var = x.mean(dim=dims), x.var(dim=dims, correction=1)
            if name in sums:
                sums[name][0] += mean
                sums[name][1] += var
            else:
                sums[name] = [mean, var]
            calls[name] += 1

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in bns.items()]
    n_batches = 0
    with guarded(red, "reset_bn_stats") as outcome:
        try:
            with torch.no_grad(), only_training(model, bns.values()):
                for batch in loader:
                    if max_batches is not None and n_batches >= max_batches:
                        break
                    x, _ = split_batch(batch)
                    forward_with_state(model, work, to_device(x, device))
                    n_batches += 1
        finally:
            for h in handles:
                h.remove()
        if n_batches == 0 and red is None:
            raise RebasinError("reset_bn_stats: the loader yielded no batches")
        outcome.count, outcome.key = n_batches, fingerprint(state, list(bns))
    if red is not None:  # add the sums and counts of every rank (a layer no rank reached stays at the reset values)
        zeros = {name: torch.zeros_like(state[prefix[name] + "running_mean"], dtype=torch.float64) for name in bns}
        flat = [t for name in bns for t in sums.get(name, [zeros[name], zeros[name]])]
        total = red.sum(flat + [torch.tensor([float(calls[name]) for name in bns], dtype=torch.float64)])
        for i, name in enumerate(bns):
            calls[name] = int(total[-1][i])
            if calls[name]:
                sums[name] = [total[2 * i].to(device), total[2 * i + 1].to(device)]

    for name in bns:
        k = calls[name]
        mean_key, var_key, count_key = (prefix[name] + b for b in buffers)
        old_mean, old_var = state[mean_key], state[var_key]
        if k:
            mean, var = sums[name][0] / k, sums[name][1] / k
        else:  # never reached by the forward pass: the reset values
            mean, var = torch.zeros_like(old_mean), torch.ones_like(old_var)
        out[mean_key] = mean.to(dtype=old_mean.dtype, device=old_mean.device)
        out[var_key] = var.to(dtype=old_var.dtype, device=old_var.device)
        if count_key in state:
            out[count_key] = torch.full_like(state[count_key], k)
    return out


def reset_bn_stats_(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    sync: bool = True,
    group: Any = None,
) -> nn.Module:
    """Recompute ``model``'s BatchNorm running statistics over ``loader``, in place.

    The statistics are PyTorch's exact cumulative average (as with ``momentum=None``): the mean
    over batches of each batch's mean and unbiased variance of every BatchNorm input, computed in
    float64 with only the BatchNorm layers in training mode (dropout stays off), see
    :func:`rebasin.reset_bn_stats`. With one batch holding all the data (or equal batch
    means, for the mean) these are the exact full-data statistics. ``momentum`` and the
    ``training`` flags are left as they were.

    Parameters
    ----------
    model
        Mutated: only its BatchNorm ``running_mean``, ``running_var`` and
        ``num_batches_tracked`` buffers change (in place, keeping their dtype and device).
    loader
        Yields ``(inputs, targets)`` or bare inputs; targets are ignored.
    max_batches
        Use at most this many batches (all when None).
    device
        Where to run the forward passes; defaults to the model's device.
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default) the
        statistics are summed over the ranks of ``group`` (None: the default group): every rank gets the
        result on the union of the shards. ``sync=False``: this process's data only.

    Returns
    -------
    nn.Module
        ``model`` itself.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> x = torch.randn(64, 3)
    >>> _ = reset_bn_stats_(model, [x])
    >>> torch.allclose(model[1].running_mean, model[0](x).mean(0).detach(), atol=1e-6)
    True
    """
    if loader is None:
        raise RebasinError("reset_bn_stats_ needs data: pass a loader of (inputs, targets) batches")
    new = reset_bn_stats(model, state_of(model), loader, max_batches=max_batches, device=device, sync=sync,
                         group=group)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, value in new.items():
            if key in buffers and value.data_ptr() != buffers[key].data_ptr():
                buffers[key].copy_(value)
    return model


class BNResetPath:
    """Any path with every BatchNorm's running statistics recomputed at each ``t`` (:func:`reset_bn_stats`).

    Wrap the line, a curve or any path object before :func:`rebasin.evaluate_path`: the points of an
    interpolated network with BatchNorm are only meaningful with statistics of their own.

    Parameters
    ----------
    path
        A callable ``t -> state_dict`` or an object with ``state_dict_at(t)`` (e.g.
        :class:`rebasin.LinearPath`, a curve).
    model
        The architecture. Unchanged.
    loader
        The statistics data: ``(inputs, targets)`` or bare inputs; targets are ignored.
    max_batches, device, sync, group
        As for :func:`reset_bn_stats`.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from rebasin import LinearPath
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> path = BNResetPath(LinearPath(model.state_dict(), model.state_dict()), model, [torch.randn(16, 3)])
    >>> int(path.state_dict_at(0.5)["1.num_batches_tracked"])
    1
    """

    def __init__(
        self,
        path: Any,
        model: nn.Module,
        loader: Iterable[Any],
        *,
        max_batches: int | None = None,
        device: torch.device | str | None = None,
        sync: bool = True,
        group: Any = None,
    ) -> None:
        at = getattr(path, "state_dict_at", path)
        if not callable(at):
            raise RebasinError(
                f"path must be a callable t -> state_dict or have a state_dict_at(t) method; got {type(path).__name__}"
            )
        if loader is None:
            raise RebasinError("BNResetPath needs data: pass a loader of (inputs, targets) batches")
        if max_batches is not None:
            check_int(max_batches, "max_batches")
        self.path, self.model, self.loader = path, model, loader
        self.max_batches, self.device, self.sync, self.group = max_batches, device, sync, group
        self._at = at
        self.__name__ = getattr(path, "__name__", type(path).__name__)

    def state_dict_at(self, t: float) -> dict[str, Tensor]:
        """The path's state at ``t`` with recomputed BatchNorm statistics."""
        return reset_bn_stats(self.model, self._at(t), self.loader, max_batches=self.max_batches, device=self.device,
                              sync=self.sync, group=self.group)

    __call__ = state_dict_at
