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
MLP units; activation matching; Sinkhorn re-basin (L2 cost; random-point loss); weight matching and
activation matching + REPAIR; and the symmetries beyond permutations (rows of
``benchmarks/_symmetry_rows.py``): a signed stream (refused: a LayerNorm stream admits permutations
only), and on both models folded by ``fold_layernorm`` (LayerNorm to scale-free RMSNorm, the same
functions): naive, permutations, a signed stream, an orthogonal stream by Procrustes (+ REPAIR), and the
orthogonal stream followed by activation matching of the other classes (+ REPAIR), and the orthogonal
stream refined on the path loss (``learn_transforms``, + REPAIR). Barrier =
max-minus-mean (git re-basin). Targets (issue 26): the best loss barrier at most 0.25x naive, weight
matching with an orthogonal stream at most 0.5x.

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
from _symmetry_rows import Aligned, SymmetryPair, run_rows, without

from rebasin import PermutationSpec, align, barrier, evaluate_path
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
    parser.add_argument("--rows", default=",".join([
        "naive", "wm", "wm_within", "wm_no_residual", "wm_mlp_only", "am", "sinkhorn", "sinkhorn_random", "wm_repair",
        "am_repair", "signed", "folded_naive", "folded_wm", "folded_signed", "folded_ortho", "folded_ortho_cold",
        "folded_ortho_repair",
        "folded_ortho_am", "folded_ortho_am_repair", "folded_learned", "folded_learned_repair"]))
    parser.add_argument("--learn-steps", type=int, default=200, help="training batches of the learned orthogonal stream")
    parser.add_argument("--learn-lr", type=float, default=1e-2)
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
    fit = [batch for _, batch in zip(range(args.learn_steps), train)]
    pair = SymmetryPair(a, b, x0, stats, seed=args.seed, device=args.device, fit_batches=fit, learn_lr=args.learn_lr)

    def plain_state(make) -> Aligned:  # noqa: ANN001
        return pair.linear(False, make(pair.plain))

    def sinkhorn(f, **kw) -> dict:  # noqa: ANN001, ANN003
        return align(a, b, spec=f.spec, method="sinkhorn", seed=args.seed, **kw).state_b

    heads = lambda f: set(f.spec.structure)  # noqa: E731
    extra = {
        "wm_within": ("weight matching, heads fixed (within-head only)", lambda p: plain_state(
            lambda f: align(a, b, spec=within_heads_only(f.spec), seed=args.seed).state_b)),
        "wm_no_residual": ("weight matching, residual stream fixed", lambda p: plain_state(
            lambda f: align(a, b, spec=without(f.spec, {f.stream}), seed=args.seed).state_b)),
        "wm_mlp_only": ("weight matching, MLP units only", lambda p: plain_state(
            lambda f: align(a, b, spec=without(f.spec, {f.stream} | heads(f)), seed=args.seed).state_b)),
        "sinkhorn": ("Sinkhorn re-basin (L2 cost, 300 steps)", lambda p: plain_state(
            lambda f: sinkhorn(f, cost="l2", fit={"steps": 300}))),
        "sinkhorn_random": ("Sinkhorn re-basin (random-point loss, WM init, 3 epochs)", lambda p: plain_state(
            lambda f: sinkhorn(f, loader=stats, init="weight_matching", fit={"epochs": 3}))),
    }
    endpoints = ""

    def evaluate(al: Aligned) -> tuple[float, float]:
        nonlocal endpoints
        r = evaluate_path(al.model, al.path, test, num_points=args.num_points, device=args.device)
        if not endpoints:
            endpoints = (f"A: test loss {r.loss[0]:.3f}, accuracy {r.accuracy[0] * 100:.2f}%; "
                         f"B: test loss {r.loss[-1]:.3f}, accuracy {r.accuracy[-1] * 100:.2f}%")
            print(endpoints, flush=True)
        return barrier(r, metric="loss"), barrier(r, metric="accuracy") * 100

    done = run_rows(pair, args.rows.split(","), evaluate, extra)
    naive_loss = next((r[1] for r in done if r[0].startswith("naive") and isinstance(r[1], float)), None)
    rows = [[r[0], r[1] if isinstance(r[1], str) else f"{r[1]:.3f}",
             f"{r[1] / naive_loss:.2f}" if naive_loss and not isinstance(r[1], str) else "n/a",
             r[2] if isinstance(r[2], str) else f"{r[2]:.2f}", r[3] if isinstance(r[3], str) else f"{r[3]:.1f}"]
            for r in done]
    header = ["path", "test-loss barrier", "/ naive", "accuracy barrier (pts)", "align time (s)"]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_report:
        command = "python benchmarks/" + " ".join(shlex.quote(x) for x in [Path(sys.argv[0]).name, *sys.argv[1:]])
        arch = "ViT" if args.model == "vit" else "ViT of nn.TransformerEncoderLayer blocks "
        notes = (f"{machine_summary(args.device)}. {arch}(width 64, depth 3, 4 heads, patch 7) trained {args.epochs} "
                 f"epoch(s) with AdamW {args.lr} from seeds {args.seed} and {args.seed + 1} ({endpoints}); barrier = max-minus-mean over {args.num_points} points on the 10k test images; "
                 f"activation matching / REPAIR statistics from {args.stat_batches} x 256 training images; learned stream: "
                 f"{args.learn_steps} training batches of 128, Adam {args.learn_lr} (symmetry_llama's settings, not tuned here).")
        title = "ViT on MNIST: barriers per matcher and symmetry"
        if args.model == "encoder":
            title = "ViT of nn.TransformerEncoderLayer blocks on MNIST: activation matching inside the layers"
        append_report(title, command, table, notes=notes)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
