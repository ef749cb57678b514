"""Compare continual-learning strategies on one benchmark: ``python -m continual.compare``.

Example (the reference setup: MLP 784-256-10, AdamW 1e-3, batch 500, 5 epochs, replay 1000)::

    python -m continual.compare --benchmark rotated_mnist --data-root ../shared/data \\
        --strategies naive,ewc,lwf,replay,rebasin_merge,rebasin_il,mcsgd --seeds 3 --epochs 5 --jobs 2 --out results/

After every experience each strategy is evaluated on every test experience, giving the accuracy
matrix ``R[i, j]`` (accuracy on task ``j`` after training on experience ``i``). Reported:

* average accuracy ``ACC = mean_j R[T-1, j]`` (all tasks, after the last experience);
* forgetting ``F = mean_{j < T-1} (R[j, j] - R[T-1, j])`` (accuracy right after learning a task minus
  final accuracy; Avalanche's ``StreamForgetting``);
* backward transfer ``BWT = mean_{j < T-1} (R[T-1, j] - R[j, j])`` (Lopez-Paz and Ranzato; with this
  ``R`` it is ``-F``; Avalanche's ``StreamBWT`` is stored next to it);
* wall time (training plus the evaluations) per run;
* storage: what the strategy keeps over the stream (:func:`continual.storage.strategy_storage`): replay
  buffer samples, other samples (held out to choose a merge, or an episodic memory) and model-sized copies.

Methods are compared at equal storage: for every strategy that stores samples besides its replay buffer
(``rebasin_merge_holdout`` keeps its held-out samples, ``mcsgd`` its episodic memory), a control
``replay_eq_<strategy>`` is added and run on the same seeds: ``Replay`` whose buffer holds as many samples
as the strategy stores in all (``--no-equal-storage`` skips them).

``--jobs N`` runs the (strategy, seed) cells in ``N`` worker processes on one machine (forked after
the benchmark is built, one torch thread each); every cell seeds itself, so the numbers are those of
the sequential run (one torch thread there too, e.g. ``OMP_NUM_THREADS=1``). ``runs.json`` also
holds, per run, the forgetting of every task, the merge coefficient the re-basin plugins chose at
every merge (``extra.merges``) and MC-SGD's memory line loss before and after each
mode-connectivity step (``extra.mcsgd``).

Long comparisons can be sharded: ``--first-seed K --seeds N`` runs seeds ``K..K+N-1``, and
different strategies or seeds can run in separate processes or on separate machines; then
``python -m continual.compare --combine DIR1 DIR2 ... --out DIR`` merges their ``runs.json`` into one
table and figure (the shards must share the benchmark and training settings)::

    python -m continual.compare ... --strategies naive,ewc,replay --out A/
    python -m continual.compare ... --strategies lwf,rebasin_merge,rebasin_il --out B/
    python -m continual.compare --combine A/ B/ --out results/

Written to ``--out``: ``runs.csv`` (one row per strategy and seed), ``summary.csv`` and
``summary.md`` (mean ± std over seeds), ``accuracy.png`` (``R`` averaged over seeds, one panel per
strategy, plus the mean accuracy over all tasks after each experience) and ``runs.json`` (every
matrix).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rebasin import RebasinError

__all__ = ["RunResult", "run_strategy", "summarise", "combine_runs", "main", "accuracy_matrix_metrics"]

#: ``runs.json`` arguments that must agree between shards merged by ``--combine``.
SHARD_SETTINGS = (
    "benchmark", "epochs", "batch_size", "lr", "mem_size", "hidden", "depth", "n_experiences", "train_samples",
    "test_samples", "angles", "benchmark_seed", "optimizer", "momentum", "lr_decay", "min_lr", "dropout",
    "pixels",
)

#: What a ``runs.json`` written before a setting existed ran with.
_OLD_DEFAULTS = {"depth": 1, "benchmark_seed": 0, "optimizer": "adamw", "momentum": 0.0, "lr_decay": 1.0,
                 "min_lr": 0.0, "dropout": 0.0, "pixels": "normalized"}


@dataclass
class RunResult:
    """One strategy trained on one seed."""

    strategy: str
    seed: int
    accuracy: list[list[float]]  # R[i][j]
    average_accuracy: float
    forgetting: float
    time_s: float
    extra: dict[str, Any]
    backward_transfer: float = math.nan
    storage: dict[str, float] = field(default_factory=dict)  # continual.storage.strategy_storage after the run


def accuracy_matrix_metrics(matrix: Sequence[Sequence[float]]) -> tuple[float, float]:
    """``(average accuracy, forgetting)`` of an accuracy matrix ``R[i][j]`` (see the module docstring)."""
    r = np.asarray(matrix, dtype=float)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise RebasinError(f"the accuracy matrix must be square and non-empty, got shape {r.shape}")
    t = r.shape[0]
    acc = float(r[-1].mean())
    forgetting = float(np.mean([r[j, j] - r[-1, j] for j in range(t - 1)])) if t > 1 else 0.0
    return acc, forgetting


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_strategy(
    name: str,
    benchmark: Any,
    *,
    seed: int,
    model_factory: Any,
    example_input: Any,
    epochs: int,
    batch_size: int,
    lr: float,
    mem_size: int,
    device: str,
    options: dict[str, Any] | None = None,
    progress: bool | None = None,
    optim: dict[str, Any] | None = None,
) -> RunResult:
    """Train ``name`` on every experience of ``benchmark`` and evaluate on the whole test stream after each.

    ``progress``: a tqdm bar over the experiences; None (default) shows it only when stderr is a terminal.
    ``optim``: ``optimizer``, ``momentum``, ``lr_decay``, ``min_lr`` for
    :func:`continual.baselines.make_strategy` (AdamW, constant learning rate when None).
    """
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from .baselines import make_strategy
    from .storage import strategy_storage

    _seed_everything(seed)
    model = model_factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True), forgetting_metrics(experience=True, stream=True),
            bwt_metrics(stream=True), loggers=[],
        )
    strategy = make_strategy(
        name, model=model, example_input=example_input, lr=lr, train_mb_size=batch_size, train_epochs=epochs,
        eval_mb_size=max(batch_size, 1000), mem_size=mem_size, n_experiences=len(benchmark.train_stream),
        device=device, evaluator=evaluator, seed=seed, options=options, **(optim or {}),
    )
    n = len(benchmark.train_stream)
    matrix: list[list[float]] = []
    bar = None
    if progress or (progress is None and sys.stderr.isatty()):
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"{name} seed {seed}", leave=False, file=sys.stderr)
    start = time.perf_counter()
    last: dict[str, float] = {}
    for i, exp in enumerate(benchmark.train_stream):
        strategy.train(exp)
        last = strategy.eval(benchmark.test_stream)
        row = [float(last[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"]) for j in range(n)]
        matrix.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc_seen=f"{np.mean(row[: i + 1]):.3f}")
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    acc, forgetting = accuracy_matrix_metrics(matrix)
    r = np.asarray(matrix)
    extra: dict[str, Any] = {
        "avalanche_stream_forgetting": float(last.get("StreamForgetting/eval_phase/test_stream", math.nan)),
        "avalanche_stream_bwt": float(last.get("StreamBWT/eval_phase/test_stream", math.nan)),
        "forgetting_per_task": [float(r[j, j] - r[-1, j]) for j in range(n - 1)],
    }
    for plugin in getattr(strategy, "plugins", []):
        history = getattr(plugin, "history", None)
        if history and hasattr(history[0], "alpha"):
            # per-layer merges (AlphaPolicy(granularity="layer")): the layers' alphas, input to output
            extra["alphas"] = [h.alpha if getattr(h, "layers", None) is None else list(h.layers.alphas.values())
                               for h in history]
            extra["merges"] = [{"experience": h.experience, "alpha": h.alpha,
                                "refit_steps": getattr(h, "refit_steps", 0),
                                **({} if getattr(h, "layers", None) is None else {"layer_alphas": h.layers.alphas})}
                               for h in history]
        if history and hasattr(history[0], "n_moved"):
            extra["units_moved"] = [h.n_moved for h in history]
        if history and hasattr(history[0], "n_lines"):
            extra["mcsgd"] = [{"experience": h.experience, "n_memory": h.n_memory, "steps": h.steps,
                               "loss_before": None if math.isnan(h.loss_before) else h.loss_before,
                               "loss_after": None if math.isnan(h.loss_after) else h.loss_after} for h in history]
    return RunResult(name, seed, matrix, acc, forgetting, elapsed, extra, backward_transfer=-forgetting,
                     storage=strategy_storage(strategy))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per strategy: mean and std over seeds of accuracy, forgetting and time; mean storage."""
    from .storage import STORAGE_KEYS

    rows = []
    for name in dict.fromkeys(r.strategy for r in runs):
        mine = [r for r in runs if r.strategy == name]
        acc = _mean_std([r.average_accuracy for r in mine])
        fgt = _mean_std([r.forgetting for r in mine])
        bwt = _mean_std([r.backward_transfer for r in mine])
        tim = _mean_std([r.time_s for r in mine])
        rows.append({
            "strategy": name, "seeds": len(mine),
            "acc_mean": acc[0], "acc_std": acc[1],
            "forgetting_mean": fgt[0], "forgetting_std": fgt[1],
            "bwt_mean": bwt[0], "bwt_std": bwt[1],
            "time_s_mean": tim[0], "time_s_std": tim[1],
            **{key: statistics.fmean(r.storage.get(key, math.nan) for r in mine) for key in STORAGE_KEYS},
        })
    return rows


