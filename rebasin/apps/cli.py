"""The ``rebasin`` command line: ``demo``, ``landscape``, ``align``, ``path``, ``merge`` and ``cl``.

Every subcommand has ``--help``, with a line for every option. ``align`` aligns B to A with any registered
matcher and saves B's aligned state_dict (and, with ``--save-perms``, the permutations); ``path`` evaluates
the linear path (with the BatchNorm statistics reset for BN nets, optionally REPAIR and a trained Bezier
curve) and writes ``results.json`` in the demo's format and a figure; ``merge`` merges two or more
checkpoints into one basin, optionally with REPAIR. ``align`` and ``merge`` also take Hugging Face model folders
(what ``save_pretrained`` writes) without ``--model`` and write a folder ``from_pretrained`` loads
(:mod:`rebasin.apps.folders`).

Bad input — an unknown method, a missing or unreadable checkpoint, architectures that do not match, a
factory that cannot be imported or returns something other than a loader, a first batch the model cannot
run on, an output path that cannot be written, a model in which tracing leaves nothing to permute
(``align``) — ends with a one-line error and exit status 2, checked before any alignment, evaluation or
training runs (:mod:`rebasin.apps._cli_inputs`). ``align`` and ``merge`` print the traced spec's coverage
(hidden units permutable vs pinned to the identity); ``--strict`` refuses what would be pinned.
``--symmetry signed|orthogonal`` (``align``, ``merge``) aligns by signed permutations or orthogonal maps where
the model admits them, and refuses with the reason what cannot be done (:mod:`rebasin.apps._cli_symmetry`).

Methods come from the matcher registry (:func:`rebasin.register_matcher`): ``rebasin align --help``
lists every registered matcher with its description, and ``--matcher-module package.module`` (``align``,
``merge`` and ``demo``, repeatable) imports a module of yours before anything else, so the matchers it
registers can be named with ``--method`` / ``--methods``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from .._errors import RebasinError
from ..matching.registry import get_matcher, matcher_names
from ._cli_inputs import (
    EXAMPLE_DTYPES,
    build_model,
    check_output_dir,
    check_output_file,
    example_input,
    float_ids_error,
    has_batchnorm,
    importable_from_cwd,
    load_state,
    loader_from,
    model_from,
)
from ._cli_symmetry import SYMMETRIES, SYMMETRY_HELP, symmetry_method
from .demo import (
    demo_methods,
    device_from_name,
    run_demo,
    run_landscape,
    save_paths_figure,
)
from .folders import align_folders, any_folder, merge_folders

__all__ = ["build_parser", "import_matcher_modules", "main"]

#: Subcommands that take ``--matcher-module`` (the ones that run matchers by name).
_MATCHER_COMMANDS = ("align", "demo", "merge")


# --------------------------------------------------------------------------- matchers
def import_matcher_modules(names: Sequence[str]) -> None:
    """Import each module named in ``names`` so that its :func:`rebasin.register_matcher` calls run.

    Raises
    ------
    RebasinError
        A module that cannot be imported (or fails while importing), named with the cause.
    """
    for name in names:
        try:
            with importable_from_cwd():
                importlib.import_module(name)
        except RebasinError as exc:
            raise RebasinError(f"--matcher-module {name!r} failed to register its matchers: {exc}") from exc
        except Exception as exc:  # any failure of the user's module is one user error
            raise RebasinError(
                f"cannot import --matcher-module {name!r} ({type(exc).__name__}: {exc}); it must be an importable "
                "module (on PYTHONPATH) that calls rebasin.register_matcher"
            ) from exc


def _matcher_modules_in(argv: Sequence[str]) -> list[str]:
    """The ``--matcher-module`` values of a command line (read before the parser is built)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--matcher-module", action="append", default=[])
    known, _ = pre.parse_known_args(list(argv))
    return known.matcher_module


def _methods_help() -> str:
    """Every registered matcher with its description, one per line (for ``--method``)."""
    names = matcher_names()
    width = max(map(len, names), default=0)
    lines = [f"a registered matcher (default weight_matching); {len(names)} registered:"]
    for name in names:
        matcher = get_matcher(name)
        data = " [needs --data]" if matcher.needs_data else " [reads --data if given]" if matcher.uses_data else ""
        lines.append(f"  {name:<{width}}  {matcher.description}{data}")
    lines.append("add your own with --matcher-module")
    return "\n".join(lines).replace("%", "%%")


