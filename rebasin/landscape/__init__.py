r"""Loss-landscape metrics: mode connectivity, CKA similarity, Hessian top eigenvalue and trace.

The four metrics Yang et al. use to place a trained network in their taxonomy of loss
landscapes: *global* structure from the mode connectivity ``mc`` between two solutions and the
CKA similarity of their representations; *local* structure from the top eigenvalue and the trace
of the Hessian of the training loss.

Everything is a pure function: models are run through :func:`torch.func.functional_call` in eval
mode and are unchanged afterwards (parameters, buffers, ``.grad`` fields and ``training`` flags).

References: Y. Yang, L. Hodgkinson, R. Theisen, J. Zou, J. E. Gonzalez, K. Ramchandran,
M. W. Mahoney, "Taxonomizing local versus global structure in neural network loss landscapes",
NeurIPS 2021. S. Kornblith, M. Norouzi, H. Lee, G. Hinton, "Similarity of Neural Network
Representations Revisited", ICML 2019. M. F. Hutchinson, "A stochastic estimator of the trace of
the influence matrix for Laplacian smoothing splines", 1989.
"""

from __future__ import annotations

from .connectivity import ModeConnectivity, mode_connectivity
from .hessian import HessianEigenvalue, HessianTrace, hessian_top_eigenvalue, hessian_trace
from .similarity import cka

__all__ = [
    "ModeConnectivity",
    "mode_connectivity",
    "cka",
    "HessianEigenvalue",
    "HessianTrace",
    "hessian_top_eigenvalue",
    "hessian_trace",
]
