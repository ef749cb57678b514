r"""Learnable global connections of Anokhin & Yarotsky (ICML 2020): the Flow and the Bijection connection.

A network with one hidden layer, :math:`f(x) = \sum_{i=1}^n c_i\,\sigma(\langle w_i, x\rangle + b_i) + c_0`,
is a *set* of neurons :math:`u_i = (w_i, b_i, c_i) \in \mathbb{R}^{d}` (incoming weights, bias, outgoing
weights; :math:`d = d_\text{in} + 1 + d_\text{out}`) plus the output bias :math:`c_0`. Both connections
move each neuron along

.. math::

    \psi(t) = \nu^{-1}\big[\cos(\tfrac{\pi t}{2})\,\nu(u^A_i) + \sin(\tfrac{\pi t}{2})\,\nu(u^B_i)\big],
    \qquad c_0(t) = (1 - t)\,c_0^A + t\,c_0^B,

with an invertible :math:`\nu` (a :class:`rebasin.paths.flows.NeuronFlow`); with :math:`\nu` the identity
this is the arc about the origin. If the neurons of trained networks were i.i.d. samples of a law
:math:`p` and :math:`\nu` pushed :math:`p` to :math:`N(0, I)`, every point of the path would again be a
network whose neurons are i.i.d. samples of :math:`p`: a "typical" trained network.

* :func:`fit_flow_connection` -- :math:`\nu` by maximum likelihood on the neurons of a zoo of trained
  networks (RealNVP or IAF layers).
* :func:`fit_bijection_connection` -- :math:`\nu_W` trained so that the path itself has low loss,
  :math:`\min_W \mathbb{E}_{t \sim U(0,1),\,(A, B) \sim \text{zoo}}\, L(\psi_W(t; A, B))`.

Both are *global*: fitted once on a zoo, their :meth:`FlowConnection.path` connects any new pair of
networks of the same architecture. The path is exact at both ends (``t = 0`` returns A's tensors,
``t = 1`` B's, bit for bit; :math:`\nu^{-1}(\nu(u))` itself round-trips to float precision).
Neurons are paired by index: align B to A first (e.g. :func:`rebasin.weight_matching`) to pair them
by similarity.

Networks with more hidden layers (Linear chains, e.g. ``MLP(784, [512, 512], 10)``) are connected
layer by layer, the scheme the seed uses for deep nets: the Weight Adjustment path of
:func:`rebasin.paths.weight_adjusted_path` (``L`` Linear layers, ``L`` stages; while layer ``k`` moves, layer
``k+1`` is refit by least squares so that its pre-activations on a batch of inputs follow A's), with the
moving *hidden* layer travelling on the flow path instead of a straight line. Hidden layer ``l`` has its
own flow :math:`\nu_l`, fitted on that layer's neurons across the zoo, where a neuron is now the
layer's *incoming* weights and bias :math:`u = (w, b) \in \mathbb{R}^{d_{l-1} + 1}` (its outgoing
weights are the next layer's incoming ones, which the refit handles). The output layer moves on the
straight line in the last stage. See :meth:`FlowConnection.path`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._common import (
    check_float,
    check_int,
    check_pair,
    check_state_for_model,
    cross_entropy_of,
    cycle_batches,
    forward_with_state,
    progress_bar,
    resolve_device,
    split_batch,
    to_device,
)
from .._errors import RebasinError
from .flows import FLOW_KINDS, NeuronFlow
from .weight_adjusted import WeightAdjustedPath, linear_chain_keys

__all__ = ["FlowConnection", "FlowPath", "fit_flow_connection", "fit_bijection_connection"]

State = Mapping[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------------------------
# neurons of a one-hidden-layer network


@dataclass(frozen=True)
class _Layout:
    """Keys of a one-hidden-layer Linear chain and the sizes of one neuron vector."""

    hidden_w: str
    hidden_b: str | None
    out_w: str
    d_in: int
    d_out: int
    width: int

    @property
    def dim(self) -> int:
        return self.d_in + (self.hidden_b is not None) + self.d_out

    def neurons(self, state: State) -> Tensor:
        """``(width, d)``: row ``i`` is ``[W1[i], b1[i], W2[:, i]]``."""
        parts = [state[self.hidden_w]]
        if self.hidden_b is not None:
            parts.append(state[self.hidden_b][:, None])
        parts.append(state[self.out_w].T)
        return torch.cat([p.to(parts[0].dtype) for p in parts], dim=1)

    def assemble(self, u: Tensor, like: State) -> dict[str, Tensor]:
        """The hidden and output weights of neuron matrix ``u`` in ``like``'s dtypes."""
        out = {self.hidden_w: u[:, : self.d_in].to(like[self.hidden_w].dtype)}
        k = self.d_in
        if self.hidden_b is not None:
            out[self.hidden_b] = u[:, k].to(like[self.hidden_b].dtype)
            k += 1
        out[self.out_w] = u[:, k:].T.to(like[self.out_w].dtype)
        return out


