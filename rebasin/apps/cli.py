"""The ``rebasin`` command line: ``demo``, ``landscape``, ``align``, ``path`` and ``cl``.

Every subcommand has ``--help``. Bad input (unknown method, missing file, architectures that do
not match, a factory that cannot be imported) ends with a one-line error and exit status 2.

Methods come from the matcher registry (:func:`rebasin.register_matcher`): ``rebasin align --help``
lists every registered matcher with its description, and ``--matcher-module package.module`` (``align``
and ``demo``, repeatable) imports a module of yours before anything else, so the matchers it registers
can be named with ``--method`` / ``--methods``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .._errors import RebasinError
from ..matching.registry import get_matcher, matcher_names
from .demo import demo_methods, device_from_name, run_demo, run_landscape

__all__ = ["build_parser", "import_matcher_modules", "main"]

#: Subcommands that take ``--matcher-module`` (the ones that run matchers by name).
_MATCHER_COMMANDS = ("align", "demo")


# --------------------------------------------------------------------------- helpers
def _load_factory(spec: str, option: str = "--model"):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RebasinError(f"{option} must look like 'package.module:factory', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RebasinError(f"cannot import module {module_name!r} for {option}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise RebasinError(f"module {module_name!r} has no attribute {attr!r}") from exc


def _load_state(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise RebasinError(f"no such file: {path}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is one user error
        raise RebasinError(f"cannot read {path} as a torch state_dict: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RebasinError(f"{path} does not hold a state_dict (a dict of tensors)")
    return obj


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError as exc:
        raise RebasinError(f"--example-shape must be comma-separated integers, got {text!r}") from exc
    if not shape or any(s <= 0 for s in shape):
        raise RebasinError(f"--example-shape must be positive integers, got {text!r}")
    return shape


def _model_from(factory_spec: str, state: dict[str, torch.Tensor], label: str) -> torch.nn.Module:
    model = _load_factory(factory_spec)()
    if not isinstance(model, torch.nn.Module):
        raise RebasinError(f"{factory_spec} returned {type(model).__name__}, not an nn.Module")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise RebasinError(
            f"{label} does not match the architecture of {factory_spec}: {' '.join(first[:3])}"
        ) from exc
    return model


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


# --------------------------------------------------------------------------- align / path
def run_align(args: argparse.Namespace) -> None:
    from ..matching.alignment import align
    from ..trace.tracing import spec_from_model

    import_matcher_modules(args.matcher_module)  # main() did already; a no-op then (build_parser() users)
    matcher = get_matcher(args.method)  # an unknown name is a one-line error listing the registered ones
    if matcher.needs_data and args.data is None:
        raise RebasinError(
            f"matcher {args.method!r} needs data: pass --data package.module:loader_factory (a loader of "
            "(inputs, targets) batches)"
        )
    state_a, state_b = _load_state(args.model_a), _load_state(args.model_b)
    model_a = _model_from(args.model, state_a, args.model_a)
    model_b = _model_from(args.model, state_b, args.model_b)
    example = torch.randn(*_shape(args.example_shape))
    spec = spec_from_model(model_a, example)
    loader = None if args.data is None else _load_factory(args.data, "--data")()
    res = align(model_a, model_b, method=args.method, spec=spec, loader=loader, seed=args.seed)
    torch.save(res.state_b, args.output)
    _print(f"aligned {args.model_b} to {args.model_a} with {args.method} in {res.time_s:.2f} s -> {args.output}")


def run_path(args: argparse.Namespace) -> None:
    from ..paths import barrier, evaluate_path

    state_a, state_b = _load_state(args.model_a), _load_state(args.model_b)
    model = _model_from(args.model, state_a, args.model_a)
    _model_from(args.model, state_b, args.model_b)
    loader = _load_factory(args.data, "--data")()
    result = evaluate_path(model, state_a, state_b, loader, num_points=args.num_points, device=device_from_name(args.device))
    for kind in ("max_minus_mean", "detrended"):
        _print(f"{kind:>15} loss barrier {barrier(result, kind=kind, metric='loss'):.4f}")
    if args.plot:
        from ..paths.plot import plot_paths

        plot_paths({"path": result}, metric="loss").savefig(args.plot, dpi=120)
        _print(f"wrote {args.plot}")


def _print(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``rebasin`` argument parser; ``--method`` / ``--methods`` list the matchers registered *now*.

    :func:`main` imports the ``--matcher-module`` modules before calling it, so their matchers are listed.
    """
    parser = argparse.ArgumentParser(prog="rebasin", description="Re-basin toolkit: align, interpolate, merge.")
    sub = parser.add_subparsers(dest="command", required=True)
    matcher_module = argparse.ArgumentParser(add_help=False)
    matcher_module.add_argument(
        "--matcher-module", action="append", default=[], metavar="PACKAGE.MODULE",
        help="import this module first so the matchers it registers (rebasin.register_matcher) can be used; "
             "repeatable",
    )

    demo = sub.add_parser("demo", parents=[matcher_module],
                          help="train two nets, align them with every method, compare barriers")
    demo.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    demo.add_argument("--data-root", default=None, help="folder holding MNIST/raw (for --dataset mnist)")
    demo.add_argument("--out", default="rebasin-demo", help="output folder (results.json, results.md, paths.png)")
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--width", type=int, default=128)
    demo.add_argument("--depth", type=int, default=2)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--num-points", type=int, default=25)
    demo.add_argument("--methods", default=None,
                      help=f"comma-separated subset of {','.join(demo_methods())} (rows of registered matchers, "
                           "each also as ROW+repair or ROW+bezier)".replace("%", "%%"))
    demo.add_argument("--ste-epochs", type=int, default=5)
    demo.add_argument("--sinkhorn-epochs", type=int, default=10)
    demo.add_argument("--sinkhorn-iters", type=int, default=50, help="Sinkhorn iterations per soft permutation")
    demo.add_argument("--sinkhorn-lr", type=float, default=0.1)
    demo.add_argument("--curve-epochs", type=int, default=5, help="epochs for the Bezier curve's bend")
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

    al = sub.add_parser("align", parents=[matcher_module], formatter_class=argparse.RawTextHelpFormatter,
                        help="align two saved state_dicts of your own architecture")
    al.add_argument("model_a")
    al.add_argument("model_b")
    al.add_argument("--model", required=True, help="importable factory 'package.module:function' building the net")
    al.add_argument("--example-shape", required=True, help="input shape for tracing, e.g. 1,3,32,32")
    # validated against the registry in run_align (an unknown name is a one-line error, like every bad input)
    al.add_argument("--method", default="weight_matching", metavar="{" + ",".join(matcher_names()) + "}",
                    help=_methods_help())
    al.add_argument("--data", default=None, metavar="PACKAGE.MODULE:FACTORY",
                    help="importable factory returning a loader of (inputs, targets) batches, for data-driven matchers")
    al.add_argument("--seed", type=int, default=0)
    al.add_argument("-o", "--output", required=True, help="where to write B's aligned state_dict")
    al.set_defaults(func=run_align)

    pa = sub.add_parser("path", help="evaluate (and plot) the linear path between two saved models")
    pa.add_argument("model_a")
    pa.add_argument("model_b")
    pa.add_argument("--model", required=True, help="importable factory 'package.module:function'")
    pa.add_argument("--data", required=True, help="importable factory 'package.module:function' returning a loader")
    pa.add_argument("--num-points", type=int, default=25)
    pa.add_argument("--device", default="auto")
    pa.add_argument("--plot", default=None, help="PNG file to write")
    pa.set_defaults(func=run_path)

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
