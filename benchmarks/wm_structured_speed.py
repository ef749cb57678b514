"""Speed of weight matching on structured specs: a GPT-2-shaped transformer stack with packed attention.

Each block (width ``E``, ``H`` heads of ``d = E / H``, MLP ``4E``) has PyTorch-layout weights
``ln1 (E)``, ``attn.c_attn (3E, E)`` packed q;k;v, ``attn.c_proj (E, E)``, ``ln2 (E)``, ``mlp.c_fc (4E, E)``,
``mlp.c_proj (E, 4E)``, all biases, on one residual permutation ``R``; the spec structures q/k (``QK``) and
v/o (``VO``) by the head permutation of the block and gives ``c_attn``'s rows as the concatenation
``QK; QK; VO``. Random weights, B = A permuted inside the structure (+ 10% noise) or an independent draw.

Columns: sweeps, whether it converged before the cap, wall seconds, seconds per sweep, and the share of the
time spent in the within-head assignments of ``structured_assignment`` (``H^2`` LAPs of size ``d`` per
member and visit). Run ``python benchmarks/wm_structured_speed.py`` (default: E=768, H=12, 2 and 4 layers;
about a minute on 2 cores); ``--no-report`` skips docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import append_report, machine_summary, markdown_table

import rebasin.matching.assignment as assignment
from rebasin import PermutationSpec, permute, random_permutation, weight_matching

HEADER = ["E", "H", "layers", "case", "sweeps", "conv.", "wall s", "s / sweep", "within-head LAP share", "recovered"]


def make_spec(e: int, h: int, layers: int) -> PermutationSpec:
    axes: dict[str, tuple[str | None, ...]] = {"wpe": (None, "R")}
    structure, concat = {}, {}
    for i in range(layers):
        p = f"h{i}."
        axes.update({
            p + "ln_1.weight": ("R",), p + "ln_1.bias": ("R",),
            p + "attn.c_attn.weight": (f"QKV{i}", "R"), p + "attn.c_attn.bias": (f"QKV{i}",),
            p + "attn.c_proj.weight": ("R", f"VO{i}"), p + "attn.c_proj.bias": ("R",),
            p + "ln_2.weight": ("R",), p + "ln_2.bias": ("R",),
            p + "mlp.c_fc.weight": (f"F{i}", "R"), p + "mlp.c_fc.bias": (f"F{i}",),
            p + "mlp.c_proj.weight": ("R", f"F{i}"), p + "mlp.c_proj.bias": ("R",),
        })
        structure[f"QK{i}"] = (f"H{i}", e // h)
        structure[f"VO{i}"] = (f"H{i}", e // h)
        concat[f"QKV{i}"] = ((f"QK{i}", e), (f"QK{i}", e), (f"VO{i}", e))
    return PermutationSpec(axes, structure=structure, concat=concat)


def make_state(spec: PermutationSpec, e: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"wpe": (1024, e)}
    for key, ax in spec.axes.items():
        if key == "wpe":
            continue
        size = {"R": e, "F": 4 * e, "Q": 3 * e, "V": e}
        shapes[key] = tuple(size[n[0]] for n in ax)
    return {k: torch.randn(s, generator=g) / s[-1] ** 0.5 for k, s in shapes.items()}


def run(e: int, h: int, layers: int, case: str, n_iter: int) -> list:
    spec = make_spec(e, h, layers)
    a = make_state(spec, e, 0)
    spec = spec.with_sizes(a)
    planted = random_permutation(spec, seed=1)
    if case == "perm+noise":
        g = torch.Generator().manual_seed(2)
        b = permute(spec, planted, a)
        b = {k: v + 0.1 * v.std() * torch.randn(v.shape, generator=g) for k, v in b.items()}
    else:
        b = make_state(spec, e, 3)
    spent = [0.0]
    inner = assignment._block_assignments

    def timed(blocks):
        t0 = time.perf_counter()
        try:
            return inner(blocks)
        finally:
            spent[0] += time.perf_counter() - t0

    assignment._block_assignments = timed
    try:
        t0 = time.perf_counter()
        perms, info = weight_matching(spec, a, b, n_iter=n_iter, return_info=True)
        wall = time.perf_counter() - t0
    finally:
        assignment._block_assignments = inner
    recovered = "-"
    if case == "perm+noise":
        inv = {p: torch.argsort(q) for p, q in planted.items()}
        recovered = "yes" if all(torch.equal(perms[p], inv[p]) for p in perms) else "no"
    return [e, h, layers, case, info.n_sweeps, "yes" if info.converged else "no", round(wall, 2),
            round(wall / max(info.n_sweeps, 1), 2), f"{spent[0] / wall:.0%}", recovered]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--cases", nargs="+", default=["perm+noise", "independent"], choices=["perm+noise", "independent"])
    parser.add_argument("--n-iter", type=int, default=8)
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    start = time.perf_counter()
    for layers in args.layers:
        for case in args.cases:
            row = run(args.width, args.heads, layers, case, args.n_iter)
            print(" | ".join(map(str, row)), flush=True)
            rows.append(row)
    total = time.perf_counter() - start
    table = markdown_table(HEADER, rows)
    print(table)
    if not args.no_report:
        command = "python benchmarks/wm_structured_speed.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
        notes = (
            f"Machine: {machine_summary()}; total {total:.0f} s.\n"
            "GPT-2-shaped blocks (packed q;k;v as a concatenation, heads as structure), random weights; "
            "sweep cap `--n-iter`. The heads of each block are one unit solved by `structured_assignment`; "
            "`within-head LAP share` is the time in its H² size-d assignments.\n"
        )
        print(f"appended to {append_report('Structured weight matching speed (wm_structured_speed)', command.strip(), table, notes=notes)}")


if __name__ == "__main__":
    main()