def _markdown(rows: Sequence[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| strategy | seeds | average accuracy (%) | forgetting (%) | stored samples (buffer + other) "
             "| model copies | wall time (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['seeds']} | {100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f} | "
            f"{100 * r['forgetting_mean']:.1f} ± {100 * r['forgetting_std']:.1f} | {_stored(r)} | "
            f"{_number(r.get('model_copies'))} | {r['time_s_mean']:.0f} ± {r['time_s_std']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    return "?" if value is None or value != value else f"{value:g}"


def _stored(row: dict[str, Any]) -> str:
    """``"total (buffer + other)"`` samples of a summary row; ``?`` for runs from before storage was recorded."""
    buffer, held, memory = (row.get(k) for k in ("buffer_samples", "held_out_samples", "memory_samples"))
    if any(v is None or v != v for v in (buffer, held, memory)):
        return "?"
    return f"{buffer + held + memory:g} ({buffer:g} + {held + memory:g})"  # type: ignore[operator]  # the sizes are set for every run that reaches the table


def _plot(runs: Sequence[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(dict.fromkeys(r.strategy for r in runs))
    mats = {n: np.mean([np.asarray(r.accuracy) for r in runs if r.strategy == n], axis=0) for n in names}
    cols = len(names) + 1
    fig, axes = plt.subplots(1, cols, figsize=(2.8 * cols, 3.0), squeeze=False, layout="constrained")
    im = None
    for k, (ax, name) in enumerate(zip(axes[0], names)):
        n = mats[name].shape[0]
        im = ax.imshow(100 * mats[name], vmin=0, vmax=100, cmap="viridis", aspect="auto",
                       extent=(0.5, n + 0.5, n + 0.5, 0.5))
        ax.set_title(name, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("task")
        if k == 0:
            ax.set_ylabel("after experience")
    fig.colorbar(im, ax=axes[0][: len(names)].tolist(), shrink=0.8, label="accuracy (%)")  # type: ignore[arg-type]  # im is the image drawn by the last pass of the loop above
    ax = axes[0][-1]
    for name in names:
        ax.plot(range(1, mats[name].shape[0] + 1), 100 * mats[name].mean(axis=1), marker=".", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("mean accuracy, all tasks (%)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    from .baselines import OPTIMIZERS, STRATEGIES
    from .benchmarks import BENCHMARKS, PIXELS

    p = argparse.ArgumentParser(prog="python -m continual.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="rotated_mnist")
    p.add_argument("--data-root", default=None, help="torchvision root holding MNIST/raw (never downloads)")
    p.add_argument("--strategies", default="naive,ewc,lwf,replay,rebasin_merge,rebasin_il,mcsgd",
                   help=f"comma-separated, from {','.join(STRATEGIES)}")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (FIRST..FIRST+N-1)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (to shard seeds across runs)")
    p.add_argument("--combine", nargs="+", default=None, metavar="DIR",
                   help="merge the runs.json of earlier --out folders into one table; trains nothing")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="of every strategy")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (--optimizer sgd)")
    p.add_argument("--lr-decay", type=float, default=1.0,
                   help="learning rate before experience k: max(--min-lr, lr * decay**k) (MC-SGD's schedule)")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.0, help="dropout after every hidden layer of the MLP")
    p.add_argument("--mem-size", type=int, default=1000, help="replay buffer of every strategy that replays")
    p.add_argument("--hidden", type=int, default=256, help="width of the MLP's hidden layers")
    p.add_argument("--depth", type=int, default=1, help="hidden layers of the MLP (2: MC-SGD's 2x256 MLP)")
    p.add_argument("--n-experiences", type=int, default=None, help="override the benchmark's default")
    p.add_argument("--angles", default=None,
                   help="rotated_mnist only: comma-separated degrees, or 'random' (uniform in [0, 180), seeded by "
                        "--benchmark-seed); default linspace(0, 180, n_experiences)")
    p.add_argument("--benchmark-seed", type=int, default=0,
                   help="seed of the benchmark itself (subsets, random angles, permutations); the same for every run")
    p.add_argument("--pixels", choices=PIXELS, default="normalized",
                   help="MNIST benchmarks: normalised with MNIST's mean and std, or raw [0, 1] (MC-SGD's protocol)")
    p.add_argument("--train-samples", type=int, default=None, help="MNIST training images per experience")
    p.add_argument("--test-samples", type=int, default=None, help="MNIST test images per experience")
    p.add_argument("--option", action="append", default=[], metavar="STRATEGY.KEY=VALUE",
                   help="option for a re-basin strategy, e.g. rebasin_il.alpha=0.5 (value parsed as JSON)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes for the (strategy, seed) cells (one torch thread each); default 1")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-equal-storage", action="store_true",
                   help="skip the replay_eq_<strategy> controls (Replay given what a strategy stores besides its buffer)")
    args = p.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in args.strategies if s not in STRATEGIES and not _is_control(s)]
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    if args.combine is not None:
        return args
    if args.benchmark != "synthetic" and args.data_root is None:
        p.error("--data-root is required for the MNIST benchmarks")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.first_seed < 0:
        p.error("--first-seed must be >= 0")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.mem_size < 1:
        p.error("--mem-size must be >= 1 (the replay buffer and MC-SGD's memory; Naive, EWC and LwF keep none)")
    if args.jobs > 1 and not str(args.device).startswith("cpu"):
        p.error(f"--jobs > 1 runs the cells in forked CPU workers; with --device {args.device} use --jobs 1, or "
                "shard with --first-seed / --strategies and --combine")
    if args.depth < 1:
        p.error("--depth must be >= 1")
    if not 0 <= args.momentum < 1 or (args.momentum and args.optimizer != "sgd"):
        p.error("--momentum must be in [0, 1) and needs --optimizer sgd")
    if not 0 < args.lr_decay <= 1:
        p.error("--lr-decay must be in (0, 1]")
    if args.min_lr < 0 or (args.min_lr and args.lr_decay == 1):
        p.error("--min-lr must be >= 0 and needs --lr-decay below 1")
    if not 0 <= args.dropout < 1:
        p.error("--dropout must be in [0, 1)")
    if args.angles is not None:
        if args.benchmark != "rotated_mnist":
            p.error("--angles only applies to --benchmark rotated_mnist")
        if args.angles != "random":
            try:
                args.angles = [float(a) for a in args.angles.split(",") if a.strip()]
            except ValueError:
                p.error(f"--angles must be comma-separated degrees or 'random', got {args.angles!r}")
            if not args.angles:
                p.error("--angles holds no angle")
    return args


def _rank(name: str) -> float:
    """Table order: the order of ``continual.baselines.STRATEGIES``, a control right after what it controls."""
    from .baselines import EQUAL_STORAGE, STRATEGIES

    order = {n: float(i) for i, n in enumerate(STRATEGIES)}
    if name.startswith(EQUAL_STORAGE):
        return order.get(name[len(EQUAL_STORAGE):].split(" (")[0], len(order)) + 0.5
    return order.get(name.split(" (")[0], len(order))


def _is_control(name: str) -> bool:
    from .baselines import EQUAL_STORAGE, STRATEGIES

    return name.startswith(EQUAL_STORAGE) and name[len(EQUAL_STORAGE):].split(" (")[0] in STRATEGIES


def _options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        strategy, dot, opt = key.partition(".")
        if not sep or not dot:
            raise RebasinError(f"--option must look like STRATEGY.KEY=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(strategy, {})[opt] = parsed
    return out


def build_benchmark(args: argparse.Namespace) -> tuple[Any, int, int]:
    """The benchmark, its input size and number of classes."""
    from .benchmarks import BENCHMARKS

    kwargs: dict[str, Any] = {}
    if args.n_experiences is not None:
        kwargs["n_experiences"] = args.n_experiences
    if getattr(args, "angles", None) is not None:
        kwargs["angles"] = args.angles
    if args.benchmark != "synthetic":
        kwargs["seed"] = getattr(args, "benchmark_seed", 0)
    if args.benchmark == "synthetic":
        bm = BENCHMARKS["synthetic"](**kwargs)  # type: ignore[operator]  # BENCHMARKS maps names to factories with differing signatures
    else:
        bm = BENCHMARKS[args.benchmark](  # type: ignore[operator]  # BENCHMARKS maps names to factories with differing signatures
            args.data_root, train_samples=args.train_samples, test_samples=args.test_samples,
            pixels=getattr(args, "pixels", "normalized"), **kwargs
        )
    x0 = bm.train_stream[0].dataset[0][0]
    n_classes = 1 + max(int(max(exp.dataset.targets)) for exp in bm.train_stream)
    return bm, int(x0.numel()), n_classes


def combine_runs(folders: Sequence[str | Path]) -> tuple[list[RunResult], dict[str, Any]]:
    """Read the ``runs.json`` of several ``--out`` folders as one list of runs.

    Returns the runs, sorted by strategy (in the order of ``continual.baselines.STRATEGIES``) and seed,
    and the shared settings. Raises :class:`RebasinError` when a
    folder has no ``runs.json``, when the shards disagree on a setting in :data:`SHARD_SETTINGS`, or
    when two shards hold the same strategy and seed.
    """
    runs: list[RunResult] = []
    settings: dict[str, Any] | None = None
    first = ""
    seen: dict[tuple[str, int], str] = {}
    for folder in folders:
        path = Path(folder) / "runs.json"
        if not path.is_file():
            raise RebasinError(f"{folder}: no runs.json (is it an --out folder of python -m continual.compare?)")
        data = json.loads(path.read_text())
        mine = {k: data["args"].get(k, _OLD_DEFAULTS.get(k)) for k in SHARD_SETTINGS}
        if settings is None:
            settings, first = mine, str(folder)
        else:
            diff = {k: (settings[k], mine[k]) for k in SHARD_SETTINGS if settings[k] != mine[k]}
            if diff:
                raise RebasinError(f"{folder} was run with other settings than {first}: {diff}")
        for r in data["runs"]:
            result = RunResult(**{"backward_transfer": -r["forgetting"], **r})  # runs.json before BWT / storage
            key = (result.strategy, result.seed)
            if key in seen:
                raise RebasinError(f"{result.strategy} seed {result.seed} is in both {seen[key]} and {folder}")
            seen[key] = str(folder)
            runs.append(result)
    if settings is None:
        raise RebasinError("--combine needs at least one folder")
    runs.sort(key=lambda r: (_rank(r.strategy), r.strategy, r.seed))
    return runs, settings


def _write_outputs(runs: Sequence[RunResult], header: str, out: Path, args: dict[str, Any]) -> str:
    from .storage import STORAGE_KEYS

    rows = summarise(runs)
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "seed", "average_accuracy", "forgetting", "backward_transfer", "time_s", *STORAGE_KEYS])
        for r in runs:
            w.writerow([r.strategy, r.seed, f"{r.average_accuracy:.6f}", f"{r.forgetting:.6f}",
                        f"{r.backward_transfer:.6f}", f"{r.time_s:.2f}", *(r.storage.get(k, "") for k in STORAGE_KEYS)])
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))  # type: ignore[assignment]  # w is reused: a csv.writer above, a DictWriter here
        w.writeheader()  # type: ignore[attr-defined]  # w is reused: a csv.writer above, a DictWriter here
        w.writerows(rows)
    table = _markdown(rows, header)
    (out / "summary.md").write_text(table)
    (out / "runs.json").write_text(json.dumps({"args": args, "runs": [asdict(r) for r in runs]}, indent=1))
    _plot(runs, out / "accuracy.png")
    return table


def _header(settings: dict[str, Any], runs: Sequence[RunResult], model: str, tail: str) -> str:
    """The line above the summary table: benchmark, training settings, seeds, then ``tail``."""
    seeds = sorted({r.seed for r in runs})
    s = {**_OLD_DEFAULTS, **settings}
    opt = (f"AdamW lr {settings['lr']}" if s["optimizer"] == "adamw"
           else f"SGD lr {settings['lr']} momentum {s['momentum']}")
    if s["lr_decay"] != 1.0:
        opt += f" (x{s['lr_decay']} per experience, at least {s['min_lr']})"
    if s["dropout"]:
        model += f", dropout {s['dropout']}"
    if s["pixels"] != "normalized":
        model += f", {s['pixels']} pixels"
    return (f"{settings['benchmark']} ({len(runs[0].accuracy)} experiences), {model}, {opt}, "
            f"batch {settings['batch_size']}, {settings['epochs']} epochs, replay {settings['mem_size']}, "
            f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}), {tail}")


