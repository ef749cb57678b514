"""Where the permutations are: the bookkeeping of the propagation engine (:mod:`rebasin.trace.engine`).

Every tensor value of the traced graph gets one entry per axis: an :class:`~rebasin.trace.rules.AxisPerm`
(a permutation, possibly acting on blocks) or None. :class:`PermState` holds those entries, the
union-find over permutations that must be equal (two streams added, a module called twice), the
permutation of every axis of every state_dict entry, and the complaints: constructs not provably safe
for some permutations, raised by :func:`rebasin.trace.trace_model` only if those permutations are real (a
permutation merged with ``DEAD`` reaches the model output and is the identity).

The helpers read shapes recorded on the graph (:func:`node_meta`) and follow permuted axes through
reshapes (:func:`reshape_axes`).
"""

from __future__ import annotations

import builtins
import operator
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata

from .._errors import RebasinError
from .ops import UNSUPPORTED_HINT
from .rules import AxisPerm

__all__ = [
    "DEAD",
    "MANUAL",
    "PermState",
    "node_meta",
    "plain_axes",
    "axis_perms",
    "has_nodes",
    "node_leaves",
    "bind_args",
    "target_name",
    "node_site",
    "LIBRARY_DIRS",
    "user_frame",
    "call_site",
    "describe_node",
    "Issue",
    "reshape_axes",
    "static_value",
]

DEAD = 0  # union-find root meaning "must be the identity"
MANUAL = (
    "Pass a manual spec instead: PermutationSpec(axes={key: (perm_or_None, ...)}) with one entry per "
    "state_dict key (see rebasin.PermutationSpec), or change the model."
)


def bind_args(node: Node, names: Sequence[str]) -> dict[str, Any]:
    """Positional and keyword arguments of a call by parameter name (missing ones absent)."""
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def target_name(node: Node, gm: nn.Module) -> str:
    t = node.target
    if node.op == "call_module":
        return f"{t} ({type(gm.get_submodule(t)).__name__})"  # type: ignore[arg-type]  # a call_module target is the submodule name; fx types targets as Callable | str
    if node.op == "call_method":
        return f"Tensor.{t}"
    if callable(t):
        name = getattr(t, "__name__", None)
        if name and getattr(F, name, None) is t:  # F.linear's __module__ is torch._C._nn
            return f"torch.nn.functional.{name}"
        mod = getattr(t, "__module__", None) or ""
        return f"{mod + '.' if mod else ''}{getattr(t, '__name__', repr(t))}"
    return str(t)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in ')
#: Frames in these folders are not the user's code: torch and the tracer itself.
LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def user_frame(filenames_lines: Iterable[tuple[str, int]]) -> tuple[str, int] | None:
    """The innermost ``(file, line)`` of a call stack (outermost first) outside :data:`LIBRARY_DIRS`."""
    found = None
    for f, line in filenames_lines:
        if not f.startswith(LIBRARY_DIRS):
            found = (f, int(line))
    return found


def call_site(depth: int = 1) -> str | None:
    """Where the user's code made the call being recorded, as a one-frame ``node.stack_trace``, or None.

    Walks out from the caller ``depth`` frames up, past torch and the tracer, to the first other frame:
    the line of the model's ``forward`` (or of a library the model's code lives in). Meeting the tracer
    again after torch means no user code made the call (an ``nn.Sequential`` running its children).
    Cheaper than torch.fx's ``record_stack_traces`` (one frame, no formatting).
    """
    f, in_torch = sys._getframe(depth + 1), False
    while f is not None and f.f_code.co_filename.startswith(LIBRARY_DIRS):
        if in_torch and f.f_code.co_filename.startswith(LIBRARY_DIRS[1]):
            return None
        in_torch = in_torch or f.f_code.co_filename.startswith(LIBRARY_DIRS[0])
        f = f.f_back  # type: ignore[assignment]  # inspect.currentframe() is None only on interpreters without frames
    if f is None:
        return None
    return f'File "{f.f_code.co_filename}", line {f.f_lineno}, in {f.f_code.co_name}'


