"""Specs derived from ordinary models: torch.fx tracing and the propagation of permutations.

Layer 2: ``spec_from_model`` traces a model and propagates "which permutation lives on this activation's
feature axis" through the graph (``engine``), using only layers 0-1.
"""

from __future__ import annotations

from .tracing import ModelTrace, spec_from_model, trace_model

__all__ = ["spec_from_model", "trace_model", "ModelTrace"]