def equal_storage_cells(runs: Sequence[RunResult], done: Sequence[str] = ()) -> list[tuple[str, int, int]]:
    """The ``(replay_eq_<strategy>, seed, mem_size)`` controls for the runs that store samples besides a buffer.

    The control's buffer holds every sample the run stored (its buffer's and the others), so Replay and the
    strategy compare at equal storage. Strategies already in ``done`` (given explicitly) are not added again.
    """
    from .baselines import EQUAL_STORAGE
    from .storage import extra_samples, total_samples

    cells = []
    for r in runs:
        name = EQUAL_STORAGE + r.strategy
        if r.storage and extra_samples(r.storage) > 0 and not _is_control(r.strategy) and name not in done:
            cells.append((name, r.seed, total_samples(r.storage)))
    return cells


_WORKER_BENCHMARK: Any = None  # set in the parent before forking the workers of --jobs


def _run_cell(benchmark: Any, name: str, seed: int, settings: dict[str, Any], mem_size: int | None = None) -> RunResult:
    """One (strategy, seed) cell of the comparison (the same call sequentially and in a worker).

    ``mem_size``: the buffer of an equal-storage control (``replay_eq_<strategy>``), else ``settings``'s.
    """
    from .baselines import mlp

    s = settings
    options = None if _is_control(name) else s["options"].get(name)
    result = run_strategy(
        name, benchmark, seed=seed,
        model_factory=lambda: mlp(s["in_features"], s["hidden"], s["n_classes"], s["depth"], s["dropout"]),
        example_input=s["example_input"], epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
        mem_size=s["mem_size"] if mem_size is None else mem_size, device=s["device"], options=options,
        progress=s["progress"], optim=s["optim"],
    )
    if options:
        result.strategy = name + " (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"
    return result