# --------------------------------------------------------------------------- align / path / merge
def _device(args: argparse.Namespace) -> torch.device:
    return device_from_name(args.device)


def _spec(args: argparse.Namespace, model: torch.nn.Module, first_inputs: Any, *, need_perms: bool) -> Any:
    """``spec_from_model`` on ``--example-shape`` (of ``--example-dtype``) when given, else on the first two
    inputs of ``--data``; ``--strict`` refuses what would be pinned, and the spec's coverage is printed.

    With ``need_perms`` a spec in which nothing is left to permute is a :class:`RebasinError` (exit 2): there is
    nothing to align.

    The ``--example-shape`` input is drawn from a generator seeded by ``--seed``, never from the global RNG
    (``main`` may run inside a caller's process). A model that takes token ids and was given a floating
    input fails with torch's "Expected tensor for argument #1 'indices'"; the error then says how to give
    integer inputs.
    """
    from ..trace.tracing import spec_from_model

    example = _example(args, model, first_inputs)
    try:
        spec = spec_from_model(model, example, strict=args.strict)
    except (RebasinError, RuntimeError) as exc:
        hint = float_ids_error(exc, type(model).__name__, args.example_shape, args.example_dtype)
        if hint is None:
            raise
        raise hint from exc
    if spec.coverage is not None:
        _print(spec.coverage.summary())
    if need_perms and not spec.perms:
        raise RebasinError(
            f"nothing to align: tracing {type(model).__name__} left no permutation (every hidden unit is pinned "
            "to the identity or reaches the output; the warning above names the modules and lines). Register "
            "layer rules for them in the --model factory's module (rebasin.register_module)")
    return spec


def _example(args: argparse.Namespace, model: torch.nn.Module, first_inputs: Any) -> Any:
    """The input the model is traced on: ``--example-shape`` (seeded by ``--seed``) or the first inputs of ``--data``."""
    if args.example_shape is not None:
        return example_input(args.example_shape, args.example_dtype, model, args.seed)
    if first_inputs is None:
        raise RebasinError("pass --example-shape (e.g. 1,3,32,32) or --data, so the model can be traced")
    return first_inputs


def _checkpoint_output(path: str) -> Path:
    """``-o``: a writable file whose extension names a checkpoint format (checked before any work)."""
    from ..spec.checkpoint import output_format

    if not Path(path).is_dir():  # a folder at -o is check_output_file's error
        try:
            output_format(path)
        except RebasinError as exc:
            raise RebasinError(f"-o {path}: {exc}") from None
    return check_output_file(path, "-o")


def _save_like(state: dict[str, torch.Tensor], output: Path, like: dict[str, torch.Tensor]) -> None:
    """Write ``state`` to ``output`` in the format its extension names, each tensor in the dtype it has in
    ``like`` (the checkpoint read: a bfloat16 file loaded into a float32 model goes back in bfloat16)."""
    from ..spec.checkpoint import save_state

    save_state(state, output, dtypes={k: v.dtype for k, v in like.items() if k in state})


