"""Two-process ``torch.distributed`` (gloo, CPU) scenarios for tests/test_distributed.py.

:func:`run_world` starts the process group once and runs every scenario of :data:`SCENARIOS` on both
ranks (rank ``r`` gets batches ``r, r + 2, ...`` of :func:`data`, as a ``DistributedSampler`` would),
recording what each returned or raised; the tests then compare with one process on all the batches.
A scenario that raises on one rank only would leave the other waiting: the group's timeout turns that into
an error instead of a hang, and :func:`run_world` kills workers that outlive its own (both only guards
against hangs, set far above the time a busy machine needs).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp
from builders import HANG_S, mlp

WORLD = 2
#: How long a rank waits for the other at a collective (and at the start) before it raises. Only a guard
#: against a scenario that leaves one rank waiting (a bug): the ranks meet within a second on a quiet machine,
#: but on a loaded one a rank can lag by tens of seconds (spawning, importing torch), so it is set far above.
PG_TIMEOUT_S = 300


def data(n_batches: int = 4, batch: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 5, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n_batches)]


def shard(batches: list[Any], rank: int, world: int = WORLD) -> list[Any]:
    return batches[rank::world]


def models(bn: bool = False, width: int = 8) -> tuple[torch.nn.Module, torch.nn.Module]:
    return mlp(5, [width, width], 3, bn=bn, seed=1), mlp(5, [width, width], 3, bn=bn, seed=2)


def spec_of(model: torch.nn.Module) -> Any:
    from rebasin.trace import spec_from_model

    return spec_from_model(model, torch.randn(2, 5))


# ---------------------------------------------------------------------------------------- scenarios
def _reset_bn(rank: int, sync: bool = True) -> Any:
    from rebasin import reset_bn_stats

    a, _ = models(bn=True)
    return reset_bn_stats(a, a.state_dict(), shard(data(), rank), sync=sync)


def _evaluate_path(rank: int) -> Any:
    from rebasin import evaluate_path

    a, b = models(bn=True)
    res = evaluate_path(a, a.state_dict(), b.state_dict(), shard(data(), rank), num_points=3,
                        bn_loader=shard(data(seed=1), rank))
    return {"loss": res.loss, "accuracy": res.accuracy, "n": res.metadata["num_examples"]}


def _repair(rank: int, closed_form: bool = False) -> Any:
    from rebasin import repair

    a, b = models()
    return repair(a, a.state_dict(), b.state_dict(), 0.5, shard(data(), rank), spec=spec_of(a),
                  closed_form=closed_form).state_dict()


def _repair_bn(rank: int) -> Any:
    from rebasin import repair

    a, b = models(bn=True)
    return repair(a, a.state_dict(), b.state_dict(), 0.5, shard(data(), rank)).state_dict()


def _activation(rank: int, sync: bool = True) -> Any:
    from rebasin import activation_matching
    from rebasin.matching import activation_correlations

    a, b = models()
    perms = activation_matching(a, b, shard(data(), rank), sync=sync)
    corr = activation_correlations(a, b, shard(data(), rank), sync=sync)
    return {"perms": perms, "corr": corr}


def _activation_group(rank: int) -> Any:
    import torch.distributed as dist

    from rebasin import activation_matching

    group = dist.new_group([0, 1], backend="gloo")
    a, b = models()
    return activation_matching(a, b, shard(data(), rank), group=group)


def _mismatch_shapes(rank: int) -> Any:
    from rebasin import reset_bn_stats

    a, _ = models(bn=True, width=8 if rank == 0 else 6)
    return reset_bn_stats(a, a.state_dict(), shard(data(), rank))


def _mismatch_activation(rank: int) -> Any:
    from rebasin import activation_matching

    a, b = models(width=8 if rank == 0 else 6)
    return activation_matching(a, b, shard(data(), rank))


def _bn_mismatch(kind: str) -> Callable[[int], Any]:
    """Rank 0's models have BatchNorm, rank 1's do not: every rank must raise, before any other collective."""

    def run(rank: int) -> Any:
        from rebasin import activation_matching, evaluate_path, repair, reset_bn_stats

        a, b = models(bn=rank == 0)
        loader = shard(data(), rank)
        if kind == "reset":
            return reset_bn_stats(a, a.state_dict(), loader)
        if kind == "evaluate":
            return evaluate_path(a, a.state_dict(), b.state_dict(), loader, num_points=2, bn_loader=loader).loss
        if kind == "activation":
            return activation_matching(a, b, loader)
        return repair(a, a.state_dict(), b.state_dict(), 0.5, loader).state_dict()

    return run


def _no_perms_sinkhorn(rank: int) -> Any:
    """Rank 1's models have no hidden layer (no permutation, no logits): it used to fail with StopIteration
    before the agreement, leaving rank 0 to pair its fingerprint with rank 1's next collective."""
    from rebasin import SinkhornRebasin

    a, b = models() if rank == 0 else (mlp(5, [], 3, seed=1), mlp(5, [], 3, seed=2))
    return SinkhornRebasin(a, b, cost="midpoint", example_input=torch.randn(2, 5)).fit(shard(data(), rank))


