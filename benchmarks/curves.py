"""Mode-connecting curves on MNIST, and the figure of every method along the path.

    python benchmarks/curves.py --data-root ../shared/data --figure docs/figures/mnist_mlp_paths.png

Trains two MLPs (784-256-256-10, Adam 1e-3, different seeds), aligns B to A with every matcher
(weight matching, activation matching, STE, Sinkhorn with the l2 / midpoint / random costs), fits a Bezier curve and a PolyChain (``--num-bends`` control points,
``--curve-epochs`` epochs of one t ~ U(0,1) per batch) between the *unaligned* and between the
*aligned* endpoints, and evaluates the test accuracy along every path: naive linear, aligned linear
(every matcher), aligned + REPAIR, the four curves and the arc (Anokhin & Yarotsky) between the
aligned endpoints. Reports the minimum accuracy along each path and its max test error minus the
endpoints' (the target for the curves: within 1 point). The table is appended to
docs/benchmarks.md; ``--figure`` saves the accuracy plot (rebasin.paths.plot_paths).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import append_report, machine_summary, markdown_table, mnist_root

from rebasin import (
    BezierCurve,
    RepairedPath,
    align,
    evaluate_path,
    fit_curve,
)
from rebasin.apps.data import mnist_loaders
from rebasin.apps.models import MLP
from rebasin.apps.training import fit_classifier_, seeded_model
from rebasin.paths import ArcPath, PolyChainCurve, plot_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="torchvision MNIST root (default: $REBASIN_DATA)")
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--curve-epochs", type=int, default=2)
    parser.add_argument("--curve-lr", type=float, default=1e-3)
    parser.add_argument("--num-bends", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--num-points", type=int, default=11)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", default=None, help="save the accuracy-vs-t plot here (PNG)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    root = mnist_root(args.data_root)

    hidden = [int(h) for h in args.hidden.split(",")]
    factory = lambda: MLP(784, hidden, 10)  # noqa: E731 - a one-line model factory
    train, test = mnist_loaders(root, batch_size=128, train_subset=args.train_subset, seed=args.seed)
    stats, _ = mnist_loaders(root, batch_size=500, train_subset=args.train_subset, seed=args.seed)
    stats = list(stats)[:10]
    a = fit_classifier_(seeded_model(factory, args.seed), train, epochs=args.epochs, seed=args.seed, device=args.device)
    b = fit_classifier_(seeded_model(factory, args.seed + 1), train, epochs=args.epochs, seed=args.seed + 1, device=args.device)
    sa, sb = ({k: v.detach() for k, v in m.state_dict().items()} for m in (a, b))
    wm = align(a, b, method="weight_matching", loader=stats, seed=args.seed, device=args.device)
    am = align(a, b, method="activation_matching", loader=stats, seed=args.seed, device=args.device)
    ste = align(a, b, method="ste", loader=train, seed=args.seed, device=args.device, epochs=1, lr=1e-3)
    sk = {
        cost: align(a, b, method="sinkhorn", loader=train, seed=args.seed, device=args.device, cost=cost,
                    init="identity", fit={"epochs": 1, "lr": 0.1, "progress": False})
        for cost in ("l2", "midpoint", "random")
    }

    def ev(**kw):
        return evaluate_path(a, kw.pop("sa", None), kw.pop("sb", None), test, num_points=args.num_points, device=args.device, **kw)

    results, secs = {}, {}
    results["naive"] = ev(sa=sa, sb=sb)
    results["weight matching"] = ev(sa=sa, sb=wm.state_b)
    results["activation matching"] = ev(sa=sa, sb=am.state_b)
    results["STE"] = ev(sa=sa, sb=ste.state_b)
    secs["STE"] = ste.time_s
    for cost, res in sk.items():
        results[f"Sinkhorn ({cost})"] = ev(sa=sa, sb=res.state_b)
        secs[f"Sinkhorn ({cost})"] = res.time_s
    results["weight matching + REPAIR"] = ev(path=RepairedPath(a, sa, wm.state_b, stats, spec=wm.spec, device=args.device))
    results["arc (aligned)"] = ev(path=ArcPath(sa, wm.state_b, spec=wm.spec))
    for cls, cname in ((BezierCurve, "Bezier"), (PolyChainCurve, "PolyChain")):
        for end, ename in ((sb, "unaligned"), (wm.state_b, "aligned")):
            curve = cls(sa, end, num_bends=args.num_bends)
            start = time.perf_counter()
            fit_curve(a, curve, train, epochs=args.curve_epochs, lr=args.curve_lr, seed=args.seed, device=args.device, progress=False)
            secs[f"{cname} ({ename})"] = time.perf_counter() - start
            results[f"{cname} ({ename})"] = ev(path=curve)

    rows = []
    for label, r in results.items():
        acc = [100 * v for v in r.accuracy]
        ends = max(100 - acc[0], 100 - acc[-1])
        rows.append([label, f"{min(acc):.2f}", f"{acc[len(acc) // 2]:.2f}", f"{max(100 - v for v in acc) - ends:.2f}", f"{secs.get(label, 0.0):.0f}"])
    header = ["path", "min acc %", "acc t=0.5 %", "max err - endpoint err (pts)", "fit time (s)"]
    table = markdown_table(header, rows)
    print(f"endpoints: A {results['naive'].accuracy[0] * 100:.2f}%, B {results['naive'].accuracy[-1] * 100:.2f}%")
    print(table)
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9.0, 5.5), constrained_layout=True)
        plot_paths(results, metric="accuracy", ax=ax, title=f"MNIST MLP 784-{args.hidden.replace(',', '-')}-10: test accuracy along the path")
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure, dpi=130)
        print("saved", args.figure)
    if not args.no_report:
        command = "python benchmarks/" + " ".join(shlex.quote(x) for x in [Path(sys.argv[0]).name, *sys.argv[1:]])
        notes = (
            f"{machine_summary(args.device)}. Endpoints: A {results['naive'].accuracy[0] * 100:.2f}%, "
            f"B {results['naive'].accuracy[-1] * 100:.2f}% test accuracy. Curves: {args.num_bends} control points, "
            f"{args.curve_epochs} epochs of Adam lr {args.curve_lr}, one t ~ U(0,1) per batch; "
            f"{args.num_points} evenly spaced t. Target for curves: max test error within 1 point of the endpoints'."
        )
        append_report("Mode-connecting curves on MNIST", command, table, notes=notes)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
