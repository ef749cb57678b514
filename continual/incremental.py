r"""Peña et al.'s incremental learning by re-basin (CVPR 2023) as plain objects (no Avalanche import).

For every experience after the first, the network's own weights are frozen at
:math:`\theta_{\text{prev}}` and only two things are learned, on the new data plus replayed samples:

* one Sinkhorn logit matrix per permutation group, giving soft permutations :math:`P`;
* a residual :math:`\delta` on every parameter (zero at the start, with weight decay),

minimising the task loss of the network at the midpoint of the path between the previous model and
a permuted copy of itself:

.. math::

    \min_{P,\delta}\; \ell\Big(f\big(\tfrac12(\theta_{\text{prev}} + \pi_P(\theta_{\text{prev}})) + \delta\big)\Big).

Because :math:`\pi_P(\theta_{\text{prev}})` computes the same function as :math:`\theta_{\text{prev}}`,
the model "re-basins itself": it searches for the permutation of its own hidden units whose average
with the unpermuted weights also solves the new task. At the end of the experience the hard
permutation :math:`\hat P` (linear assignment on the logits) gives the new weights

.. math::

    \theta = (1 - \alpha)\,\theta_{\text{prev}} + \alpha\,\pi_{\hat P}(\theta_{\text{prev}}) + \delta .

``alpha`` follows the project's convention: it is the weight of B, here the permuted copy that was
trained towards the new task; ``1 - alpha`` goes to the previous, unpermuted model. The paper's
:math:`\alpha` (weight of the previous model) is our ``1 - alpha``, so the default ``alpha = 0.2`` is
the paper's 0.8.

:class:`IncrementalRebasin` holds one experience's logits, residual and their optimizer;
:class:`ILSettings` holds the hyperparameters shared by every experience. The Avalanche glue is
:class:`continual.RebasinILPlugin` (and the strategy :class:`continual.RebasinIL`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from rebasin import PermutationSpec, RebasinError
from rebasin.checks import check_positive
from rebasin.matching import sinkhorn
from rebasin.spec import matrix_to_perm

from .merging import check_alpha, midpoint_state, rebasin_il_state

__all__ = ["ILSettings", "IncrementalRebasin", "INITS"]

#: Initial logits: the identity (start at the previous model) or a random permutation.
INITS = ("identity", "random")


@dataclass(frozen=True)
class ILSettings:
    """Hyperparameters of Peña et al.'s incremental step, validated at construction.

    Attributes
    ----------
    alpha
        Weight of the permuted copy :math:`\\pi_{\\hat P}(\\theta_{\\text{prev}})` in the final merge
        (``1 - alpha`` goes to the previous, unpermuted model), in ``[0, 1]``.
    perm_lr
        Learning rate of the permutation logits (Adam, no weight decay).
    residual_lr, residual_weight_decay
        Learning rate and decoupled weight decay of the residual :math:`\\delta` (AdamW).
    tau, n_iter
        Sinkhorn temperature and iterations (:func:`rebasin.matching.sinkhorn`, implicit backward).
    init, init_scale
        Initial logits: ``init_scale`` times the identity (``"identity"``, start at the previous
        model) or times a random permutation matrix (``"random"``, drawn from the step's seed).

    Examples
    --------
    >>> ILSettings(alpha=0.2).perm_lr
    0.1
    """

    alpha: float = 0.2
    perm_lr: float = 0.1
    residual_lr: float = 1e-3
    residual_weight_decay: float = 1e-2
    tau: float = 1.0
    n_iter: int = 20
    init: str = "identity"
    init_scale: float = 1.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the validated values in place
        set_(self, "alpha", check_alpha(self.alpha))
        for name in ("perm_lr", "residual_lr", "tau"):
            set_(self, name, check_positive(getattr(self, name), name))
        wd = self.residual_weight_decay
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not (wd >= 0 and math.isfinite(wd)):
            raise RebasinError(f"residual_weight_decay must be a finite number >= 0, got {wd!r}")
        set_(self, "residual_weight_decay", float(wd))
        if isinstance(self.n_iter, bool) or not isinstance(self.n_iter, int) or self.n_iter < 1:
            raise RebasinError(f"n_iter must be an int >= 1, got {self.n_iter!r}")
        if self.init not in INITS:
            raise RebasinError(f"unknown init {self.init!r}; choose one of {INITS}")
        scale = self.init_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise RebasinError(f"init_scale must be a finite number, got {scale!r}")
        set_(self, "init_scale", float(scale))


class IncrementalRebasin:
    r"""One experience of Peña et al.'s method: logits and a residual around a frozen previous model.

    Holds the state that the training of one experience changes — the logit matrices
    ``logits[perm]`` (``(n, n)``), the residuals ``delta[key]`` (shaped like the parameters) and
    their own :class:`torch.optim.AdamW` — next to a detached copy of :math:`\theta_{\text{prev}}`.
    The caller drives the loop: :meth:`zero_grad`, :meth:`forward` (the model run on
    :meth:`training_state` through :func:`torch.func.functional_call`; the model itself is never
    modified), a backward pass of its loss, :meth:`step`; at the end, :meth:`merged_state`.

    Parameters
    ----------
    spec
        Permutation spec of the architecture; validated against ``state_prev``.
    state_prev
        The previous model's full state_dict (parameters and buffers); copied, not mutated.
    settings
        The hyperparameters (:class:`ILSettings`).
    trainable
        The state_dict keys that get a residual (the model's parameters); integer entries are
        skipped.
    seed
        Seeds the ``"random"`` initial logits (a private :class:`torch.Generator`; the global RNG
        is never used).
    device
        Where the logits, residuals and the copy of ``state_prev`` live; ``state_prev``'s device by
        default.

    Examples
    --------
    >>> import torch
    >>> from rebasin import spec_from_model
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> spec = spec_from_model(model, torch.zeros(1, 4))
    >>> names = [k for k, _ in model.named_parameters()]
    >>> step = IncrementalRebasin(spec, model.state_dict(), ILSettings(), trainable=names, seed=0)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> step.zero_grad()
    >>> torch.nn.functional.cross_entropy(step.forward(model, x), y).backward()
    >>> step.step()
    >>> sorted(step.merged_state()) == sorted(model.state_dict())
    True
    """

    def __init__(
        self,
        spec: PermutationSpec,
        state_prev: Mapping[str, Tensor],
        settings: ILSettings,
        *,
        trainable: Iterable[str],
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(settings, ILSettings):
            raise RebasinError(f"settings must be an ILSettings, got {type(settings).__name__}")
        sizes = spec.validate(state_prev)
        if spec.structure:
            raise RebasinError(
                f"the incremental-learning strategy learns one free n x n permutation matrix per permutation; the "
                f"spec structures {sorted(spec.structure)} (heads or groups moved as blocks), which it does not support"
            )
        trainable = list(trainable)
        unknown = [k for k in trainable if k not in state_prev]
        if unknown:
            raise RebasinError(f"trainable keys {unknown} are not in the previous model's state_dict")
        if device is None:
            device = next((v.device for v in state_prev.values()), torch.device("cpu"))
        device = torch.device(device)
        self.spec = spec
        self.settings = settings
        self.state_prev = {k: v.detach().to(device).clone() for k, v in state_prev.items()}
        g = torch.Generator().manual_seed(int(seed))
        self.logits: dict[str, Tensor] = {}
        for name in spec.perms:
            n = sizes[name]
            start = torch.randperm(n, generator=g) if settings.init == "random" else torch.arange(n)
            m = torch.zeros(n, n, device=device)
            m[torch.arange(n, device=device), start.to(device)] = settings.init_scale
            self.logits[name] = m.requires_grad_()
        self.delta: dict[str, Tensor] = {
            k: torch.zeros_like(self.state_prev[k]).requires_grad_()
            for k in trainable
            if self.state_prev[k].is_floating_point()
        }
        groups: list[dict[str, Any]] = [
            {"params": list(self.logits.values()), "lr": settings.perm_lr, "weight_decay": 0.0}
        ]
        if self.delta:
            groups.append(
                {"params": list(self.delta.values()), "lr": settings.residual_lr,
                 "weight_decay": settings.residual_weight_decay}
            )
        self.optimizer = torch.optim.AdamW(groups)

    def soft_matrices(self) -> dict[str, Tensor]:
        """``{perm: Sinkhorn(logits / tau)}``, doubly stochastic ``(n, n)``, differentiable in the logits."""
        s = self.settings
        return {k: sinkhorn(v, tau=s.tau, n_iter=s.n_iter, grad="implicit") for k, v in self.logits.items()}

    def training_state(self) -> dict[str, Tensor]:
        """``½(θ_prev + π_P(θ_prev)) + δ`` (:func:`continual.merging.midpoint_state`), differentiable."""
        return midpoint_state(self.spec, self.state_prev, self.soft_matrices(), self.delta)

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """``model`` run on :meth:`training_state` (``functional_call``, strict; the model is unchanged)."""
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return functional_call(model, self.training_state(), args, strict=True)

    def zero_grad(self) -> None:
        """Clear the gradients of the logits and the residuals."""
        self.optimizer.zero_grad()

    def step(self) -> None:
        """One AdamW step of the logits and the residuals on their current gradients."""
        self.optimizer.step()

    def hard_perms(self) -> dict[str, Tensor]:
        """The hard permutations :math:`\\hat P`: linear assignment on each logit matrix (CPU LongTensors)."""
        return {k: matrix_to_perm(v.detach()).cpu() for k, v in self.logits.items()}

    def delta_norm(self) -> float:
        """L2 norm of the residual over all parameters (0.0 without residuals)."""
        if not self.delta:
            return 0.0
        return float(torch.sqrt(sum((d.detach().double() ** 2).sum() for d in self.delta.values())))  # type: ignore[arg-type]  # sum() over tensors is typed with its start value 0

    @torch.no_grad()
    def merged_state(self, perms: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        r"""``(1 − α) θ_prev + α π_P̂(θ_prev) + δ`` (:func:`continual.merging.rebasin_il_state`), detached.

        ``perms`` defaults to :meth:`hard_perms`.
        """
        perms = self.hard_perms() if perms is None else perms
        delta = {k: v.detach() for k, v in self.delta.items()}
        return rebasin_il_state(self.spec, self.state_prev, perms, self.settings.alpha, delta)
