"""Synaptic Intelligence whose snapshots are copies: Avalanche 0.6's plugin is a no-op on CPU.

Avalanche's :class:`~avalanche.training.plugins.SynapticIntelligencePlugin` snapshots the weights with
``param.detach().cpu().flatten()``. On a CPU model that is a *view* of the live parameter, not a copy: the
weights "before" a step move with the step, so every per-step change it integrates is zero, every importance
is zero and the penalty is zero — the strategy trains exactly what ``Naive`` trains (bitwise). On CUDA the
``.cpu()`` copies and the plugin works. :class:`SIPlugin` takes the same snapshots as copies, on every device.
"""

from __future__ import annotations

from typing import Any

from avalanche.training.plugins import SynapticIntelligencePlugin

__all__ = ["SIPlugin"]


class SIPlugin(SynapticIntelligencePlugin):
    """Avalanche's ``SynapticIntelligencePlugin`` (same arguments, same algorithm) with copied snapshots.

    The two snapshots that must outlive a training step are copied after Avalanche takes them: the
    weights at the start of an experience (the anchor of the penalty and of the importance's
    denominator) and the weights before each step (the start of the path integral).
    """

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().before_training_exp(strategy, **kwargs)
        for anchor in self.ewc_data[0].values():
            anchor.data = anchor.data.clone()

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        super().before_training_iteration(strategy, **kwargs)
        for before in self.syn_data["old_theta"].values():
            before.data = before.data.clone()
