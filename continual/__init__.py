"""Continual learning with re-basin: Avalanche 0.6 strategies and plugins (the ``continual`` extra).

``import continual`` is cheap: Avalanche (a slow import) is loaded on first use of a name that
needs it. ``import rebasin`` never imports this package nor Avalanche.

* :class:`RebasinMergePlugin` — after each experience, align the fresh model to the previous one and
  merge along the linear path (fixed or chosen weight), composable with Naive, Replay, EWC, LwF;
  :class:`AlphaPolicy` says how it chooses the merge weight (and what that stores).
* :class:`CLeWI` — Kozal et al. (2024)'s continual learning with weight interpolation (replay; after each task
  align, interpolate at 0.5 and REPAIR on the buffer), a baseline; :class:`CLeWIPlugin` holds it.
* :class:`RebasinILPlugin` — Peña et al. (2023)'s incremental learning by re-basin, added to any
  supervised strategy (the logic: :class:`IncrementalRebasin`); :class:`RebasinIL` — the same as a
  strategy (``SupervisedTemplate`` + ``ReplayPlugin`` + the plugin).
* :class:`MCSGD` — Mirzadeh et al. (2021)'s Mode Connectivity SGD, the baseline that merges tasks
  along linearly connected low-loss paths (:class:`MCSGDPlugin` holds it; the objective is in
  :mod:`continual.lines`).
* :class:`ExperienceLRDecay` — a learning rate decayed per experience (MC-SGD's schedule), for any strategy.
* :mod:`continual.benchmarks` — Rotated / Permuted / Split MNIST from a local root, and a tiny
  synthetic benchmark; :mod:`continual.baselines`; ``python -m continual.compare``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "RebasinMergePlugin",
    "MergeRecord",
    "AlphaPolicy",
    "CLeWI",
    "CLeWIPlugin",
    "RebasinILPlugin",
    "ILRecord",
    "RebasinIL",
    "MCSGD",
    "MCSGDPlugin",
    "MCSGDRecord",
    "SIPlugin",
    "IncrementalRebasin",
    "ILSettings",
    "make_strategy",
    "STRATEGIES",
    "rotated_mnist",
    "permuted_mnist",
    "split_mnist",
    "synthetic",
    "merge_states",
    "select_alpha",
    "select_layer_alphas",
    "layer_groups",
    "write_state_",
    "AlphaChoice",
    "LayerAlphaChoice",
    "ExperienceLRDecay",
]

_WHERE = {
    "RebasinMergePlugin": "plugin",
    "MergeRecord": "plugin",
    "AlphaPolicy": "policy",
    "CLeWI": "clewi",
    "CLeWIPlugin": "clewi",
    "RebasinILPlugin": "il_plugin",
    "ILRecord": "il_plugin",
    "RebasinIL": "strategy",
    "MCSGD": "mcsgd",
    "MCSGDPlugin": "mcsgd",
    "MCSGDRecord": "mcsgd",
    "SIPlugin": "si",
    "IncrementalRebasin": "incremental",
    "ILSettings": "incremental",
    "make_strategy": "baselines",
    "STRATEGIES": "baselines",
    "rotated_mnist": "benchmarks",
    "permuted_mnist": "benchmarks",
    "split_mnist": "benchmarks",
    "synthetic": "benchmarks",
    "merge_states": "merging",
    "select_alpha": "merging",
    "select_layer_alphas": "merging",
    "layer_groups": "merging",
    "write_state_": "merging",
    "AlphaChoice": "merging",
    "LayerAlphaChoice": "merging",
    "ExperienceLRDecay": "optim",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'continual' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