def run_align(args: argparse.Namespace) -> None:
    """``rebasin align``: every input checked, then ``align``; writes B's aligned state_dict (and perms)."""
    from ..matching.alignment import align

    import_matcher_modules(args.matcher_module)  # main() did already; a no-op then (build_parser() users)
    matcher = get_matcher(args.method)  # an unknown name is a one-line error listing the registered ones
    if any_folder([args.model_a, args.model_b]):  # Hugging Face model folders: built from config.json
        _no_folder_symmetry(args)
        align_folders(args)
        return
    if matcher.needs_data and args.data is None:
        raise RebasinError(
            f"matcher {args.method!r} needs data: pass --data package.module:loader_factory (a loader of "
            "(inputs, targets) batches)"
        )
    _need_model(args)
    output = _checkpoint_output(args.output)
    perms_file = None if args.save_perms is None else check_output_file(args.save_perms, "--save-perms")
    device = _device(args)
    if (args.symmetry == "permutation" and matcher.reads_checkpoints
            and Path(args.model_a).suffix == Path(args.model_b).suffix == ".safetensors"):
        _align_checkpoints(args, output, perms_file, device)
        return
    state_a, state_b = load_state(args.model_a), load_state(args.model_b)
    model_a = model_from(args.model, state_a, args.model_a)
    model_b = model_from(args.model, state_b, args.model_b)
    loader, first = (None, None) if args.data is None else loader_from(args.data, "--data", model_a, targets=False)
    spec = _spec(args, model_a, first, need_perms=True)
    example = _example(args, model_a, first)
    method, options = symmetry_method(args.symmetry, args.method, [model_a, model_b], example, spec, writes_pair=True)
    res = align(model_a, model_b, method=method, spec=spec, loader=loader, seed=args.seed, device=device,
                example_input=example, **options)
    _save_like(res.state_b, output, state_b)
    how = method + ("" if not options else f" ({args.symmetry})")
    _print(f"aligned {args.model_b} to {args.model_a} with {how} in {res.time_s:.2f} s -> {output}")
    if perms_file is not None:
        found = res.perms if res.transforms is None else res.transforms
        torch.save({k: _cpu(v) for k, v in found.items()}, perms_file)
        n = res.spec.resolved_sizes(res.state_b)
        sizes = ", ".join(f"{k} ({n[k]})" for k in found) or "none"
        _print(f"{'permutations' if res.transforms is None else 'transforms'} {sizes} -> {perms_file}")


def _cpu(t: Any) -> Any:
    """A permutation, signed permutation or orthogonal matrix on the CPU."""
    return type(t)(*(x.cpu() for x in t)) if isinstance(t, tuple) else t.cpu()


def _no_folder_symmetry(args: argparse.Namespace) -> None:
    if args.symmetry != "permutation":
        raise RebasinError(f"--symmetry {args.symmetry} is not available for Hugging Face model folders yet; "
                           "load the models in Python and use rebasin.align(..., method='transform_matching')")


def _need_model(args: argparse.Namespace) -> None:
    if args.model is None:
        raise RebasinError("pass --model PACKAGE.MODULE:FACTORY, the architecture of the checkpoints (Hugging Face "
                           "model folders need none: the model is built from their config.json)")


def _align_checkpoints(args: argparse.Namespace, output: Path, perms_file: Path | None, device: torch.device) -> None:
    """``rebasin align A.safetensors B.safetensors`` with a matcher that reads checkpoints one tensor at a time
    (weight matching): never both models in memory.

    The spec is traced on a freshly built ``--model`` (its own weights, dropped before matching); the
    checkpoints are read one tensor at a time (:func:`rebasin.open_checkpoint`) and B's aligned copy is
    streamed to ``-o`` (:func:`rebasin.save_permuted`; a ``.pt`` output is gathered in memory first).
    """
    import time

    from ..spec.checkpoint import open_checkpoint, save_permuted

    ckpt_a, ckpt_b = open_checkpoint(args.model_a), open_checkpoint(args.model_b)
    model = build_model(args.model)
    spec = _spec(args, model, None, need_perms=True)
    del model
    start = time.perf_counter()
    perms = get_matcher(args.method)(spec, ckpt_a, ckpt_b, seed=args.seed, device=device).perms
    save_permuted(spec, perms, ckpt_b, output)
    _print(f"aligned {args.model_b} to {args.model_a} with {args.method} (one tensor at a time) in "
           f"{time.perf_counter() - start:.2f} s -> {output}")
    if perms_file is not None:
        torch.save(perms, perms_file)
        sizes = ", ".join(f"{k} ({len(v)})" for k, v in perms.items()) or "none"
        _print(f"permutations {sizes} -> {perms_file}")


def _row(path: Any, kind: str, time_s: float, bn_reset: bool) -> dict[str, Any]:
    """One entry of ``results.json``'s ``methods``: the demo's fields, plus whether BN statistics were reset."""
    from ..paths import barrier

    mid = len(path.loss) // 2
    classification = path.accuracy is not None
    return {
        "barrier": {
            "loss": barrier(path, kind="max_minus_mean", metric="loss"),
            "accuracy": barrier(path, kind="max_minus_mean", metric="accuracy") if classification else None,
        },
        "midpoint": {"loss": path.loss[mid], "accuracy": path.accuracy[mid] if classification else None},
        "path": kind,
        "time_s": time_s,
        "bn_reset": bn_reset,
    }


