"""Merging N MNIST MLPs trained from different seeds: merged vs naive average vs best single model.

    python benchmarks/merge.py --data-root ../shared/data --num-models 4

Trains ``--num-models`` MLPs (784-256-256-10 by default, Adam 1e-3) and merges them with
``rebasin.merge`` for each ``--methods`` matcher (aligned + REPAIR), then ``rebasin.compare_merge``
reports the test accuracy of every input, the naive average (unaligned), the naive average REPAIRed, the
aligned average before REPAIR, the merged model and the ensemble (mean logits). A merge worse than the naive average is a
bug. The table is appended to docs/benchmarks.md.
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

from rebasin import compare_merge, merge
from rebasin.apps.data import mnist_loaders
from rebasin.apps.models import MLP
from rebasin.apps.training import fit_classifier_, seeded_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="torchvision MNIST root (default: $REBASIN_DATA)")
    parser.add_argument("--num-models", type=int, default=4)
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--methods", default="weight_matching,activation_matching")
    parser.add_argument("--n-iter", type=int, default=5, help="maximum alignment rounds of merge")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    root = mnist_root(args.data_root)

    hidden = [int(h) for h in args.hidden.split(",")]
    train, test = mnist_loaders(root, batch_size=128, train_subset=args.train_subset, seed=args.seed)
    stats, _ = mnist_loaders(root, batch_size=500, train_subset=args.train_subset, seed=args.seed)
    stats = list(stats)[:10]
    models = [
        fit_classifier_(seeded_model(lambda: MLP(784, hidden, 10), args.seed + i), train, epochs=args.epochs, seed=args.seed + i, device=args.device)
        for i in range(args.num_models)
    ]
    rows = []
    for method in args.methods.split(","):
        start = time.perf_counter()
        merged, info = merge(models, method=method, loader=stats, n_iter=args.n_iter, device=args.device, return_info=True)
        comparison = compare_merge(models, merged, info, test, loader=stats, device=args.device)
        elapsed = time.perf_counter() - start
        acc = {k: v for k, v in comparison.accuracy.items() if k != "models"}
        best = max(comparison.accuracy["models"])
        rows.append(
            [method, f"{100 * best:.2f}", f"{100 * acc['naive']:.2f}", f"{100 * acc['naive_repair']:.2f}", f"{100 * acc['aligned_average']:.2f}",
             f"{100 * acc['merged']:.2f}", f"{100 * acc['ensemble']:.2f}", f"{info.rounds}{'' if info.converged else ' (not converged)'}", f"{info.time_s:.0f}"]
        )  # fmt: skip
        print(method, "models:", ", ".join(f"{100 * v:.2f}" for v in comparison.accuracy["models"]), f"({elapsed:.0f}s incl. evaluation)", flush=True)
        if acc["merged"] <= acc["naive"]:
            print(f"WARNING: {method}: merged ({acc['merged']:.4f}) is not better than the naive average ({acc['naive']:.4f})")
    header = ["matcher", "best single %", "naive avg %", "naive avg + REPAIR %", "aligned avg %", "merged (aligned + REPAIR) %", "ensemble %", "rounds", "merge time (s)"]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_report:
        command = "python benchmarks/" + " ".join(shlex.quote(x) for x in [Path(sys.argv[0]).name, *sys.argv[1:]])
        notes = (
            f"{machine_summary(args.device)}. {args.num_models} MLPs 784-{args.hidden.replace(',', '-')}-10, {args.epochs} epochs each, "
            "different seeds; test accuracy on the 10,000 MNIST test images; REPAIR / matching data: 10 x 500 training images."
        )
        append_report(f"Merging {args.num_models} MNIST MLPs", command, table, notes=notes)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
