"""Speed of weight matching against its floor, on MLPs 784-w-w-w-10.

For each width and each pair of models the script runs, side by side,

* ``plain``: the textbook algorithm (the seam ``rebasin.matching.weight._INCREMENTAL = False``): every visit
  builds the similarity from scratch and solves it;
* ``fast``: the default (cached static terms, low-rank updates, skipped unchanged solves);

and times, alone, the two primitives the textbook algorithm cannot avoid:

* ``floor_matmul``: one sweep of similarity matmuls (every permutation, every tensor axis it
  touches, pre-laid-out float32 operands, ``addmm`` accumulation) times the number of sweeps;
* ``floor_lsa``: ``scipy.optimize.linear_sum_assignment`` on exactly the float64 matrices the
  plain run solved (a hook solves each one alone just before the algorithm does; the hook's time
  is subtracted from that run's wall time).

``floor = floor_matmul + floor_lsa`` is the cost of the plain algorithm's primitives; ``ratio =
wall / floor``. The plain run should be close to 1; the fast run goes below 1. Both must return
the same permutations (column ``same``).

Cases: ``perm+noise`` (B = A with random permutations and 10% Gaussian noise) and ``independent``
(two independent random initialisations, the hard case).

Run ``python benchmarks/wm_speed.py`` (defaults: widths 512 2048 4096, 2 repeats, at most 8 sweeps,
about 5 minutes on 2 quiet cores); ``--device cuda`` for a GPU, ``--no-report`` to skip appending
to docs/benchmarks.md. The sweep cap applies to plain and fast alike, so the comparison is fair;
``conv.`` says whether the run converged before the cap.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import append_report, machine_summary, markdown_table

from rebasin import (
    PermutationSpec,
    permute,
    random_permutation,
    weight_matching,
)
from rebasin.matching import weight as weight_module


def mlp_spec(depth: int = 3) -> PermutationSpec:
    """Spec of ``nn.Sequential(Linear, ReLU, ..., Linear)`` with ``depth`` hidden layers."""
    axes: dict[str, tuple[str | None, ...]] = {}
    prev: str | None = None
    for i in range(depth + 1):
        out = f"P{i}" if i < depth else None
        axes[f"{2 * i}.weight"] = (out, prev)
        axes[f"{2 * i}.bias"] = (out,)
        prev = out
    return PermutationSpec(axes)


def mlp_state(width: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    dims = [784, width, width, width, 10]
    out = {}
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        out[f"{2 * i}.weight"] = (torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5).to(device)
        out[f"{2 * i}.bias"] = (0.1 * torch.randn(fan_out, generator=generator)).to(device)
    return out


def make_pair(case: str, width: int, device: torch.device, seed: int = 0):
    spec = mlp_spec()
    g = torch.Generator().manual_seed(seed)
    a = mlp_state(width, g, device)
    if case == "perm+noise":
        perms = random_permutation(spec, generator=g, sizes=spec.validate(a))
        b = permute(spec, perms, a)
        b = {k: v + 0.1 * v.std() * torch.randn(v.shape, generator=g).to(device) for k, v in b.items()}
    else:
        b = mlp_state(width, g, device)
    return spec, a, b


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sweep_matmuls(spec, a, b, device: torch.device, repeats: int) -> float:
    """Min time of one sweep of from-scratch similarity matmuls (operands laid out beforehand)."""
    sizes = spec.validate(a)
    ops = []
    for perm, where in spec.perm_to_axes.items():
        n = sizes[perm]
        mats = []
        for key, axis in where:
            mats.append(
                (
                    a[key].movedim(axis, 0).reshape(n, -1).to(device, torch.float32).contiguous(),
                    b[key].movedim(axis, 0).reshape(n, -1).to(device, torch.float32).contiguous(),
                )
            )
        ops.append(mats)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for mats in ops:
            s = torch.mm(mats[0][0], mats[0][1].T)
            for x, y in mats[1:]:
                s.addmm_(x, y.T)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def run_case(width: int, case: str, device: torch.device, repeats: int, seed: int, n_iter: int = 100):
    spec, a, b = make_pair(case, width, device, seed)
    lsa_times: list[float] = []
    hook_time = [0.0]

    def hook(name: str, cost: np.ndarray) -> None:
        # cost is the float64 matrix the algorithm is about to hand to scipy: solve it alone first
        t0 = time.perf_counter()
        linear_sum_assignment(cost)
        t1 = time.perf_counter()
        lsa_times.append(t1 - t0)
        hook_time[0] += t1 - t0

    def timed(_incremental: bool = True, _on_solve=None):
        # the textbook loop and the solve hook are module-level seams of rebasin.matching.weight
        sync(device)
        saved = weight_module._INCREMENTAL, weight_module._ON_SOLVE
        weight_module._INCREMENTAL, weight_module._ON_SOLVE = _incremental, _on_solve
        try:
            t0 = time.perf_counter()
            out = weight_matching(spec, a, b, return_info=True, device=device, n_iter=n_iter)
            sync(device)
        finally:
            weight_module._INCREMENTAL, weight_module._ON_SOLVE = saved
        return time.perf_counter() - t0, out

    # the floor's sweep of matmuls is timed between the runs (min over all), so that a burst of
    # load from other processes hits floor and algorithm alike; the plain run with the hook comes
    # first (it captures the solve times of its matrices), then the repeats side by side
    t_sweep = time_sweep_matmuls(spec, a, b, device, 1)
    wall, (plain_perms, plain_info) = timed(_incremental=False, _on_solve=hook)
    plain_wall = wall - hook_time[0]
    fast_wall = float("inf")
    for r in range(repeats):
        if r > 0:
            plain_wall = min(plain_wall, timed(_incremental=False)[0])
        t_sweep = min(t_sweep, time_sweep_matmuls(spec, a, b, device, 1))
        wall, (fast_perms, fast_info) = timed()
        fast_wall = min(fast_wall, wall)
    t_sweep = min(t_sweep, time_sweep_matmuls(spec, a, b, device, 1))
    floor_mm = t_sweep * plain_info.n_sweeps
    floor_lsa = float(sum(lsa_times))
    floor = floor_mm + floor_lsa
    same = all(torch.equal(plain_perms[k], fast_perms[k]) for k in plain_perms)
    rows = []
    for mode, info, wall in (("plain", plain_info, plain_wall), ("fast", fast_info, fast_wall)):
        rows.append(
            [
                width,
                case,
                mode,
                info.n_sweeps,
                "yes" if info.converged else "no",
                info.n_solves,
                info.n_full_builds,
                info.n_lowrank_updates,
                wall,
                floor,
                floor_mm,
                floor_lsa,
                f"{wall / floor:.2f}",
                "yes" if same else "NO",
            ]
        )
    return rows


HEADER = [
    "width",
    "case",
    "mode",
    "sweeps",
    "conv.",
    "solves",
    "full builds",
    "low-rank upd.",
    "wall s",
    "floor s",
    "floor_matmul s",
    "floor_lsa s",
    "ratio",
    "same",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--cases", nargs="+", default=["perm+noise", "independent"], choices=["perm+noise", "independent"])
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per mode (min is kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--n-iter", type=int, default=8, help="sweep cap passed to weight_matching (keeps 4096 under budget)"
    )
    parser.add_argument("--report-file", default=None, help="markdown file to append to (default docs/benchmarks.md)")
    parser.add_argument("--no-report", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    spec, a, b = make_pair("independent", 64, device)  # warm-up: imports, thread pools, CUDA context
    weight_matching(spec, a, b, device=device)
    start = time.perf_counter()
    for width in args.widths:
        for case in args.cases:
            for row in run_case(width, case, device, args.repeats, args.seed, args.n_iter):
                rows.append(row)
                print(" | ".join(str(v) if not isinstance(v, float) else f"{v:.3f}" for v in row), flush=True)
    total = time.perf_counter() - start
    table = markdown_table(HEADER, rows)
    print(table)
    print(f"total benchmark time {total:.0f} s")
    if not args.no_report:
        command = "python benchmarks/wm_speed.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
        notes = (
            f"Machine: {machine_summary(device)}; device `{device}`; total {total:.0f} s.\n"
            "MLP 784-w-w-w-10, random weights. floor = floor_matmul (one sweep of from-scratch similarity "
            "matmuls, timed alone, x sweeps of the plain run) + floor_lsa (scipy assignment re-solved alone on "
            "every matrix the plain run solved). ratio = wall / floor; `plain` is the textbook loop, `fast` the "
            "default (low-rank updates, static terms cached, unchanged solves skipped). same = identical perms.\n"
        )
        path = append_report(
            "Weight matching speed (wm_speed)", command.strip(), table, notes=notes, path=args.report_file
        )
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