def _empty(fn: Callable[[list[Any]], Any]) -> Callable[[int], Any]:
    def run(rank: int) -> Any:
        return fn(shard(data(), rank) if rank == 0 else [])

    return run


def _empty_reset(loader: list[Any]) -> Any:
    from rebasin import reset_bn_stats

    a, _ = models(bn=True)
    return reset_bn_stats(a, a.state_dict(), loader)


def _empty_activation(loader: list[Any]) -> Any:
    from rebasin import activation_matching

    a, b = models()
    return activation_matching(a, b, loader)


def _empty_repair(loader: list[Any]) -> Any:
    from rebasin import repair

    a, b = models()
    return repair(a, a.state_dict(), b.state_dict(), 0.5, loader).state_dict()


def _empty_evaluate(loader: list[Any]) -> Any:
    from rebasin import evaluate_path

    a, b = models()
    return evaluate_path(a, a.state_dict(), b.state_dict(), loader, num_points=2).loss


def union(batches: list[Any], world: int = WORLD) -> list[Any]:
    """One process's batches matching the ranks' steps: step k is the concatenation of every rank's k-th batch."""
    return [tuple(torch.cat(parts) for parts in zip(*batches[k : k + world], strict=True))
            for k in range(0, len(batches), world)]


def ste(loader: list[Any], **kw: Any) -> Any:
    from rebasin import ste_matching

    a, b = models()
    perms, info = ste_matching(a, b, loader, epochs=2, lr=0.05, n_iter=20, return_info=True, **kw)
    return {"perms": perms, "losses": info.losses}


def sinkhorn_fit(loader: list[Any], **kw: Any) -> Any:
    from rebasin import SinkhornRebasin

    a, b = models()
    module = SinkhornRebasin(a, b, cost="midpoint", init="random", seed=3, example_input=torch.randn(2, 5))
    history = module.fit(loader, epochs=2, lr=0.1, **kw)
    return {"perms": module.hard_permutations(), "history": history,
            "logits": {k: v.detach().clone() for k, v in module.logits.items()}}


def curve_fit(loader: list[Any], **kw: Any) -> Any:
    from rebasin import BezierCurve, fit_curve

    a, b = models()
    curve = BezierCurve(a, b, num_bends=3)
    fit = fit_curve(a, curve, loader, epochs=2, lr=1e-2, seed=4, **kw)
    return {"losses": fit.loss, "bends": {k: v.detach().clone() for k, v in curve.named_parameters()}}


def pam(loader: list[Any], **kw: Any) -> Any:
    from rebasin.paths import proximal_alternating_minimization
    from rebasin.paths.pam import ProximalStep

    a, b = models()
    res = proximal_alternating_minimization(a, a.state_dict(), b.state_dict(), loader, example_input=torch.randn(2, 5),
                                            rounds=2, theta_steps=3, lr=1e-2, finetune_steps=2, seed=5,
                                            perm_step=ProximalStep(lr=1.0, batches=2, n_iter=200), **kw)
    return {"perms": res.perms, "history": res.history, "finetune": res.finetune_loss, "changed": res.changed,
            "bends": {k: v.detach().clone() for k, v in res.curve.named_parameters()}, "soft": res.soft}


def _unequal(fn: Callable[[list[Any]], Any]) -> Callable[[int], Any]:
    def run(rank: int) -> Any:
        return fn(data()[:2] if rank == 0 else data()[:1])

    return run


def _mismatch_sinkhorn(rank: int) -> Any:
    from rebasin import SinkhornRebasin

    a, b = models(width=8 if rank == 0 else 6)
    return SinkhornRebasin(a, b, cost="l2", example_input=torch.randn(2, 5)).fit(steps=3)


def cka_of(loader: list[Any], gram: bool = False, **kw: Any) -> float:
    from rebasin.landscape import cka, similarity

    a, b = models()
    budget = similarity._CKA_FEATURE_BUDGET
    similarity._CKA_FEATURE_BUDGET = 0 if gram else budget  # the wide-feature (Gram) form on tiny models
    try:
        return cka(a, b, loader, layer="1", **kw)
    finally:
        similarity._CKA_FEATURE_BUDGET = budget


