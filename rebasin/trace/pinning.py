"""Pin, don't refuse: what the tracer does with the constructs it cannot prove safe for a permutation.

During propagation every construct that keeps a permutation in place (a residual on the model input,
an op or module without a rule, a reduction over the permuted axis, a reshape that mixes channels) is
recorded as an :class:`~rebasin.trace.state.Issue` (:meth:`PermState.complain
<rebasin.trace.state.PermState.complain>`); a rule that knows some units cannot move records a
deliberate one (:meth:`RuleContext.pin <rebasin.trace.rules.RuleContext.pin>`). When the graph is done,
:func:`resolve_pins` visits them, deliberate pins first, then in graph order: an issue whose permutations
are all the identity already (they reach the model output, or an earlier pin took them) is moot;
otherwise its permutations are merged with the identity, and with them everything unified with them (the residual stream they
belong to, the parts of a concatenation, the heads of a structured permutation). The identity is always
a valid element, so pinning never breaks functional equivalence; the rest of the model stays permutable.
Under ``strict=True`` the first live issue that is not deliberate raises :class:`RebasinError` instead.

Weights the forward pass reads but no rule gave axes to (a parameter used as opaque data) are pinned
units too. Everything pinned is reported in one :class:`~rebasin.RebasinWarning`, grouped by the module
whose units were pinned, with the module path and source line of the construct and the reason, and
counted in :class:`~rebasin.spec.SpecCoverage` (``spec.coverage``).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable

from torch import nn
from torch.fx import Node

from .._errors import RebasinError, RebasinWarning
from ..spec.core import Pin, SpecCoverage
from .state import DEAD, MANUAL, Issue, PermState, node_site

__all__ = ["resolve_pins", "live_units", "perm_names", "pin_message"]

_SHOWN = 24  # lines of the warning listing pinned modules; the rest is in spec.coverage.pins


def live_units(prop: PermState, pid: int) -> int:
    """How many of ``pid``'s units may still move (0 once it is the identity; the live parts of a concatenation)."""
    r = prop.find(pid)
    if r == DEAD:
        return 0
    if r in prop.concat_def:
        return sum(live_units(prop, p) for p, _ in prop.concat_def[r] if p is not None)
    st = prop.struct.get(r)
    if st is not None and prop.find(st[0]) == DEAD:
        return 0
    return prop.size[r]


def perm_names(prop: PermState, live: list[int]) -> dict[int, str]:
    """Names of the live roots: ``P#`` for permutations, ``C#`` for concatenations, ``H#`` for outer
    (head / group) permutations that act on no axis of their own."""
    on_axes = {prop.find(p) for cur in prop.key_axes.values() for p in cur if p is not None}
    outers = {prop.find(o) for o, _ in prop.struct.values()}
    names: dict[int, str] = {}
    counters = {"P": 0, "C": 0, "H": 0}
    for r in live:
        kind = "C" if r in prop.concat_def else "H" if r in outers and r not in on_axes else "P"
        names[r] = f"{kind}{counters[kind]}"
        counters[kind] += 1
    return names


def _module_of(node: Node | str) -> str:
    if isinstance(node, str):
        return node
    return node_site(node)[0] or ""


def _strict_error(prop: PermState, issue: Issue, live: list[int]) -> RebasinError:
    roots = sorted({prop.find(p) for p in range(1, len(prop.parent))} - {DEAD})
    names = perm_names(prop, roots)
    hit = sorted({names[prop.find(p)] for p in live if prop.find(p) in names})
    return RebasinError(
        f"spec_from_model(strict=True) cannot prove {issue.where} safe for permutation(s) {hit}: {issue.reason}. Without strict=True those units are pinned to the identity and the rest "
        f"of the model stays permutable; or register a rule (rebasin.register_module). {MANUAL}")


def _opaque_issues(prop: PermState) -> list[Issue]:
    out = []
    for node, key in prop.opaque:
        pids = tuple(p for p in prop.key_axes.get(key, []) if p is not None)
        if not pids:
            continue
        module, line = (node, None) if isinstance(node, str) else node_site(node)
        out.append(Issue(module or "", node if isinstance(node, str) else prop.where(node), line, pids,
                         f"it uses the parameter {key!r} as data the tracer does not understand (e.g. a transposed "
                         "or shared weight)"))
    return out