def _worker_init() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"avalanche\..*")
    warnings.filterwarnings("ignore", message="No loggers specified")


def _worker_cell(name: str, seed: int, settings: dict[str, Any], mem_size: int | None) -> RunResult:
    return _run_cell(_WORKER_BENCHMARK, name, seed, settings, mem_size)


def _run_cells(
    benchmark: Any, cells: Sequence[tuple[str, int, int | None]], settings: dict[str, Any], *, jobs: int, report: Any
) -> list[RunResult]:
    """Run every (strategy, seed, mem_size) cell, in order or in ``jobs`` forked workers; results in the order of
    ``cells``."""
    if jobs <= 1 or len(cells) <= 1:
        out = []
        for name, seed, mem in cells:
            out.append(_run_cell(benchmark, name, seed, settings, mem))
            report(out[-1])
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if "fork" not in multiprocessing.get_all_start_methods():
        raise RebasinError("--jobs > 1 needs the 'fork' start method (Linux, macOS); run with --jobs 1 or shard "
                           "with --first-seed / --combine")
    global _WORKER_BENCHMARK
    _WORKER_BENCHMARK = benchmark  # inherited by the forked workers, not pickled
    try:
        with ProcessPoolExecutor(max_workers=min(jobs, len(cells)), mp_context=multiprocessing.get_context("fork"),
                                 initializer=_worker_init) as pool:
            futures = {pool.submit(_worker_cell, name, seed, settings, mem): i
                       for i, (name, seed, mem) in enumerate(cells)}
            results: list[RunResult | None] = [None] * len(cells)
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                report(results[futures[future]])
    finally:
        _WORKER_BENCHMARK = None
    return [r for r in results if r is not None]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except RebasinError as err:  # a bad setting or a missing dataset: one line, no traceback
        print(f"python -m continual.compare: error: {err}", file=sys.stderr)
        return 2


