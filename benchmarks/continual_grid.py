"""Choosing alpha: Replay + RebasinMergePlugin over a grid of continual-learning protocols.

    OMP_NUM_THREADS=1 python benchmarks/continual_grid.py --data-root ../shared/data --seeds 2 --jobs 2

Every cell of the grid is one protocol (benchmark, rotation set, tasks, epochs, replay memory); every
protocol runs every variant on every seed, and the table reports every cell, not the best ones:

* ``replay``: Avalanche's ``Replay`` alone;
* ``defaults``: ``Replay`` + ``RebasinMergePlugin(alpha=AlphaPolicy())``, the plugin's defaults when the grid
  ran (200 held-out samples per task, kept; ``continual.compare``'s ``rebasin_merge_holdout``; the defaults are
  the buffer fold with ``refit`` since issue 27, ``buffer fold + refit`` below);
* ``one chain``: the plugin training every experience from the merge (``train_from="merged"``, its
  defaults until this grid preferred two chains);
* the other ways of choosing the merge weight alpha, each differing from ``one chain`` in one setting,
  and MC-SGD's earlier all-lines step (``continual.MCSGD(variant="all_lines")`` with the defaults it had
  when the grid ran);
* two controls: Replay whose buffer also gets the samples a plugin variant stores (200 or 20 per task),
  i.e. the same total storage spent on replay instead of on choosing alpha.

``--variants`` picks columns by their index in ``VARIANTS`` (more are there: alpha chosen on the
replay buffer, the plugin's old default, and on the buffer with a transient held-out slice of the new task; and,
with no storage besides the buffer, ``buffer fold`` — ``continual.compare``'s ``rebasin_merge_fold`` —, the same with
``refit`` (``rebasin_merge_refit``), the same with one alpha per layer (``rebasin_merge_layer``) and ``clewi``).
The seed seeds the training *and* the benchmark (its MNIST subset, its random angles, its pixel
permutations), so each seed is another protocol of each kind; ``--first-seed K`` runs seeds K, K + 1, ...: the
fresh draws of issue 27 are seeds 2 and 3, which the grid's choices never saw. Results go to ``--out`` (JSON, one record
per run, written as runs finish; ``--resume`` keeps them and runs only what is missing, so a complete file
just prints the table) and the summary table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import append_report, machine_summary, markdown_table, mnist_root, relative_command

#: (label, benchmark, number of experiences, angles, epochs, replay memory)
CELLS: list[tuple[str, str, int, str | None, int, int]] = [
    ("rot 0-180 10t 1ep m500", "rotated_mnist", 10, None, 1, 500),
    ("rot rand 10t 1ep m500", "rotated_mnist", 10, "random", 1, 500),
    ("rot rand 10t 5ep m500", "rotated_mnist", 10, "random", 5, 500),
    ("rot rand 10t 1ep m200", "rotated_mnist", 10, "random", 1, 200),
    ("rot rand 10t 1ep m1000", "rotated_mnist", 10, "random", 1, 1000),
    ("rot rand 5t 1ep m500", "rotated_mnist", 5, "random", 1, 500),
    ("rot rand 20t 1ep m500", "rotated_mnist", 20, "random", 1, 500),
    ("perm 10t 1ep m500", "permuted_mnist", 10, None, 1, 500),
    ("perm 10t 5ep m500", "permuted_mnist", 10, None, 5, 500),
    ("perm 20t 1ep m200", "permuted_mnist", 20, None, 1, 200),
]

#: continual.MCSGD's earlier step and defaults (``variant="all_lines"``), the grid's MC-SGD column
ALL_LINES: dict[str, Any] = {"variant": "all_lines", "line_points": 10, "mc_lr": 0.05, "mc_batch_size": 64,
                             "start_position": 0.1}

#: (label, strategy of continual.baselines, options)
#: The plugin variants other than ``defaults`` ran with one chain of weights (``train_from="merged"``, the
#: defaults before the grid preferred two chains): each differs from ``one chain`` in one setting.
ONE = {"train_from": "merged"}
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("replay", "replay", {}),
    ("defaults", "rebasin_merge_holdout", {}),  # the plugin's defaults when the grid ran (AlphaPolicy())
    ("holdout, old=new", "rebasin_merge", {"alpha": {"old_weight": 0.5}, **ONE}),
    ("memory", "rebasin_merge", {"alpha": {"source": "memory"}, **ONE}),
    ("replay buffer, old=new", "rebasin_merge", {"alpha": {"source": "replay", "old_weight": 0.5}, **ONE}),
    ("alpha 0.5", "rebasin_merge", {"alpha": 0.5, **ONE}),
    # the grid ran before continual.MCSGD followed the reference code: its earlier step, with its earlier defaults
    ("mcsgd, all lines", "mcsgd", ALL_LINES),
    # Replay with the plugin's stored samples added to its buffer (trained on, not only used to choose alpha):
    # the defaults keep memory_per_experience held-out samples of every task besides the replay buffer.
    ("replay +200/task", "replay", {}),
    ("replay buffer + new held-out", "rebasin_merge", {"alpha": {"source": "replay_holdout"}, **ONE}),
    ("holdout 20/task", "rebasin_merge", {"alpha": {"samples": 20}, **ONE}),
    ("replay +20/task", "replay", {}),
    ("holdout, by accuracy", "rebasin_merge", {"alpha": {"criterion": "accuracy"}, **ONE}),
    ("one chain", "rebasin_merge_holdout", ONE),
    # no storage besides the buffer (issue 27): alpha chosen on a rotating fold of the buffer the experience does
    # not train on; and CLeWI (replay, then align, interpolate at 0.5 and REPAIR)
    ("buffer fold", "rebasin_merge_fold", {}),
    ("clewi", "clewi", {}),
    # the buffer fold, and once alpha is chosen one more pass over the held-out slice (AlphaPolicy(refit=True))
    ("buffer fold + refit", "rebasin_merge_refit", {}),  # the plugin's defaults since issue 27
    # the same with one alpha per layer (AlphaPolicy(granularity="layer")): a coordinate search from the best single alpha
    ("buffer fold + refit, per layer", "rebasin_merge_layer", {}),
    ("per layer, 2 passes", "rebasin_merge_layer",
     {"alpha": {"source": "buffer_fold", "refit": True, "granularity": "layer", "layer_passes": 2}}),
    # diagnostics of the permutation protocols (2026-12-08): the merge's matcher, the fold's size, and the fold's cost
    # alone (refit with alpha = 1 at every merge) against no merge at all (a fixed alpha = 1: Replay's training)
    ("refit, activation matching", "rebasin_merge_refit", {"matcher": "activation_matching"}),
    ("refit, 10 folds", "rebasin_merge_refit", {"alpha": {"source": "buffer_fold", "refit": True, "folds": 10}}),
    ("plugin, alpha 1", "rebasin_merge_refit", {"alpha": 1.0}),
    ("refit, alpha 1 (fold cost)", "rebasin_merge_refit",
     {"alpha": {"source": "buffer_fold", "refit": True, "grid": [1.0]}}),
    ("refit, by accuracy", "rebasin_merge_refit",
     {"alpha": {"source": "buffer_fold", "refit": True, "criterion": "accuracy"}}),
]
#: the variants a plain run covers (the table's columns, in this order); the others run with --variants
DEFAULT_VARIANTS = [0, 1, 12, 2, 3, 5, 9, 11, 6, 7, 10]
#: variants whose replay buffer also gets what a plugin variant stores (samples per task; None: the defaults')
EXTRA_MEMORY: dict[str, int | None] = {"replay +200/task": None, "replay +20/task": 20}

_CACHE: dict[tuple[str, int], Any] = {}
_ARGS: Any = None


def _benchmark(cell: tuple, seed: int) -> Any:
    from continual.benchmarks import permuted_mnist, rotated_mnist

    key = (cell[0], seed)
    if key not in _CACHE:
        _CACHE.clear()  # one benchmark at a time per worker
        _, name, n, angles, _, _ = cell
        kwargs = dict(seed=seed, train_samples=_ARGS.train_samples, test_samples=_ARGS.test_samples)
        if name == "rotated_mnist":
            _CACHE[key] = rotated_mnist(_ARGS.data_root, n, angles=angles, **kwargs)
        else:
            _CACHE[key] = permuted_mnist(_ARGS.data_root, n, **kwargs)
    return _CACHE[key]


def _held_out_per_task() -> int:
    from continual import AlphaPolicy

    return AlphaPolicy().samples  # at most max_fraction of an experience: 200 of the grid's 10000 per task


def _init(args: Any) -> None:
    global _ARGS
    _ARGS = args
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def _run(cell_index: int, variant_index: int, seed: int) -> dict[str, Any]:
    from continual.baselines import mlp
    from continual.compare import run_strategy

    cell = CELLS[cell_index]
    label, strategy, options = VARIANTS[variant_index]
    bm = _benchmark(cell, seed)
    extra = EXTRA_MEMORY.get(label, 0)
    mem_size = cell[5] + (_held_out_per_task() if extra is None else extra) * cell[2]
    x0 = bm.train_stream[0].dataset[0][0]
    example = x0.unsqueeze(0).repeat(2, *([1] * x0.ndim))
    result = run_strategy(
        strategy, bm, seed=seed, model_factory=lambda: mlp(784, _ARGS.hidden, 10, 1), example_input=example,
        epochs=cell[4], batch_size=_ARGS.batch_size, lr=_ARGS.lr, mem_size=mem_size, device="cpu",
        options=options or None, progress=False,
    )
    return {"cell": cell[0], "variant": label, "seed": seed, "acc": result.average_accuracy,
            "forgetting": result.forgetting, "time_s": result.time_s, "alphas": result.extra.get("alphas")}


def _table(records: list[dict[str, Any]], cells: list[str], variants: list[str]) -> str:
    """The grid's table: mean ± std per protocol and variant, and each candidate's per-seed difference to Replay.

    The difference columns are ``defaults − replay`` when ``defaults`` ran, else one per plugin variant that ran
    (not the controls); the last row counts the protocols where that difference is at least 1 point on every seed.
    """
    by = {(r["cell"], r["variant"], r["seed"]): r for r in records}
    rows = []
    wins = {v: 0 for v in variants}
    versus = ["defaults"] if "defaults" in variants else [v for v in variants if v != "replay" and v not in EXTRA_MEMORY]
    versus = versus if "replay" in variants else []
    clear = {v: 0 for v in versus}  # protocols where the variant is >= 1 point above Replay on every seed
    for cell in cells:
        row = [cell]
        means = {}
        for v in variants:
            accs = [100 * r["acc"] for (c, vv, _), r in by.items() if c == cell and vv == v]
            if not accs:
                row.append("-")
                continue
            means[v] = statistics.fmean(accs)
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            row.append(f"{means[v]:.1f} ± {sd:.1f}")
        if means:
            best = max(m for v, m in means.items() if v not in EXTRA_MEMORY)  # the controls are not candidates
            for v, m in means.items():
                if m == best and v not in EXTRA_MEMORY:
                    wins[v] += 1
            row = [row[0]] + [f"**{x}**" if variants[i] in means and means[variants[i]] == best
                              and variants[i] not in EXTRA_MEMORY else x
                              for i, x in enumerate(row[1:])]
        for v in versus:
            seeds = sorted({s for (c, vv, s) in by if c == cell and vv == v})
            diffs = [100 * (by[(cell, v, s)]["acc"] - by[(cell, "replay", s)]["acc"])
                     for s in seeds if (cell, "replay", s) in by]
            row.append(" / ".join(f"{d:+.1f}" for d in diffs) if diffs else "-")
            clear[v] += bool(diffs) and min(diffs) >= 1.0
        rows.append(row)
    header = ["protocol"] + variants + [f"{v} − replay per seed" for v in versus]
    mean_row = ["mean over protocols"]
    for v in variants:
        cell_means = []
        for cell in cells:
            accs = [100 * r["acc"] for (c, vv, _), r in by.items() if c == cell and vv == v]
            if accs:
                cell_means.append(statistics.fmean(accs))
        mean_row.append(f"{statistics.fmean(cell_means):.1f}" if len(cell_means) == len(cells) else "-")
    rows.append(mean_row + [""] * len(versus))
    rows.append(["protocols where best"] + [str(wins[v]) if v not in EXTRA_MEMORY else "(control)" for v in variants]
                + [""] * len(versus))
    if versus:
        rows.append(["protocols ≥ 1 point above replay on every seed"] + [""] * len(variants)
                    + [str(clear[v]) for v in versus])
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first_seed .. first_seed + seeds - 1: a seed the grid never ran draws a fresh protocol "
                        "(another MNIST subset, other random angles and permutations)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--train-samples", type=int, default=10000)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cells", default=None, help="comma-separated cell indices (default: all)")
    p.add_argument("--variants", default=None, help="comma-separated indices into VARIANTS (default: DEFAULT_VARIANTS)")
    p.add_argument("--out", default="continual_grid.json")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--table-only", action="store_true",
                   help="print the table of the runs in --out (and --include) without running the missing ones")
    p.add_argument("--include", nargs="+", default=[], metavar="FILE",
                   help="result files of earlier runs (other --out files): their runs count as done and join the "
                        "table; nothing is written to them")
    args = p.parse_args(argv)
    if not args.table_only:
        args.data_root = mnist_root(args.data_root)
    cells = list(range(len(CELLS))) if args.cells is None else [int(i) for i in args.cells.split(",")]
    variants = DEFAULT_VARIANTS if args.variants is None else [int(i) for i in args.variants.split(",")]
    out = Path(args.out)
    records: list[dict[str, Any]] = json.loads(out.read_text()) if (args.resume or args.table_only) and out.exists() else []
    included = [r for f in args.include for r in json.loads(Path(f).read_text())]
    done = {(r["cell"], r["variant"], r["seed"]) for r in records + included}
    # Seed-major, so a partial grid already has every protocol on the first seeds.
    tasks = [(c, v, s) for s in range(args.first_seed, args.first_seed + args.seeds) for c in cells for v in variants
             if (CELLS[c][0], VARIANTS[v][0], s) not in done and not args.table_only]

    def keep(record: dict[str, Any]) -> None:
        records.append(record)
        out.write_text(json.dumps(records, indent=1))
        print(f"{record['cell']:>24s} | {record['variant']:>24s} | seed {record['seed']}: "
              f"{100 * record['acc']:.1f}%  ({record['time_s']:.0f} s)", file=sys.stderr, flush=True)

    if args.jobs <= 1:
        _init(args)
        for task in tasks:
            keep(_run(*task))
    else:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_init, initargs=(args,)) as pool:
            for future in as_completed([pool.submit(_run, *t) for t in tasks]):
                keep(future.result())
    cell_labels = [CELLS[c][0] for c in cells]
    variant_labels = [VARIANTS[v][0] for v in variants]
    table = _table(included + records, cell_labels, variant_labels)  # a rerun (in --out) wins over an included one
    print(table)
    if not args.no_report:
        seeds = sorted({r["seed"] for r in records})
        notes = (
            f"Average accuracy (%) after the last task, mean ± std over seeds {', '.join(map(str, seeds))} (each seed "
            f"also draws the protocol's MNIST subset, random angles and pixel permutations). MNIST subsets of {args.train_samples} training and {args.test_samples} test "
            f"images per task; MLP 784-{args.hidden}-10, AdamW lr {args.lr}, batch {args.batch_size}; "
            f"`rot 0-180`: angles `linspace(0, 180, T)`, `rot rand`: T angles uniform in [0, 180); `perm`: "
            f"pixel permutations; `Nt` tasks, `Nep` epochs per task, `mN` replay memory (MC-SGD keeps mN / T "
            f"samples per task). Variants: "
            + "; ".join(f"`{label}` = {strategy}" + (f" with {options}" if options else "")
                        + (f" with a buffer of mN + {_held_out_per_task() if EXTRA_MEMORY[label] is None else EXTRA_MEMORY[label]}"
                           "·T (a control: what the plugin variant stores, spent on replay)" if label in EXTRA_MEMORY else "")
                        for label, strategy, options in (VARIANTS[v] for v in variants))
            + ". `rebasin_merge*` = Replay + RebasinMergePlugin; `defaults` is the plugin's defaults when the grid "
              "ran, alpha=AlphaPolicy() (weight matching, alpha chosen on 200 held-out samples per task, kept, every "
              "task weighted the same, two chains: each task trains from the weights before the last merge); bold: the best "
              "mean of each protocol among the non-control columns"
            + f". {machine_summary()}; one torch thread per run; the runs' wall times add up to "
              f"{sum(r['time_s'] for r in records) / 60:.0f} min."
        )
        append_report("Choosing alpha: a grid of protocols (continual_grid)",
                      relative_command("OMP_NUM_THREADS=1 python " + " ".join(sys.argv)), table, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
