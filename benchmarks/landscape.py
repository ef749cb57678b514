"""Landscape measurements on MNIST MLPs, and the Anokhin & Yarotsky connection table.

    python benchmarks/landscape.py --data-root ../shared/data                 # both parts
    python benchmarks/landscape.py --data-root ../shared/data --part metrics  # Yang et al. only
    python benchmarks/landscape.py --data-root ../shared/data --part paths    # Anokhin & Yarotsky only

Part ``metrics`` (Yang et al., NeurIPS 2021, "Taxonomizing local versus global structure in neural
network loss landscapes"): two MLPs 784-512-512-10 trained from different seeds on clean labels, and
two trained on labels of which ``--noise`` are replaced by uniformly random classes (their "poor
data" setting). For each pair: mode connectivity ``mc`` on a trained Bezier curve (training loss on
the labels the pair was trained on), linear CKA between the two models' outputs and between their
last hidden layers (test set), the Hessian's top eigenvalue (power iteration) and trace (Hutchinson)
of the training loss on a fixed batch, averaged over the pair's two models.

Part ``paths`` (Anokhin & Yarotsky, ICML 2020, table of worst accuracy along the path): two
one-hidden-layer MLPs 784-2000-10; worst test accuracy along Linear, Arc, Linear+WA, Arc+WA, OT and
OT+WA paths (WA refits on ``--wa-samples`` training inputs), plus weight matching for reference.

Tables are printed and appended to docs/benchmarks.md with the command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import append_report, machine_summary, markdown_table, mnist_root

from rebasin import evaluate_path, interpolate, permute, spec_from_model, weight_matching
from rebasin._common import state_of
from rebasin.apps.data import mnist_tensors, tensor_loader
from rebasin.apps.models import MLP
from rebasin.apps.training import evaluate, fit_classifier_, seeded_model
from rebasin.matching import ot_matching
from rebasin.paths import ArcPath, weight_adjusted_path


def noisy_labels(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A copy of ``y`` whose first ``fraction`` (in a seeded random order) get uniformly random classes."""
    g = torch.Generator().manual_seed(seed)
    y = y.clone()
    idx = torch.randperm(len(y), generator=g)[: round(fraction * len(y))]
    y[idx] = torch.randint(0, 10, (len(idx),), generator=g)
    return y


def train_pair(factory, x, y, *, epochs, seed, device):
    loader = tensor_loader(x, y, batch_size=128, shuffle=True, seed=seed)
    models = []
    for k in range(2):
        model = seeded_model(factory, seed=seed + k).to(device)
        fit_classifier_(model, loader, epochs=epochs, lr=1e-3, seed=seed + k, device=device, progress=False)
        models.append(model.eval())
    return models


