"""The main job behind ``rebasin demo``: two nets, every matcher, the paths between them.

Trains two MLPs from different seeds (scikit-learn digits by default, offline; or torchvision MNIST
from a local folder), aligns B to A with every registered matcher (:func:`demo_methods`: read from the
matcher registry, so a matcher registered with :func:`rebasin.register_matcher` gets its own row),
and evaluates the linear path for each —
plus the weight-matched path with REPAIR and a trained quadratic Bezier curve between A and the
weight-matched B. Writes ``results.json``, ``results.md`` and ``paths.png`` (when matplotlib is
installed) and returns the results dict.

``rebasin landscape`` (:func:`run_landscape`) trains the same pair and prints the landscape
measurements of Yang et al. (mode connectivity, CKA, Hessian top eigenvalue and trace) and the
worst accuracy along Anokhin & Yarotsky's connecting paths.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .._errors import RebasinError
from ..matching.registry import get_matcher, matcher_names
from ..matching.sinkhorn_rebasin import COSTS as SINKHORN_COSTS

__all__ = ["DEMO_USES", "demo_methods", "run_demo", "run_landscape", "save_paths_figure"]

#: What a row can do with an aligned pair besides the linear path: ``<matcher>+repair`` (the linear path
#: with REPAIR) and ``<matcher>+bezier`` (a trained quadratic Bezier curve).
DEMO_USES = ("repair", "bezier")
#: The uses the default rows show, on the weight-matched pair.
_DEFAULT_USES = ("weight_matching+repair", "weight_matching+bezier")


def _matcher_rows() -> list[str]:
    """One row per registered matcher, in registration order; Sinkhorn once per built-in cost.

    (A ``"sinkhorn"`` registered over the built-in without a ``cost`` option is one row, like any matcher.)
    """
    rows: list[str] = []
    for name in matcher_names():
        if name == "identity":  # the "naive" row, always shown first
            continue
        per_cost = "cost" in (get_matcher(name).options() or ()) and name in _PER_COST
        rows += [f"{name}_{cost}" for cost in SINKHORN_COSTS] if per_cost else [name]
    return list(dict.fromkeys(rows))


def demo_methods() -> tuple[str, ...]:
    """The demo's default rows, read from the matcher registry when called.

    Every registered matcher except ``identity`` (the ``naive`` row) on the linear path — the built-ins
    and any matcher registered with :func:`rebasin.register_matcher` — with Sinkhorn once per built-in
    cost (``sinkhorn_l2``, ``sinkhorn_midpoint``, ``sinkhorn_random``), followed by the weight-matched
    pair with REPAIR and with a Bezier curve. ``--methods`` also takes ``<row>+repair`` / ``<row>+bezier``
    for any matcher row.

    Returns
    -------
    tuple of str
        ``("weight_matching", "activation_matching", "ste", "sinkhorn_l2", ..., "ot", "transform_matching",
        <user matchers>, "weight_matching+repair", "weight_matching+bezier")``.
    """
    return (*_matcher_rows(), *_DEFAULT_USES)


def _check_rows(methods: list[str]) -> None:
    """Each row is a matcher row, optionally ``+repair`` / ``+bezier``; an error lists the valid ones."""
    rows = _matcher_rows()
    unknown = []
    for name in methods:
        matcher, plus, use = name.partition("+")
        if matcher not in rows or (plus and use not in DEMO_USES):
            unknown.append(name)
    if unknown:
        raise RebasinError(
            f"unknown method(s) {unknown}; choose from {rows} (registered matchers), each optionally with "
            f"{['+' + u for u in DEMO_USES]}"
        )


def device_from_name(name: str | None) -> torch.device:
    """``"auto"``/None picks CUDA when present; a CUDA request without CUDA is a user error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise RebasinError(f"unknown device {name!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RebasinError("--device cuda was asked for but CUDA is not available")
    return dev


def _progress(args: argparse.Namespace) -> bool:
    """``--progress`` / ``--no-progress``, or bars only when stderr is a terminal."""
    import sys

    flag = getattr(args, "progress", None)
    return sys.stderr.isatty() if flag is None else bool(flag)


def _say(msg: str) -> None:
    print(msg, flush=True)


def demo_data(args: argparse.Namespace):
    """``(train_loader, test_loader, in_features)`` for ``args.dataset``."""
    from . import data

    if args.dataset == "digits":
        train, test = data.digits_loaders(batch_size=args.batch_size, seed=args.seed)
        return train, test, 64
    if args.dataset == "mnist":
        root = args.data_root or data.data_root_from_env()
        if root is None:
            raise RebasinError("--dataset mnist needs --data-root (a folder holding MNIST/raw) or REBASIN_DATA")
        train, test = data.mnist_loaders(root, batch_size=args.batch_size, seed=args.seed)
        return train, test, 784
    raise RebasinError(f"unknown dataset {args.dataset!r}; choose digits or mnist")


def _matcher_call(name: str, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Map a demo row's matcher to ``(registered matcher, options)``: the demo's settings for the built-ins.

    Only the options the registered matcher takes are passed: a matcher registered over a built-in name
    (``register_matcher(..., overwrite=True)``) gets none of the built-in's settings it does not know.
    """
    method, cost = name, None
    if name not in matcher_names() and "_" in name and name.rsplit("_", 1)[0] in _PER_COST:
        method, cost = name.rsplit("_", 1)
    options = _demo_settings(args).get(method, {})
    if cost is not None:
        options = {**options, "cost": cost}
    return method, get_matcher(method).known({**options, "progress": _progress(args)})


#: Built-in matchers the demo shows once per built-in cost (when the registered one takes ``cost=``).
_PER_COST = ("sinkhorn",)


def _demo_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The demo's own settings for some built-ins (a table, not a test of the matcher's name)."""
    return {
        "sinkhorn": {"init": "identity", "n_iter": args.sinkhorn_iters,
                     "fit": {"epochs": args.sinkhorn_epochs, "lr": args.sinkhorn_lr}},
        "ste": {"epochs": args.ste_epochs, "lr": 1e-3},
    }


def _align_quietly(model_a, model_b, method, options, loader, spec, args, device):
    """``align`` with Sinkhorn's soft-matrix convergence warnings folded into one flag.

    The demo only uses the *hard* permutations (linear assignment on the logits), which do not
    depend on how far the last Sinkhorn projection converged, so the warning is noise here.
    """
    from ..matching.alignment import align

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = align(model_a, model_b, method=method, loader=loader, spec=spec, seed=args.seed, device=device,
                    **options)
    unconverged = False
    for w in caught:
        if "did not converge" in str(w.message):
            unconverged = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return res, unconverged


def _train_pair(args: argparse.Namespace, device: torch.device, progress: bool):
    """The demo's two MLPs, trained from seeds ``seed`` and ``seed + 1``; prints one line."""
    from .models import MLP
    from .training import evaluate, fit_classifier_, seeded_model

    train, test, in_features = demo_data(args)
    hidden = [args.width] * args.depth
    models = []
    t0 = time.perf_counter()
    for k in range(2):
        model = seeded_model(lambda: MLP(in_features, hidden, 10), seed=args.seed + k).to(device)
        fit_classifier_(model, train, epochs=args.epochs, lr=1e-3, seed=args.seed + k, device=device, progress=progress)
        models.append(model)
    train_time = time.perf_counter() - t0
    endpoints = [evaluate(m, test, device=device) for m in models]
    arch = f"MLP {in_features}-{'-'.join(map(str, hidden))}-10"
    _say(f"trained two {arch} on {args.dataset} ({args.epochs} epochs, {train_time:.1f} s): test accuracy "
         f"{100 * endpoints[0][1]:.1f}% / {100 * endpoints[1][1]:.1f}%")  # type: ignore[operator]  # evaluate's accuracy is None only without a classification target; the demo classifies
    return train, test, models[0], models[1], endpoints, arch


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Train two models, align them with every method, evaluate the paths; return the results dict."""
    from .._common import state_of
    from ..paths import LinearPath, RepairedPath, barrier, evaluate_path
    from ..paths.curves import BezierCurve, fit_curve
    from ..trace.tracing import spec_from_model

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(demo_methods())
    _check_rows(methods)
    progress = _progress(args)
    device = device_from_name(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test, model_a, model_b, endpoints, arch = _train_pair(args, device, progress)
    state_a = state_of(model_a)
    spec = spec_from_model(model_a, next(iter(test))[0][:2].to(device))

    def fresh_train():
        # every row gets its own loader with the same seeded shuffling, so no row's numbers depend on
        # which rows ran before it (a shared loader's shuffle generator advances with every pass)
        return demo_data(args)[0]

    def evaluate_on_test(path):
        return evaluate_path(model_a, path, test, num_points=args.num_points, device=device)

    results: dict[str, Any] = {}
    paths = {}
    aligned: dict[str, Any] = {}  # matcher name -> align result, reused by the +repair / +bezier rows
    for name in ["naive", *methods]:
        matcher, _, use = name.partition("+")
        kind = use or "linear"
        unconverged = False
        if matcher not in aligned:
            method, options = ("identity", {}) if name == "naive" else _matcher_call(matcher, args)
            aligned[matcher], unconverged = _align_quietly(model_a, model_b, method, options, fresh_train(), spec,
                                                           args, device)
        res = aligned[matcher]
        t_use = time.perf_counter()
        if kind == "linear":
            path = evaluate_on_test(LinearPath(state_a, res.state_b))
        elif kind == "repair":
            path = evaluate_on_test(RepairedPath(model_a, state_a, res.state_b, fresh_train(), device=device))
        else:  # bezier: one trainable bend between A and the aligned B
            curve = BezierCurve(state_a, res.state_b, num_bends=3)
            fit_curve(model_a, curve, fresh_train(), epochs=args.curve_epochs, seed=args.seed, device=device, progress=progress)
            path = evaluate_on_test(curve)
        extra = time.perf_counter() - t_use if kind == "bezier" else 0.0
        paths[name] = path
        mid = len(path.loss) // 2
        results[name] = {
            "barrier": {
                "loss": barrier(path, kind="max_minus_mean", metric="loss"),
                "accuracy": barrier(path, kind="max_minus_mean", metric="accuracy"),
            },
            "midpoint": {"loss": path.loss[mid], "accuracy": path.accuracy[mid]},
            "path": kind,
            "time_s": res.time_s + extra,
        }
        b = results[name]["barrier"]
        note = "  (soft matrices not fully converged; hard permutations used)" if unconverged else ""
        _say(f"  {name:<24} loss barrier {b['loss']:8.4f}   accuracy barrier {100 * b['accuracy']:6.2f} pts"
             f"   ({results[name]['time_s']:.2f} s){note}")

    payload = {
        "dataset": args.dataset,
        "architecture": arch,
        "seed": args.seed,
        "epochs": args.epochs,
        "num_points": args.num_points,
        "endpoints": {"a": {"loss": endpoints[0][0], "accuracy": endpoints[0][1]},
                      "b": {"loss": endpoints[1][0], "accuracy": endpoints[1][1]}},
        "methods": results,
        "paths": {k: v.as_dict() for k, v in paths.items()},
    }
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(payload, indent=2))
    written[1].write_text(markdown_table(payload))
    if save_paths_figure(paths, out / "paths.png"):
        written.append(out / "paths.png")
    _say("wrote " + ", ".join(map(str, written)))
    return payload


def markdown_table(payload: dict[str, Any]) -> str:
    """The demo's results as a markdown table (one row per method)."""
    a, b = payload["endpoints"]["a"]["accuracy"], payload["endpoints"]["b"]["accuracy"]
    lines = [
        f"rebasin demo: {payload['architecture']} on {payload['dataset']} (seed {payload['seed']}, "
        f"{payload['epochs']} epochs; test accuracy A {100 * a:.2f}%, B {100 * b:.2f}%; "
        f"{payload['num_points']} points on the test set)",
        "",
        "| method | path | loss barrier | accuracy barrier (pts) | midpoint accuracy (%) | time (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in payload["methods"].items():
        lines.append(
            f"| {name} | {r['path']} | {r['barrier']['loss']:.4f} | {100 * r['barrier']['accuracy']:.2f} | "
            f"{100 * r['midpoint']['accuracy']:.2f} | {r['time_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def save_paths_figure(paths: dict[str, Any], target: Path) -> bool:
    """Write the loss and accuracy panels of ``{name: PathResult}`` to ``target`` (a PNG).

    Used by ``rebasin demo`` (``paths.png``) and ``rebasin path``. matplotlib is a base dependency;
    should it be missing all the same, a note is printed and False returned.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        _say("matplotlib is not installed: skipping paths.png (pip install matplotlib)")
        return False
    from ..paths.plot import plot_paths

    with_accuracy = all(p.accuracy is not None for p in paths.values())  # None: not a classification task
    fig, axes = plt.subplots(1, 2 if with_accuracy else 1, figsize=(11 if with_accuracy else 5.5, 4),
                             constrained_layout=True, squeeze=False)
    plot_paths(paths, metric="loss", ax=axes[0][0], title="test loss along the path")
    if with_accuracy:
        plot_paths(paths, metric="accuracy", ax=axes[0][1], title="test accuracy along the path")
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return True


def run_landscape(args: argparse.Namespace) -> dict[str, Any]:
    """Landscape measurements for the demo pair; writes ``landscape.json`` and returns it."""

    from .._common import module_with_state, state_of
    from ..landscape import cka, hessian_top_eigenvalue, hessian_trace, mode_connectivity
    from ..matching import ot_matching
    from ..matching.weight import weight_matching
    from ..paths import ArcPath, evaluate_path, interpolate, weight_adjusted_path
    from ..spec.core import permute
    from ..trace.tracing import spec_from_model

    progress = _progress(args)
    device = device_from_name(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test, model_a, model_b, endpoints, arch = _train_pair(args, device, progress)
    state_a, state_b = state_of(model_a), state_of(model_b)
    # one pass over the (shuffled) loader for inputs and labels together: two passes pair them wrongly
    pairs = list(train)
    x_train = torch.cat([xb for xb, _ in pairs]).to(device)
    y_train = torch.cat([yb for _, yb in pairs]).to(device)
    spec = spec_from_model(model_a, x_train[:2])
    state_wm = permute(spec, weight_matching(spec, state_a, state_b, seed=args.seed), state_b)
    state_ot = permute(spec, ot_matching(spec, state_a, state_b), state_b)
    last_hidden = f"layers.{2 * args.depth - 1}"  # the activation after the last hidden Linear of rebasin.apps.models.MLP

    report: dict[str, Any] = {"architecture": arch, "dataset": args.dataset, "seed": args.seed, "pairs": {}}
    _say(f"{'pair':<16} {'mc linear':>10} {'mc bezier':>10} {'CKA out':>8} {'CKA hidden':>10}   (mc on test error)")
    for label, state in (("unaligned", state_b), ("weight-matched", state_wm)):
        mc = {
            kind: mode_connectivity(model_a, state_a, state, test, curve=kind, fit_loader=train,
                                    epochs=args.curve_epochs, num_points=args.num_points, seed=args.seed, device=device).mc
            for kind in ("linear", "bezier")
        }
        model_bb = module_with_state(model_b, state)
        sims = {"outputs": cka(model_a, model_bb, test, device=device),
                "last_hidden": cka(model_a, model_bb, test, layer=last_hidden, device=device)}
        report["pairs"][label] = {"mc": mc, "cka": sims}
        _say(f"{label:<16} {mc['linear']:>+10.4f} {mc['bezier']:>+10.4f} {sims['outputs']:>8.4f} {sims['last_hidden']:>10.4f}")

    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(x_train), generator=g)[:512]
    batch = (x_train[idx], y_train[idx])
    report["hessian"] = {}
    for name, model in (("A", model_a), ("B", model_b)):
        eig = hessian_top_eigenvalue(model, batch, n_iter=100, seed=args.seed, device=device)
        tr = hessian_trace(model, batch, n_samples=50, seed=args.seed, device=device)
        report["hessian"][name] = {"top_eigenvalue": eig.eigenvalue, "trace": tr.trace, "trace_std_error": tr.std_error}
        _say(f"Hessian of the training loss (512 images), model {name}: top eigenvalue {eig.eigenvalue:.3f}, "
             f"trace {tr.trace:.1f} ± {tr.std_error:.1f}")

    paths = {
        "Linear": lambda t: interpolate(state_a, state_b, t),
        "Arc": ArcPath(state_a, state_b, spec=spec),
        "Linear+WA": weight_adjusted_path(model_a, state_a, state_b, x_train, device=device),
        "OT": lambda t: interpolate(state_a, state_ot, t),
        "OT+WA": weight_adjusted_path(model_a, state_a, state_ot, x_train, device=device),
        "weight matching": lambda t: interpolate(state_a, state_wm, t),
    }
    report["worst_accuracy"] = {}
    for name, path in paths.items():
        res = evaluate_path(model_a, path, test, num_points=args.num_points, device=device)  # type: ignore[arg-type]  # path is one of the path objects built above, held in an object-typed table
        report["worst_accuracy"][name] = min(res.accuracy)  # type: ignore[arg-type]  # the demo evaluates a classifier, so the accuracies are set
    _say("worst test accuracy along the path (endpoints "
         f"{100 * endpoints[0][1]:.2f}% / {100 * endpoints[1][1]:.2f}%): "
         + ", ".join(f"{k} {100 * v:.2f}%" for k, v in report["worst_accuracy"].items()))
    (out / "landscape.json").write_text(json.dumps(report, indent=2))
    _say(f"wrote {out / 'landscape.json'}")
    return report

