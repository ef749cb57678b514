"""The ``rebasin`` command line: ``demo``, ``align`` and ``path``.

Every subcommand has ``--help``. Bad input (unknown method, missing file, architectures that do
not match, a factory that cannot be imported) ends with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._errors import RebasinError

__all__ = ["main"]

DEMO_METHODS = (
    "weight_matching",
    "activation_matching",
    "ste",
    "sinkhorn_l2",
    "sinkhorn_midpoint",
    "sinkhorn_random",
)


# --------------------------------------------------------------------------- helpers
def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise RebasinError(f"unknown device {name!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RebasinError("--device cuda was asked for but CUDA is not available")
    return dev


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


# --------------------------------------------------------------------------- demo
def _demo_data(args: argparse.Namespace):
    from . import data

    if args.dataset == "digits":
        train, test = data.digits_loaders(batch_size=args.batch_size, seed=args.seed)
        in_features = 64
    elif args.dataset == "mnist":
        root = args.data_root or data.data_root_from_env()
        if root is None:
            raise RebasinError("--dataset mnist needs --data-root (a folder holding MNIST/raw) or REBASIN_DATA")
        train, test = data.mnist_loaders(root, batch_size=args.batch_size, seed=args.seed)
        in_features = 784
    else:  # argparse restricts choices; kept for direct callers
        raise RebasinError(f"unknown dataset {args.dataset!r}; choose digits or mnist")
    return train, test, in_features


def _method_call(name: str, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Map a demo method name to (align method, options)."""
    if name.startswith("sinkhorn_"):
        cost = name.split("_", 1)[1]
        return "sinkhorn", {
            "cost": cost,
            "init": "identity",
            "n_iter": args.sinkhorn_iters,
            "fit": {"epochs": args.sinkhorn_epochs, "lr": args.sinkhorn_lr, "progress": False},
        }
    if name == "ste":
        return "ste", {"epochs": args.ste_epochs, "lr": 1e-3}
    return name, {}


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Train two models, align them with every method, evaluate the paths; return the results dict."""
    from ._functional import state_of
    from .align import align
    from .models import MLP
    from .path import barrier, evaluate_path
    from .train import evaluate, fit_classifier_, seeded_model

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(DEMO_METHODS)
    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown:
        raise RebasinError(f"unknown method(s) {unknown}; choose from {list(DEMO_METHODS)}")
    device = _device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test, in_features = _demo_data(args)
    hidden = [args.width] * args.depth
    models = []
    t0 = time.perf_counter()
    for k in range(2):
        model = seeded_model(lambda: MLP(in_features, hidden, 10), seed=args.seed + k).to(device)
        fit_classifier_(model, train, epochs=args.epochs, lr=1e-3, seed=args.seed + k, device=device)
        models.append(model)
    train_time = time.perf_counter() - t0
    model_a, model_b = models
    state_a = state_of(model_a)
    endpoints = [evaluate(m, test, device=device) for m in models]
    _print(f"trained two MLPs {in_features}-{'-'.join(map(str, hidden))}-10 on {args.dataset} "
           f"({args.epochs} epochs, {train_time:.1f} s): test accuracy "
           f"{100 * endpoints[0][1]:.1f}% / {100 * endpoints[1][1]:.1f}%")

    results: dict[str, Any] = {}
    paths = {}
    for name in ["naive", *methods]:
        method, options = ("identity", {}) if name == "naive" else _method_call(name, args)
        res = align(model_a, model_b, method=method, loader=train, seed=args.seed, device=device, **options)
        path = evaluate_path(model_a, state_a, res.state_b, test, num_points=args.num_points, device=device)
        paths[name] = path
        results[name] = {
            "barrier": {
                "loss": barrier(path, kind="max_minus_mean", metric="loss"),
                "accuracy": barrier(path, kind="max_minus_mean", metric="accuracy"),
            },
            "midpoint": {"loss": path.loss[len(path.loss) // 2], "accuracy": path.accuracy[len(path.accuracy) // 2]},
            "time_s": res.time_s,
        }
        b = results[name]["barrier"]
        _print(f"  {name:<20} loss barrier {b['loss']:8.4f}   accuracy barrier {100 * b['accuracy']:6.2f} pts"
               f"   ({res.time_s:.2f} s)")

    payload = {
        "dataset": args.dataset,
        "architecture": f"MLP {in_features}-{'-'.join(map(str, hidden))}-10",
        "seed": args.seed,
        "epochs": args.epochs,
        "num_points": args.num_points,
        "endpoints": {"a": {"loss": endpoints[0][0], "accuracy": endpoints[0][1]},
                      "b": {"loss": endpoints[1][0], "accuracy": endpoints[1][1]}},
        "methods": results,
        "paths": {k: v.as_dict() for k, v in paths.items()},
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "results.md").write_text(_markdown_table(payload))
    _save_plot(paths, out / "paths.png")
    _print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'paths.png'}")
    return payload


def _markdown_table(payload: dict[str, Any]) -> str:
    lines = [
        f"# rebasin demo: {payload['architecture']} on {payload['dataset']} (seed {payload['seed']})",
        "",
        "| method | loss barrier | accuracy barrier (pts) | midpoint accuracy (%) | time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in payload["methods"].items():
        lines.append(
            f"| {name} | {r['barrier']['loss']:.4f} | {100 * r['barrier']['accuracy']:.2f} | "
            f"{100 * r['midpoint']['accuracy']:.2f} | {r['time_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _save_plot(paths, target: Path) -> None:
    from .plot import plot_paths

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    plot_paths(paths, metric="loss", ax=axes[0], title="test loss along the linear path")
    plot_paths(paths, metric="accuracy", ax=axes[1], title="test accuracy along the linear path")
    fig.savefig(target, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- align / path
def run_align(args: argparse.Namespace) -> None:
    from .align import align
    from .trace import spec_from_model

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
    from .path import barrier, evaluate_path

    state_a, state_b = _load_state(args.model_a), _load_state(args.model_b)
    model = _model_from(args.model, state_a, args.model_a)
    _model_from(args.model, state_b, args.model_b)
    loader = _load_factory(args.data)()
    result = evaluate_path(model, state_a, state_b, loader, num_points=args.num_points, device=_device(args.device))
    for kind in ("max_minus_mean", "detrended"):
        _print(f"{kind:>15} loss barrier {barrier(result, kind=kind, metric='loss'):.4f}")
    if args.plot:
        from .plot import plot_paths

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
    demo.add_argument("--epochs", type=int, default=20)
    demo.add_argument("--width", type=int, default=128)
    demo.add_argument("--depth", type=int, default=2)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--num-points", type=int, default=25)
    demo.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(DEMO_METHODS)}")
    demo.add_argument("--ste-epochs", type=int, default=2)
    demo.add_argument("--sinkhorn-epochs", type=int, default=2)
    demo.add_argument("--sinkhorn-iters", type=int, default=50, help="Sinkhorn iterations per soft permutation")
    demo.add_argument("--sinkhorn-lr", type=float, default=0.1)
    demo.set_defaults(func=run_demo)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
