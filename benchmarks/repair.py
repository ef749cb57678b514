"""REPAIR on MNIST: accuracy barrier of the aligned-then-interpolated pair, with and without REPAIR.

    python benchmarks/repair.py --data-root ../shared/data                       # MLP + CNN
    python benchmarks/repair.py --arch mlp --epochs 5 --data-root ../shared/data

Architectures: ``mlp`` — depth 10, width 128, ReLU, no normalisation (the REPAIR paper's MNIST MLP,
which reports an accuracy barrier 17.1 -> 2.9 points); ``cnn`` — ``SmallCNN`` with BatchNorm
(REPAIR = resetting the BatchNorm statistics of the interpolated net). Two models are trained
from different seeds (Adam 1e-3), B is aligned to A (``--matcher``), and the test accuracy is
evaluated on ``--num-points`` points of the linear path: plain interpolation, and REPAIR at every
``t`` (statistics from ``--repair-batches`` training batches). The barrier is max-minus-mean in
accuracy points; the target is a >= 60% relative reduction. The table is printed and appended to
docs/benchmarks.md with the command.
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
    BNResetPath,
    LinearPath,
    RepairedPath,
    align,
    barrier,
    evaluate_path,
)
from rebasin.apps.data import mnist_loaders
from rebasin.apps.models import MLP, SmallCNN
from rebasin.apps.training import fit_classifier_, seeded_model

ARCHS = {
    "mlp": (lambda: MLP(784, [128] * 10, 10), True),
    "cnn": (lambda: SmallCNN(in_channels=1, num_classes=10, channels=(16, 32, 32)), False),
}


def run_arch(name: str, args: argparse.Namespace, root: Path) -> list[list[object]]:
    factory, flatten = ARCHS[name]
    train, test = mnist_loaders(root, batch_size=128, flatten=flatten, train_subset=args.train_subset, seed=args.seed)
    stats_loader, _ = mnist_loaders(root, batch_size=500, flatten=flatten, train_subset=args.train_subset, seed=args.seed)
    stats_loader = list(stats_loader)[: args.repair_batches]  # fixed batches: every pass sees the same data
    if args.test_batches:
        test = list(test)[: args.test_batches]
    start = time.perf_counter()
    a = fit_classifier_(seeded_model(factory, args.seed), train, epochs=args.epochs, seed=args.seed, device=args.device)
    b = fit_classifier_(seeded_model(factory, args.seed + 1), train, epochs=args.epochs, seed=args.seed + 1, device=args.device)
    train_s = time.perf_counter() - start
    res = align(a, b, method=args.matcher, loader=stats_loader, seed=args.seed, device=args.device)
    sa = {k: v.detach() for k, v in a.state_dict().items()}
    bn = None if flatten else stats_loader  # BN nets: the plain path keeps interpolated running stats
    rows = []
    plain = evaluate_path(a, LinearPath(sa, res.state_b), test, num_points=args.num_points, device=args.device)
    start = time.perf_counter()
    path = RepairedPath(a, sa, res.state_b, stats_loader, spec=res.spec, device=args.device)
    repaired = evaluate_path(a, path, test, num_points=args.num_points, device=args.device)
    repair_s = time.perf_counter() - start
    variants = [("aligned, plain interpolation", plain, 0.0)]
    if bn is not None:
        reset = evaluate_path(a, BNResetPath(LinearPath(sa, res.state_b), a, bn, device=args.device), test, num_points=args.num_points,
                              device=args.device)
        variants.append(("aligned, BN stats reset", reset, 0.0))
    variants.append(("aligned + REPAIR", repaired, repair_s))
    base = barrier(plain, metric="accuracy") * 100
    for label, r, secs in variants:
        b_pts = barrier(r, metric="accuracy") * 100
        mid = r.accuracy[len(r.t) // 2] * 100
        red = 100.0 * (1 - b_pts / base) if base > 0 else float("nan")
        rows.append([name, label, f"{r.accuracy[0] * 100:.2f}", f"{r.accuracy[-1] * 100:.2f}", f"{mid:.2f}", f"{b_pts:.2f}", f"{red:.0f}%", f"{secs:.1f}"])
    print(f"[{name}] trained two models in {train_s:.0f}s; {args.matcher} took {res.time_s:.1f}s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="torchvision MNIST root (default: $REBASIN_DATA)")
    parser.add_argument("--arch", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=None, help="train on this many images (all by default)")
    parser.add_argument("--matcher", default="activation_matching", help="any rebasin.align method (the REPAIR paper matches activations)")
    parser.add_argument("--repair-batches", type=int, default=10, help="batches of 500 training images for the statistics")
    parser.add_argument("--num-points", type=int, default=11)
    parser.add_argument("--test-batches", type=int, default=None, help="evaluate on this many test batches of 128 (all by default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = parser.parse_args()
    root = mnist_root(args.data_root)
    header = ["arch", "path", "acc A %", "acc B %", "acc t=0.5 %", "acc barrier (pts)", "barrier reduction", "REPAIR time (s)"]
    rows: list[list[object]] = []
    for name in args.arch.split(","):
        rows += run_arch(name.strip(), args, root)
    table = markdown_table(header, rows)
    print(table)
    if not args.no_report:
        command = "python benchmarks/" + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
        notes = (
            f"{machine_summary(args.device)}. Accuracy barrier = mean of the endpoint test accuracies minus "
            f"the minimum along {args.num_points} evenly spaced points (max-minus-mean); REPAIR statistics "
            f"from {args.repair_batches} x 500 training images. Target: REPAIR reduces the barrier by >= 60%."
        )
        append_report("REPAIR on MNIST", command, table, notes=notes)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
