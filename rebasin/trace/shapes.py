"""Shapes for the propagation: the traced graph run once on the example input, failures in one line.

:class:`torch.fx.passes.shape_prop.ShapeProp` records each node's output shape, but when a node fails it
prints the whole traceback to stderr and raises a ``RuntimeError`` about fx internals (``ShapeProp error
for: node=%layers_0 ...``) whose own text omits the cause. :func:`record_shapes` runs the same pass without
the print and turns a failure into a :class:`RebasinError` whose first line says which module or function
failed, torch's own message (``mat1 and mat2 shapes cannot be multiplied (4x9 and 8x16)``) and the shapes
and dtypes it was given.

A model built under ``torch.device("meta")`` holds no values, only shapes, and is traced the same way:
:func:`example_for` moves the example input to meta (or builds one from a bare shape) and
:func:`record_shapes` runs the graph with meta as the default device, so no weight or activation is
ever allocated and the spec equals the one of the same model with real weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import ShapeProp

from .._common import describe_tensors, first_line, input_mismatch, to_device
from .._errors import RebasinError
from .state import describe_node

__all__ = ["example_for", "on_meta", "record_shapes"]


def on_meta(model: nn.Module) -> bool:
    """Whether ``model``'s parameters and buffers are meta tensors (shapes without values).

    Raises :class:`RebasinError` when only some of them are: such a model can neither be run nor traced
    on one device.
    """
    state = model.state_dict(keep_vars=True)
    meta = [k for k, v in state.items() if isinstance(v, Tensor) and v.is_meta]
    if meta and len(meta) < len(state):
        real = next(k for k, v in state.items() if not (isinstance(v, Tensor) and v.is_meta))
        raise RebasinError(
            f"{type(model).__name__} has some tensors on meta ({meta[0]!r}) and some with values ({real!r} on "
            f"{state[real].device}); build the whole model under torch.device('meta') or materialise it "
            "(model.to_empty(device=...) and load a state_dict)"
        )
    return bool(meta)


def _is_shape(x: Any) -> bool:
    return isinstance(x, torch.Size) or (
        isinstance(x, tuple) and len(x) > 0 and all(type(v) is int and v >= 0 for v in x)
    )


def example_for(model: nn.Module, example_input: Any) -> tuple[Any, bool]:
    """``example_input`` ready to trace ``model``, and whether ``model`` is on meta.

    A bare shape (a ``torch.Size`` or a tuple of ints, e.g. ``(1, 3, 32, 32)``) becomes one floating tensor of
    that shape in the dtype of the model's first floating entry (float32 if none): a meta tensor for a meta
    model, else standard normal values from a generator seeded with 0 on the model's device. For a meta model,
    every tensor of the example input (CPU, CUDA, ...) is moved to meta; nothing is allocated. For a model whose
    parameters and buffers all live on one device, the example input's tensors are moved there (a CUDA model
    traced from a CPU loader's first batch).
    """
    meta = on_meta(model)
    if _is_shape(example_input):
        state = model.state_dict(keep_vars=True)
        dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
        shape = tuple(example_input)
        if meta:
            return torch.empty(shape, dtype=dtype, device="meta"), True
        device = next((v.device for v in state.values()), torch.device("cpu"))
        gen = torch.Generator().manual_seed(0)
        return torch.randn(shape, generator=gen, dtype=dtype).to(device), False
    if meta:
        return to_device(example_input, torch.device("meta")), True
    # A model on one device traces on that device: a CUDA model's example often comes from a CPU loader.
    devices = {v.device for v in model.state_dict(keep_vars=True).values()}
    inputs = _devices_in(example_input)
    if len(devices) == 1 and inputs - devices and "meta" not in {d.type for d in inputs}:
        return to_device(example_input, devices.pop()), False
    return example_input, False  # a meta input for a real model is refused later, naming both devices


def _devices_in(x: Any) -> set[torch.device]:
    """The devices of the tensors inside (nested) tuples, lists and mappings ``x``."""
    if isinstance(x, torch.Tensor):
        return {x.device}
    if isinstance(x, (tuple, list)):
        return set().union(*(_devices_in(v) for v in x))
    if isinstance(x, Mapping):
        return set().union(*(_devices_in(v) for v in x.values()))
    return set()


class _NodeFailed(Exception):
    def __init__(self, node: Node, error: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__(str(error))
        self.node, self.error, self.args_, self.kwargs_ = node, error, args, kwargs


class _QuietShapeProp(ShapeProp):
    """ShapeProp that hands the failing node and its arguments back instead of printing a traceback.

    A failing call is caught in ``call_module`` / ``call_function`` / ``call_method`` (so ShapeProp's
    ``run_node``, which prints, never sees an exception) and raised again, as :class:`_NodeFailed`,
    once ``run_node`` has returned.
    """

    def __init__(self, gm: GraphModule, meta: bool = False) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # no "While executing ..." appended to the error text
        self._failure: tuple[Exception, tuple[Any, ...], dict[str, Any]] | None = None
        self._meta = meta

    def get_attr(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        value = super().get_attr(target, args, kwargs)
        if self._meta and isinstance(value, Tensor) and not value.is_meta:
            # a tensor the forward built at trace time (torch.ones(9)) is a CPU constant: its meta twin
            return value.to("meta")
        return value

    def run_node(self, n: Node) -> Any:
        self._failure = None
        result = super().run_node(n)
        if self._failure is not None:
            raise _NodeFailed(n, *self._failure)
        return result

    def _guarded(self, call: Any, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return call(target, args, kwargs)
        except Exception as err:  # noqa: BLE001 - reported with the node by run_node
            self._failure = (err, args, kwargs)
            return None

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._guarded(super().call_module, target, args, kwargs)

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._guarded(super().call_function, target, args, kwargs)

    def call_method(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._guarded(super().call_method, target, args, kwargs)


def record_shapes(gm: GraphModule, inputs: Sequence[Any], model_name: str) -> None:
    """Run ``gm`` on ``inputs`` (its placeholders, in order) recording every node's output shape.

    Raises :class:`RebasinError`, first line: the failing module or function, torch's message and what it was
    given, e.g. ``example_input (4, 9) float32 does not run through MLP: layers.0 (Linear) raised RuntimeError:
    mat1 and mat2 shapes cannot be multiplied (4x9 and 8x16); it was given (4, 9) float32 and holds weight
    (16, 8) float32, bias (16,) float32. Pass an input the model accepts (...)``.
    """
    meta = any(t.is_meta for t in gm.state_dict(keep_vars=True).values()) or any(
        isinstance(t, Tensor) and t.is_meta for t in torch.utils._pytree.tree_leaves(list(inputs)))
    prop = _QuietShapeProp(gm, meta)
    try:
        # on meta, tensors the forward creates (torch.zeros(...), torch.arange(...)) are meta too
        with torch.device("meta") if meta else nullcontext():
            prop.propagate(*inputs)
    except _NodeFailed as failed:
        raise RebasinError(_message(gm, failed, inputs, model_name)) from failed.error
    except Exception as err:  # noqa: BLE001 - placeholders, outputs: whatever else fails
        raise RebasinError(
            f"example_input {describe_tensors(list(inputs))} does not run through {model_name}: "
            f"{type(err).__name__}: {first_line(err)}"
        ) from err


def _message(gm: GraphModule, failed: _NodeFailed, inputs: Sequence[Any], model_name: str) -> str:
    node, err = failed.node, failed.error
    where = describe_node(node, gm, model_name)
    given = describe_tensors((failed.args_, failed.kwargs_))
    text = (f"example_input {describe_tensors(list(inputs))} does not run through {model_name}: {where} raised "
            f"{type(err).__name__}: {first_line(err)}; it was given {given}")
    state: dict[str, Tensor] = {}
    if node.op == "call_module":
        module: nn.Module = gm.get_submodule(str(node.target))
        state = dict(module.state_dict(keep_vars=True))
        shown = [f"{k} {describe_tensors(v)}" for k, v in list(state.items())[:4]]
        if shown:
            text += " and holds " + ", ".join(shown) + (", ..." if len(state) > 4 else "")
    prefix = f"{node.target}." if node.op == "call_module" else ""
    owned = {prefix + k: v for k, v in state.items()} or dict(gm.state_dict(keep_vars=True))
    mismatch = input_mismatch(list(inputs), owned)
    if mismatch is not None:
        text += f"; {mismatch.replace('the inputs are', 'example_input is', 1)}"
    return text + ". Pass an input the model accepts (e.g. the first samples of one batch of its loader)."
