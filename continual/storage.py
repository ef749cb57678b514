"""What a continual-learning strategy stores over the stream: samples and model-sized state.

Continual-learning methods are compared at equal storage: a method that keeps samples besides its replay
buffer (held out to choose a merge, or an episodic memory) is compared with Replay given those samples as
buffer. :func:`strategy_storage` reads, after a run, what every plugin of an Avalanche strategy holds:

* ``buffer_samples``: the replay buffer (a plugin's ``storage_policy``: ``Replay``, ``ReplayPlugin``,
  :class:`continual.RebasinIL`, :class:`continual.CLeWI`);
* ``held_out_samples``, ``memory_samples``: samples a plugin keeps besides a buffer, reported by the plugin's
  own ``storage()`` (:class:`continual.RebasinMergePlugin`, :class:`continual.MCSGDPlugin`);
* ``model_copies``: model-sized state kept besides the model, in units of the model's parameter count: a
  plugin's ``storage()`` when it has one, else the tensors held by Avalanche's regularisation plugins (EWC's
  saved parameters and importances, SI's, LwF's previous model), counted element by element.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["STORAGE_KEYS", "strategy_storage", "extra_samples", "total_samples"]

#: The fields of :func:`strategy_storage`'s answer, in table order.
STORAGE_KEYS = ("buffer_samples", "held_out_samples", "memory_samples", "model_copies")
_WALKED = ("avalanche.training.plugins.ewc", "avalanche.training.plugins.synaptic_intelligence",
           "avalanche.training.plugins.lwf", "avalanche.training.regularization", "avalanche.training.utils",
           "continual.si")


def _numel(obj: Any, depth: int = 0, seen: set[int] | None = None) -> int:
    """Elements of the tensors ``obj`` holds (dicts, sequences, modules, Avalanche's regularisation objects)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return 0
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        return obj.numel()
    if isinstance(obj, nn.Module):
        return sum(t.numel() for t in obj.state_dict().values())
    if isinstance(obj, dict):
        return sum(_numel(v, depth + 1, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_numel(v, depth + 1, seen) for v in obj)
    if type(obj).__module__.startswith(_WALKED) and hasattr(obj, "__dict__"):
        return sum(_numel(v, depth + 1, seen) for v in vars(obj).values())
    return 0


def strategy_storage(strategy: Any) -> dict[str, float]:
    """What ``strategy``'s plugins hold now (after the last experience: what they stored over the stream).

    Parameters
    ----------
    strategy
        An Avalanche strategy (anything with ``plugins`` and ``model``).

    Returns
    -------
    dict
        :data:`STORAGE_KEYS` to numbers: sample counts (ints) and ``model_copies`` (a float, model-sized
        states; see the module doc).
    """
    out: dict[str, float] = dict.fromkeys(STORAGE_KEYS, 0)
    n_params = max(1, sum(t.numel() for t in strategy.model.state_dict().values()))
    for plugin in getattr(strategy, "plugins", []):
        policy = getattr(plugin, "storage_policy", None)
        if policy is not None and hasattr(policy, "buffer"):
            out["buffer_samples"] += len(policy.buffer)
        own = getattr(plugin, "storage", None)
        if callable(own):
            for key, value in own().items():
                out[key] += value
        elif type(plugin).__module__.startswith(_WALKED):
            out["model_copies"] += _numel(vars(plugin)) / n_params
    out["model_copies"] = round(float(out["model_copies"]), 2)
    return out


def extra_samples(storage: dict[str, float]) -> int:
    """Samples stored besides the replay buffer (held out or in an episodic memory)."""
    return int(storage.get("held_out_samples", 0) + storage.get("memory_samples", 0))


def total_samples(storage: dict[str, float]) -> int:
    """Every sample stored: the buffer's and the others."""
    return int(storage.get("buffer_samples", 0)) + extra_samples(storage)