@dataclass(frozen=True)
class _DeepLayout:
    """A Linear chain with at least two hidden layers: ``(weight, bias)`` keys of every Linear, in order.

    The neurons of hidden layer ``l`` (``l < len(layers) - 1``) are the rows ``[W_l[i], b_l[i]]``.
    """

    layers: tuple[tuple[str, str | None], ...]
    d_in: tuple[int, ...]  # input width of every Linear

    @property
    def num_hidden(self) -> int:
        return len(self.layers) - 1

    def dim(self, layer: int) -> int:
        return self.d_in[layer] + (self.layers[layer][1] is not None)

    def neurons(self, state: State, layer: int) -> Tensor:
        """``(width_l, d_l)``: row ``i`` is ``[W_l[i], b_l[i]]``."""
        w, b = self.layers[layer]
        if b is None:
            return state[w]
        return torch.cat([state[w], state[b][:, None].to(state[w].dtype)], dim=1)

    def split(self, u: Tensor, like: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor | None]:
        """Neuron matrix ``u`` back to ``(weight, bias)`` in ``like``'s dtypes."""
        w, b = like
        if b is None:
            return u.to(w.dtype), None
        return u[:, :-1].to(w.dtype), u[:, -1].to(b.dtype)


_HINT = (
    "flow and bijection connections take a network with one hidden layer (two nn.Linear modules with "
    "parameter-free elementwise ops between them, e.g. rebasin.apps.models.MLP(784, [2000], 10)) or a "
    "feed-forward chain of Linear layers with more hidden layers (connected layer by layer)"
)


def _deep_layout(model: nn.Module) -> _DeepLayout:
    layers = linear_chain_keys(model)
    ref = model.state_dict()
    owned = {k for pair in layers for k in pair if k is not None}
    other = [k for k, v in ref.items() if k not in owned and v.is_floating_point()]
    if other:
        raise RebasinError(f"{_HINT}; {type(model).__name__} has other floating entries {other[:8]}")
    return _DeepLayout(layers, tuple(int(ref[w].shape[1]) for w, _ in layers))


def _layout(model: nn.Module) -> _Layout | _DeepLayout:
    if not isinstance(model, nn.Module):
        raise RebasinError(f"model must be an nn.Module, got {type(model).__name__}")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) > 2:
        return _deep_layout(model)
    if len(linears) != 2:
        raise RebasinError(f"{_HINT}; {type(model).__name__} has {len(linears)} Linear modules "
                           f"{[n for n, _ in linears]}")
    (n1, l1), (n2, l2) = linears
    if l2.in_features != l1.out_features:
        raise RebasinError(f"{_HINT}; {n1!r} has {l1.out_features} outputs but {n2!r} takes {l2.in_features}")
    pre = lambda name: f"{name}." if name else ""  # noqa: E731 - a one-line key prefix
    owned = {f"{pre(n1)}weight", f"{pre(n2)}weight"} | {f"{pre(n)}bias" for n, m in linears if m.bias is not None}
    other = [k for k, v in model.state_dict().items() if k not in owned and v.is_floating_point()]
    if other:
        raise RebasinError(f"{_HINT}; {type(model).__name__} has other floating entries {other[:8]} "
                           "(norm layers are not supported)")
    return _Layout(f"{pre(n1)}weight", f"{pre(n1)}bias" if l1.bias is not None else None, f"{pre(n2)}weight",
                   l1.in_features, l2.out_features, l1.out_features)


