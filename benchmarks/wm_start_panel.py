"""Weight matching's start on a panel of pairs used to tune nothing: identity, layer-wise, one descent, two descents.

    python benchmarks/wm_start_panel.py --data-root ../shared/data

The pairs: independently trained MNIST models (MLPs at two widths and two seed pairs, a small CNN, a
narrow ResNet20, a tiny ViT; trained a few seconds each on a training subset), random initialisations of
tiny Llamas, and planted copies of a trained MLP (B = a random permutation of A, plus Gaussian noise of 0,
25 % and 50 % of each tensor's standard deviation). Neither the README demo's pair (digits MLPs) nor the
ViT benchmark's pair is here: those judge the rule chosen from this panel.

For every pair and every ``start`` of :func:`rebasin.weight_matching` the table has the objective, the
CPU seconds (``time.process_time``), the sweeps of every descent, the objective over the Cauchy-Schwarz
bound ``sum_k |A_k| |B_k|`` at the layer-wise *start* point and at each end, for trained pairs the test-loss
barrier of the linear path (max minus mean, BatchNorm statistics recomputed along the path where the model
has BatchNorm) and for planted pairs whether the planted permutation came back.

The starts: ``identity``, ``layerwise``, ``auto`` (the default: one descent, from the higher of the
layer-wise start and the identity) and ``best`` (a descent from each, the higher end kept: the default
until 2026-12-08, whose column the first run of this script labelled ``auto``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _report import append_report, machine_summary
from builders import tiny_llama  # tests/builders.py

from rebasin import (
    BNResetPath,
    LinearPath,
    barrier,
    evaluate_path,
    invert,
    permute,
    random_permutation,
    spec_from_model,
    weight_matching,
)
from rebasin.apps.data import data_root_from_env
from rebasin.apps.models import MLP, ResNet20, SmallCNN, ViT
from rebasin.apps.training import fit_classifier_, seeded_model
from rebasin.datasets import mnist_tensors, tensor_loader

STARTS = ("identity", "layerwise", "auto", "best")


def bound(spec, sa: dict[str, torch.Tensor], sb: dict[str, torch.Tensor]) -> float:
    """``sum_k |A_k| |B_k|`` over the floating keys with a permuted axis (the objective's keys)."""
    total = 0.0
    for k, axes in spec.axes.items():
        if sa[k].is_floating_point() and sa[k].numel() and any(a is not None for a in axes):
            total += float(sa[k].double().norm() * sb[k].double().norm())
    return total


def data(root: str, n_train: int, n_test: int, seed: int) -> tuple[torch.Tensor, ...]:
    x, y = mnist_tensors(root, train=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=g)[:n_train]
    xt, yt = mnist_tensors(root, train=False)
    return x[idx], y[idx], xt[:n_test], yt[:n_test]


def trained_pairs(root: str, args: argparse.Namespace) -> list[tuple[str, nn.Module, nn.Module, Any, Any, bool]]:
    """``(name, A, B, train loader, test loader, has BatchNorm)`` for every trained pair."""
    x, y, xt, yt = data(root, args.n_train, args.n_test, seed=7)
    flat = (x.reshape(len(x), -1), xt.reshape(len(xt), -1))
    loaders = {
        True: (tensor_loader(flat[0], y, batch_size=128, shuffle=True, seed=7), tensor_loader(flat[1], yt, batch_size=1000)),
        False: (tensor_loader(x, y, batch_size=128, shuffle=True, seed=7), tensor_loader(xt, yt, batch_size=1000)),
    }
    archs: list[tuple[str, Callable[[], nn.Module], bool, tuple[int, int], int]] = [
        ("MLP 784-128-128-10", lambda: MLP(784, [128, 128], 10), True, (10, 11), args.epochs),
        ("MLP 784-128-128-10", lambda: MLP(784, [128, 128], 10), True, (20, 21), args.epochs),
        ("MLP 784-512-512-512-10", lambda: MLP(784, [512, 512, 512], 10), True, (10, 11), args.epochs),
        ("MLP 784-512-512-512-10", lambda: MLP(784, [512, 512, 512], 10), True, (20, 21), args.epochs),
        ("SmallCNN 16-32-32 + BN", lambda: SmallCNN(channels=(16, 32, 32)), False, (10, 11), 1),
        ("ResNet20 x0.5 + BN", lambda: ResNet20(width=0.5, in_channels=1), False, (10, 11), 1),
        ("ViT width 32, depth 2", lambda: ViT(width=32, depth=2, heads=4), False, (10, 11), args.epochs),
    ]
    out = []
    for name, factory, flatten, seeds, epochs in archs:
        train, test = loaders[flatten]
        models = []
        for s in seeds:
            m = seeded_model(factory, seed=s)
            fit_classifier_(m, train, epochs=epochs, lr=1e-3, seed=s, progress=False)
            models.append(m.eval())
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models[0].modules())
        out.append((f"{name}, seeds {seeds[0]}/{seeds[1]}", models[0], models[1], train, test, has_bn))
        print(f"trained {out[-1][0]}", flush=True)
    return out


def plant(model: nn.Module, example: torch.Tensor, noise: float, seed: int) -> tuple[Any, dict, dict, dict]:
    """``(spec, A, B, truth)``: B = a random permutation of A plus ``noise`` x each tensor's std (as tests/test_sinkhorn_planted.py)."""
    spec = spec_from_model(model, example)
    sa = {k: v.detach().clone() for k, v in model.state_dict().items()}
    planted = random_permutation(spec, seed=seed + 100)
    g = torch.Generator().manual_seed(seed + 1000)
    sb = {k: v + noise * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and noise else v
          for k, v in permute(spec, planted, sa).items()}
    return spec, sa, sb, invert(planted)