def part_metrics(args, data, device) -> tuple[str, str]:
    from rebasin.landscape import cka, hessian_top_eigenvalue, hessian_trace, mode_connectivity

    (x, y), (xt, yt) = data
    factory = lambda: MLP(784, [512, 512], 10)  # noqa: E731 - a one-line model factory
    test = tensor_loader(xt, yt, batch_size=1000)
    g = torch.Generator().manual_seed(args.seed)
    sub = torch.randperm(len(x), generator=g)[: args.eval_samples]
    hess = torch.randperm(len(x), generator=g)[: args.hessian_samples]
    rows = []
    for label, fraction in (("clean labels", 0.0), (f"{100 * args.noise:.0f}% random labels", args.noise)):
        t0 = time.perf_counter()
        y_used = noisy_labels(y, fraction, seed=args.seed + 7) if fraction > 0 else y
        a, b = train_pair(factory, x, y_used, epochs=args.epochs, seed=args.seed, device=device)
        fit = tensor_loader(x, y_used, batch_size=128, shuffle=True, seed=args.seed)
        train_eval = tensor_loader(x[sub], y_used[sub], batch_size=1000)
        mc = mode_connectivity(a, state_of(a), state_of(b), train_eval, curve="bezier", fit_loader=fit,
                               epochs=args.curve_epochs, metric="loss", num_points=args.num_points,
                               seed=args.seed, device=device)
        cka_out = cka(a, b, test, device=device)
        cka_hidden = cka(a, b, test, layer="layers.3", device=device)
        batch = (x[hess].to(device), y_used[hess].to(device))
        eig = [float(hessian_top_eigenvalue(m, batch, loss_fn=F.cross_entropy, n_iter=args.power_iters,
                                            seed=args.seed, device=device)) for m in (a, b)]
        tr = [float(hessian_trace(m, batch, loss_fn=F.cross_entropy, n_samples=args.hutchinson_samples,
                                  seed=args.seed, device=device)) for m in (a, b)]
        accs = [evaluate(m, test, device=device)[1] for m in (a, b)]
        rows.append([label, f"{100 * sum(accs) / 2:.2f}", f"{mc.mc:+.4f}", f"{mc.t_star:.2f}", f"{cka_out:.4f}",
                     f"{cka_hidden:.4f}", f"{sum(eig) / 2:.2f}", f"{sum(tr) / 2:.1f}",
                     f"{time.perf_counter() - t0:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    header = ["labels", "test acc % (mean of pair)", "mc (train loss)", "t*", "CKA outputs", "CKA last hidden",
              "Hessian top eig", "Hessian trace", "time (s)"]
    notes = (
        f"{machine_summary(device)}. MLP 784-512-512-10, {args.epochs} epochs of Adam 1e-3 (batch 128), seeds "
        f"{args.seed}/{args.seed + 1}; mc on a quadratic Bezier curve trained {args.curve_epochs} epochs, training "
        f"loss on {args.eval_samples} training images with the labels the pair was trained on, {args.num_points} "
        f"points (negative = barrier); CKA = linear CKA on the 10k test images; Hessian of the training loss on a "
        f"fixed batch of {args.hessian_samples} training images: top eigenvalue by power iteration "
        f"({args.power_iters} iterations at most), trace by Hutchinson with {args.hutchinson_samples} Rademacher "
        f"vectors; both averaged over the pair's two models."
    )
    return markdown_table(header, rows), notes


def part_paths(args, data, device) -> tuple[str, str]:
    (x, y), (xt, yt) = data
    factory = lambda: MLP(784, [args.width], 10)  # noqa: E731 - a one-line model factory
    test = tensor_loader(xt, yt, batch_size=1000)
    a, b = train_pair(factory, x, y, epochs=args.epochs, seed=args.seed, device=device)
    sa, sb = state_of(a), state_of(b)
    spec = spec_from_model(a, x[:2].to(device))
    g = torch.Generator().manual_seed(args.seed)
    wa_batch = x[torch.randperm(len(x), generator=g)[: args.wa_samples]].to(device)
    t0 = time.perf_counter()
    sb_ot = permute(spec, ot_matching(spec, sa, sb), sb)
    t_ot = time.perf_counter() - t0
    t0 = time.perf_counter()
    sb_wm = permute(spec, weight_matching(spec, sa, sb), sb)
    t_wm = time.perf_counter() - t0
    paths = {
        "Linear": (lambda t: interpolate(sa, sb, t), 0.0),
        "Arc": (ArcPath(sa, sb, spec=spec), 0.0),
        "Linear+WA": (weight_adjusted_path(a, sa, sb, wa_batch, device=device), 0.0),
        "Arc+WA": (weight_adjusted_path(a, sa, sb, wa_batch, base="arc", device=device), 0.0),
        "OT": (lambda t: interpolate(sa, sb_ot, t), t_ot),
        "OT+WA": (weight_adjusted_path(a, sa, sb_ot, wa_batch, device=device), t_ot),
        "weight matching (reference)": (lambda t: interpolate(sa, sb_wm, t), t_wm),
    }
    rows = []
    for name, (path, t_match) in paths.items():
        t0 = time.perf_counter()
        res = evaluate_path(a, path, test, num_points=args.num_points, device=device)
        i = min(range(len(res.accuracy)), key=res.accuracy.__getitem__)
        rows.append([name, f"{100 * res.accuracy[i]:.2f}", f"{res.t[i]:.2f}", f"{100 * res.accuracy[len(res.t) // 2]:.2f}",
                     f"{t_match:.2f}", f"{time.perf_counter() - t0:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    accs = [evaluate(m, test, device=device)[1] for m in (a, b)]
    header = ["path", "worst test acc %", "at t", "acc at t=0.5 %", "matching (s)", "path eval (s)"]
    notes = (
        f"{machine_summary(device)}. MLP 784-{args.width}-10, {args.epochs} epochs of Adam 1e-3 (batch 128), seeds "
        f"{args.seed}/{args.seed + 1}; endpoints {100 * accs[0]:.2f}% / {100 * accs[1]:.2f}% test accuracy; "
        f"{args.num_points} evenly spaced t on the 10k test images; WA refits the next layer by ridge least squares "
        f"on {args.wa_samples} training inputs. Anokhin & Yarotsky report (784-2000-10) ~95.9% worst accuracy for "
        f"Linear up to ~97.9% for OT+WA with endpoints ~98.0%."
    )
    return markdown_table(header, rows), notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="torchvision MNIST root (default: $REBASIN_DATA)")
    parser.add_argument("--part", choices=["metrics", "paths", "both"], default="both")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.2, help="share of random labels in the 'poor data' pair")
    parser.add_argument("--curve-epochs", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=10000)
    parser.add_argument("--hessian-samples", type=int, default=1000)
    parser.add_argument("--power-iters", type=int, default=50)
    parser.add_argument("--hutchinson-samples", type=int, default=50)
    parser.add_argument("--train-samples", type=int, default=None, help="train on a seeded subset (smoke tests)")
    parser.add_argument("--width", type=int, default=2000)
    parser.add_argument("--wa-samples", type=int, default=10000)
    parser.add_argument("--num-points", type=int, default=21)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    root = mnist_root(args.data_root)
    device = torch.device(args.device)
    flat = lambda xy: (xy[0].flatten(1), xy[1])  # noqa: E731 - a one-line batch transform
    x, y = flat(mnist_tensors(root, train=True))
    if args.train_samples is not None:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[: args.train_samples]
        x, y = x[keep], y[keep]
    data = ((x, y), flat(mnist_tensors(root, train=False)))
    command = "python benchmarks/" + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
    if args.part in ("metrics", "both"):
        table, notes = part_metrics(args, data, device)
        print(table)
        if not args.no_report:
            append_report("Landscape metrics: clean vs random labels (Yang et al.)", command, table, notes=notes)
    if args.part in ("paths", "both"):
        table, notes = part_paths(args, data, device)
        print(table)
        if not args.no_report:
            append_report("Worst accuracy along connecting paths (Anokhin & Yarotsky)", command, table, notes=notes)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
