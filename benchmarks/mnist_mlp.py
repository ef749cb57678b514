"""Linear-path barriers on MNIST: naive vs every matcher, for two models trained from different seeds.

    python benchmarks/mnist_mlp.py --data-root ../shared/data                 # MLP 784-512-512-512-10
    python benchmarks/mnist_mlp.py --arch mlp2 --data-root ../shared/data     # 784-512-512-10
    python benchmarks/mnist_mlp.py --arch cnn --data-root ../shared/data      # 3 conv + BN + linear

Trains A and B (Adam 1e-3, ``--epochs``), aligns B to A with each method through
``rebasin.align``, evaluates the test loss / accuracy on 25 evenly spaced points including both
endpoints (recomputing BatchNorm statistics at every t for models with BatchNorm, as is standard;
``--bn-reset off`` to see the variance collapse without it), and reports the max-minus-mean barrier
and the wall time of each matcher. The table is printed and appended to docs/benchmarks.md with the
command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import append_report

from rebasin import (
    BNResetPath,
    LinearPath,
    align,
    barrier,
    evaluate_path,
)
from rebasin.apps.data import data_root_from_env, mnist_loaders
from rebasin.apps.models import MLP, SmallCNN
from rebasin.apps.training import evaluate, fit_classifier_, seeded_model

ARCHS = {
    "mlp3": (lambda: MLP(784, [512, 512, 512], 10), True),
    "mlp2": (lambda: MLP(784, [512, 512], 10), True),
    "cnn": (lambda: SmallCNN(in_channels=1, num_classes=10), False),
}
METHODS = {
    "naive": ("identity", {}),
    "weight_matching": ("weight_matching", {}),
    "activation_matching": ("activation_matching", {}),
    "ste": ("ste", {"epochs": 1, "lr": 1e-3}),
    "sinkhorn_l2": ("sinkhorn", {"cost": "l2", "fit": {"steps": 300, "lr": 0.1}}),
    "sinkhorn_midpoint": ("sinkhorn", {"cost": "midpoint", "fit": {"epochs": 1, "lr": 0.1}}),
    "sinkhorn_random": ("sinkhorn", {"cost": "random", "fit": {"epochs": 1, "lr": 0.1}}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="mlp3")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--num-points", type=int, default=25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sinkhorn-epochs", type=int, default=None, help="override the data costs' epochs")
    parser.add_argument("--bn-reset", choices=["auto", "on", "off"], default="auto",
                        help="recompute BatchNorm statistics at every t on 20 training batches (auto: when the model has BN)")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = parser.parse_args()

    root = args.data_root or data_root_from_env()
    if root is None:
        parser.error("--data-root (or REBASIN_DATA) must point at a folder holding MNIST/raw")
    device = torch.device(args.device)
    factory, flatten = ARCHS[args.arch]
    train, test = mnist_loaders(root, batch_size=128, flatten=flatten, seed=args.seed)

    t0 = time.perf_counter()
    models = []
    for k in range(2):
        model = seeded_model(factory, seed=args.seed + k).to(device)
        fit_classifier_(model, train, epochs=args.epochs, lr=1e-3, seed=args.seed + k, device=device, progress=True)
        models.append(model)
    train_s = time.perf_counter() - t0
    accs = [evaluate(m, test, device=device)[1] for m in models]
    print(f"{args.arch}: trained 2 models in {train_s:.0f} s; test accuracy {accs[0]:.4f} / {accs[1]:.4f}")

    model_a, model_b = models
    state_a = {k: v.detach() for k, v in model_a.state_dict().items()}
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model_a.modules())
    bn_reset = args.bn_reset == "on" or (args.bn_reset == "auto" and has_bn)
    rows = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        method, options = METHODS[name]
        options = {**options}
        if args.sinkhorn_epochs is not None and "fit" in options and "epochs" in options["fit"]:
            options["fit"] = {**options["fit"], "epochs": args.sinkhorn_epochs}
        # progress is a standard keyword: the registry passes it to the matchers that show one
        res = align(model_a, model_b, method=method, loader=train, seed=args.seed, device=device, progress=True,
                    **options)
        line = LinearPath(state_a, res.state_b)
        how = BNResetPath(line, model_a, train, max_batches=20, device=device) if bn_reset else line
        path = evaluate_path(model_a, how, test, num_points=args.num_points, device=device)
        rows.append(
            (
                name,
                barrier(path, kind="max_minus_mean", metric="loss"),
                100 * barrier(path, kind="max_minus_mean", metric="accuracy"),
                100 * path.accuracy[len(path.accuracy) // 2],
                res.time_s,
            )
        )
        print(f"  {name:<20} loss barrier {rows[-1][1]:.4f}  acc barrier {rows[-1][2]:.2f} pts  "
              f"({res.time_s:.1f} s)", flush=True)

    arch_desc = {"mlp3": "MLP 784-512-512-512-10", "mlp2": "MLP 784-512-512-10", "cnn": "SmallCNN (3 conv + BN + linear)"}
    table = [
        f"{arch_desc[args.arch]}, {args.epochs} epochs of Adam (1e-3, batch 128), seeds {args.seed}/{args.seed + 1}; "
        f"endpoint test accuracy {100 * accs[0]:.2f}% / {100 * accs[1]:.2f}%; barrier = max-minus-mean over "
        f"{args.num_points} points on the 10k test set"
        + ("; BatchNorm statistics recomputed at every t on 20 training batches" if bn_reset else "")
        + f"; device {device}.",
        "",
        "| method | test-loss barrier | test-accuracy barrier (pts) | midpoint accuracy (%) | matcher time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    table += [f"| {n} | {lb:.4f} | {ab:.2f} | {mid:.2f} | {t:.2f} |" for n, lb, ab, mid, t in rows]
    text = "\n".join(table)
    print(text)
    if not args.no_report:
        command = "python benchmarks/mnist_mlp.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        append_report(f"Barriers on MNIST: {arch_desc[args.arch]}", command, text)


if __name__ == "__main__":
    main()