def _check_zoo(model: nn.Module, states: Sequence[State]) -> list[dict[str, Tensor]]:
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise RebasinError(f"states must be a list of state_dicts (a zoo of trained networks), "
                           f"got {type(states).__name__}")
    if len(states) < 2:
        raise RebasinError(f"a zoo needs at least 2 trained networks (the connection is fitted on their "
                           f"neurons and, for the bijection, on pairs of them); got {len(states)}")
    out = []
    for i, st in enumerate(states):
        if not isinstance(st, Mapping):
            raise RebasinError(f"states[{i}] must be a state_dict, got {type(st).__name__}")
        check_state_for_model(model, st, name=f"states[{i}]")
        bad = [k for k, v in st.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise RebasinError(f"states[{i}] has NaN or inf in {bad[:8]}; a zoo must hold trained, finite networks")
        out.append({k: v.detach() for k, v in st.items()})
    return out


# ----------------------------------------------------------------------------------------------
# the connection and its paths


class _LayerMove:
    r"""The moving hidden layer of the layer-wise path: :math:`\nu_l^{-1}[c\,\nu_l(S) + s'\,\nu_l(B)]` row by row.

    The output layer (no flow) moves on the straight line. Encodings of the stage ends are cached when
    autograd is off (a path evaluated at many ``t``).
    """

    def __init__(self, connection: FlowConnection) -> None:
        self.connection = connection
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, i: int, start: tuple[Tensor, Tensor | None], end: tuple[Tensor, Tensor | None],
                 s: float) -> tuple[Tensor, Tensor | None]:
        conn = self.connection
        layout = conn.layout
        assert isinstance(layout, _DeepLayout)
        if i >= layout.num_hidden:  # the output layer: straight line
            return torch.lerp(start[0], end[0], s), None if start[1] is None else torch.lerp(start[1], end[1], s)  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
        flow = conn.flows[i]
        dev, dtype = conn.device, conn.dtype

        def neurons(wb: tuple[Tensor, Tensor | None]) -> Tensor:
            u = wb[0] if wb[1] is None else torch.cat([wb[0], wb[1][:, None].to(wb[0].dtype)], dim=1)
            return u.to(dev, dtype)  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module

        if torch.is_grad_enabled():
            za, zb = flow(neurons(start))[0], flow(neurons(end))[0]
        else:
            if i not in self._cache:
                self._cache[i] = (flow(neurons(start))[0], flow(neurons(end))[0])
            za, zb = self._cache[i]
        c, sn = math.cos(math.pi * s / 2.0), math.sin(math.pi * s / 2.0)
        w, b = layout.split(flow.inverse(c * za + sn * zb), start)
        return w.to(start[0].device), None if b is None else b.to(start[0].device)


class FlowPath:
    r"""The path :math:`\psi(t)` of a :class:`FlowConnection` between two networks; ``state_dict_at(t)``.

    Plugs into :func:`rebasin.evaluate_path` as ``path=``, into :func:`rebasin.paths.plot_paths` and
    :func:`rebasin.barrier` through the result. ``t = 0`` and ``t = 1`` return copies of A's and
    B's tensors. One hidden layer: ``t`` outside ``[0, 1]`` continues along the circle. More hidden
    layers (the layer-wise path, :meth:`FlowConnection.path`): ``t`` must lie in ``[0, 1]``.

    Attributes
    ----------
    connection
        The :class:`FlowConnection`.
    state_a, state_b
        Detached copies of the endpoints on the connection's device.
    stages
        Several hidden layers: the :class:`rebasin.paths.WeightAdjustedPath` that runs the layer-wise path
        (its ``num_stages``, ``stage(t)``); None for one hidden layer.
    """

    def __init__(self, connection: FlowConnection, state_a: State, state_b: State, batch: Any = None, *,
                 ridge: float = 1e-6) -> None:
        check_pair(state_a, state_b)
        shapes = {k: tuple(v.shape) for k, v in state_a.items()}
        if shapes != connection.shapes:
            raise RebasinError(f"the states do not fit the connection's architecture: got {shapes}, the zoo had "
                               f"{connection.shapes}")
        self.connection = connection
        self.__name__ = connection.method
        dev = connection.device
        self.state_a = {k: v.detach().to(dev) for k, v in state_a.items()}
        self.state_b = {k: v.detach().to(dev) for k, v in state_b.items()}
        self.stages: WeightAdjustedPath | None = None
        if connection.layerwise:
            if batch is None:
                raise RebasinError(
                    "the layer-wise flow path of a network with several hidden layers refits the transition layer "
                    "on data: pass batch= (inputs, or an (inputs, targets) pair; a few thousand training inputs)")
            assert connection.model is not None
            self.stages = WeightAdjustedPath(connection.model, self.state_a, self.state_b, batch,
                                             base=_LayerMove(connection), ridge=ridge, device=dev)
            return
        if batch is not None:
            raise RebasinError("batch= is only used by the layer-wise path of networks with several hidden layers; "
                               "the path of a one-hidden-layer network needs no data")
        with torch.no_grad():
            self._za = connection.encode(self.state_a)
            self._zb = connection.encode(self.state_b)

    def state_dict_at(self, t: float) -> dict[str, Tensor]:
        """The full state_dict at ``t`` (new tensors)."""
        t = check_float(t, "t")
        if self.stages is not None:
            return self.stages.state_dict_at(t)
        if t == 0.0 or t == 1.0:
            return {k: v.clone() for k, v in (self.state_a if t == 0.0 else self.state_b).items()}
        with torch.no_grad():
            return self.connection.state_at(self.state_a, self.state_b, t, za=self._za, zb=self._zb)

    __call__ = state_dict_at

    def __repr__(self) -> str:
        return (f"FlowPath(method={self.connection.method!r}, kind={self.connection.kind!r}, "
                f"layerwise={self.connection.layerwise})")