def _short_path(path: str) -> str:
    """``path`` relative to the working directory, or from its package for an installed library."""
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return rel if not rel.startswith("..") else path


def node_site(node: Node) -> tuple[str | None, str | None]:
    """``(module path, "file:line")`` of a graph node, each None when the graph does not record it.

    The module path is the called module of a ``call_module`` node, else the innermost module whose
    ``forward`` made the call (torch.fx's ``nn_module_stack`` meta, which the dynamic recorder writes
    too; ``""`` for the model's own ``forward``). The source line is the innermost frame of the recorded
    stack (``node.stack_trace``) outside torch and the tracer: the line of the user's ``forward``.
    """
    if node.op == "call_module":
        module: str | None = str(node.target)
    else:
        stack = node.meta.get("nn_module_stack")
        module = None if stack is None else (str(list(stack.values())[-1][0]) if stack else "")
    if module is None and node.op in ("call_function", "call_method") and node.stack_trace:
        module = ""
    line = None
    if node.stack_trace:
        hit = user_frame((m.group(1), int(m.group(2))) for m in _FRAME.finditer(node.stack_trace))
        if hit is not None:
            line = f"{_short_path(hit[0])}:{hit[1]}"
    return module, line


_SYMBOLS = {operator.add: "the +", operator.sub: "the -", operator.mul: "the *", operator.truediv: "the /",
            operator.matmul: "the @", operator.getitem: "the indexing [...]", operator.neg: "the unary -",
            operator.iadd: "the +=", operator.imul: "the *=", operator.floordiv: "the //"}


def describe_node(node: Node, gm: nn.Module, model_name: str | None = None) -> str:
    """A node as messages name it: what it calls, the module path and the source line, never the fx node name.

    ``fc2 (Linear, net.py:31)`` for a module call; ``torch.mean in blocks.0.norm (net.py:12)`` for a
    function or method called in a module's ``forward``; ``operator.add in Residual.forward (net.py:40)``
    in the model's own ``forward`` (``model_name``, default the graph module's class name).
    """
    module, line = node_site(node)
    at = f", {line}" if line else ""
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__}{at})"
    what = _SYMBOLS.get(node.target, target_name(node, gm)) if node.op == "call_function" else target_name(node, gm)  # type: ignore[arg-type]  # torch.fx types Node.target as Callable | str; a call_function target is the callable
    if node.op in ("placeholder", "output", "get_attr"):
        what = {"placeholder": f"the model input {node.target!r}", "output": "the model output",
                "get_attr": f"the tensor {node.target!r}"}[node.op]
        return what
    if module is None:
        return f"{what} ({line})" if line else what
    owner = f"{model_name or type(gm).__name__}.forward" if module == "" else module
    return f"{what} in {owner} ({line})" if line else f"{what} in {owner}"


class Issue(NamedTuple):
    """One construct that keeps permutations in place: pinned to the identity (or refused under ``strict``).

    ``module`` is the module path the construct belongs to (``""``: the model's own ``forward``),
    ``where`` the full description (:func:`describe_node`), ``line`` its ``"file:line"`` (or None),
    ``pids`` the permutation handles it touches, ``reason`` why, and ``deliberate`` whether a rule pinned
    them on purpose (:meth:`~rebasin.trace.rules.RuleContext.pin`; kept under ``strict=True``) rather than
    refused what it cannot prove safe.
    """

    module: str
    where: str
    line: str | None
    pids: tuple[int, ...]
    reason: str
    deliberate: bool = False


def node_meta(node: Node) -> Any:
    """Shape tuple for a tensor output, a list for a tuple/list output, None otherwise."""
    def conv(m: Any) -> Any:
        if isinstance(m, TensorMetadata):
            return tuple(int(s) for s in m.shape)
        if isinstance(m, (tuple, list)):
            return [conv(x) for x in m]
        return None
    return conv(node.meta.get("tensor_meta"))


