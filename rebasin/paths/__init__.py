"""Paths between two networks and what is measured along them.

Layer 4: the straight line (``linear``), running a model on explicit states (``running``: evaluation,
BatchNorm statistics), REPAIR (``repairing``), evaluation along any path (``evaluation``), trainable curves
(``curves``), the arc (``arc``), the Weight Adjustment path (``weight_adjusted``), the learnable Flow and Bijection
connections (``flows``: the invertible neuron maps, ``connections``: fitting and paths), proximal alternating
minimisation (``pam``) and plots (``plot``).
"""

from __future__ import annotations

from .arc import ArcPath, arc_interpolate
from .connections import FlowConnection, FlowPath, fit_bijection_connection, fit_flow_connection
from .curves import CURVE_KINDS, BezierCurve, CurveFit, PolyChainCurve, fit_curve
from .evaluation import evaluate_path
from .flows import FLOW_KINDS, NeuronFlow
from .linear import BARRIER_KINDS, BARRIER_METRICS, LinearPath, PathResult, StatePath, barrier, combine, interpolate
from .pam import PAMResult, ProximalStep, proximal_alternating_minimization
from .plot import plot_paths
from .repairing import ChannelStats, RepairedPath, channel_stats, repair, repair_states, repaired_path
from .running import BNResetPath, reset_bn_stats, reset_bn_stats_
from .weight_adjusted import WA_PATHS, WeightAdjustedPath, weight_adjusted_path

__all__ = [
    "interpolate",
    "combine",
    "PathResult",
    "StatePath",
    "LinearPath",
    "BNResetPath",
    "barrier",
    "BARRIER_KINDS",
    "BARRIER_METRICS",
    "evaluate_path",
    "reset_bn_stats",
    "reset_bn_stats_",
    "repair",
    "repair_states",
    "repaired_path",
    "RepairedPath",
    "channel_stats",
    "ChannelStats",
    "BezierCurve",
    "PolyChainCurve",
    "CURVE_KINDS",
    "fit_curve",
    "CurveFit",
    "arc_interpolate",
    "ArcPath",
    "weight_adjusted_path",
    "WeightAdjustedPath",
    "WA_PATHS",
    "fit_flow_connection",
    "fit_bijection_connection",
    "FlowConnection",
    "FlowPath",
    "NeuronFlow",
    "FLOW_KINDS",
    "proximal_alternating_minimization",
    "ProximalStep",
    "PAMResult",
    "plot_paths",
]
