"""Every data-reading function under torch.distributed against one process on all the data.

    torchrun --nproc_per_node 2 benchmarks/distributed.py                  # gloo on CPU
    torchrun --nproc_per_node 2 benchmarks/distributed.py --backend nccl   # one GPU per rank
    python benchmarks/distributed.py                                       # spawns 2 gloo processes itself

Each rank holds every ``world``-th batch of a synthetic classification set (what a
``DistributedSampler`` gives); rank 0 also runs the same call with ``sync=False`` on all the
batches (the single-process reference; for the fitters, one process whose step ``k`` sees the
union of the ranks' ``k``-th batches). The table gives, per function, the largest difference of
the distributed result from the reference (for permutations: the number of entries that differ),
whether all ranks hold the same result, and the wall times (after one warm-up call each). The
fitters pay two small collectives per step (the lockstep check and the gradient all-reduce).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rebasin import (
    BezierCurve,
    BNResetPath,
    LinearPath,
    SinkhornRebasin,
    activation_matching,
    evaluate_path,
    fit_curve,
    repair,
    reset_bn_stats,
    ste_matching,
)
from rebasin.landscape import cka
from rebasin.paths import proximal_alternating_minimization
from rebasin.paths.pam import ProximalStep
from rebasin.trace import spec_from_model


def mlp(seed: int, bn: bool, width: int) -> nn.Sequential:
    torch.manual_seed(seed)
    norm = (lambda: nn.BatchNorm1d(width)) if bn else nn.Identity
    return nn.Sequential(nn.Linear(32, width), norm(), nn.ReLU(), nn.Linear(width, width), norm(), nn.ReLU(),
                         nn.Linear(width, 10))


def data(n_batches: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 10, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, 32, generator=g)
        out.append((x, (x @ w + 0.5 * torch.randn(batch, 10, generator=g)).argmax(1)))
    return out


def diff(a: Any, b: Any) -> float:
    """Largest absolute difference (tensors, numbers, nested); LongTensors: the number of differing entries."""
    if isinstance(a, dict):
        return max((diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        return max((diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, torch.Tensor):
        if not a.is_floating_point():
            return float((a != b.to(a.device)).sum())
        return float((a.double() - b.to(a.device).double()).abs().max()) if a.numel() else 0.0
    return abs(float(a) - float(b))


def cases(device: torch.device, width: int) -> dict[str, Callable[[list[Any], bool], Any]]:
    a_bn, b_bn = mlp(1, True, width).to(device), mlp(2, True, width).to(device)
    a, b = mlp(1, False, width).to(device), mlp(2, False, width).to(device)
    spec = spec_from_model(a, torch.randn(2, 32, device=device))

    def sinkhorn(loader: list[Any], sync: bool) -> Any:
        m = SinkhornRebasin(a, b, spec=spec, cost="midpoint", init="random", seed=3)
        m.fit(loader, epochs=1, lr=0.1, sync=sync)
        return m.hard_permutations()

    def curve(loader: list[Any], sync: bool) -> Any:
        c = BezierCurve(a, b, num_bends=3)
        fit_curve(a, c, loader, epochs=1, lr=1e-3, seed=0, sync=sync)
        return {k: v.detach() for k, v in c.named_parameters()}

    def pam(loader: list[Any], sync: bool) -> Any:
        res = proximal_alternating_minimization(a, a.state_dict(), b.state_dict(), loader, spec=spec, rounds=2,
                                                theta_steps=4, lr=1e-3, perm_step=ProximalStep(batches=2), sync=sync)
        return {"perms": res.perms, "bends": {k: v.detach() for k, v in res.curve.named_parameters()}}

    return {
        "reset_bn_stats": lambda ld, s: reset_bn_stats(a_bn, a_bn.state_dict(), ld, sync=s),
        "evaluate_path (BN reset)": lambda ld, s: evaluate_path(
            a_bn, BNResetPath(LinearPath(a_bn.state_dict(), b_bn.state_dict()), a_bn, ld, sync=s), ld, num_points=5,
            sync=s).loss,
        "repair": lambda ld, s: repair(a, [a.state_dict(), b.state_dict()], [0.5, 0.5], ld, spec=spec, sync=s),
        "activation_matching": lambda ld, s: activation_matching(a, b, ld, spec=spec, sync=s),
        "cka": lambda ld, s: cka(a, b, ld, layer="2", sync=s),
        "ste_matching": lambda ld, s: ste_matching(a, b, ld, spec=spec, lr=0.01, n_iter=20, sync=s),
        "SinkhornRebasin.fit": sinkhorn,
        "fit_curve": curve,
        "proximal_alternating_minimization": pam,
    }


FITTERS = {"ste_matching", "SinkhornRebasin.fit", "fit_curve", "proximal_alternating_minimization"}


def union(batches: list[Any], world: int) -> list[Any]:
    return [tuple(torch.cat(p) for p in zip(*batches[k : k + world], strict=True))
            for k in range(0, len(batches), world)]


def main(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    batches = [tuple(t.to(device) for t in b) for b in data(args.batches, args.batch_size)]
    mine = batches[rank::world]
    rows = []
    for name, fn in cases(device, args.width).items():
        fn(mine[:1], False)  # warm-up: lazy imports (scipy) and allocator, outside the timings
        dist.barrier()
        start = time.perf_counter()
        got = fn(mine, True)
        t_dist = time.perf_counter() - start
        same = all(diff(got, other) == 0 for other in gather(got))
        if rank == 0:
            ref_data = union(batches, world) if name in FITTERS else batches
            start = time.perf_counter()
            want = fn(ref_data, False)
            t_one = time.perf_counter() - start
            rows.append((name, diff(got, want), same, t_dist, t_one))
        dist.barrier()
    if rank == 0:
        print(f"world={world} backend={args.backend} device={device.type} batches={args.batches}x{args.batch_size} "
              f"width={args.width} torch={torch.__version__}")
        print("| function | max diff vs 1 process | ranks identical | time, distributed (s) | time, 1 process (s) |")
        print("|---|---|---|---|---|")
        for name, d, same, td, t1 in rows:
            print(f"| {name} | {d:.2e} | {'yes' if same else 'NO'} | {td:.3f} | {t1:.3f} |")


def gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, _cpu(obj))
    return out


def _cpu(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj.cpu() if isinstance(obj, torch.Tensor) else obj


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ["WORLD_SIZE"])))
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=120))
    try:
        main(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--batches", type=int, default=16, help="batches in all (split over the ranks)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    args = parser.parse_args()
    if "RANK" in os.environ:
        run(args)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(_spawned, args=(args.nproc, port, args), nprocs=args.nproc)
        sys.exit(0)