class FlowConnection:
    r"""A fitted global connection: the neuron map(s) :math:`\nu` and how they were fitted.

    Built by :func:`fit_flow_connection` or :func:`fit_bijection_connection`.

    Attributes
    ----------
    flows
        One :class:`rebasin.paths.flows.NeuronFlow` per hidden layer (eval mode, ``requires_grad``
        off): one flow over whole neurons :math:`(w, b, c)` for a one-hidden-layer network; for a
        network with ``L - 1 >= 2`` hidden layers, flow ``l`` acts on hidden layer ``l``'s incoming
        neurons :math:`(w, b)`.
    flow
        ``flows[0]``.
    layerwise
        True for networks with several hidden layers (the layer-wise path, :meth:`path`).
    method
        ``"flow"`` (maximum likelihood) or ``"bijection"`` (trained on the path loss).
    kind
        ``"realnvp"`` or ``"iaf"``.
    history
        One value per optimisation step: the minibatch mean log-likelihood per coordinate, averaged
        over the layers' flows (``"flow"``) or the minibatch task loss at the sampled ``t``
        (``"bijection"``).
    log_likelihood_start, log_likelihood_end
        Mean log-likelihood per coordinate of all zoo neurons before and after fitting (averaged over
        the layers' flows).
    shapes
        ``{key: shape}`` of the architecture's state_dict; :meth:`path` accepts states of these shapes.
    device
        Where the flows live and the paths are computed.
    dtype
        The flows' dtype.
    model
        Several hidden layers: a private copy of the architecture (the layer-wise path traces it);
        None for one hidden layer.
    """

    def __init__(self, flows: Sequence[NeuronFlow], layout: _Layout | _DeepLayout, like: State, *, method: str,
                 history: Sequence[float], log_likelihood_start: float, log_likelihood_end: float,
                 device: torch.device, model: nn.Module | None = None) -> None:
        self.flows = tuple(f.eval().requires_grad_(False) for f in flows)
        self.flow = self.flows[0]
        self.layout = layout
        self.layerwise = isinstance(layout, _DeepLayout)
        self.model = model
        self.shapes = {k: tuple(v.shape) for k, v in like.items()}
        self.method, self.kind = method, self.flow.kind
        self.dtype = self.flow.mean.dtype
        self.history = tuple(float(v) for v in history)
        self.log_likelihood_start = float(log_likelihood_start)
        self.log_likelihood_end = float(log_likelihood_end)
        self.device = device

    def _neuron_sets(self, state: State) -> list[Tensor]:
        if isinstance(self.layout, _DeepLayout):
            return [self.layout.neurons(state, l) for l in range(self.layout.num_hidden)]  # noqa: E741 - l is the hidden layer index, as in the layout API
        return [self.layout.neurons(state)]

    def encode(self, state: State, layer: int = 0) -> Tensor:
        r""":math:`\nu_l` of every neuron of hidden layer ``layer`` of ``state``: shape ``(width, d)``."""
        sets = self._neuron_sets(state)
        if not 0 <= layer < len(sets):
            raise RebasinError(f"layer must be in [0, {len(sets)}), got {layer!r}")
        return self.flows[layer](sets[layer].to(self.device, self.dtype))[0]  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module

    def state_at(self, state_a: State, state_b: State, t: float, *, za: Tensor | None = None,
                 zb: Tensor | None = None) -> dict[str, Tensor]:
        r""":math:`\psi(t)` as a full state_dict, differentiable with respect to :attr:`flow`'s parameters.

        One-hidden-layer networks only; the layer-wise path of deeper ones needs data (:meth:`path`).
        """
        if isinstance(self.layout, _DeepLayout):
            raise RebasinError("state_at is the one-hidden-layer formula; for several hidden layers use "
                               "path(state_a, state_b, batch).state_dict_at(t)")
        za = self.encode(state_a) if za is None else za
        zb = self.encode(state_b) if zb is None else zb
        c, s = math.cos(math.pi * t / 2.0), math.sin(math.pi * t / 2.0)
        moved = self.layout.assemble(self.flow.inverse(c * za + s * zb), state_a)
        out: dict[str, Tensor] = {}
        for key, a in state_a.items():
            if key in moved:
                out[key] = moved[key]
            elif a.is_floating_point():
                out[key] = torch.lerp(a, state_b[key].to(a.device), t)
            else:
                out[key] = a.clone()
        return out

    def path(self, state_a: State, state_b: State, batch: Any = None, *, ridge: float = 1e-6) -> FlowPath:
        r"""The path between two networks of the connection's architecture (any pair, not only the zoo's).

        One hidden layer: every neuron :math:`(w, b, c)` moves on
        :math:`\nu^{-1}[\cos(\pi t/2)\nu(u^A) + \sin(\pi t/2)\nu(u^B)]`, the output bias on the straight
        line; ``batch`` must be None.

        ``L - 1 >= 2`` hidden layers (``L`` Linear layers): the layer-wise path, which is
        :func:`rebasin.paths.weight_adjusted_path` (stages, refits, ``ridge``, ``batch``: see there) with the
        moving layer's own path replaced. ``[0, 1]`` is cut into ``L`` equal stages; in stage ``k``
        (local position :math:`s`) layers ``< k`` are at B, layers ``> k + 1`` at A, and

        * hidden layer ``k`` (``k < L``) moves from its stage start :math:`S_k` (A's layer for
          ``k = 1``, else the refit that ended stage ``k - 1``) to B's layer neuron by neuron,
          :math:`u(s) = \nu_k^{-1}[\cos(\pi s/2)\,\nu_k(u^{S_k}) + \sin(\pi s/2)\,\nu_k(u^{B_k})]`
          with :math:`u = (w, b)` a row of the layer's weight and its bias;
        * layer ``k + 1`` is refit by ridge least squares on ``batch`` so that its pre-activations
          follow A's (the transition layer; exactly as in :func:`rebasin.paths.weight_adjusted_path`);
        * in the last stage the output layer moves on the straight line from its refit to B's.

        ``t = 0`` gives A and ``t = 1`` gives B bit for bit; stage ends are joined exactly (the flow is
        not evaluated at ``s = 0, 1``). ``batch`` is required here.
        """
        return FlowPath(self, state_a, state_b, batch, ridge=ridge)

    def log_likelihood(self, states: Sequence[State]) -> float:
        """Mean log-likelihood per coordinate of the hidden neurons of ``states`` (averaged over the flows)."""
        sets = [self._neuron_sets(s) for s in states]
        with torch.no_grad():
            lls = []
            for l, flow in enumerate(self.flows):  # noqa: E741 - l is the hidden layer index, as in the layout API
                u = torch.cat([ns[l] for ns in sets]).to(self.device, self.dtype)  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
                lls.append(_mean_ll(flow, u))
        return sum(lls) / len(lls)

    def __repr__(self) -> str:
        dims = [f.dim for f in self.flows]
        return (f"FlowConnection(method={self.method!r}, kind={self.kind!r}, layerwise={self.layerwise}, "
                f"dims={dims}, steps={len(self.history)})")


