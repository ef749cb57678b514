r"""The Weight Adjustment path (Anokhin & Yarotsky, ICML 2020).

From I. Anokhin, D. Yarotsky, "Low-loss connection of weight vectors: distribution-based approaches",
ICML 2020 (their optimal-transport neuron matcher is :func:`rebasin.matching.ot_matching`):

* :func:`weight_adjusted_path` -- the Weight Adjustment (WA) path: move the layers of A to B one
  at a time, and while layer ``k`` moves, refit layer ``k+1`` by least squares so that the
  network's pre-activations stay close to A's.

Compositions used in the paper's comparison (``spec``, ``model``, states and ``batch`` as usual):

* "Linear+WA": ``weight_adjusted_path(model, sa, sb, batch)``
* "Arc+WA": ``weight_adjusted_path(model, sa, sb, batch, base="arc")``
* "OT+WA": ``weight_adjusted_path(model, sa, permute(spec, ot_matching(spec, sa, sb), sb), batch)``

Every path object has ``state_dict_at(t)`` and plugs into :func:`rebasin.evaluate_path` as
``path=``.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Node
from torch.fx.node import map_arg

from .._common import check_float, check_pair, check_state_for_model, resolve_device, split_batch, to_device
from .._deprecation import renamed_keywords
from .._errors import RebasinError
from ..spec.core import PermutationSpec
from ..trace.ops import DROPOUT_FN, ELEMENTWISE_FN, ELEMENTWISE_METHOD, IDENTITY_METHOD
from ..trace.registry import module_rule, trace_graph
from .arc import arc_interpolate

__all__ = ["weight_adjusted_path", "WeightAdjustedPath", "WA_PATHS", "LayerMove", "linear_chain_keys"]

WA_PATHS = ("linear", "arc")

State = Mapping[str, Tensor]
LayerWB = tuple[Tensor, "Tensor | None"]
#: ``move(i, start, end, s) -> (weight, bias)``: layer ``i`` (0-based) at position ``s`` in ``(0, 1)`` of its stage,
#: from ``start`` to ``end`` (each ``(weight, bias_or_None)``); a custom ``base`` of :class:`WeightAdjustedPath`.
LayerMove = Callable[[int, LayerWB, LayerWB, float], LayerWB]



# ----------------------------------------------------------------------------------------------
# Weight Adjustment path: the Linear chain

_CHAIN_HINT = (
    "weight_adjusted_path supports feed-forward chains of Linear layers with elementwise activations "
    "(e.g. rebasin.apps.models.MLP without norm layers, or nn.Sequential of Linear / activation / Flatten / Dropout)"
)
# What may sit between two Linear layers: the trace package's elementwise ops, flatten, and (below)
# modules whose registered rule declares a stateless elementwise op (params={}).
_CHAIN_FN = (ELEMENTWISE_FN | {torch.flatten}) - {F.linear}
_CHAIN_METHOD = ELEMENTWISE_METHOD | IDENTITY_METHOD | {"flatten"}

Op = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class _Layer:
    weight: str
    bias: str | None
    post: tuple[Op, ...]  # parameter-free ops from this Linear's output to the next Linear's input


def _node_op(node: Node, model: nn.Module) -> Op | nn.Linear:
    """The callable of one chain node, or the Linear module it calls; RebasinError otherwise."""
    what = f"fx node {node.name!r}"
    if node.op == "call_module":
        m = model.get_submodule(str(node.target))
        if type(m) is nn.Linear:
            return m
        if isinstance(m, nn.modules.dropout._DropoutNd):
            return lambda x: x  # eval mode
        rule = module_rule(m)
        if (isinstance(m, nn.Flatten) or (rule is not None and rule.elementwise)) and not list(m.parameters()):
            return m
        raise RebasinError(f"{_CHAIN_HINT}; {type(model).__name__} calls a {type(m).__name__} at {what}")
    if node.op == "call_function" and node.target in _CHAIN_FN:
        if node.target in DROPOUT_FN:
            return lambda x: x
        fn = node.target
        return lambda x: fn(*map_arg(node.args, lambda _: x), **map_arg(node.kwargs, lambda _: x))  # type: ignore[operator]  # torch.fx types Node.target as Callable | str; a call_function target is the callable
    if node.op == "call_method" and node.target in _CHAIN_METHOD:
        name = str(node.target)

        def method(x: Tensor) -> Tensor:
            args = map_arg(node.args, lambda _: x)
            return getattr(args[0], name)(*args[1:], **map_arg(node.kwargs, lambda _: x))

        return method
    raise RebasinError(f"{_CHAIN_HINT}; {type(model).__name__} has {node.op} {node.target!r} at {what}")


def _linear_chain(model: nn.Module) -> tuple[tuple[Op, ...], tuple[_Layer, ...]]:
    """``(ops before the first Linear, layers)`` of a model that is a chain of Linear layers."""
    try:
        gm = trace_graph(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means "not a plain chain"
        raise RebasinError(f"{_CHAIN_HINT}; torch.fx could not trace {type(model).__name__}: {err}") from err
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise RebasinError(f"{_CHAIN_HINT}; {type(model).__name__} takes {len(inputs)} inputs, expected one")
    pre: list[Op] = []
    layers: list[tuple[str, nn.Linear, list[Op]]] = []
    cur = inputs[0]
    for node in nodes:
        if node.op == "placeholder":
            continue
        if node.all_input_nodes != [cur] or len(cur.users) != 1:
            raise RebasinError(
                f"{_CHAIN_HINT}; {type(model).__name__} is not a chain: fx node {node.name!r} reads "
                f"{[n.name for n in node.all_input_nodes]} and {cur.name!r} feeds {len(cur.users)} nodes "
                "(residual or branching connection)"
            )
        if node.op == "output":
            break
        op = _node_op(node, model)
        if isinstance(op, nn.Linear):
            if any(m is op for _, m, _ in layers):
                raise RebasinError(f"{_CHAIN_HINT}; {type(model).__name__} calls Linear {node.target!r} twice")
            layers.append((str(node.target), op, []))
        else:
            (layers[-1][2] if layers else pre).append(op)
        cur = node
    if not layers:
        raise RebasinError(f"{_CHAIN_HINT}; {type(model).__name__} has no Linear layer")
    return tuple(pre), tuple(
        _Layer(f"{name}.weight", None if m.bias is None else f"{name}.bias", tuple(post)) for name, m, post in layers
    )


def linear_chain_keys(model: nn.Module) -> tuple[tuple[str, str | None], ...]:
    """``(weight_key, bias_key_or_None)`` of every Linear layer of a Linear chain, in network order.

    Raises
    ------
    RebasinError
        If ``model`` is not a feed-forward chain of Linear layers with parameter-free ops in between.
    """
    if not isinstance(model, nn.Module):
        raise RebasinError(f"model must be an nn.Module, got {type(model).__name__}")
    return tuple((layer.weight, layer.bias) for layer in _linear_chain(model)[1])


def _sub_spec(spec: PermutationSpec, keys: list[str]) -> PermutationSpec:
    """The part of ``spec`` on ``keys``: their axes and blocks, and the concatenations, structure and grouped
    axes that act on them (so the arc's centre of one layer sees the same orbits as in the whole spec)."""
    axes = {k: spec.axes[k] for k in keys}
    block_inner = {ka: v for ka, v in spec.block_inner.items() if ka[0] in axes}
    used = {n for ax in axes.values() for n in ax if n is not None} | set(block_inner.values())
    concat = {c: parts for c, parts in spec.concat.items() if c in used}
    perms = (used - set(concat)) | {q for parts in concat.values() for q, _ in parts if q is not None}
    return PermutationSpec(
        axes,
        blocks={ka: v for ka, v in spec.blocks.items() if ka[0] in axes},
        structure={q: v for q, v in spec.structure.items() if q in perms},
        concat=concat,
        grouped={ka: v for ka, v in spec.grouped.items() if ka[0] in axes},
        block_inner=block_inner,
    )


def _chain_spec(layers: tuple[_Layer, ...]) -> PermutationSpec:
    """The permutation spec of a Linear chain: hidden layer ``l`` carries ``P{l}``."""
    axes: dict[str, tuple[str | None, ...]] = {}
    for i, layer in enumerate(layers):
        out = f"P{i}" if i < len(layers) - 1 else None
        axes[layer.weight] = (out, f"P{i - 1}" if i else None)
        if layer.bias is not None:
            axes[layer.bias] = (out,)
    return PermutationSpec(axes)


def _run(ops: tuple[Op, ...], x: Tensor) -> Tensor:
    x = x.clone()  # ops may work in place (ReLU(inplace=True)); never touch the caller's tensor
    for op in ops:
        x = op(x)
    return x


# ----------------------------------------------------------------------------------------------
# Weight Adjustment path


class WeightAdjustedPath:
    r"""The Weight Adjustment path of Anokhin & Yarotsky (2020) between two Linear chains.

    Built by :func:`weight_adjusted_path` (see there for the construction); ``state_dict_at(t)``
    gives the full state_dict at ``t`` in ``[0, 1]``, so the object plugs into
    :func:`rebasin.evaluate_path` as ``path=``.

    Attributes
    ----------
    num_stages
        ``L``, the number of Linear layers; stage ``k`` covers ``t`` in ``[(k-1)/L, k/L]``.
    layer_keys
        ``(weight_key, bias_key_or_None)`` of each Linear layer, in network order.
    kind
        ``"linear"`` or ``"arc"``: the ``base`` path the moving layer travels on; ``"custom"`` for a
        :data:`LayerMove` callable (how the Flow and Bijection connections run their layer-wise path).
    """

    __name__ = "weight_adjusted"
    _CACHE = 64

    def __init__(
        self,
        model: nn.Module,
        state_a: State,
        state_b: State,
        batch: Any,
        *,
        base: str | LayerMove = "linear",
        spec: PermutationSpec | None = None,
        ridge: float = 1e-6,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise RebasinError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(base) and base not in WA_PATHS:
            raise RebasinError(f"unknown path kind base={base!r}; valid kinds: {list(WA_PATHS)} or a LayerMove callable")
        self.ridge = check_float(ridge, "ridge")
        if not self.ridge > 0:
            raise RebasinError(f"ridge must be > 0 (it keeps every refit unique and continuous in t), got {ridge!r}")
        for name, st in (("state_a", state_a), ("state_b", state_b)):
            check_state_for_model(model, st, name=name)  # a module or non-mapping: one clear error
        check_pair(state_a, state_b)
        pre, layers = _linear_chain(model)
        if spec is None:
            spec = _chain_spec(layers)
            spec.validate_pair({k: state_a[k] for k in spec.axes}, {k: state_b[k] for k in spec.axes})
        elif not isinstance(spec, PermutationSpec):
            raise RebasinError(f"spec must be a PermutationSpec or None, got {type(spec).__name__}")
        else:
            spec.validate_pair(state_a, state_b)
        self.kind = base if isinstance(base, str) else "custom"
        self._mover: LayerMove | None = None if isinstance(base, str) else base
        self.device = resolve_device(model, device=device)
        self.num_stages = len(layers)
        self.layer_keys = tuple((layer.weight, layer.bias) for layer in layers)
        self._layers = layers
        dev = self.device
        self._a = {k: v.detach().to(dev) for k, v in state_a.items()}
        self._b = {k: v.detach().to(dev) for k, v in state_b.items()}
        self._specs = [_sub_spec(spec, [k for k in keys if k is not None]) for keys in self.layer_keys]
        x, _ = split_batch(batch)
        if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[0] == 0 or not x.is_floating_point():
            raise RebasinError("batch must be a non-empty floating input tensor or an (inputs, targets) pair")
        self._cache: OrderedDict[tuple[int, float], tuple[Tensor, Tensor | None]] = OrderedDict()
        with torch.no_grad():
            self._precompute(pre, to_device(x, dev).to(torch.float64))

    # ------------------------------------------------------------------ helpers
    def _wb(self, state: State, i: int) -> tuple[Tensor, Tensor | None]:
        w, b = self.layer_keys[i]
        return state[w], None if b is None else state[b]

    @staticmethod
    def _lin(h: Tensor, wb: tuple[Tensor, Tensor | None]) -> Tensor:
        w, b = wb
        return F.linear(h, w.to(torch.float64), None if b is None else b.to(torch.float64))

    def _precompute(self, pre: tuple[Op, ...], x: Tensor) -> None:
        """B's layer inputs, A's pre-activations, the refit weights at every stage end."""
        n_layers = self.num_stages
        shape = tuple(x.shape)
        try:
            x = _run(pre, x)
            hin_b, h = [x], x
            for i in range(n_layers - 1):
                h = _run(self._layers[i].post, self._lin(h, self._wb(self._b, i)))
                hin_b.append(h)
            z_a, h = [self._lin(x, self._wb(self._a, 0))], x
            for i in range(1, n_layers):
                h = _run(self._layers[i - 1].post, z_a[-1])
                z_a.append(self._lin(h, self._wb(self._a, i)))
        except RuntimeError as err:
            raise RebasinError(f"cannot run the Linear chain on the batch (input shape {shape}): {err}") from err
        self._hin_b, self._z_a = hin_b, z_a
        # stage k (0-based i = k - 1) moves layer i from start[i] to B and refits layer i + 1
        self._start: list[tuple[Tensor, Tensor | None]] = [self._wb(self._a, 0)]
        self._z_start: list[Tensor] = []
        for i in range(n_layers - 1):
            h0 = _run(self._layers[i].post, self._lin(hin_b[i], self._start[i]))
            self._z_start.append(self._lin(h0, self._wb(self._a, i + 1)))
            self._start.append(self._adjusted(i, hin_b[i + 1], z_a[i + 1]))

    def _adjusted(self, i: int, h: Tensor, target: Tensor) -> tuple[Tensor, Tensor | None]:
        """Layer ``i + 1`` = A's weights + the ridge least-squares correction towards ``target``."""
        w_a, b_a = self._wb(self._a, i + 1)
        d_in, d_out = w_a.shape[1], w_a.shape[0]
        resid = (target - self._lin(h, (w_a, b_a))).reshape(-1, d_out)
        feats = h.reshape(-1, d_in)
        if b_a is not None:
            feats = torch.cat([feats, feats.new_ones(feats.shape[0], 1)], dim=1)
        gram = feats.T @ feats / feats.shape[0]
        rhs = feats.T @ resid / feats.shape[0]
        lam = self.ridge * max(float(gram.diagonal().mean().detach()), 1e-12)
        gram.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(gram)
        sol = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.lstsq(gram, rhs).solution
        w = (w_a.to(torch.float64) + sol[:d_in].T).to(w_a.dtype)
        b = None if b_a is None else (b_a.to(torch.float64) + sol[d_in]).to(b_a.dtype)
        return w, b

    def _move(self, i: int, s: float) -> tuple[Tensor, Tensor | None]:
        """Layer ``i`` at position ``s`` of its stage: from its stage start to B's weights."""
        start, end = self._start[i], self._wb(self._b, i)
        if self._mover is not None:
            if s == 0.0 or s == 1.0:
                return start if s == 0.0 else end
            return self._mover(i, start, end, s)
        if self.kind == "linear":
            return torch.lerp(start[0], end[0], s), None if start[1] is None else torch.lerp(start[1], end[1], s)  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
        keys = [k for k in self.layer_keys[i] if k is not None]
        out = arc_interpolate(dict(zip(keys, start)), dict(zip(keys, end)), s, spec=self._specs[i])  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
        return out[keys[0]], out[keys[1]] if len(keys) > 1 else None

    def _refit(self, i: int, s: float, moved: tuple[Tensor, Tensor | None], *,
               cache: bool = True) -> tuple[Tensor, Tensor | None]:
        if s == 0.0:
            return self._wb(self._a, i + 1)
        if s == 1.0:
            return self._start[i + 1]
        if not cache:
            h = _run(self._layers[i].post, self._lin(self._hin_b[i], moved))
            return self._adjusted(i, h, torch.lerp(self._z_start[i], self._z_a[i + 1], s))
        key = (i, s)
        if key not in self._cache:
            h = _run(self._layers[i].post, self._lin(self._hin_b[i], moved))
            self._cache[key] = self._adjusted(i, h, torch.lerp(self._z_start[i], self._z_a[i + 1], s))
            if len(self._cache) > self._CACHE:
                self._cache.popitem(last=False)
        return self._cache[key]

    def stage(self, t: float) -> tuple[int, float]:
        """``(k, s)``: the 1-based stage containing ``t`` and the position ``s`` in ``[0, 1]`` within it."""
        t = check_float(t, "t")
        if not 0.0 <= t <= 1.0:
            raise RebasinError(f"t must lie in [0, 1] (the WA path is not defined outside), got {t!r}")
        u = t * self.num_stages
        k = min(int(math.floor(u)), self.num_stages - 1) + 1
        return k, min(max(u - (k - 1), 0.0), 1.0)

    # ------------------------------------------------------------------ public
    def state_dict_at(self, t: float, *, differentiable: bool = False) -> dict[str, Tensor]:
        """The full state_dict at ``t`` (new tensors on ``device``, in the endpoints' dtypes).

        With ``differentiable=True`` autograd records the moving layer and the refit (no cache): gradients
        reach whatever a custom ``base`` made the moving layer depend on (a flow's parameters, say).
        """
        k, s = self.stage(t)
        t = float(t)
        if t == 0.0 or t == 1.0:
            return {key: v.clone() for key, v in (self._a if t == 0.0 else self._b).items()}
        with contextlib.nullcontext() if differentiable else torch.no_grad():
            layer: dict[int, tuple[Tensor, Tensor | None]] = {}
            i = k - 1
            layer[i] = self._move(i, s)
            if i + 1 < self.num_stages:
                layer[i + 1] = self._refit(i, s, layer[i], cache=not differentiable)
            out: dict[str, Tensor] = {}
            for j, keys in enumerate(self.layer_keys):
                wb = layer.get(j, self._wb(self._b if j < i else self._a, j))
                for key, v in zip(keys, wb):
                    if key is not None:
                        out[key] = v.clone()  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
            for key, a in self._a.items():
                if key not in out:
                    out[key] = torch.lerp(a, self._b[key], t) if a.is_floating_point() else a.clone()
        return {key: out[key] for key in self._a}

    __call__ = state_dict_at

    def __repr__(self) -> str:
        return f"WeightAdjustedPath(kind={self.kind!r}, num_stages={self.num_stages}, ridge={self.ridge:g})"


@renamed_keywords(path="base")
def weight_adjusted_path(
    model: nn.Module,
    state_a: State,
    state_b: State,
    batch: Any,
    *,
    base: str | LayerMove = "linear",
    spec: PermutationSpec | None = None,
    ridge: float = 1e-6,
    device: torch.device | str | None = None,
) -> WeightAdjustedPath:
    r"""The Weight Adjustment (WA) path from network A to network B (Anokhin & Yarotsky 2020).

    For a chain of ``L`` Linear layers :math:`z_l = W_l h_{l-1} + b_l`, :math:`h_l = \sigma_l(z_l)`
    (parameter-free :math:`\sigma_l`), ``[0, 1]`` is split into ``L`` equal stages; stage ``k``
    covers :math:`t \in [\frac{k-1}{L}, \frac{k}{L}]` with local position :math:`s = tL - k + 1`.

    * Layers :math:`l < k` are at B.
    * Layer ``k`` moves from its stage start :math:`S_k` to :math:`B_k` along the ``base`` path:
      :math:`(1-s) S_k + s B_k` (``"linear"``) or the arc of
      :func:`rebasin.paths.arc_interpolate` between the two (``"arc"``). :math:`S_1 = A_1`, and
      :math:`S_k = R_k` (the refit of the previous stage's end) for :math:`k \ge 2`.
    * Layer ``k+1`` (for :math:`k < L`) is refit on the inputs ``x`` of ``batch`` so that its
      pre-activations follow A's. With :math:`h(s)` its input at ``s`` (layers ``< k`` at B, layer
      ``k`` at its moved weights) and the target

      .. math:: T(s) = (1 - s)\, z^{\text{start}}_{k+1} + s\, z^A_{k+1},

      where :math:`z^A_{k+1}` are A's pre-activations on ``x`` and :math:`z^{\text{start}}_{k+1}`
      the network's own at the stage start, the layer is
      :math:`(W, b)_{k+1}(s) = (A_{k+1} + \Delta(s))` with the ridge least-squares correction

      .. math::

          \Delta(s) = \arg\min_\Delta \tfrac1N \big\lVert T(s) - (A_{k+1} + \Delta)[h(s); 1]
          \big\rVert^2 + \lambda \lVert \Delta \rVert^2,
          \qquad \lambda = \text{ridge} \cdot \overline{\operatorname{diag} G},

      solved in float64 (:math:`G` the Gram matrix of :math:`[h(s); 1]` over the ``N`` inputs).
      Its end value is :math:`R_{k+1} = A_{k+1} + \Delta(1)`, the paper's adjusted layer:
      layer ``k`` is at B and layer ``k+1`` reproduces A's pre-activations as well as a
      least-squares fit can. Layers :math:`l > k+1` are at A.
    * Stage ``L``: layers ``< L`` at B, the last layer moves from :math:`R_L` to :math:`B_L`.

    Why this form (continuity and exact ends). The target starts at the network's own
    pre-activations, so :math:`\Delta(0) = 0` exactly and each stage starts where the previous one
    ended (stage ``k`` at ``s = 1`` and stage ``k+1`` at ``s = 0`` are the same state); within a
    stage :math:`h(s)`, :math:`T(s)` and (thanks to :math:`\lambda > 0`) :math:`\Delta(s)` are
    continuous. Regularising the *correction* rather than the weights makes the refit the
    smallest change to A's layer that fits the target, so directions the batch does not see
    (dead units, fewer inputs than units) keep A's values. In stage 1 the start target is A's own
    pre-activations, :math:`T(s) = z^A_2` throughout, as in the paper; later stages fade out the
    small residual left by the previous refit. ``t = 0`` returns A and ``t = 1`` returns B
    bit for bit. Entries outside the Linear layers (a chain has none that are used) are
    interpolated linearly; integer entries are A's.

    Parameters
    ----------
    model
        The architecture: a feed-forward chain of ``nn.Linear`` modules with parameter-free ops in
        between (activations, Flatten, Dropout -- run as in eval mode), e.g.
        :class:`rebasin.apps.models.MLP` without norm layers. Traced with torch.fx; not mutated.
    state_a, state_b
        Endpoint state_dicts of ``model`` (same keys, shapes, dtypes; finite). For "OT+WA" pass
        B aligned to A. Not mutated.
    batch
        The refit inputs: a tensor or an ``(inputs, targets)`` pair (targets are ignored). A few
        thousand training inputs is typical; the Gram matrices are ``(width+1)^2``.
    base
        ``"linear"`` or ``"arc"``: the path the moving layer travels on; or a :data:`LayerMove`
        callable ``move(i, start, end, s) -> (weight, bias)`` giving layer ``i`` (0-based) at ``s`` in
        ``(0, 1)`` of its stage (the path uses ``start`` at ``s = 0`` and ``end`` at ``s = 1`` exactly,
        without calling it). ``path=`` is a
        deprecated alias (``path=`` names a path object everywhere else).
    spec
        Permutation spec of the model, used for the arc's permutation-invariant centre;
        default: the chain's own (hidden layer ``l`` carries one permutation).
    ridge
        Relative ridge :math:`> 0` of the refits (see :math:`\lambda`).
    device
        Where to compute and where the returned states live; default the model's device.

    Returns
    -------
    WeightAdjustedPath
        ``state_dict_at(t)`` for ``t`` in ``[0, 1]``; refits are cached per ``t``.

    Raises
    ------
    RebasinError
        If the model is not a Linear chain (residual, norm layers, convolutions, ...), the states
        do not fit the model or each other, ``base`` is unknown, ``ridge`` is not positive,
        ``batch`` is empty, or ``t`` is outside ``[0, 1]``.

    Examples
    --------
    >>> import torch
    >>> from rebasin.apps.models import MLP
    >>> model = MLP(4, [8], 3)
    >>> sa, sb = MLP(4, [8], 3).state_dict(), MLP(4, [8], 3).state_dict()
    >>> wa = weight_adjusted_path(model, sa, sb, torch.randn(32, 4))
    >>> torch.equal(wa.state_dict_at(0.0)["layers.0.weight"], sa["layers.0.weight"])
    True
    >>> res = evaluate_path(model, wa, loader)  # doctest: +SKIP
    """
    return WeightAdjustedPath(model, state_a, state_b, batch, base=base, spec=spec, ridge=ridge, device=device)