def connectivity(loader: list[Any], **kw: Any) -> Any:
    from rebasin.landscape import mode_connectivity

    a, b = models(bn=True)
    res = mode_connectivity(a, a.state_dict(), b.state_dict(), loader, curve="bezier", epochs=1, lr=1e-2,
                            num_points=3, bn_loader=loader, metric="loss", **kw)
    return {"mc": res.mc, "values": res.values}


def merged(loader: list[Any], **kw: Any) -> Any:
    from rebasin import merge

    ms = [mlp(5, [8, 8], 3, seed=s) for s in (1, 2, 3)]
    model, info = merge(ms, method="activation_matching", loader=loader, eval_loader=loader, return_info=True, **kw)
    return {"state": model.state_dict(), "loss": info.loss, "accuracy": info.accuracy}


def hessian(loader: list[Any], **kw: Any) -> Any:
    from rebasin.landscape import hessian_top_eigenvalue, hessian_trace

    a, _ = models()
    top = hessian_top_eigenvalue(a, loader, n_iter=20, seed=0, **kw)
    trace = hessian_trace(a, loader, n_samples=5, seed=0, **kw)
    return {"top": float(top), "trace": float(trace)}


def _after_errors(rank: int) -> Any:
    """The group still works after the failed scenarios (every rank raised, none hangs)."""
    return _reset_bn(rank)


SCENARIOS: dict[str, Callable[[int], Any]] = {
    "reset_bn": _reset_bn,
    "reset_bn_nosync": lambda rank: _reset_bn(rank, sync=False),
    "evaluate_path": _evaluate_path,
    "repair": _repair,
    "repair_closed_form": lambda rank: _repair(rank, closed_form=True),
    "repair_bn": _repair_bn,
    "activation": _activation,
    "activation_nosync": lambda rank: _activation(rank, sync=False),
    "activation_group": _activation_group,
    "mismatch_shapes": _mismatch_shapes,
    "mismatch_activation": _mismatch_activation,
    "empty_reset": _empty(_empty_reset),
    "empty_activation": _empty(_empty_activation),
    "empty_repair": _empty(_empty_repair),
    "empty_evaluate": _empty(_empty_evaluate),
    "ste": lambda rank: ste(shard(data(), rank)),
    "sinkhorn": lambda rank: sinkhorn_fit(shard(data(), rank)),
    "sinkhorn_nosync": lambda rank: sinkhorn_fit(shard(data(), rank), sync=False),
    "fit_curve": lambda rank: curve_fit(shard(data(), rank)),
    "unequal_ste": _unequal(ste),
    "unequal_sinkhorn": _unequal(sinkhorn_fit),
    "unequal_curve": _unequal(curve_fit),
    "empty_sinkhorn": _empty(sinkhorn_fit),
    "mismatch_sinkhorn": _mismatch_sinkhorn,
    "cka": lambda rank: cka_of(shard(data(), rank)),
    "cka_gram": lambda rank: cka_of(shard(data(), rank), gram=True),
    "cka_nosync": lambda rank: cka_of(shard(data(), rank), sync=False),
    "empty_cka": _empty(cka_of),
    "mode_connectivity": lambda rank: connectivity(shard(data(), rank)),
    "merge": lambda rank: merged(shard(data(), rank)),
    "hessian": lambda rank: hessian(shard(data(), rank)),
    "empty_hessian": _empty(hessian),
    "pam": lambda rank: pam(shard(data(), rank)),
    "pam_nosync": lambda rank: pam(shard(data(), rank), sync=False),
    "empty_pam": _empty(pam),
    **{f"bn_mismatch_{kind}": _bn_mismatch(kind) for kind in ("reset", "evaluate", "activation", "repair")},
    "no_perms_sinkhorn": _no_perms_sinkhorn,
    "after_errors": _after_errors,
}


# ---------------------------------------------------------------------------------------- the world
def _worker(rank: int, out_dir: str, names: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # the ranks meet through a file in the run's own folder, not a TCP port: worlds started at once by
    # parallel test workers (pytest-xdist) cannot take each other's rendezvous
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "store"), rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    results: dict[str, Any] = {}
    try:
        for name in names:
            try:
                results[name] = ("ok", SCENARIOS[name](rank))
            except Exception as err:  # noqa: BLE001 - recorded for the test to judge
                results[name] = ("error", type(err).__name__, str(err), traceback.format_exc())
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_world(names: list[str] | None = None, timeout_s: float = HANG_S) -> list[dict[str, Any]]:
    """Run the scenarios on two gloo processes; ``[rank 0 results, rank 1 results]``."""
    names = list(SCENARIOS) if names is None else names
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(r, out_dir, names)) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        out = []
        for r in range(WORLD):
            path = os.path.join(out_dir, f"rank{r}.pt")
            out.append(torch.load(path, weights_only=False) if os.path.exists(path) else {})
        return out