# ----------------------------------------------------------------------------------------------
# fitting


def _new_flow(kind: str, zoo_neurons: Tensor, n_layers: int, hidden: int, n_blocks: int, seed: int,
              dtype: torch.dtype) -> NeuronFlow:
    if kind not in FLOW_KINDS:
        raise RebasinError(f"unknown flow kind {kind!r}; valid kinds: {list(FLOW_KINDS)}")
    mean = zoo_neurons.mean(0)
    std = zoo_neurons.std(0)
    std = torch.clamp(std, min=1e-6 * float(std.max()) + 1e-12)
    return NeuronFlow(zoo_neurons.shape[1], kind=kind, n_layers=n_layers, hidden=hidden, n_blocks=n_blocks,
                      mean=mean, std=std, seed=seed, dtype=dtype)


def _zoo_neurons(layout: _Layout | _DeepLayout, zoo: Sequence[State]) -> list[Tensor]:
    """Per flow: every zoo network's neurons of that layer, stacked."""
    if isinstance(layout, _DeepLayout):
        return [torch.cat([layout.neurons(s, l) for s in zoo]) for l in range(layout.num_hidden)]  # noqa: E741 - l is the hidden layer index, as in the layout API
    return [torch.cat([layout.neurons(s) for s in zoo])]


def _mean_ll(flow: NeuronFlow, u: Tensor, chunk: int = 4096) -> float:
    with torch.no_grad():
        total = sum(float(flow.log_prob(u[i : i + chunk]).sum()) for i in range(0, len(u), chunk))
    return total / (len(u) * u.shape[1])