def _unclaimed(model: nn.Module, prop: PermState) -> dict[str, tuple[list[str], int]]:
    """Modules whose weights the forward pass reads but no rule gave axes to: ``{path: (leaves, units)}``.

    A weight (a floating parameter with two or more axes) that some rule assigned is fine even when all its
    permutations are the identity. One no rule assigned was only read as opaque data (or by an op that
    touched no permutation): its units (its first axis, PyTorch's output axis) stay in place. Weights the
    forward pass never reads are not reported.
    """
    called = [f"{n.target}." for n in prop.gm.graph.nodes if n.op == "call_module"]
    read = set(prop.param_key.values())
    seen: set[int] = set()
    found: dict[str, tuple[list[str], int]] = {}
    for mod_name, mod in model.named_modules():
        for leaf, p in mod.named_parameters(recurse=False):
            key = f"{mod_name}.{leaf}" if mod_name else leaf
            if id(p) in seen or key in prop.key_axes or p.ndim < 2 or not p.is_floating_point():
                continue
            if key not in read and not any(key.startswith(c) for c in called):
                continue  # never used by the forward pass: nothing to align
            seen.add(id(p))
            leaves, units = found.get(mod_name, ([], 0))
            found[mod_name] = (leaves + [leaf], max(units, int(p.shape[0])))
    return found


def resolve_pins(prop: PermState, model: nn.Module, strict: bool) -> SpecCoverage:
    """Pin (or, under ``strict``, refuse) every live issue of ``prop``; warn once; return the coverage.

    Must run after the whole graph is propagated (permutations reaching the output are the identity
    by then, and their issues are moot).
    """
    born = {pid: _module_of(node) for pid, node in prop.born.items()}
    now = {pid: live_units(prop, pid) for pid in born}
    free = {pid: n for pid, n in now.items() if n}  # hidden units before pinning (output units excluded)
    pins: list[Pin] = []
    issues = prop.complaints + _opaque_issues(prop)
    # deliberate pins first: a rule's statement holds whatever else happens, so refusals of units it pinned are moot
    for issue in [i for i in issues if i.deliberate] + [i for i in issues if not i.deliberate]:
        live = [p for p in issue.pids if not prop.dead(p)]
        if not live:
            continue
        if strict and not issue.deliberate:
            raise _strict_error(prop, issue, live)
        for p in issue.pids:
            prop.union(p, DEAD)
        hit: dict[str, int] = {}
        for pid, n in list(now.items()):
            if n:
                left = live_units(prop, pid)
                if left < n:
                    hit[born[pid]] = hit.get(born[pid], 0) + n - left
                    now[pid] = left
        for module, units in (hit or {issue.module: 0}).items():
            pins.append(Pin(module, units, issue.where, issue.line, issue.reason))
    modules: dict[str, list[int]] = {}
    for pid, n in free.items():
        row = modules.setdefault(born[pid], [0, 0])
        row[0] += now[pid]
        row[1] += n - now[pid]
    for module, (leaves, units) in _unclaimed(model, prop).items():
        pins.append(Pin(module, units, "", None, f"no rule gave permutations to its weights ({', '.join(leaves)}), "
                        "so its units stay in place; register a rule for the module (rebasin.register_module)"))
        modules.setdefault(module, [0, 0])[1] += units
    coverage = SpecCoverage({m: (a, b) for m, (a, b) in modules.items()}, tuple(pins), type(model).__name__)
    if pins:
        warnings.warn(pin_message(coverage), RebasinWarning, stacklevel=_outside_rebasin())
    return coverage


def _outside_rebasin() -> int:
    """The ``stacklevel`` of the caller's first frame outside the rebasin package (the user's call)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    f, level = sys._getframe(1), 1
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(package):
        f, level = f.f_back, level + 1  # type: ignore[assignment]  # inspect.currentframe() is None only on interpreters without frames
    return level


def pin_message(coverage: SpecCoverage) -> str:
    """The one warning about pinned units: grouped by the module whose units are pinned, with causes and lines."""
    lines: list[str] = []
    groups: dict[str, list[Pin]] = {}
    for pin in coverage.pins:
        groups.setdefault(pin.module, []).append(pin)
    for module, group in groups.items():
        units = sum(p.units for p in group)
        causes = _unique(f"{p.where}: {p.reason}" if p.where else p.reason for p in group)
        head = f"{coverage.label(module)}: {units} unit(s) pinned" if units else f"{coverage.label(module)}"
        lines.append(f"  - {head}: " + "; ".join(causes))
    shown = lines[:_SHOWN] + ([f"  ... and {len(lines) - _SHOWN} more module(s) (see spec.coverage.pins)"]
                              if len(lines) > _SHOWN else [])
    text = (f"spec_from_model pinned {coverage.pinned} hidden unit(s) to the identity (they stay in place); "
            f"{coverage.permutable} stay permutable. strict=True refuses instead. Pinned:\n" + "\n".join(shown))
    if coverage.permutable == 0:
        text += ("\nNothing is left to permute: alignment has nothing to align. Register rules for the modules "
                 "above (rebasin.register_module) or pass a manual PermutationSpec.")
    return text


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
