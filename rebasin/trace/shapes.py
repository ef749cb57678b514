"""Shapes for the propagation: the traced graph run once on the example input, failures in one line.

:class:`torch.fx.passes.shape_prop.ShapeProp` records each node's output shape, but when a node fails it
prints the whole traceback to stderr and raises a ``RuntimeError`` about fx internals (``ShapeProp error
for: node=%layers_0 ...``) whose own text omits the cause. :func:`record_shapes` runs the same pass without
the print and turns a failure into a :class:`RebasinError` whose first line says which module or function
failed, torch's own message (``mat1 and mat2 shapes cannot be multiplied (4x9 and 8x16)``) and the shapes
and dtypes it was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import ShapeProp

from .._common import describe_tensors, first_line, input_mismatch
from .._errors import RebasinError
from .state import target_name

__all__ = ["record_shapes"]


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

    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # no "While executing ..." appended to the error text
        self._failure: tuple[Exception, tuple[Any, ...], dict[str, Any]] | None = None

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
    prop = _QuietShapeProp(gm)
    try:
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
    where = target_name(node, gm)
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