def run_starts(spec, sa, sb) -> dict[str, Any]:
    """Every start's permutations, objective, CPU seconds and descents; the layer-wise start's objective."""
    res: dict[str, Any] = {"bound": bound(spec, sa, sb)}
    _, zinfo = weight_matching(spec, sa, sb, start="layerwise", n_iter=0, return_info=True)
    res["start_obj"], res["identity_obj"] = zinfo.final_objective, zinfo.identity_objective
    for s in STARTS:
        t0 = time.process_time()
        perms, info = weight_matching(spec, sa, sb, start=s, return_info=True)
        res[s] = (perms, info, time.process_time() - t0)
    return res


def loss_barrier(model: nn.Module, sa, sb, train, test, has_bn: bool, points: int) -> float:
    line = LinearPath(sa, sb)
    how = BNResetPath(line, model, train, max_batches=10) if has_bn else line
    return barrier(evaluate_path(model, how, test, num_points=points, progress=False), kind="max_minus_mean", metric="loss")


def fmt_descents(info) -> str:
    return ", ".join(f"{k[0]}{n}" for k, _, n in info.descents) if info.descents else str(info.n_sweeps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--n-train", type=int, default=6000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--no-report", action="store_true", help="print only; do not write docs/benchmarks.md")
    args = parser.parse_args()
    root = args.data_root or data_root_from_env()
    if root is None:
        parser.error("--data-root (or REBASIN_DATA) must point at a folder holding MNIST/raw")
    torch.set_grad_enabled(True)

    rows = []
    header = ("| pair | kind | start | objective | / bound | CPU s | sweeps | test-loss barrier | planted found |\n"
              "|---|---|---|---:|---:|---:|---|---:|---|")

    def add(name: str, kind: str, spec, sa, sb, judge: Callable[[dict], str], barrier_of: Callable[[dict], str]) -> None:
        r = run_starts(spec, sa, sb)
        b = r["bound"]
        rows.append(f"| {name} | {kind} | identity point | {r['identity_obj']:.6g} | {r['identity_obj'] / b:.4f} |  |  | "
                    f"{barrier_of({}) if kind == 'trained' else ''} |  |")
        rows.append(f"| {name} | {kind} | layer-wise start point | {r['start_obj']:.6g} | {r['start_obj'] / b:.4f} |  |  |  |  |")
        for s in STARTS:
            perms, info, cpu = r[s]
            rows.append(f"| {name} | {kind} | {s} | {info.final_objective:.6g} | {info.final_objective / b:.4f} | "
                        f"{cpu:.3g} | {fmt_descents(info)} | {barrier_of(perms)} | {judge(perms)} |")
            print(rows[-1], flush=True)

    for name, a, b_model, train, test, has_bn in trained_pairs(root, args):
        example = next(iter(test))[0][:2]
        spec = spec_from_model(a, example)
        sa = {k: v.detach() for k, v in a.state_dict().items()}
        sb = {k: v.detach() for k, v in b_model.state_dict().items()}

        def barrier_of(perms: dict, a=a, spec=spec, sa=sa, sb=sb, train=train, test=test, has_bn=has_bn) -> str:
            pb = permute(spec, perms, sb) if perms else sb
            return f"{loss_barrier(a, sa, pb, train, test, has_bn, args.points):.4f}"

        add(name, "trained", spec, sa, sb, lambda p: "", barrier_of)
        if name.startswith("MLP 784-128-128-10, seeds 10"):
            planted_source = (a, example)

    for layers, hidden, inter in ((2, 64, 128), (4, 128, 256)):
        a = tiny_llama(hidden=hidden, intermediate=inter, layers=layers, seed=0, norm_seed=1)
        b_model = tiny_llama(hidden=hidden, intermediate=inter, layers=layers, seed=1, norm_seed=2)
        tokens = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(0))
        spec = spec_from_model(a, tokens)
        add(f"Llama {layers} layers, width {hidden}, 4 q / 2 kv heads, random init 0/1", "random init", spec,
            {k: v.detach() for k, v in a.state_dict().items()}, {k: v.detach() for k, v in b_model.state_dict().items()},
            lambda p: "", lambda p: "")

    a, example = planted_source
    for noise in (0.0, 0.25, 0.5):
        for seed in (0, 1):
            spec, sa, sb, truth = plant(a, example, noise, seed)

            def found(p: dict, truth: dict = truth) -> str:
                return "yes" if all(torch.equal(p[k], truth[k]) for k in truth) else "no"

            add(f"planted MLP 784-128-128-10, noise {noise:.0%}, seed {seed}", "planted", spec, sa, sb, found,
                lambda p: "")

    text = "\n".join([
        f"Machine: {machine_summary()}. MNIST subset of {args.n_train} training images (seed 7), {args.n_test} test "
        f"images; MLPs and the ViT trained {args.epochs} epochs, the CNN and the ResNet 1 epoch (Adam 1e-3, batch 128). "
        f"Barrier: max minus mean test loss over {args.points} points of the linear path; 'identity point' is the "
        "naive path. Sweeps: i = from the identity, l = from the layer-wise start (the start itself not counted).",
        "", header, *rows])
    print(text)
    if not args.no_report:
        command = "python benchmarks/wm_start_panel.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
        append_report("Weight matching's start on an untuned panel (wm_start_panel)", command, text)


if __name__ == "__main__":
    main()
