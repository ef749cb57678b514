"""Mode connectivity ``mc`` on a trained curve (Yang et al., NeurIPS 2021)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._common import as_state, check_int, resolve_device
from .._deprecation import renamed_keywords
from .._errors import RebasinError
from ..paths.curves import CURVE_KINDS, CurveFit, fit_curve
from ..paths.evaluation import evaluate_path
from ..paths.linear import LinearPath, PathLike, PathResult, StatePath
from ..paths.running import BNResetPath, LossFn

__all__ = ["ModeConnectivity", "mode_connectivity"]

State = Mapping[str, Tensor]
_MC_METRICS = ("error", "loss")
#: ``curve=`` kinds: the two trainable curves and the straight line.
_MC_CURVES = (*CURVE_KINDS, "linear")


# ----------------------------------------------------------------------------------------------
# mode connectivity


@dataclass(frozen=True)
class ModeConnectivity:
    r"""Result of :func:`mode_connectivity`.

    Attributes
    ----------
    mc
        :math:`\tfrac12(E(\theta_A) + E(\theta_B)) - E(\gamma(t^*))`: negative for a barrier,
        positive when the curve is better than its ends, 0 for identical endpoints.
    t_star
        The grid point :math:`t^*` where :math:`|E(\gamma(t)) - \text{endpoint\_mean}|` is largest
        (the first one on ties).
    ts, values
        The evaluated grid and :math:`E(\gamma(t))` at each point.
    endpoint_mean
        :math:`\tfrac12(E(\theta_A) + E(\theta_B))`.
    metric
        ``"error"`` (1 - accuracy) or ``"loss"``.
    curve
        The evaluated path object: the curve trained for ``curve="bezier"`` / ``"polychain"``,
        the object passed as ``path=``, or None for the straight line.
    fit
        What :func:`rebasin.fit_curve` did, or None when nothing was trained.
    result
        The full :class:`rebasin.PathResult` (loss and accuracy along the path).
    """

    mc: float
    t_star: float
    ts: tuple[float, ...]
    values: tuple[float, ...]
    endpoint_mean: float
    metric: str
    curve: Any = None
    fit: CurveFit | None = None
    result: PathResult | None = None


def _check_starts_at(path: PathLike, state: State, t: float, name: str) -> None:
    got = path.state_dict_at(t) if isinstance(path, StatePath) else path(t)
    if set(got) != set(state) or any(
        not torch.equal(got[k].detach().cpu(), state[k].detach().cpu()) for k in state
    ):
        raise RebasinError(f"the path's state at t={t:g} is not {name}; pass state_a=state_b=None with path=")


@renamed_keywords(n_points="num_points")
def mode_connectivity(
    model: nn.Module,
    state_a: State | nn.Module | None,
    state_b: State | nn.Module | None,
    loader: Iterable[Any],
    *,
    curve: str | None = None,
    path: PathLike | None = None,
    fit_loader: Iterable[Any] | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    num_bends: int = 3,
    num_points: int = 25,
    metric: str = "error",
    loss_fn: LossFn | None = None,
    bn_loader: Iterable[Any] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    sync: bool = True,
    group: Any = None,
) -> ModeConnectivity:
    r"""Mode connectivity ``mc`` of Yang et al. (2021) between two networks.

    .. math::

        mc = \tfrac12\big(E(\theta_A) + E(\theta_B)\big) - E(\gamma(t^*)),\qquad
        t^* = \arg\max_t \Big|E(\gamma(t)) - \tfrac12\big(E(\theta_A) + E(\theta_B)\big)\Big|

    over the evaluated grid (endpoints included), where :math:`\gamma` is a curve from
    :math:`\theta_A` to :math:`\theta_B`. ``mc < 0``: a barrier (poorly connected modes);
    ``mc > 0``: the curve is better than its ends; ``mc = 0`` exactly for identical endpoints.
    With very unequal endpoints and a flat path :math:`t^*` can be an endpoint, and then
    :math:`|mc| = \tfrac12|E(\theta_A) - E(\theta_B)|`.

    Parameters
    ----------
    model
        The architecture. Unchanged afterwards.
    state_a, state_b
        Endpoint state_dicts (or modules). None for both with ``path=``; when given with it, the
        path must start at ``state_a`` and end at ``state_b``.
    loader
        Yields ``(inputs, targets)``; :math:`E` is measured on it (the test set in the paper).
    curve
        The kind of curve to train and measure (default ``"bezier"``): ``"bezier"`` or
        ``"polychain"``, a :class:`rebasin.BezierCurve` / ``PolyChainCurve`` with ``num_bends``
        control points trained by :func:`rebasin.fit_curve` on ``fit_loader`` (default
        ``loader``) for ``epochs`` epochs of Adam at ``lr``, seeded by ``seed``; ``"linear"``:
        the straight line, no training. Not with ``path=``.
    path
        A path that is already there, used as is: any object with ``state_dict_at(t)`` (a
        trained curve, a :class:`rebasin.paths.ArcPath`, a :class:`rebasin.paths.PAMResult`'s ``curve``,
        ...) or a callable ``t -> state_dict``.
    num_points
        Size of the even grid over ``[0, 1]`` (both endpoints included), at least 2.
        ``n_points=`` is a deprecated alias.
    metric
        ``"error"``: :math:`E = 1 - \text{accuracy}` in ``[0, 1]`` (classification only);
        ``"loss"``: the mean of ``loss_fn`` (default cross-entropy).
    bn_loader
        Recompute BatchNorm statistics at every ``t`` on it (needed for BN nets off the
        endpoints); see :func:`rebasin.evaluate_path`.
    device, progress
        Where to run (default: the model's device); tqdm bars (None (default): only when stderr is a terminal (or in Jupyter), so a piped or logged run stays clean).
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default) the curve
        fit and the evaluation along the path reduce over the ranks of ``group`` (None: the default group);
        see :func:`rebasin.fit_curve` and :func:`rebasin.evaluate_path`. ``sync=False``: this process only.

    Returns
    -------
    ModeConnectivity

    Raises
    ------
    RebasinError
        Unknown ``curve`` or ``metric``, both ``curve`` and ``path``, missing endpoints,
        ``metric="error"`` on a non-classification task, or a path that does not join
        ``state_a`` and ``state_b``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(4, 3)
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> sa = model.state_dict()
    >>> mode_connectivity(model, sa, sa, data, curve="linear", num_points=5).mc
    0.0
    """
    if metric not in _MC_METRICS:
        raise RebasinError(f"unknown metric {metric!r}; valid metrics: {list(_MC_METRICS)}")
    check_int(num_points, "num_points (both endpoints are always evaluated)", 2)
    device = resolve_device(model, device=device)
    if (state_a is None) != (state_b is None):
        raise RebasinError("pass both state_a and state_b, or neither (with path=)")
    a = None if state_a is None else as_state(state_a, "state_a")
    b = None if state_b is None else as_state(state_b, "state_b")
    options = {"num_points": num_points, "loss_fn": loss_fn, "device": device, "progress": progress, "sync": sync,
               "group": group}  # fmt: skip
    trained: Any = None  # the path object evaluated; None for the straight line
    fit: CurveFit | None = None
    if path is not None:
        if curve is not None:
            raise RebasinError(f"pass curve={curve!r} (a kind to train) or path= (a path to measure), not both")
        if not (isinstance(path, StatePath) or callable(path)):
            raise RebasinError(f"path must have state_dict_at(t) or be a callable t -> state_dict; got {type(path).__name__}")
        if a is not None and b is not None:
            _check_starts_at(path, a, 0.0, "state_a")
            _check_starts_at(path, b, 1.0, "state_b")
        trained = path
    else:
        curve = "bezier" if curve is None else curve
        if not isinstance(curve, str):
            raise RebasinError(f"curve is a kind, one of {list(_MC_CURVES)}, got a {type(curve).__name__}; "
                               "a path object (with state_dict_at(t), or a callable t -> state_dict) goes to path=")
        if curve not in _MC_CURVES:
            raise RebasinError(f"unknown curve {curve!r}; valid: {list(_MC_CURVES)} (or a path object as path=)")
        if a is None or b is None:
            raise RebasinError(f"curve={curve!r} needs state_a and state_b")
        if curve != "linear":
            trained = CURVE_KINDS[curve](a, b, num_bends=num_bends)
            fit = fit_curve(model, trained, loader if fit_loader is None else fit_loader, epochs=epochs, lr=lr,
                            seed=seed, loss_fn=loss_fn, device=device, progress=progress, sync=sync,
                            group=group)  # fmt: skip
    measured: Any = LinearPath(a, b) if trained is None else trained  # type: ignore[arg-type]  # a, b set above
    if bn_loader is not None:
        measured = BNResetPath(measured, model, bn_loader, device=device, sync=sync, group=group)
    with torch.no_grad():
        result = evaluate_path(model, measured, loader, **options)
    if metric == "error":
        if result.accuracy is None:
            raise RebasinError("metric='error' needs a classification task (integer targets); use metric='loss'")
        values = tuple(1.0 - acc for acc in result.accuracy)
    else:
        values = result.loss
    mean = 0.5 * (values[0] + values[-1])
    gaps = [abs(v - mean) for v in values]
    i = gaps.index(max(gaps))
    return ModeConnectivity(mc=mean - values[i], t_star=result.t[i], ts=result.t, values=values,
                            endpoint_mean=mean, metric=metric, curve=trained, fit=fit, result=result)  # fmt: skip
