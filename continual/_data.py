"""Small helpers to pull tensors out of Avalanche datasets (any map-style dataset of ``(x, y, ...)``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from rebasin import PermutationSpec, RebasinError, spec_from_model

__all__ = ["sample_tensors", "tensors_at", "subset", "concat_tensors", "first_input", "tensor_batches", "trace_spec", "spec_at_experience",
           "find_replay_buffer"]


def _eval_view(dataset: Any) -> Any:
    """The dataset with its evaluation transforms (Avalanche datasets), else the dataset itself."""
    view = getattr(dataset, "eval", None)
    return view() if callable(view) else dataset


def sample_tensors(
    dataset: Any, max_samples: int | None, *, seed: int, batch_size: int = 1000
) -> tuple[Tensor, Tensor]:
    """Up to ``max_samples`` items of ``dataset`` drawn without replacement (seeded), as ``(x, y)`` on the CPU.

    Items are read through the dataset's evaluation transforms when it has them. ``max_samples=None``
    takes every item in order. The global torch RNG is not touched: the subset comes from a seeded
    generator, and so does the base seed a :class:`~torch.utils.data.DataLoader` draws when it is
    iterated (without ``generator=`` it would draw it from the global RNG and shift the caller's
    training).
    """
    n = len(dataset)
    if n == 0:
        raise RebasinError("cannot sample from an empty dataset")
    if max_samples is None or max_samples >= n:
        index = list(range(n))
    else:
        g = torch.Generator().manual_seed(int(seed))
        index = torch.randperm(n, generator=g)[: int(max_samples)].sort().values.tolist()
    return tensors_at(dataset, index, seed=seed, batch_size=batch_size)


def subset(dataset: Any, index: list[int]) -> Any:
    """The items ``index`` of ``dataset``: its own ``subset`` (Avalanche datasets keep their type), else a ``Subset``."""
    return dataset.subset(index) if hasattr(dataset, "subset") else torch.utils.data.Subset(dataset, index)


def tensors_at(dataset: Any, index: list[int], *, seed: int, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """The items ``index`` of ``dataset``, in that order, as ``(x, y)`` on the CPU (evaluation transforms; see
    :func:`sample_tensors`, which draws the index)."""
    subset_ = subset(_eval_view(dataset), index)
    collate = getattr(subset_, "collate_fn", None)
    loader = DataLoader(
        subset_, batch_size=batch_size, shuffle=False, collate_fn=collate,
        generator=torch.Generator().manual_seed(int(seed)),
    )
    xs, ys = [], []
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise RebasinError(
                f"dataset items must be (inputs, targets, ...); got a batch of type {type(batch).__name__}"
            )
        xs.append(batch[0].cpu())
        ys.append(batch[1].cpu())
    return torch.cat(xs), torch.cat(ys)


def concat_tensors(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor] | None:
    """Concatenate ``(x, y)`` pairs; None for an empty list."""
    if not parts:
        return None
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def tensor_batches(x: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """``(x, y)`` cut into consecutive batches, in order, as a list.

    For evaluation passes over in-memory samples: a list draws no random number when iterated
    (a ``DataLoader`` without ``generator=`` draws its base seed from the global RNG).
    """
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def first_input(dataset: Any, n: int = 2) -> Tensor:
    """The inputs of ``n`` items of ``dataset`` (for tracing a model): a seeded sample, in index order, when it
    has more than ``n`` items (not necessarily the first ``n``), else every item."""
    x, _ = sample_tensors(dataset, None if len(dataset) <= n else n, seed=0, batch_size=n)
    return x[:n]


def spec_at_experience(strategy: Any, example_input: Any) -> PermutationSpec:
    """The spec of ``strategy.model``, traced on ``example_input`` (or the experience's first inputs) on its device."""
    example = first_input(strategy.experience.dataset) if example_input is None else example_input
    example = example.to(strategy.device) if isinstance(example, Tensor) else example
    return trace_spec(strategy.model, example)


def trace_spec(model: nn.Module, example_input: Any) -> PermutationSpec:
    """Trace the spec; any failure becomes a RebasinError naming the model."""
    try:
        return spec_from_model(model, example_input)
    except RebasinError as err:
        raise RebasinError(
            f"cannot build a permutation spec for {type(model).__name__}: {err} "
            "Pass spec= (a hand-written rebasin.PermutationSpec) instead."
        ) from err
    except Exception as err:  # noqa: BLE001 - tracing arbitrary user code
        raise RebasinError(
            f"cannot trace {type(model).__name__} to build a permutation spec ({type(err).__name__}: {err}). "
            "Pass spec= (a hand-written rebasin.PermutationSpec) instead."
        ) from err


def find_replay_buffer(strategy: Any) -> tuple[Any, Any]:
    """``(plugin, storage policy)`` of the strategy's first plugin with a replay buffer (ReplayPlugin and kin),
    ``(None, None)`` without one."""
    for plugin in getattr(strategy, "plugins", []):
        policy = getattr(plugin, "storage_policy", None)
        if policy is not None and hasattr(policy, "buffer"):
            return plugin, policy
    return None, None