def _main(argv: Sequence[str] | None) -> int:
    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.combine is not None:
        runs, settings = combine_runs(args.combine)
        header = _header(settings, runs, f"MLP hidden {settings['hidden']} x {settings['depth']}",
                         f"combined from {', '.join(map(str, args.combine))}")
        print(_write_outputs(runs, header, out, {**settings, "combined_from": list(map(str, args.combine))}))
        return 0
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"avalanche\..*")
    warnings.filterwarnings("ignore", message="No loggers specified")
    options = _options(args.option)
    t0 = time.perf_counter()
    bm, in_features, n_classes = build_benchmark(args)
    print(f"benchmark {args.benchmark}: {len(bm.train_stream)} experiences, built in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    x0 = bm.train_stream[0].dataset[0][0]
    example = x0.unsqueeze(0).repeat(2, *([1] * x0.ndim)).to(args.device)
    cells = [(name, seed, None) for seed in range(args.first_seed, args.first_seed + args.seeds) for name in args.strategies]
    settings = dict(
        in_features=in_features, hidden=args.hidden, depth=args.depth, n_classes=n_classes, example_input=example,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, mem_size=args.mem_size, device=args.device, options=options,
        progress=False if (args.no_progress or args.jobs > 1) else None, dropout=args.dropout,
        optim={"optimizer": args.optimizer, "momentum": args.momentum, "lr_decay": args.lr_decay, "min_lr": args.min_lr},
    )

    def report(result: RunResult) -> None:
        print(f"{result.strategy:>20s} seed {result.seed}: ACC {100 * result.average_accuracy:.1f}%  "
              f"forgetting {100 * result.forgetting:.1f}%  {result.time_s:.0f} s", file=sys.stderr)

    runs = _run_cells(bm, cells, settings, jobs=args.jobs, report=report)
    if not args.no_equal_storage:
        controls = equal_storage_cells(runs, done=args.strategies)
        runs += _run_cells(bm, controls, settings, jobs=args.jobs, report=report)
        order = {name: i for i, name in enumerate(args.strategies)}

        def place(name: str) -> tuple[int, bool]:  # the order asked for, each control after its strategy
            control = _is_control(name) and name not in order
            base = (name[len("replay_eq_"):] if control else name).split(" (")[0]
            return order.get(base, len(order)), control

        runs.sort(key=lambda r: (r.seed, *place(r.strategy)))  # seed-major, as the cells ran
    threads = 1 if args.jobs > 1 else torch.get_num_threads()
    header = _header(vars(args), runs, f"MLP {in_features}-{'-'.join([str(args.hidden)] * args.depth)}-{n_classes}",
                     f"device {args.device}, torch threads {threads}"
                     + (f", {args.jobs} worker processes" if args.jobs > 1 else ""))
    print(_write_outputs(runs, header, out, vars(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