def _pct(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{100 * value:6.2f}{unit}"


def run_path(args: argparse.Namespace) -> dict[str, Any]:
    """``rebasin path``: the linear path (and REPAIRed path, Bezier curve) between two saved models."""
    import time

    from ..paths import BNResetPath, LinearPath, RepairedPath, evaluate_path
    from ..paths.curves import BezierCurve, fit_curve
    from ..paths.running import evaluate_state

    out = None if args.out is None else check_output_dir(args.out, "--out")
    plot = None if args.plot is None else check_output_file(args.plot, "--plot")
    device = _device(args)
    state_a, state_b = load_state(args.model_a), load_state(args.model_b)
    model = model_from(args.model, state_a, args.model_a)
    model_from(args.model, state_b, args.model_b)
    test, _ = loader_from(args.data, "--data", model, targets=True)
    train = test if args.train_data is None else loader_from(args.train_data, "--train-data", model, targets=True)[0]
    bn_model = has_batchnorm(model)
    bn_reset = bn_model if args.bn_reset is None else args.bn_reset and bn_model
    bn_loader = train if bn_reset else None
    stats = "--train-data" if args.train_data is not None else "--data"
    if bn_reset:
        _print(f"BatchNorm statistics are recomputed on {stats} at every point (--no-bn-reset to keep them)")

    common = {"num_points": args.num_points, "device": device, "progress": args.progress}

    def bn(path: Any) -> Any:
        return path if bn_loader is None else BNResetPath(path, model, bn_loader, max_batches=args.max_batches,
                                                          device=device)

    kinds = ["linear", *(["repair"] if args.repair else []), *(["bezier"] if args.curve == "bezier" else [])]
    paths: dict[str, Any] = {}
    rows: dict[str, Any] = {}
    for kind in kinds:
        start = time.perf_counter()
        if kind == "linear":
            path = evaluate_path(model, bn(LinearPath(state_a, state_b)), test, **common)
        elif kind == "repair":  # REPAIR sets BatchNorm statistics itself
            repaired = RepairedPath(model, state_a, state_b, train, max_batches=args.max_batches, device=device)
            path = evaluate_path(model, repaired, test, **common)
        else:
            curve = BezierCurve(state_a, state_b, num_bends=3)
            fit_curve(model, curve, train, epochs=args.curve_epochs, lr=args.curve_lr, seed=args.seed,
                      device=device, progress=bool(args.progress))
            path = evaluate_path(model, bn(curve), test, **common)
        paths[kind] = path
        rows[kind] = _row(path, kind, time.perf_counter() - start, kind != "repair" and bn_reset)
        r = rows[kind]
        _print(f"  {kind:<7} loss barrier {r['barrier']['loss']:8.4f}   accuracy barrier "
               f"{_pct(r['barrier']['accuracy'], ' pts')}   midpoint accuracy {_pct(r['midpoint']['accuracy'], '%')}")

    endpoints = {}
    for label, state in (("a", state_a), ("b", state_b)):
        loss, acc, _ = evaluate_state(model, state, test, loss_fn=None, device=device,
                                      name=f"model {label.upper()}")
        endpoints[label] = {"loss": loss, "accuracy": acc}
    payload = {
        "dataset": args.data,
        "architecture": args.model,
        "models": {"a": args.model_a, "b": args.model_b},
        "seed": args.seed,
        "num_points": args.num_points,
        "bn_reset": bn_reset,
        "endpoints": endpoints,
        "methods": rows,
        "paths": {k: v.as_dict() for k, v in paths.items()},
    }
    written = []
    if out is not None:
        (out / "results.json").write_text(json.dumps(payload, indent=2))
        written.append(out / "results.json")
        if save_paths_figure(paths, out / "paths.png"):
            written.append(out / "paths.png")
    if plot is not None and save_paths_figure(paths, plot):
        written.append(plot)
    if written:
        _print("wrote " + ", ".join(map(str, written)))
    return payload


def run_merge(args: argparse.Namespace) -> None:
    """``rebasin merge``: align N saved models into the first one's basin, average, optionally REPAIR."""
    from .._common import module_with_state, state_of
    from ..merging import compare_merge, merge
    from ..paths import reset_bn_stats

    import_matcher_modules(args.matcher_module)
    if len(args.models) < 2:
        raise RebasinError(f"merge needs at least two checkpoints, got {len(args.models)}")
    matcher = get_matcher(args.method)
    if matcher.needs_data and args.data is None:
        raise RebasinError(f"matcher {args.method!r} needs data: pass --data package.module:loader_factory")
    if args.repair and args.data is None:
        raise RebasinError("--repair measures channel statistics: pass --data package.module:loader_factory")
    if not -len(args.models) <= args.reference < len(args.models):
        raise RebasinError(f"--reference must index the {len(args.models)} checkpoints, got {args.reference}")
    if any_folder(args.models):  # Hugging Face model folders: built from config.json
        _no_folder_symmetry(args)
        merge_folders(args)
        return
    _need_model(args)
    output = _checkpoint_output(args.output)
    device = _device(args)
    states = [load_state(p) for p in args.models]
    models = [model_from(args.model, s, p) for s, p in zip(states, args.models)]
    loader, first = (None, None) if args.data is None else loader_from(args.data, "--data", models[0], targets=False)
    evals = None if args.eval_data is None else loader_from(args.eval_data, "--eval-data", models[0], targets=True)[0]
    spec = _spec(args, models[0], first, need_perms=False)
    example = _example(args, models[0], first)
    method, options = symmetry_method(args.symmetry, args.method, models, example, spec, writes_pair=False)
    merged, info = merge(models, method=method, loader=loader, reference=args.reference, n_iter=args.n_iter,  # type: ignore[misc]  # nn.Module attributes are typed Tensor | Module
                         repair=args.repair, spec=spec, seed=args.seed, device=device, return_info=True,
                         example_input=example, **options)
    state = state_of(merged)
    note = " and REPAIR" if args.repair else ""
    if has_batchnorm(models[0]) and not args.repair:
        if loader is not None and args.bn_reset is not False:
            state = reset_bn_stats(models[0], state, loader, device=device)
            merged = module_with_state(models[0], state, device)
            note = " and a BatchNorm reset on --data"
        else:
            _print("note: the merged BatchNorm statistics are averages of the models' statistics; pass --data "
                   "(they are then recomputed) or --repair")
    _save_like(state, output, states[args.reference])
    rounds = f"{info.rounds} round{'s' if info.rounds > 1 else ''}" + ("" if info.converged else ", not converged")
    how = method + ("" if not options else f" ({args.symmetry})")
    _print(f"merged {len(models)} models with {how}{note} ({rounds}, {info.time_s:.2f} s) -> {output}")
    if evals is not None:
        cmp = compare_merge(models, merged, info, evals, loader=loader, device=device)
        acc = cmp.accuracy
        if acc["merged"] is None:
            _print(f"loss on --eval-data: models {' '.join(f'{v:.4f}' for v in cmp.loss['models'])}, naive average "
                   f"{cmp.loss['naive']:.4f}, merged {cmp.loss['merged']:.4f}")
        else:
            _print(f"accuracy on --eval-data: models {' '.join(f'{100 * v:.2f}%' for v in acc['models'])}, naive "
                   f"average {100 * acc['naive']:.2f}%, merged {100 * acc['merged']:.2f}%, ensemble "
                   f"{100 * acc['ensemble']:.2f}%")


def _print(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: ``rebasin align: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


_FACTORY = "PACKAGE.MODULE:FACTORY"


def build_parser() -> argparse.ArgumentParser:
    """The ``rebasin`` argument parser; ``--method`` / ``--methods`` list the matchers registered *now*.

    :func:`main` imports the ``--matcher-module`` modules before calling it, so their matchers are listed.
    """
    parser = _Parser(prog="rebasin", description="Re-basin toolkit: align, interpolate, merge.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,landscape,align,path,merge,cl}")
    matcher_module = argparse.ArgumentParser(add_help=False)
    matcher_module.add_argument(
        "--matcher-module", action="append", default=[], metavar="PACKAGE.MODULE",
        help="import this module first so the matchers it registers (rebasin.register_matcher) can be used; "
             "repeatable",
    )
    positive, at_least_2 = _int_at_least(1), _int_at_least(2)

    demo = sub.add_parser("demo", parents=[matcher_module],  # type: ignore[list-item]  # typeshed's subparsers action is generic in a parser type it cannot bind here
                          help="train two nets, align them with every method, compare barriers")
    demo.add_argument("--dataset", choices=["digits", "mnist"], default="digits",
                      help="scikit-learn's 8x8 digits (offline, default) or MNIST from --data-root")
    demo.add_argument("--data-root", default=None, help="folder holding MNIST/raw (for --dataset mnist)")
    demo.add_argument("--out", default="rebasin-demo", help="output folder (results.json, results.md, paths.png)")
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (CUDA when available)")
    demo.add_argument("--seed", type=int, default=0, help="seed of model A (B gets seed+1), the split and the matchers")
    demo.add_argument("--epochs", type=positive, default=30, help="training epochs of each model")
    demo.add_argument("--width", type=positive, default=128, help="hidden units per layer of the MLPs")
    demo.add_argument("--depth", type=positive, default=2, help="hidden layers of the MLPs")
    demo.add_argument("--batch-size", type=positive, default=64, help="batch size of training and evaluation")
    demo.add_argument("--num-points", type=at_least_2, default=25,
                      help="points on each path, both endpoints included")
    demo.add_argument("--methods", default=None,
                      help=f"comma-separated subset of {','.join(demo_methods())} (rows of registered matchers, "
                           "each also as ROW+repair or ROW+bezier)".replace("%", "%%"))
    demo.add_argument("--ste-epochs", type=positive, default=5, help="epochs of the STE matcher")
    demo.add_argument("--sinkhorn-epochs", type=positive, default=10, help="epochs of Sinkhorn re-basin's fit")
    demo.add_argument("--sinkhorn-iters", type=positive, default=50, help="Sinkhorn iterations per soft permutation")
    demo.add_argument("--sinkhorn-lr", type=_positive_float, default=0.1, help="learning rate of Sinkhorn re-basin")
    demo.add_argument("--curve-epochs", type=positive, default=5, help="epochs for the Bezier curve's bend")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bars for training (default: when stderr is a terminal)")
    demo.set_defaults(func=run_demo)

    land = sub.add_parser(
        "landscape",
        help="the demo pair's landscape: mode connectivity, CKA, Hessian, Anokhin & Yarotsky paths",
    )
    for action in demo._actions:
        if action.dest in ("help", "out", "methods", "ste_epochs", "sinkhorn_epochs", "sinkhorn_iters", "sinkhorn_lr",
                           "matcher_module"):
            continue
        land._add_action(action)
    land.add_argument("--out", default="rebasin-landscape", help="output folder (landscape.json)")
    land.set_defaults(func=run_landscape)

    checkpoint = ("a saved state_dict (torch.save(model.state_dict(), ...), or a .safetensors file) of the --model "
                  "architecture")
    model_help = ("importable factory 'package.module:function' that builds your net (no arguments); "
                  "modules in the current folder are found too")
    shape_help = "input shape for tracing the net, e.g. 1,3,32,32 (default: two inputs of --data's first batch)"
    dtype_help = (f"dtype of the --example-shape input: {', '.join(EXAMPLE_DTYPES)} (default float32); integer "
                  "dtypes draw token ids below the model's embedding size")
    device_help = "cpu, cuda, cuda:1 or auto (CUDA when available)"
    checkpoint_or_folder = (checkpoint + ", or a Hugging Face model folder (save_pretrained's config.json and "
                            "safetensors shards; no --model needed)")
    optional_model = model_help + "; optional for Hugging Face model folders (default: built from config.json)"
    strict_help = ("refuse (exit 2) any construct the tracer cannot prove safe for a permutation, instead of\n"
                   "pinning its units to the identity (the default; a warning names them and the\n"
                   "coverage line counts them)")

    al = sub.add_parser("align", parents=[matcher_module], formatter_class=argparse.RawTextHelpFormatter,  # type: ignore[list-item]  # typeshed's subparsers action is generic in a parser type it cannot bind here
                        help="align B to A (two saved state_dicts of your own architecture)",
                        description="Permute B's hidden units to match A's; B's function is unchanged.")
    al.add_argument("model_a", help="the reference model A: " + checkpoint_or_folder)
    al.add_argument("model_b", help="the model B to align to A: " + checkpoint_or_folder)
    al.add_argument("--model", default=None, metavar=_FACTORY, help=optional_model)
    al.add_argument("--example-shape", default=None, metavar="SHAPE", help=shape_help)
    al.add_argument("--example-dtype", default=None, metavar="DTYPE", help=dtype_help)
    al.add_argument("--strict", action="store_true", help=strict_help)
    # validated against the registry in run_align (an unknown name is a one-line error, like every bad input)
    al.add_argument("--method", default="weight_matching", metavar="{" + ",".join(matcher_names()) + "}",
                    help=_methods_help())
    al.add_argument("--data", default=None, metavar=_FACTORY,
                    help="importable factory returning a loader of (inputs, targets) batches,\n"
                         "for the data-driven matchers")
    al.add_argument("--seed", type=int, default=0, help="seed of the matcher's random choices and of the --example-shape input (same seed, same result)")
    al.add_argument("--device", default="auto", help=device_help)
    al.add_argument("-o", "--output", required=True, metavar="FILE",
                    help="where to write B's aligned state_dict (folders are created), in the format\n"
                         "its extension names (.safetensors, or torch .pt/.pth/.bin) and B's dtypes.\n"
                         "weight_matching on two .safetensors files reads them one tensor at a time\n"
                         "and streams a .safetensors output: neither model is held in memory;\n"
                         "for two model folders, a new folder laid out like B that from_pretrained loads")
    al.add_argument("--symmetry", default="permutation", metavar="{" + ",".join(SYMMETRIES) + "}",
                    help=SYMMETRY_HELP)
    al.add_argument("--save-perms", default=None, metavar="FILE",
                    help="also write the permutations {name: LongTensor} that map B onto A\n"
                         "(torch.load(FILE); rebasin.permute(spec, perms, state_b) applies them);\n"
                         "with --symmetry, every class's transform (rebasin.spec.apply_transforms)")
    al.set_defaults(func=run_align)

    pa = sub.add_parser(
        "path", help="loss and accuracy along the path between two saved models (JSON, figure)",
        description="Evaluate the linear path from A to B (and, on request, the REPAIRed path and a trained Bezier "
                    "curve): loss and accuracy barriers, midpoint accuracy, every point.")
    pa.add_argument("model_a", help="the model at t = 0: " + checkpoint)
    pa.add_argument("model_b", help="the model at t = 1 (usually B aligned by rebasin align): " + checkpoint)
    pa.add_argument("--model", required=True, metavar=_FACTORY, help=model_help)
    pa.add_argument("--data", required=True, metavar=_FACTORY,
                    help="importable factory returning the loader of (inputs, targets) batches to evaluate on")
    pa.add_argument("--train-data", default=None, metavar=_FACTORY,
                    help="loader for BatchNorm statistics, REPAIR's statistics and the curve's training "
                         "(default: --data)")
    pa.add_argument("--num-points", type=at_least_2, default=25, help="points on each path, both endpoints included")
    pa.add_argument("--bn-reset", action=argparse.BooleanOptionalAction, default=None,
                    help="recompute BatchNorm running statistics at every point (default: on for nets with "
                         "BatchNorm; interpolated statistics are wrong)")
    pa.add_argument("--repair", action="store_true",
                    help="also evaluate the path with REPAIR (Jordan et al. 2023): every permuted channel gets "
                         "the interpolated endpoint statistics")
    pa.add_argument("--curve", choices=["linear", "bezier"], default="linear",
                    help="bezier: also train a quadratic Bezier curve from A to B and evaluate it")
    pa.add_argument("--curve-epochs", type=positive, default=5, help="epochs of the Bezier curve's training")
    pa.add_argument("--curve-lr", type=_positive_float, default=1e-3, help="learning rate of the curve's training")
    pa.add_argument("--max-batches", type=positive, default=None,
                    help="read at most this many batches for statistics (BatchNorm, REPAIR); default all")
    pa.add_argument("--seed", type=int, default=0, help="seed of the curve's training")
    pa.add_argument("--device", default="auto", help=device_help)
    pa.add_argument("--out", default=None, metavar="DIR",
                    help="write results.json (the demo's format) and paths.png here (created)")
    pa.add_argument("--plot", default=None, metavar="FILE", help="also write the figure to this PNG file")
    pa.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False,
                    help="progress bars over the points and the curve's epochs")
    pa.set_defaults(func=run_path)

    me = sub.add_parser(
        "merge", parents=[matcher_module], formatter_class=argparse.RawTextHelpFormatter,  # type: ignore[list-item]  # typeshed's subparsers action is generic in a parser type it cannot bind here
        help="merge two or more saved models into one (align into one basin, average, optional REPAIR)",
        description="Align every model into the reference's basin, average the weights, optionally REPAIR.")
    me.add_argument("models", nargs="+", metavar="CHECKPOINT", help="two or more checkpoints: " + checkpoint_or_folder)
    me.add_argument("--model", default=None, metavar=_FACTORY, help=optional_model)
    me.add_argument("-o", "--output", required=True, metavar="FILE",
                    help="where to write the merged state_dict (folders are created), in the format\n"
                         "its extension names (.safetensors, or torch .pt/.pth/.bin) and the\n"
                         "reference checkpoint's dtypes; for model folders, a new folder laid out like\n"
                         "the reference's, merged one tensor at a time")
    me.add_argument("--method", default="weight_matching", metavar="{" + ",".join(matcher_names()) + "}",
                    help=_methods_help())
    me.add_argument("--symmetry", default="permutation", metavar="{" + ",".join(SYMMETRIES) + "}",
                    help=SYMMETRY_HELP)
    me.add_argument("--data", default=None, metavar=_FACTORY,
                    help="loader of (inputs, targets) batches: for data-driven matchers, --repair and\n"
                         "BatchNorm statistics")
    me.add_argument("--repair", action="store_true",
                    help="REPAIR the average: every permuted channel gets the mean of the models'\n"
                         "channel statistics (needs --data)")
    me.add_argument("--bn-reset", action=argparse.BooleanOptionalAction, default=None,
                    help="without --repair, recompute the merged net's BatchNorm statistics on --data\n"
                         "(default: on when the net has BatchNorm and --data is given)")
    me.add_argument("--eval-data", default=None, metavar=_FACTORY,
                    help="loader to report accuracy on: each model, the naive average, the merged\n"
                         "model and the ensemble")
    me.add_argument("--example-shape", default=None, metavar="SHAPE", help=shape_help)
    me.add_argument("--example-dtype", default=None, metavar="DTYPE", help=dtype_help)
    me.add_argument("--strict", action="store_true", help=strict_help)
    me.add_argument("--reference", type=int, default=0,
                    help="index of the checkpoint whose basin (unit order) the merged model keeps")
    me.add_argument("--n-iter", type=positive, default=10, help="alignment rounds at most")
    me.add_argument("--seed", type=int, default=0, help="seed of the matcher's random choices and of the --example-shape input")
    me.add_argument("--device", default="auto", help=device_help)
    me.set_defaults(func=run_merge)

    sub.add_parser(
        "cl",
        help="the continual-learning comparison (python -m continual.compare; needs the 'continual' extra)",
        add_help=False,
    )
    return parser


def run_cl(argv: Sequence[str]) -> int:
    """``rebasin cl ARGS`` runs ``python -m continual.compare ARGS`` in a child process.

    ``continual`` sits above the toolkit (it imports Avalanche); the command line only hands over to it.
    """
    import importlib.util
    import subprocess

    if importlib.util.find_spec("continual") is None or importlib.util.find_spec("avalanche") is None:
        print("rebasin cl: error: the continual-learning comparison needs avalanche-lib "
              "(pip install 'rebasin-toolkit[continual]')", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "continual.compare", *argv])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cl"]:
        return run_cl(argv[1:])
    if argv[:1] and argv[0] in _MATCHER_COMMANDS:
        try:  # before the parser is built, so --help and --method see the user's matchers
            import_matcher_modules(_matcher_modules_in(argv[1:]))
        except RebasinError as exc:
            print(f"rebasin {argv[0]}: error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except RebasinError as exc:
        print(f"rebasin {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
