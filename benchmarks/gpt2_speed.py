"""Speed of tracing and weight matching a 12-layer, 768-wide GPT-2 (``transformers``, built from a config).

Two ``GPT2LMHeadModel(GPT2Config(n_positions=...))`` are initialised from two seeds (random weights, no
download). The script times

* ``trace``: :func:`rebasin.trace.trace_model` on model A (the dynamic tracer: torch.fx cannot trace it),
  including the functional check ``spec.check`` that makes the spec exact, and ``trace (no check)``;
* ``weight matching``: :func:`rebasin.weight_matching` of A and B (``return_info=True`` for the sweeps);
* the floor, the primitives weight matching cannot avoid, each timed alone: ``floor_matmul``, one
  sweep of similarity matmuls (for every permutation, the product of A's and B's entries over every
  stretch of every axis it acts on, concatenation parts included, float32, ``addmm`` accumulation) and
  ``floor_lsa``, :func:`scipy.optimize.linear_sum_assignment` on each permutation's similarity
  (float64); plus, for each head permutation, one LAP over the heads. ``sweep = floor_matmul + floor_lsa``;
  the floor of the kept path is ``sweep x (1 + the kept descent's sweeps)`` (the layer-wise start solves
  every permutation once), the floor of the work done ``sweep x (1 + every descent's sweeps)``
  (``start="best"`` may descend twice); ``ratio = weight matching / floor``.

Run ``OMP_NUM_THREADS=2 python benchmarks/gpt2_speed.py`` (needs ``pip install rebasin[hf]``; a few
minutes, about 2 GB of memory); ``--no-report`` skips writing docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import append_report, machine_summary, markdown_table

import rebasin
from rebasin.trace import trace_model


def build(seed: int, n_positions: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=n_positions)).eval()


def similarity_operands(spec, a, b):
    """For each permutation: [(A stretch, B stretch)] as (n, -1) float32 matrices."""
    sizes = spec.validate(a)
    ops = {}
    for perm, occ in spec.occurrences.items():
        n = sizes[perm]
        mats = []
        for o in occ:
            xa = a[o.key].movedim(o.axis, 0)[o.start * o.block:(o.start + n) * o.block]
            xb = b[o.key].movedim(o.axis, 0)[o.start * o.block:(o.start + n) * o.block]
            mats.append((xa.reshape(n, -1).float().contiguous(), xb.reshape(n, -1).float().contiguous()))
        ops[perm] = mats
    return ops, sizes


def _now() -> tuple[float, float]:
    """(wall, CPU of this process) seconds: on a shared machine the CPU time is the steadier measure."""
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = _now()
    return t1[0] - t0[0], t1[1] - t0[1]


def floor_times(spec, a, b, repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """((wall, CPU) of one sweep of similarity matmuls, (wall, CPU) of one sweep of assignments), the minima
    over ``repeats``."""
    ops, sizes = similarity_operands(spec, a, b)
    best_mm, sims = (float("inf"), float("inf")), {}
    for _ in range(repeats):
        t0 = _now()
        for perm, mats in ops.items():
            s = torch.mm(mats[0][0], mats[0][1].T)
            for x, y in mats[1:]:
                s.addmm_(x, y.T)
            sims[perm] = s
        best_mm = tuple(map(min, best_mm, _since(t0)))
    costs = [(-s).double().numpy() for s in sims.values()]
    for outer in spec.outers:  # one assignment of the heads per head permutation
        h = spec.outer_size(outer, sizes)
        costs.append(np.random.default_rng(0).standard_normal((h, h)))
    best_lsa = (float("inf"), float("inf"))
    for _ in range(repeats):
        t0 = _now()
        for c in costs:
            linear_sum_assignment(c)
        best_lsa = tuple(map(min, best_lsa, _since(t0)))
    return best_mm, best_lsa  # type: ignore[return-value]


def trace_and_match(model_a: torch.nn.Module, model_b: torch.nn.Module, x: torch.Tensor,
                    repeats: int) -> tuple[list[list], rebasin.PermutationSpec, dict]:
    """Time the trace (with and without the check), weight matching and the floor; return the table rows,
    the spec and A's state."""
    t0 = time.perf_counter()
    tr = trace_model(model_a, x)
    t_trace = time.perf_counter() - t0
    t0 = time.perf_counter()
    trace_model(model_a, x, check=False)
    t_trace_nocheck = time.perf_counter() - t0
    spec = tr.spec
    a = {k: v.detach() for k, v in model_a.state_dict().items()}
    b = {k: v.detach() for k, v in model_b.state_dict().items()}
    print(f"trace {t_trace:.2f} s (no check {t_trace_nocheck:.2f} s): {len(spec.perms)} permutations, "
          f"{len(spec.structure)} structured, {len(spec.concat)} concatenations", flush=True)

    t0 = _now()
    try:
        _, info = rebasin.weight_matching(spec, a, b, return_info=True)
        t_wm, wm_note = _since(t0), ""
        descents = list(info.descents)
    except Exception as err:  # noqa: BLE001 - reported in the table
        t_wm, wm_note, descents = (float("nan"),) * 2, f"failed: {type(err).__name__}: {str(err)[:80]}", [("identity", 0.0, 1)]
        info = None
    ran = ", ".join(f"from {s} {n} sweeps" + (" (kept)" if info is not None and s == info.start else "")
                    for s, _, n in descents)
    print(f"weight matching {t_wm[0]:.2f} s (CPU {t_wm[1]:.2f} s): {ran} {wm_note}", flush=True)
    # the descent alone (start="identity"), as before the layer-wise start existed
    t0 = _now()
    _, info_id = rebasin.weight_matching(spec, a, b, start="identity", return_info=True)
    t_id, sweeps_id = _since(t0), int(info_id.n_sweeps)
    print(f"weight matching from the identity {t_id[0]:.2f} s (CPU {t_id[1]:.2f} s), {sweeps_id} sweeps", flush=True)
    mm, lsa = floor_times(spec, a, b, repeats)
    sweep = tuple(x + y for x, y in zip(mm, lsa))
    # the default always builds the layer-wise start, which solves every permutation once: one sweep of the
    # floor (its products are partial sums of the first sweep's, its assignments are as many as a sweep's)
    kept = int(info.n_sweeps) if info is not None else 1
    n_path = kept + (1 if info is not None and info.start == "layerwise" else 0)
    n_work = 1 + sum(n for _, _, n in descents)
    one_path = tuple(x * n_path for x in sweep)
    work = tuple(x * n_work for x in sweep)

    def ratio(x, y):
        return tuple(p / q for p, q in zip(x, y))

    rows = [
        ["trace (spec_from_model, with check)", t_trace, "", ""],
        ["trace (check=False)", t_trace_nocheck, "", ""],
        ["weight matching (default start='auto')", *t_wm, f"{ran} {wm_note}".strip()],
        ["weight matching, start='identity'", *t_id, f"{sweeps_id} sweeps"],
        ["floor_matmul (one sweep)", *mm, ""],
        ["floor_lsa (one sweep)", *lsa, f"{len(spec.perms)} perms + {len(spec.outers)} head LAPs"],
        ["floor of the kept path = sweep x (start + kept sweeps)", *one_path, f"{n_path} sweeps; the layer-wise start counts as one"],
        ["floor of the work done = sweep x (start + every descent's sweeps)", *work, f"{n_work} sweeps"],
        ["ratio default / floor of the kept path", *ratio(t_wm, one_path), "target <= 1.25"],
        ["ratio default / floor of the work done", *ratio(t_wm, work), "the implementation's overhead"],
        ["ratio start='identity' / its floor (sweep x its sweeps)", *ratio(t_id, tuple(x * sweeps_id for x in sweep)),
         "the floor used before the start existed"],
        ["objective: default / start='identity'",
         (info.final_objective / info_id.final_objective) if info is not None else float("nan"), "", ""],
    ]
    return rows, spec, a


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-positions", type=int, default=64)
    parser.add_argument("--seq", type=int, default=8, help="example input length")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the floor timings (min kept)")
    parser.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--report-file", default=None)
    args = parser.parse_args(argv)

    model_a, model_b = build(0, args.n_positions), build(1, args.n_positions)
    x = torch.randint(0, model_a.config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    rows, _, _ = trace_and_match(model_a, model_b, x, args.repeats)
    table = markdown_table(["step", "seconds", "CPU seconds", "note"], rows)
    print(table)
    if not args.no_report:
        command = "OMP_NUM_THREADS={} python benchmarks/gpt2_speed.py {}".format(
            torch.get_num_threads(), " ".join(shlex.quote(s) for s in (argv or sys.argv[1:])))
        notes = (f"Machine: {machine_summary()}. GPT2Config() defaults (12 layers, width 768, 12 heads, vocab "
                 f"50257) with n_positions={args.n_positions}, two random initialisations; example input "
                 f"(1, {args.seq}) tokens. The trace includes spec.check (a random permutation, randomised "
                 "norms, two forwards, on the 124M parameters).\n")
        path = append_report("GPT-2 trace and weight matching speed (gpt2_speed)", command.strip(), table,
                             notes=notes, path=args.report_file)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
