"""The ``rebasin`` command line: ``demo``, ``landscape``, ``align``, ``path`` and ``cl``.

Every subcommand has ``--help``. Bad input (unknown method, missing file, architectures that do
not match, a factory that cannot be imported) ends with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .._errors import RebasinError
from .demo import DEMO_METHODS, device_from_name, run_demo, run_landscape

__all__ = ["main"]



# --------------------------------------------------------------------------- helpers
def _load_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RebasinError(f"--model must look like 'package.module:factory', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RebasinError(f"cannot import module {module_name!r} for --model: {exc}") from exc
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


# --------------------------------------------------------------------------- align / path
def run_align(args: argparse.Namespace) -> None:
    from ..matching.alignment import align
    from ..trace.tracing import spec_from_model

    state_a, state_b = _load_state(args.model_a), _load_state(args.model_b)
    model_a = _model_from(args.model, state_a, args.model_a)
    model_b = _model_from(args.model, state_b, args.model_b)
    example = torch.randn(*_shape(args.example_shape))
    spec = spec_from_model(model_a, example)
    if args.method not in ("weight_matching",):
        raise RebasinError(
            f"rebasin align supports --method weight_matching on saved state_dicts (data-free); "
            f"got {args.method!r}. Use the Python API for data-driven methods."
        )
    res = align(model_a, model_b, method=args.method, spec=spec, seed=args.seed)
    torch.save(res.state_b, args.output)
    _print(f"aligned {args.model_b} to {args.model_a} with {args.method} in {res.time_s:.2f} s -> {args.output}")


def run_path(args: argparse.Namespace) -> None:
    from ..paths import barrier, evaluate_path

    state_a, state_b = _load_state(args.model_a), _load_state(args.model_b)
    model = _model_from(args.model, state_a, args.model_a)
    _model_from(args.model, state_b, args.model_b)
    loader = _load_factory(args.data)()
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
    parser = argparse.ArgumentParser(prog="rebasin", description="Re-basin toolkit: align, interpolate, merge.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train two nets, align them with every method, compare barriers")
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
    demo.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(DEMO_METHODS)}")
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
        if action.dest in ("help", "out", "methods", "ste_epochs", "sinkhorn_epochs", "sinkhorn_iters", "sinkhorn_lr"):
            continue
        land._add_action(action)
    land.add_argument("--out", default="rebasin-landscape", help="output folder (landscape.json)")
    land.set_defaults(func=run_landscape)

    al = sub.add_parser("align", help="align two saved state_dicts of your own architecture")
    al.add_argument("model_a")
    al.add_argument("model_b")
    al.add_argument("--model", required=True, help="importable factory 'package.module:function' building the net")
    al.add_argument("--example-shape", required=True, help="input shape for tracing, e.g. 1,3,32,32")
    al.add_argument("--method", default="weight_matching")
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