def _model_copy(layout: _Layout | _DeepLayout, model: nn.Module) -> nn.Module | None:
    """A private copy of the architecture for the layer-wise path's tracing (deep nets only)."""
    return copy.deepcopy(model).eval() if isinstance(layout, _DeepLayout) else None


def fit_flow_connection(
    model: nn.Module,
    states: Sequence[State],
    *,
    kind: str = "realnvp",
    n_layers: int = 4,
    hidden: int = 64,
    n_blocks: int = 8,
    n_iter: int = 1000,
    batch_size: int = 512,
    lr: float = 1e-3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> FlowConnection:
    r"""The Flow connection: :math:`\nu` fitted by maximum likelihood on a zoo's neurons.

    Every hidden neuron :math:`u = (w, b, c)` of every network in ``states`` is one sample. After
    per-coordinate standardisation, :math:`\nu` maximises

    .. math:: \frac{1}{N}\sum_{u} \Big[\log N\big(\nu(u); 0, I\big) + \log\big|\det J_\nu(u)\big|\Big]

    with Adam on minibatches of ``batch_size`` neurons drawn (with replacement) from a private
    :class:`torch.Generator`. The connection path is
    :math:`\psi(t) = \nu^{-1}[\cos(\pi t/2)\nu(u^A) + \sin(\pi t/2)\nu(u^B)]` neuron by neuron
    (module docstring).

    Several hidden layers (a Linear chain of ``L >= 3`` Linear layers): one flow :math:`\nu_l` per
    hidden layer, each fitted as above on that layer's incoming neurons :math:`u = (w, b)` (a row of
    the layer's weight with its bias) pooled over the zoo; one Adam step updates every flow (each
    on its own minibatch, the objective is the sum of the layers' mean log-likelihoods per
    coordinate). The connection then joins two networks layer by layer (:meth:`FlowConnection.path`,
    which needs a ``batch`` of inputs for the transition-layer refits).

    Parameters
    ----------
    model
        The architecture: two ``nn.Linear`` layers with parameter-free elementwise ops between them,
        or a feed-forward chain of more Linear layers (e.g. ``MLP(784, [512, 512], 10)``; traced with
        torch.fx, no norm layers). Not mutated.
    states
        The zoo: at least 2 trained state_dicts of ``model`` (finite). Not mutated.
    kind
        ``"realnvp"`` (affine coupling) or ``"iaf"`` (blockwise inverse autoregressive).
    n_layers, hidden, n_blocks
        Flow size: :class:`rebasin.paths.flows.NeuronFlow`.
    n_iter
        Adam steps.
    batch_size
        Neurons per step.
    lr
        Adam learning rate.
    seed
        Seeds the flow's initialisation and the minibatches; same seed, same connection.
    dtype
        Flow dtype (float32 is about twice as fast on CPU; float64 for exactness tests).
    device
        Where to fit; default the model's device.
    progress
        tqdm bar over steps.

    Returns
    -------
    FlowConnection
        ``method == "flow"``; ``.path(state_a, state_b)`` for any pair.

    Raises
    ------
    RebasinError
        If the zoo has fewer than 2 networks, a state does not fit ``model`` (mixed architectures)
        or holds NaN/inf, the model is neither a one-hidden-layer network nor a Linear chain, or
        ``kind`` is unknown.

    Examples
    --------
    >>> import torch
    >>> from rebasin.apps.models import MLP
    >>> zoo = [MLP(4, [8], 3).state_dict() for _ in range(3)]
    >>> conn = fit_flow_connection(MLP(4, [8], 3), zoo, n_iter=5, hidden=8)
    >>> path = conn.path(zoo[0], zoo[1])
    >>> torch.equal(path.state_dict_at(1.0)["layers.0.weight"], zoo[1]["layers.0.weight"])
    True
    >>> deep_zoo = [MLP(4, [8, 6], 3).state_dict() for _ in range(2)]
    >>> deep = fit_flow_connection(MLP(4, [8, 6], 3), deep_zoo, n_iter=2, hidden=8)
    >>> deep.layerwise, [f.dim for f in deep.flows]
    (True, [5, 9])
    >>> mid = deep.path(deep_zoo[0], deep_zoo[1], torch.randn(32, 4)).state_dict_at(0.5)
    >>> res = evaluate_path(model, path, test_loader)  # doctest: +SKIP
    """
    layout = _layout(model)
    zoo = _check_zoo(model, states)
    n_iter, batch_size = check_int(n_iter, "n_iter", 0), check_int(batch_size, "batch_size")
    lr = check_float(lr, "lr")
    dev = resolve_device(model, device=device)
    us = [u.to(dev, dtype) for u in _zoo_neurons(layout, zoo)]
    flows = [_new_flow(kind, u, n_layers, hidden, n_blocks, seed + l, dtype).to(dev) for l, u in enumerate(us)]  # noqa: E741 - l is the hidden layer index, as in the layout API
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam([p for f in flows for p in f.parameters()], lr=lr)
    ll_start = sum(_mean_ll(f, u) for f, u in zip(flows, us)) / len(us)
    history = []
    for f in flows:
        f.train()
    for _ in progress_bar(range(n_iter), progress, desc="flow", unit="step"):
        lls = []
        for f, u in zip(flows, us):
            idx = torch.randint(0, len(u), (batch_size,), generator=g).to(dev)
            lls.append(f.log_prob(u[idx]).mean() / u.shape[1])
        ll = torch.stack(lls).sum()
        opt.zero_grad(set_to_none=True)
        (-ll).backward()
        opt.step()
        history.append(float(ll.detach()) / len(us))
    ll_end = sum(_mean_ll(f, u) for f, u in zip(flows, us)) / len(us)
    return FlowConnection(flows, layout, zoo[0], method="flow", history=history, log_likelihood_start=ll_start,
                          log_likelihood_end=ll_end, device=dev, model=_model_copy(layout, model))


def fit_bijection_connection(
    model: nn.Module,
    states: Sequence[State],
    loader: Iterable[Any],
    *,
    kind: str = "realnvp",
    n_layers: int = 4,
    hidden: int = 64,
    n_blocks: int = 8,
    n_iter: int = 300,
    lr: float = 1e-3,
    loss_fn: LossFn | None = None,
    init: FlowConnection | None = None,
    refit_batch: Any = None,
    ridge: float = 1e-6,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> FlowConnection:
    r"""The Bijection connection: :math:`\nu_W` trained so that its paths between zoo networks have low loss.

    .. math::

        \min_W\ \mathbb{E}_{t \sim U(0, 1),\ (A, B)}\ L\big(\psi_W(t; \theta_A, \theta_B)\big),
        \qquad \psi_W = \nu_W^{-1}\big[\cos(\tfrac{\pi t}{2})\,\nu_W(u^A) + \sin(\tfrac{\pi t}{2})\,\nu_W(u^B)\big]

    neuron by neuron. Each Adam step draws an ordered pair of distinct zoo networks and one
    :math:`t \sim U(0, 1)` from a private :class:`torch.Generator`, builds :math:`\psi_W(t)`
    differentiably, runs the *unmodified* model on it (:func:`torch.func.functional_call`) on the
    next batch of ``loader`` and backpropagates the task loss :math:`L` into :math:`W`. The flow
    starts as the per-coordinate standardisation (every layer the identity), i.e. as an arc about
    the zoo's mean neuron, unless ``init`` gives a fitted connection to start from.

    Several hidden layers (a Linear chain of ``L >= 3`` Linear layers): :math:`\psi_W` is the
    layer-wise path of :meth:`FlowConnection.path` with one flow per hidden layer (incoming neurons
    :math:`(w, b)`), the transition layer refit on ``refit_batch``; each step builds that path for
    the drawn pair and backpropagates the task loss at :math:`t` through the moving layer's flow
    *and* through the least-squares refit of the next layer. :math:`t` is drawn uniformly from the
    first ``L - 1`` stages, :math:`t \sim U(0, (L-1)/L)` (in the last stage only the output layer
    moves, on a straight line, and nothing depends on :math:`W`).

    Parameters
    ----------
    model
        Two ``nn.Linear`` layers with parameter-free elementwise ops between them, or a feed-forward
        chain of more Linear layers (traced with torch.fx, no norm layers). Not mutated.
    states
        The zoo: at least 2 trained state_dicts of ``model``. Not mutated.
    loader
        Yields ``(inputs, targets)`` training batches, cycled as needed. Give a shuffling
        loader its own ``generator=`` for a reproducible fit.
    kind, n_layers, hidden, n_blocks
        Flow architecture (ignored when ``init`` is given).
    n_iter
        Adam steps (one pair, one ``t`` and one batch each).
    lr
        Adam learning rate.
    loss_fn
        ``loss_fn(outputs, targets) -> batch mean``; default cross-entropy.
    init
        A :class:`FlowConnection` whose flows (copied) are the starting point.
    refit_batch
        Several hidden layers only: the inputs (or an ``(inputs, targets)`` pair) the transition
        layers are refit on during training; default the first batch of ``loader``. Give the same
        kind of batch to :meth:`FlowConnection.path` afterwards.
    ridge
        Relative ridge of those refits (:func:`rebasin.paths.weight_adjusted_path`).
    seed
        Seeds the flow's initialisation and the pairs and ``t`` drawn.
    dtype, device, progress
        As in :func:`fit_flow_connection`.

    Returns
    -------
    FlowConnection
        ``method == "bijection"``; ``history`` holds the loss of every step.

    Raises
    ------
    RebasinError
        Bad zoo (fewer than 2 networks, mixed architectures, NaN/inf), a model that is neither a
        one-hidden-layer network nor a Linear chain, an unknown ``kind``, an empty loader, or
        ``refit_batch`` given for a one-hidden-layer network.

    Examples
    --------
    >>> import torch
    >>> from rebasin.apps.models import MLP
    >>> zoo = [MLP(4, [8], 3).state_dict() for _ in range(3)]
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> conn = fit_bijection_connection(MLP(4, [8], 3), zoo, data, n_iter=3, hidden=8)
    >>> len(conn.history)
    3
    """
    layout = _layout(model)
    zoo = _check_zoo(model, states)
    n_iter, lr = check_int(n_iter, "n_iter", 0), check_float(lr, "lr")
    dev = resolve_device(model, device=device)
    zoo = [{k: v.to(dev) for k, v in s.items()} for s in zoo]
    us = [u.to(dtype) for u in _zoo_neurons(layout, zoo)]
    if init is not None:
        if not isinstance(init, FlowConnection):
            raise RebasinError(f"init must be a FlowConnection or None, got {type(init).__name__}")
        if init.layout != layout:
            raise RebasinError(f"init was fitted on another architecture ({init.layout}) than model ({layout})")
        flows = [copy.deepcopy(f).to(dev) for f in init.flows]
    else:
        flows = [_new_flow(kind, u, n_layers, hidden, n_blocks, seed + l, dtype).to(dev) for l, u in enumerate(us)]  # noqa: E741 - l is the hidden layer index, as in the layout API
    deep = isinstance(layout, _DeepLayout)
    if refit_batch is not None and not deep:
        raise RebasinError("refit_batch is only used for networks with several hidden layers (the layer-wise path)")
    loss_fn = cross_entropy_of if loss_fn is None else loss_fn
    g = torch.Generator().manual_seed(int(seed))
    net = _model_copy(layout, model)
    ll_start = sum(_mean_ll(f, u) for f, u in zip(flows, us)) / len(us)
    conn = FlowConnection(flows, layout, zoo[0], method="bijection", history=[], log_likelihood_start=ll_start,
                          log_likelihood_end=float("nan"), device=dev, model=net)
    for f in flows:
        f.requires_grad_(True).train()
    opt = torch.optim.Adam([p for f in flows for p in f.parameters()], lr=lr)
    history = []
    batches = cycle_batches(loader, "fit_bijection_connection")
    if deep and n_iter > 0 and refit_batch is None:
        refit_batch = split_batch(next(cycle_batches(loader, "fit_bijection_connection")))[0]
    t_max = (layout.num_hidden / (layout.num_hidden + 1)) if isinstance(layout, _DeepLayout) else 1.0
    for _ in progress_bar(range(n_iter), progress, desc="bijection", unit="step"):
        i, j = torch.randperm(len(zoo), generator=g)[:2].tolist()
        t = t_max * float(torch.rand((), generator=g, dtype=torch.float64))
        x, y = split_batch(next(batches))
        if y is None:
            raise RebasinError("fit_bijection_connection needs (inputs, targets) batches; the loader yielded inputs only")
        if deep:
            state = conn.path(zoo[i], zoo[j], refit_batch, ridge=ridge).stages.state_dict_at(t, differentiable=True)  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
        else:
            state = conn.state_at(zoo[i], zoo[j], t)
        loss = loss_fn(forward_with_state(model, state, to_device(x, dev), eval_mode=True), to_device(y, dev))
        if loss.requires_grad:  # t on a stage end (probability 0): the state does not depend on the flows
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        history.append(float(loss.detach()))
    return FlowConnection(flows, layout, zoo[0], method="bijection", history=history,
                          log_likelihood_start=ll_start,
                          log_likelihood_end=sum(_mean_ll(f, u) for f, u in zip(flows, us)) / len(us),
                          device=dev, model=net)
