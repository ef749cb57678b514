"""Re-basin of a small Vision Transformer on MNIST: loss and accuracy barriers per matcher and per symmetry.

    python benchmarks/vit_mnist.py --data-root ../shared/data
    python benchmarks/vit_mnist.py --data-root ../shared/data --epochs 1 --train-subset 10000   # quick look
    python benchmarks/vit_mnist.py --data-root ../shared/data --model encoder   # nn.TransformerEncoderLayer blocks

The model is :class:`rebasin.apps.models.ViT` (patch embedding 7x7, cls token, learned positional
embedding, 3 pre-norm encoder blocks, 4 heads, width 64, MLP 128), trained with AdamW from two seeds
(checkpoints cached in ``--cache``). B is aligned to A and the linear path is evaluated on the test set
at ``--num-points`` points. Rows: the naive path; weight matching with every symmetry (residual stream,
heads and the units inside each head, MLP units); weight matching restricted to within-head
permutations (heads stay in place), with the residual stream left as the identity, and with only the
MLP units; activation matching; Sinkhorn re-basin (L2 cost); weight matching + REPAIR. Barrier =
max-minus-mean (git re-basin). Target: the best aligned loss barrier is at most half the naive one.

``--model encoder`` runs the same ViT written the usual PyTorch way, with ``nn.TransformerEncoderLayer`` blocks
(pre-norm, GELU, ``nn.MultiheadAttention`` inside): activation matching reaches the units inside those modules
by recomputing them from each module's inputs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import append_report, machine_summary, markdown_table, mnist_root

from rebasin import LinearPath, PermutationSpec, RebasinError, align, barrier, evaluate_path, spec_from_model
from rebasin.apps.data import mnist_loaders
from rebasin.apps.models import ViT
from rebasin.apps.training import fit_classifier_, seeded_model


def within_heads_only(spec: PermutationSpec) -> PermutationSpec:
    """The spec with every head (outer) permutation fixed: each head's units are permuted on their own."""
    sizes = dict(spec.sizes or {})
    parts: dict[str, tuple[tuple[str, int], ...]] = {}
    for p, (_, d) in spec.structure.items():
        parts[p] = tuple((f"{p}.h{i}", d) for i in range(sizes[p] // d))
    concat = {}
    axes = {}
    for key, ax in spec.axes.items():
        new = []
        for p in ax:
            if p in parts:
                concat[f"{p}~"] = parts[p]
                new.append(f"{p}~")
            else:
                new.append(p)
        axes[key] = tuple(new)
    for c, ps in spec.concat.items():
        concat[c] = tuple(q for p, n in ps for q in (parts[p] if p in parts else ((p, n),)))
    return PermutationSpec(axes, blocks=spec.blocks, concat=concat)


def without(spec: PermutationSpec, fixed: set[str]) -> PermutationSpec:
    """The spec with the permutations in ``fixed`` left as the identity."""
    axes = {k: tuple(None if p in fixed else p for p in ax) for k, ax in spec.axes.items()}
    concat = {c: tuple((None if p in fixed else p, n) for p, n in ps) for c, ps in spec.concat.items()}
    used = {p for ax in axes.values() for p in ax if p is not None}
    concat = {c: ps for c, ps in concat.items() if c in used and any(p is not None for p, _ in ps)}
    axes = {k: tuple(p if p is None or p not in spec.concat or p in concat else None for p in ax) for k, ax in axes.items()}
    structure = {p: s for p, s in spec.structure.items() if p not in fixed}
    blocks = {ka: k for ka, k in spec.blocks.items() if axes[ka[0]][ka[1]] is not None}
    return PermutationSpec(axes, blocks=blocks, structure=structure, concat=concat)


class EncoderViT(nn.Module):
    """:class:`ViT`'s sizes with ``nn.TransformerEncoder`` of pre-norm ``nn.TransformerEncoderLayer`` blocks."""

    def __init__(self, width: int = 64, depth: int = 3, heads: int = 4, patch: int = 7, image: int = 28) -> None:
        super().__init__()
        n = (image // patch) ** 2
        self.patch = nn.Conv2d(1, width, patch, stride=patch)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n + 1, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def train_pair(args: argparse.Namespace, train) -> tuple[nn.Module, nn.Module, float]:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    models, secs = [], 0.0
    for seed in (args.seed, args.seed + 1):
        name = "vit" if args.model == "vit" else "encvit"
        path = cache / f"{name}_seed{seed}_e{args.epochs}_n{args.train_subset or 60000}.pt"
        model = seeded_model(ViT if args.model == "vit" else EncoderViT, seed)
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            start = time.perf_counter()
            fit_classifier_(model, train, epochs=args.epochs, optimizer="adamw", lr=args.lr, seed=seed,
                            device=args.device)
            secs += time.perf_counter() - start
            torch.save(model.state_dict(), path)
        models.append(model.eval())
    return models[0], models[1], secs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="torchvision MNIST root (default: $REBASIN_DATA)")
    parser.add_argument("--model", choices=["vit", "encoder"], default="vit",
                        help="vit: rebasin.apps.models.ViT (attention written out); encoder: nn.TransformerEncoderLayer blocks")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--num-points", type=int, default=11)
    parser.add_argument("--stat-batches", type=int, default=10, help="training batches of 256 for the data-driven matchers")
    parser.add_argument("--rows", default="naive,wm,wm_within,wm_no_residual,wm_mlp_only,am,sinkhorn,sinkhorn_random,wm_repair,am_repair")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "rebasin-bench"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    root = mnist_root(args.data_root)
    train, test = mnist_loaders(root, batch_size=128, flatten=False, train_subset=args.train_subset, seed=args.seed)
    stats, _ = mnist_loaders(root, batch_size=256, flatten=False, train_subset=args.train_subset, seed=args.seed + 7)
    stats = [b for _, b in zip(range(args.stat_batches), stats)]
    a, b, train_s = train_pair(args, train)
    print(f"trained in {train_s:.0f}s (0 = cached)", flush=True)
    if args.train_only:
        return
    x0 = stats[0][0][:2]
    spec = spec_from_model(a, x0)
    residual = spec.axes["pos"][2]
    heads = {p for p in spec.structure}
    sa = {k: v.detach() for k, v in a.state_dict().items()}
    sb = {k: v.detach() for k, v in b.state_dict().items()}
    variants = {
        "naive": ("naive (identity)", lambda: sb, "-"),
        "wm": ("weight matching: residual + heads + within-head + MLP", lambda: align(a, b, spec=spec, seed=args.seed).state_b, "wm"),
        "wm_within": ("weight matching, heads fixed (within-head only)",
                      lambda: align(a, b, spec=within_heads_only(spec), seed=args.seed).state_b, "wm"),
        "wm_no_residual": ("weight matching, residual stream fixed",
                           lambda: align(a, b, spec=without(spec, {residual}), seed=args.seed).state_b, "wm"),
        "wm_mlp_only": ("weight matching, MLP units only",
                        lambda: align(a, b, spec=without(spec, {residual} | heads), seed=args.seed).state_b, "wm"),
        "am": ("activation matching", lambda: align(a, b, spec=spec, method="activation_matching", loader=stats,
                                                      seed=args.seed).state_b, "am"),
        "sinkhorn": ("Sinkhorn re-basin (L2 cost, 300 steps)",
                     lambda: align(a, b, spec=spec, method="sinkhorn", cost="l2", fit={"steps": 300},
                                   seed=args.seed).state_b, "sinkhorn"),
        "sinkhorn_random": ("Sinkhorn re-basin (random-point loss, WM init, 3 epochs)",
                            lambda: align(a, b, spec=spec, method="sinkhorn", loader=stats, init="weight_matching",
                                          fit={"epochs": 3}, seed=args.seed).state_b, "sinkhorn"),
    }
    rows = []
    naive_loss = None
    endpoints = ""
    for row in args.rows.split(","):
        row = row.strip()
        start = time.perf_counter()
        label = variants.get(row, (row,))[0]
        try:
            if row in ("wm_repair", "am_repair"):
                from rebasin import RepairedPath

                method = "weight_matching" if row == "wm_repair" else "activation_matching"
                label = f"{method.replace('_', ' ')} + REPAIR"
                res = align(a, b, spec=spec, method=method, loader=stats, seed=args.seed)
                path = RepairedPath(a, sa, res.state_b, stats, spec=spec, device=args.device)
                align_s = time.perf_counter() - start
                r = evaluate_path(a, path, test, num_points=args.num_points, device=args.device)
            else:
                label, make, _ = variants[row]
                state_b = make()
                align_s = time.perf_counter() - start
                r = evaluate_path(a, LinearPath(sa, state_b), test, num_points=args.num_points, device=args.device)
        except RebasinError as err:
            rows.append([label, "n/a", "n/a", "n/a", f"refused: {str(err).splitlines()[0][:90]}"])
            continue
        lb = barrier(r, metric="loss")
        ab = barrier(r, metric="accuracy") * 100
        naive_loss = lb if row == "naive" else naive_loss
        if row == "naive":
            endpoints = (f"A: test loss {r.loss[0]:.3f}, accuracy {r.accuracy[0] * 100:.2f}%; "
                         f"B: test loss {r.loss[-1]:.3f}, accuracy {r.accuracy[-1] * 100:.2f}%")
            print(endpoints, flush=True)
        rel = f"{lb / naive_loss:.2f}" if naive_loss else "-"
        rows.append([label, f"{lb:.3f}", rel, f"{ab:.2f}", f"{align_s:.1f}"])
        print(rows[-1], flush=True)
    header = ["path", "test-loss barrier", "/ naive", "accuracy barrier (pts)", "align time (s)"]
    table = markdown_table(header, rows)
    print(table)
    # sanity: the aligned B is the same function as B
    if not args.no_report:
        command = "python benchmarks/" + " ".join(shlex.quote(x) for x in [Path(sys.argv[0]).name, *sys.argv[1:]])
        arch = "ViT" if args.model == "vit" else "ViT of nn.TransformerEncoderLayer blocks "
        notes = (f"{machine_summary(args.device)}. {arch}(width 64, depth 3, 4 heads, patch 7) trained {args.epochs} "
                 f"epoch(s) with AdamW {args.lr} from seeds {args.seed} and {args.seed + 1} ({endpoints}); barrier = max-minus-mean over {args.num_points} points on the 10k test images; "
                 f"activation matching / REPAIR statistics from {args.stat_batches} x 256 training images.")
        title = "ViT on MNIST: barriers per matcher and symmetry"
        if args.model == "encoder":
            title = "ViT of nn.TransformerEncoderLayer blocks on MNIST: activation matching inside the layers"
        append_report(title, command, table, notes=notes)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