def plain_axes(meta: Any) -> Any:
    if isinstance(meta, tuple):
        return (None,) * len(meta)
    if isinstance(meta, list):
        return [plain_axes(m) for m in meta]
    return None


def axis_perms(st: Any) -> list[AxisPerm]:
    if isinstance(st, tuple):
        return [e for e in st if e is not None]
    if isinstance(st, list):
        return [e for s in st for e in axis_perms(s)]
    return []


def has_nodes(value: Any) -> bool:
    found: list[Node] = []
    map_aggregate(value, lambda a: found.append(a) if isinstance(a, Node) else None)
    return bool(found)


def _prod(xs: Iterable[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


_ARITH = {operator.add: lambda a, b: a + b, operator.sub: lambda a, b: a - b, operator.mul: lambda a, b: a * b,
          operator.floordiv: lambda a, b: a // b, operator.neg: lambda a: -a}


def static_value(value: Any) -> Any:
    """The value of a graph argument computed only from tensor shapes (``x.shape[-1] // h``), else ``value``.

    Shapes were recorded on the example input, so such values are constants of this trace. A value that
    depends on tensor data stays a :class:`~torch.fx.Node`.
    """
    if isinstance(value, (list, tuple)):
        return type(value)(static_value(v) for v in value)
    if not isinstance(value, Node):
        return value
    n = value
    if n.op == "call_method" and n.target == "size":
        shape = node_meta(n.args[0]) if isinstance(n.args[0], Node) else None
        if isinstance(shape, tuple):
            return shape[int(n.args[1])] if len(n.args) > 1 and isinstance(n.args[1], int) else shape
    if n.op == "call_method" and n.target == "dim" and isinstance(node_meta(n.args[0]), tuple):  # type: ignore[arg-type]  # torch.fx types Node.args as the Argument union
        return len(node_meta(n.args[0]))  # type: ignore[arg-type]  # torch.fx types Node.args as the Argument union
    if n.op == "call_function":
        if n.target is builtins.getattr and n.args[1] == "shape" and isinstance(node_meta(n.args[0]), tuple):  # type: ignore[arg-type]  # torch.fx types Node.args as the Argument union
            return node_meta(n.args[0])  # type: ignore[arg-type]  # torch.fx types Node.args as the Argument union
        if n.target is operator.getitem:
            base, idx = static_value(n.args[0]), static_value(n.args[1])
            if isinstance(base, tuple) and isinstance(idx, (int, slice)):
                return base[idx]
        if n.target in _ARITH:
            args = [static_value(a) for a in n.args]
            if all(isinstance(a, int) for a in args):
                return _ARITH[n.target](*args)  # type: ignore[operator]  # _ARITH maps fx targets to their Python operators (an untyped table)
    return value


def node_leaves(value: Any) -> list[Node]:
    found: list[Node] = []
    map_aggregate(value, lambda a: found.append(a) if isinstance(a, Node) else None)
    return found


def reshape_axes(
    src: tuple[int, ...],
    entries: tuple[AxisPerm | None, ...],
    dst: tuple[int, ...],
    size: Callable[[int], int],
    heads: Callable[[AxisPerm, int], AxisPerm | None] | None = None,
    block_of: Callable[[int], tuple[int, int] | None] | None = None,
    block_of_root: Callable[[int], int] = lambda p: p,
) -> tuple[tuple[AxisPerm | None, ...], str | None]:
    """Follow permuted axes through a reshape from ``src`` to ``dst`` (row-major, like torch.view).

    Non-unit axes are grouped into runs with equal products. Within a run a permuted axis of size
    ``n * k`` with leading product ``L`` (of the run's earlier input axes) maps to the output axis
    whose earlier output axes multiply to ``L`` and whose size ``s`` is a multiple of ``n``; it
    becomes a permutation acting on blocks of ``s / n``. A permuted axis of ``n = H * d`` units split
    into two consecutive axes ``(H, d)`` becomes heads: ``heads(entry, d)`` makes the permutation
    structured and returns its outer permutation, which goes on the ``H`` axis, and the ``d`` axis
    gets the inner entry. The reverse, an outer axis followed by the matching inner axis
    (``block_of(pid) -> (outer root, d)``), merges back into the flat permutation. Anything else
    mixes channels.
    """
    out: list[AxisPerm | None] = [None] * len(dst)
    ins = [i for i, s in enumerate(src) if s != 1]
    outs = [j for j, s in enumerate(dst) if s != 1]
    if _prod(src) != _prod(dst):
        return tuple(out), "the reshape changes the number of elements"
    a = b = 0
    while a < len(ins) and b < len(outs):
        gi, go = [ins[a]], [outs[b]]
        pi, po = src[ins[a]], dst[outs[b]]
        a, b = a + 1, b + 1
        while pi != po:
            if pi < po:
                gi.append(ins[a])
                pi *= src[ins[a]]
                a += 1
            else:
                go.append(outs[b])
                po *= dst[outs[b]]
                b += 1
        carried = [(t, entries[i]) for t, i in enumerate(gi) if entries[i] is not None]
        if not carried:
            continue
        if len(carried) == 2 and block_of is not None:
            (t0, e0), (t1, e1) = carried
            info = block_of(e1.pid) if e1.inner and not e0.inner and t1 == t0 + 1 else None  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
            if info is None or info[0] != block_of_root(e0.pid) or src[gi[t1]] != info[1] or e0.k != 1:  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
                return tuple(out), ("it merges two permuted axes into one other than as heads followed by the units "
                                    "inside them, which mixes channels")
            merged = AxisPerm(e1.pid)  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
            t = t0
            lead = _prod(src[i] for i in gi[:t])
            for u, j in enumerate(go):
                if _prod(dst[jj] for jj in go[:u]) == lead and dst[j] % size(merged.pid) == 0:
                    out[j] = AxisPerm(merged.pid, dst[j] // size(merged.pid))
                    break
            else:
                return tuple(out), "it merges attention heads into an axis that mixes them with other axes"
            continue
        if len(carried) > 1:
            return tuple(out), "it merges two permuted axes into one"
        t, e = carried[0]
        if e.inner:  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
            return tuple(out), "it reshapes the units inside attention heads without their head axis"
        n = size(e.pid)  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
        lead = _prod(src[i] for i in gi[:t])
        placed = False
        for u, j in enumerate(go):
            if _prod(dst[jj] for jj in go[:u]) == lead and dst[j] % n == 0:
                out[j] = AxisPerm(e.pid, dst[j] // n)  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
                placed = True
                break
        if not placed and heads is not None and e.k == 1:  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
            for u, j in enumerate(go[:-1]):
                jn = go[u + 1]
                if _prod(dst[jj] for jj in go[:u]) == lead and dst[j] * dst[jn] == n:
                    outer = heads(e, dst[jn])  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
                    if outer is None:
                        return tuple(out), f"it splits {n} permuted units into heads of {dst[jn]} that cannot be permuted"
                    out[j], out[jn] = outer, AxisPerm(e.pid, 1, True)  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
                    placed = True
                    break
        if not placed:
            return tuple(out), (f"the reshape {tuple(src)} -> {tuple(dst)} splits or merges the permuted axis "
                                "in a way that mixes channels")
    return tuple(out), None


class PermState:
    """The permutation entries of every graph value and state_dict entry, with union-find and complaints."""

    def __init__(self, gm: GraphModule, tensors: Mapping[str, Tensor], model_name: str | None = None) -> None:
        self.gm = gm
        self.model_name = model_name
        self.tensors = tensors
        self.parent: list[int] = [DEAD]
        self.size: list[int] = [0]
        self.state: dict[Node, Any] = {}
        self.param_key: dict[Node, str] = {}
        self.key_axes: dict[str, list[int | None]] = {}
        self.key_blocks: dict[tuple[str, int], int] = {}
        self.complaints: list[Issue] = []
        self.opaque: list[tuple[Node | str, str]] = []  # (where a parameter was used as data, its key)
        self.born: dict[int, Node | str] = {}  # every permutation new_perm made -> the node that made it
        self.consumers: list[tuple[Node, int, int]] = []
        self.created: dict[int, tuple[Node, int]] = {}
        self.reshapes: set[Node] = set()
        self.struct: dict[int, tuple[int, int]] = {}  # root -> (outer pid, block): heads / groups
        self.concat_def: dict[int, list[tuple[int | None, int]]] = {}  # root -> parts (pid or None, size)
        self.key_grouped: dict[tuple[str, int], int] = {}
        self.key_inner: dict[tuple[str, int], int] = {}  # (key, axis) -> the value class inside its blocks
        self.param_views: dict[Node, str] = {}  # expand(...) of a parameter -> its key

    # ---- union-find
    def find(self, p: int) -> int:
        root = p
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[p] != root:
            self.parent[p], p = root, self.parent[p]
        return root

    def union(self, a: int, b: int) -> bool:
        """Merge two permutations (with their structure and concatenation definitions); False on a conflict."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if DEAD not in (ra, rb) and self.size[ra] != self.size[rb]:
            return False
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        if lo == DEAD:
            self.kill(hi)
            return True
        ok = True
        ca, cb = self.concat_def.pop(lo, None), self.concat_def.pop(hi, None)
        if ca is not None and cb is not None:
            if [n for _, n in ca] != [n for _, n in cb]:
                return False
            for (pa, _), (pb, _) in zip(ca, cb):
                if (pa is None) != (pb is None):
                    ok = False
                elif pa is not None:
                    ok = self.union(pa, pb) and ok  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
        if ca is not None or cb is not None:
            self.concat_def[lo] = ca if ca is not None else cb  # type: ignore[assignment]  # Optional narrowed by earlier logic mypy cannot follow
        sa, sb = self.struct.pop(lo, None), self.struct.pop(hi, None)
        if sa is not None and sb is not None:
            if sa[1] != sb[1]:
                ok = False
            else:
                ok = self.union(sa[0], sb[0]) and ok
        if sa is not None or sb is not None:
            self.struct[lo] = sa if sa is not None else sb  # type: ignore[assignment]  # Optional narrowed by earlier logic mypy cannot follow
        if lo in self.struct and lo in self.concat_def:
            ok = False  # a structured concatenation: not expressible
        return ok

    def kill(self, root: int) -> None:
        """``root`` was merged with DEAD (it reaches the output): the parts of its concatenation are the identity too."""
        for part, _ in self.concat_def.pop(root, []):
            if part is not None:
                self.union(part, DEAD)
        st = self.struct.pop(root, None)
        if st is not None:  # its blocks stay in place, so the outer permutation (shared by others) is the identity
            self.union(st[0], DEAD)

    def dead(self, pid: int) -> bool:
        """True when ``pid`` is the identity: merged with DEAD, or structured with an outer permutation that is."""
        r = self.find(pid)
        if r == DEAD:
            return True
        if r in self.concat_def:
            return all(p is None or self.dead(p) for p, _ in self.concat_def[r])
        st = self.struct.get(r)
        return st is not None and self.find(st[0]) == DEAD

    def structure(self, node: Node | str, e: AxisPerm, block: int, outer: AxisPerm | None = None) -> AxisPerm | None:
        """Make ``e``'s permutation move whole blocks of ``block`` units (heads, groups); return its outer permutation.

        ``outer`` is the outer permutation to share (e.g. a grouped layer's input groups); a new one is made
        when ``e`` has none. None (after a complaint naming ``node``) when the structure conflicts with one
        ``e`` already has (another block size: nested groups) or ``e`` is a concatenation.
        """
        r = self.find(e.pid)
        n = self.size[r]
        if e.k != 1 or block < 1 or n % block or r == DEAD:
            if r != DEAD:
                self.complain(node, [e.pid], f"its {n} units cannot be split into blocks of {block}")
            return None
        if r in self.concat_def:
            self.complain(node, [e.pid], "it splits a concatenation of permutations into heads or groups")
            return None
        cur = self.struct.get(r)
        if cur is not None:
            if cur[1] != block:
                self.complain(node, [e.pid], f"it groups units in blocks of {block}, but they are already grouped "
                              f"in blocks of {cur[1]} (nested groups are not supported)")
                return None
            if outer is not None and not self.union(cur[0], outer.pid):
                self.complain(node, [e.pid, outer.pid], "two groupings of different sizes meet")
                return None
            return AxisPerm(cur[0])
        if n // block == 1 and outer is None:
            return None  # one block: nothing to permute between blocks
        if outer is None:
            self.parent.append(len(self.parent))
            self.size.append(n // block)
            outer = AxisPerm(len(self.parent) - 1)
        elif self.size[self.find(outer.pid)] != n // block or self.find(outer.pid) in self.struct:
            self.complain(node, [e.pid, outer.pid], "the grouping does not match the groups it must share")
            return None
        self.struct[r] = (outer.pid, block)
        return AxisPerm(outer.pid)

    def block_of(self, pid: int) -> int | None:
        st = self.struct.get(self.find(pid))
        return None if st is None else st[1]

    def outer_of(self, pid: int) -> int | None:
        st = self.struct.get(self.find(pid))
        return None if st is None else st[0]

    def new_concat(self, node: Node | str, parts: Sequence[tuple[AxisPerm | None, int]]) -> AxisPerm | None:
        """The permutation of a concatenation along the feature axis: the block union of ``parts`` ((perm or None, size))."""
        clean: list[tuple[int | None, int]] = []
        for e, n in parts:
            if e is not None and (e.k != 1 or e.inner):
                self.complain(node, [e.pid], "it concatenates a permuted axis that is blocked (flattened) or split "
                              "into heads")
                return None
            if e is not None and self.find(e.pid) in self.concat_def:  # flatten nested concatenations
                clean.extend(self.concat_def[self.find(e.pid)])
            else:
                clean.append((None if e is None else e.pid, int(n)))
        if all(p is None for p, _ in clean):
            return None
        if len(clean) == 1:
            return AxisPerm(clean[0][0])  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
        self.parent.append(len(self.parent))
        self.size.append(sum(n for _, n in clean))
        pid = len(self.parent) - 1
        self.concat_def[pid] = clean
        return AxisPerm(pid)

    def split_concat(self, node: Node | str, e: AxisPerm, sizes: Sequence[int]) -> list[AxisPerm | None] | None:
        """Split ``e``'s permutation into consecutive parts of ``sizes`` (its concatenation, made if needed)."""
        r = self.find(e.pid)
        if e.k != 1 or e.inner or r in self.struct:
            self.complain(node, [e.pid], "it splits a permuted axis that is blocked, grouped or split into heads")
            return None
        cur = self.concat_def.get(r)
        if cur is None:
            fresh: list[AxisPerm | None] = []
            for n in sizes:
                self.parent.append(len(self.parent))
                self.size.append(int(n))
                fresh.append(AxisPerm(len(self.parent) - 1) if n > 1 else None)
            self.concat_def[r] = [(None if f is None else f.pid, int(n)) for f, n in zip(fresh, sizes)]
            return fresh
        out: list[AxisPerm | None] = []
        i = 0
        for n in sizes:
            got, acc = [], 0
            while acc < n and i < len(cur):
                got.append(cur[i])
                acc += cur[i][1]
                i += 1
            if acc != n:
                self.complain(node, [e.pid], f"it splits a concatenation of sizes {[m for _, m in cur]} at other "
                              f"boundaries ({list(sizes)})")
                return None
            out.append(self.new_concat(node, [(None if p is None else AxisPerm(p), m) for p, m in got]))
        return out

    def unify(self, node: Node | str, perms: Sequence[AxisPerm | None], what: str) -> AxisPerm | None:
        """One permutation for streams that must carry the same one (``what`` names them in a complaint).

        Permuted entries are merged; with an unpermuted entry among them the merged permutation is pinned
        to the identity (reported; None is returned). None also, after a complaint, when they cannot be merged (different
        sizes, blocks or structures).
        """
        live = [e for e in perms if e is not None]
        if not live:
            return None
        if any(e.k != live[0].k or e.inner != live[0].inner for e in live):
            self.complain(node, [e.pid for e in live], f"{what} carry permutations acting on different blocks")
            return None
        for e in live[1:]:
            if not self.union(live[0].pid, e.pid):
                self.complain(node, [e.pid for e in live], f"{what} must carry one permutation, but theirs differ "
                              "in size or in their head / group structure")
                return None
        if len(live) < len(perms):  # the identity: pinned (reported) when tracing ends
            self.pin(node, [live[0].pid], f"{what} must carry one permutation, and one of them is not permuted")
            return None
        return live[0]

    def new_perm(self, n: int, node: Node, axis: int | None) -> AxisPerm | None:
        """A new permutation of ``n`` units, living on ``axis`` of ``node``'s output (None: inside a module)."""
        if n <= 1:
            return None
        self.parent.append(len(self.parent))
        self.size.append(int(n))
        pid = len(self.parent) - 1
        self.born[pid] = node
        if axis is not None:
            self.created[pid] = (node, axis)
        return AxisPerm(pid)

    def perm_size(self, e: AxisPerm) -> int:
        return self.size[self.find(e.pid)]

    # ---- bookkeeping
    def where(self, node: Node) -> str:
        """The node as messages name it: module path and source line (:func:`describe_node`)."""
        return describe_node(node, self.gm, self.model_name)

    def complain(self, node: Node | str, pids: Iterable[int], reason: str, *, deliberate: bool = False) -> None:
        """Record that ``node`` keeps ``pids`` in place: they are pinned to the identity (with everything unified
        with them) when tracing ends, or refused under ``strict=True`` unless ``deliberate`` (see :class:`Issue`)."""
        pids = tuple(pids)
        if not pids:
            return
        if isinstance(node, str):
            self.complaints.append(Issue(node, node, None, pids, reason, deliberate))
            return
        module, line = node_site(node)
        self.complaints.append(Issue(module or "", self.where(node), line, pids, reason, deliberate))

    def pin(self, node: Node | str, pids: Iterable[int], reason: str) -> None:
        """Pin ``pids`` to the identity on purpose (a rule knows they cannot move); reported, kept under strict."""
        self.complain(node, pids, reason, deliberate=True)

    def arg(self, node: Node, a: Any) -> Any:
        """State of an argument used as data (a parameter used this way is recorded as opaque)."""
        if not isinstance(a, Node):
            return None
        if a in self.param_key:
            self.opaque.append((node, self.param_key[a]))
        return self.state.get(a)

    def assign(self, node: Node | str, key: str, entries: Sequence[AxisPerm | None],
               groups: Mapping[int, int] | None = None, inner: Mapping[int, AxisPerm] | None = None) -> None:
        """Record the permutations on the axes of ``key`` (``groups``: {axis: g} for a grouped layer's weight;
        ``inner``: {axis: v} for a blocked axis whose blocks' units take ``v``'s inner permutations)."""
        for axis, g in (groups or {}).items():
            self.key_grouped[(key, axis)] = int(g)
        for axis, v in (inner or {}).items():
            self.key_inner[(key, axis)] = v.pid
        t = self.tensors[key]
        if len(entries) != t.ndim:
            raise RebasinError(f"internal error: {key!r} has shape {tuple(t.shape)} but got axes {entries}")
        for i, e in enumerate(entries):
            if e is not None and e.inner:
                self.complain(node, [e.pid], f"parameter {key!r} (axis {i}) is used on the units inside attention "
                              "heads; per-head parameters are not supported")
                entries = list(entries)
                entries[i] = None
        cur = self.key_axes.get(key)
        if cur is None:
            self.key_axes[key] = [None if e is None else e.pid for e in entries]
            for i, e in enumerate(entries):
                if e is not None and e.k > 1:
                    self.key_blocks[(key, i)] = e.k
            return
        for i, e in enumerate(entries):
            a, k_old = cur[i], self.key_blocks.get((key, i), 1)
            if a is None and e is None:
                continue
            if a is None or e is None:
                pid = a if a is not None else e.pid  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
                self.complain(node, [pid], f"parameter {key!r} (axis {i}) is used both with and without a "
                              "permutation (a module called twice or a shared weight)")
                if a is None:
                    cur[i] = pid
                    if e.k > 1:  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
                        self.key_blocks[(key, i)] = e.k  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
                continue
            if not self.union(a, e.pid) or k_old != e.k:
                self.complain(node, [a, e.pid], f"parameter {key!r} (axis {i}) is used with two permutations "
                              "of different sizes (a module called twice or a shared weight)")

    def key_of(self, a: Any) -> str | None:
        return self.param_key.get(a) if isinstance(a, Node) else None

    @staticmethod
    def shape_of(a: Any) -> Any:
        return node_meta(a) if isinstance(a, Node) else None

    def verify(self, node: Node, st: Any) -> Any:
        meta = node_meta(node)
        if isinstance(st, tuple):
            if not isinstance(meta, tuple) or len(meta) != len(st):
                if axis_perms(st):
                    raise RebasinError(f"spec_from_model lost track of the tensor axes at {self.where(node)} "
                                       f"(shape {meta}, axes {st}). {MANUAL}")
                return plain_axes(meta)
            st = tuple(None if e is not None and self.find(e.pid) == DEAD else e for e in st)  # made the identity
            outers = {self.find(x.pid) for x in st if x is not None and not x.inner}
            for ax, e in enumerate(st):
                if e is not None and e.inner:
                    info = self.struct.get(self.find(e.pid))
                    if info is None or meta[ax] != info[1] or self.find(info[0]) not in outers:
                        self.complain(node, [e.pid], "the units inside attention heads are separated from their "
                                      "head axis (e.g. one head was selected)")
                        st = st[:ax] + (None,) + st[ax + 1:]
                    continue
                if e is not None and meta[ax] != self.size[self.find(e.pid)] * e.k:
                    raise RebasinError(
                        f"spec_from_model lost track of a permutation at {self.where(node)}: axis {ax} has size "
                        f"{meta[ax]} but the permutation acting on it has size {self.size[self.find(e.pid)]}"
                        f"{f' x block {e.k}' if e.k > 1 else ''}. {MANUAL}")
            return st
        if isinstance(st, list) and isinstance(meta, list) and len(st) == len(meta):
            return [self.verify_leaf(node, s, m) for s, m in zip(st, meta)]
        if axis_perms(st):
            raise RebasinError(f"spec_from_model lost track of the tensor axes at {self.where(node)}. {MANUAL}")
        return plain_axes(meta)

    def verify_leaf(self, node: Node, st: Any, meta: Any) -> Any:
        if isinstance(st, tuple) and isinstance(meta, tuple) and len(st) == len(meta):
            return tuple(None if e is not None and self.find(e.pid) == DEAD else e for e in st)
        if isinstance(st, list) and isinstance(meta, list) and len(st) == len(meta):  # nested: LSTM's (h_n, c_n)
            return [self.verify_leaf(node, s, m) for s, m in zip(st, meta)]
        if axis_perms(st):
            raise RebasinError(f"spec_from_model lost track of the tensor axes at {self.where(node)}. {MANUAL}")
        return plain_axes(meta)

    def unknown(self, node: Node, reason: str | None = None) -> Any:
        pids: list[int] = []
        for a in node.all_input_nodes:
            pids += [e.pid for e in axis_perms(self.arg(node, a))]
        if reason is None:
            hint = UNSUPPORTED_HINT.get(node.target) if node.op == "call_function" else None  # type: ignore[arg-type]  # torch.fx types Node.target as Callable | str; a call_function target is the callable
            reason = hint or f"{target_name(node, self.gm)} is not an operation the tracer knows to be safe"
        self.complain(node, pids, reason)
        return plain_axes(node_meta(node))
