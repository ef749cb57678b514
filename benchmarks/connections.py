"""Anokhin & Yarotsky's connection table on MNIST, every method side by side (flows and bijection included).

    python benchmarks/connections.py --data-root ../shared/data --zoo-dir /tmp/rebasin-zoo

Two-layer ReLU nets 784-2000-10 (the seed's MNIST architecture) trained with plain SGD (no momentum,
no weight decay, constant learning rate), one seed per network: ``--fit-nets`` of them form the zoo the
global connections (Flow IAF / RealNVP, Bijection) are fitted on, and ``--eval-nets`` *other* networks
give the evaluated pairs (every pair among them), so every learnable connection is measured on pairs it
never saw. Trained networks are cached in ``--zoo-dir`` (``net{seed}.pt``); a rerun reuses them.

``--depth 2`` (or more) trains nets with that many hidden layers of ``--width`` units instead (not the seed's
table): the Flow and Bijection connections then run layer by layer (one flow per hidden layer, the transition
layer refit on the WA inputs; see ``FlowConnection.path``), and the report goes to its own section.

For every pair and method: the worst accuracy along the path on the train set (``--train-eval``
images) and the 10k test set over ``--num-points`` evenly spaced t; mean ± std over pairs.
The table (with the seed's figures beside ours) is printed and appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import append_report, machine_summary, markdown_table, mnist_root

from rebasin.apps.data import mnist_tensors
from rebasin.apps.models import MLP
from rebasin.apps.training import seeded_model


def train_sgd(x, y, *, width, epochs, lr, batch_size, seed, depth=1):
    """One 784-width(-width...)-10 ReLU net (``depth`` hidden layers) trained with plain SGD; seeded shuffling."""
    model = seeded_model(lambda: MLP(784, [width] * depth, 10), seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.eval().state_dict().items()}


def zoo(args, x, y, seeds):
    """Train (or load from ``--zoo-dir``) one network per seed."""
    out = Path(args.zoo_dir)
    out.mkdir(parents=True, exist_ok=True)
    states = []
    for s in seeds:
        tag = "" if args.depth == 1 else f"_d{args.depth}"
        f = out / f"net{s}_w{args.width}{tag}_e{args.epochs}_lr{args.lr:g}.pt"
        if f.exists():
            states.append(torch.load(f))
            continue
        t0 = time.perf_counter()
        st = train_sgd(x, y, width=args.width, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=s,
                       depth=args.depth)
        torch.save(st, f)
        print(f"trained net {s} in {time.perf_counter() - t0:.0f}s", flush=True)
        states.append(st)
    return states


# The seed's MNIST column (784-2000-10, worst test accuracy along the path, %), as quoted in the issue that
# asked for this table; the paper's own table (with its train column) could not be consulted here.
SEED = {
    "endpoints": "≈ 98.0",
    "Linear": "≈ 95.9",
    "Arc": "≈ 97.0",
    "Flow (IAF)": "≈ 95.8",
    "Flow (RealNVP)": "–",
    "Bijection (RealNVP)": "≈ 97.5",
    "Linear+WA": "≈ 97.9",
    "Arc+WA": "≈ 97.9",
    "OT": "≈ 97.9",
    "OT+WA": "≈ 97.9",
    "Bezier (3 bends)": "≈ 98.0",
    "Bezier (5 bends)": "≈ 98.0",
}
PAIRS = [(0, 1), (2, 3), (0, 2), (1, 3), (0, 3), (1, 2)]


def worst(model, path, loaders, num_points, device):
    """``[worst accuracy on each loader]`` along ``path`` (in %)."""
    from rebasin import evaluate_path

    out = []
    for loader in loaders:
        res = evaluate_path(model, path, loader, num_points=num_points, device=device)
        out.append(100 * min(res.accuracy))
    return out


def table(args, x, y, xt, yt, states):
    import json

    from rebasin import BezierCurve, fit_curve, interpolate, permute, spec_from_model, weight_matching
    from rebasin.apps.data import tensor_loader
    from rebasin.apps.training import evaluate
    from rebasin.matching import ot_matching
    from rebasin.paths import ArcPath, fit_bijection_connection, fit_flow_connection, weight_adjusted_path

    device = torch.device(args.device)
    model = MLP(784, [args.width] * args.depth, 10).to(device)
    fit_zoo, eval_zoo = states[: args.fit_nets], states[args.fit_nets :]
    g = torch.Generator().manual_seed(args.seed)
    sub = torch.randperm(len(x), generator=g)[: args.train_eval]
    loaders = [tensor_loader(x[sub], y[sub], batch_size=2000), tensor_loader(xt, yt, batch_size=2000)]
    wa_batch = x[torch.randperm(len(x), generator=g)[: args.wa_samples]].to(device)
    train = tensor_loader(x, y, batch_size=128, shuffle=True, seed=args.seed)
    spec = spec_from_model(model, x[:2].to(device))
    # several hidden layers: the learnable connections run layer by layer and refit the transition layer
    # on the same inputs as the WA paths
    deep = args.depth > 1
    refit = {"refit_batch": wa_batch} if deep else {}

    def conn_path(conn, a, b):
        return conn.path(a, b, wa_batch) if deep else conn.path(a, b)
    timings = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        print(f"{name}: {timings[name]:.0f}s", flush=True)
        return out

    conns = {
        "Flow (IAF)": timed("fit Flow (IAF)", lambda: fit_flow_connection(
            model, fit_zoo, kind="iaf", n_blocks=args.iaf_blocks, n_iter=args.flow_iter, seed=args.seed)),
        "Flow (RealNVP)": timed("fit Flow (RealNVP)", lambda: fit_flow_connection(
            model, fit_zoo, kind="realnvp", n_iter=args.flow_iter, seed=args.seed)),
        "Bijection (RealNVP)": timed("fit Bijection (RealNVP)", lambda: fit_bijection_connection(
            model, fit_zoo, train, kind="realnvp", n_iter=args.bijection_iter, seed=args.seed, **refit)),
    }
    facts = {name: {"ll_zoo": c.log_likelihood_end, "ll_heldout": c.log_likelihood(eval_zoo),
                    "ll_start": c.log_likelihood_start} for name, c in conns.items()}
    print(facts, flush=True)
    results: dict[str, list[list[float]]] = {}
    out_json = Path(args.zoo_dir) / "connections_results.json"
    for pi, (i, j) in enumerate(PAIRS[: args.pairs]):
        sa, sb = eval_zoo[i], eval_zoo[j]
        sb_ot = permute(spec, ot_matching(spec, sa, sb), sb)
        sb_wm = permute(spec, weight_matching(spec, sa, sb, seed=args.seed), sb)
        ends = []
        for st in (sa, sb):
            m = MLP(784, [args.width] * args.depth, 10)
            m.load_state_dict(st)
            ends.append([evaluate(m, ld, device=device)[1] * 100 for ld in loaders])
        results.setdefault("endpoints", []).append([(ends[0][k] + ends[1][k]) / 2 for k in range(2)])

        def bezier(n):
            curve = BezierCurve(sa, sb, num_bends=n)
            fit_curve(model, curve, train, epochs=args.curve_epochs, seed=args.seed, device=device, progress=False)
            return curve

        paths = {
            "Linear": lambda: (lambda t: interpolate(sa, sb, t)),
            "Arc": lambda: ArcPath(sa, sb, spec=spec),
            "Flow (IAF)": lambda: conn_path(conns["Flow (IAF)"], sa, sb),
            "Flow (RealNVP)": lambda: conn_path(conns["Flow (RealNVP)"], sa, sb),
            "Bijection (RealNVP)": lambda: conn_path(conns["Bijection (RealNVP)"], sa, sb),
            "Linear+WA": lambda: weight_adjusted_path(model, sa, sb, wa_batch, device=device),
            "Arc+WA": lambda: weight_adjusted_path(model, sa, sb, wa_batch, base="arc", device=device),
            "OT": lambda: (lambda t: interpolate(sa, sb_ot, t)),
            "OT+WA": lambda: weight_adjusted_path(model, sa, sb_ot, wa_batch, device=device),
            "Bezier (3 bends)": lambda: bezier(3),
            "Bezier (5 bends)": lambda: bezier(5),
            "weight matching, then Flow (RealNVP)": lambda: conn_path(conns["Flow (RealNVP)"], sa, sb_wm),
            "weight matching, then Bijection (RealNVP)": lambda: conn_path(conns["Bijection (RealNVP)"], sa, sb_wm),
            "weight matching, then Linear (reference)": lambda: (lambda t: interpolate(sa, sb_wm, t)),
        }
        for name, build in paths.items():
            t0 = time.perf_counter()
            results.setdefault(name, []).append(worst(model, build(), loaders, args.num_points, device))
            timings[f"{name} (pair {pi})"] = time.perf_counter() - t0
            print(f"pair {pi} {name}: train {results[name][-1][0]:.2f} test {results[name][-1][1]:.2f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
        out_json.write_text(json.dumps({"results": results, "timings": timings, "facts": facts}, indent=1))
    return results, timings, facts


def fmt(values):
    v = torch.tensor(values, dtype=torch.float64)
    return f"{float(v.mean()):.2f} ± {float(v.std()) if len(v) > 1 else 0.0:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="torchvision MNIST root (default: $REBASIN_DATA)")
    parser.add_argument("--zoo-dir", default="/tmp/rebasin-connections-zoo")
    parser.add_argument("--part", choices=["zoo", "table"], default="table")
    parser.add_argument("--width", type=int, default=2000)
    parser.add_argument("--depth", type=int, default=1,
                        help="hidden layers (the seed's table: 1; >1 runs the learnable connections layer by layer)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--fit-nets", type=int, default=6)
    parser.add_argument("--eval-nets", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=3, help="evaluated pairs among the eval nets (at most 6)")
    parser.add_argument("--train-eval", type=int, default=10000, help="training images for the train column")
    parser.add_argument("--num-points", type=int, default=11)
    parser.add_argument("--wa-samples", type=int, default=10000)
    parser.add_argument("--flow-iter", type=int, default=500)
    parser.add_argument("--iaf-blocks", type=int, default=4)
    parser.add_argument("--bijection-iter", type=int, default=150)
    parser.add_argument("--curve-epochs", type=int, default=1)
    parser.add_argument("--train-samples", type=int, default=None, help="seeded training subset (smoke runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    root = mnist_root(args.data_root)
    x, y = mnist_tensors(root, train=True)
    x = x.flatten(1)
    if args.train_samples is not None:
        x, y = x[: args.train_samples], y[: args.train_samples]
    seeds = list(range(args.seed, args.seed + args.fit_nets + args.eval_nets))
    t_start = time.perf_counter()
    states = zoo(args, x, y, seeds)
    if args.part == "zoo":
        return
    xt, yt = mnist_tensors(root, train=False)
    results, timings, facts = table(args, x, y, xt.flatten(1), yt, states)
    header = ["method", "worst train acc % (ours)", "worst test acc % (ours)", "seed: worst test acc %"]
    seed_col = SEED if args.depth == 1 else {}  # the seed's figures are for one hidden layer
    rows = [[name, fmt([r[0] for r in res]), fmt([r[1] for r in res]), seed_col.get(name, "–")]
            for name, res in results.items()]
    text = markdown_table(header, rows)
    print(text)
    print(facts)
    command = "OMP_NUM_THREADS=1 python benchmarks/" + " ".join(
        shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
    fit_t = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items() if k.startswith("fit"))
    ll = "; ".join(f"{k}: zoo {v['ll_zoo']:.3f}, held-out nets {v['ll_heldout']:.3f} (start {v['ll_start']:.3f})"
                   for k, v in facts.items())
    notes = (
        f"{machine_summary(args.device)}. MLP 784-{'-'.join([str(args.width)] * args.depth)}-10 (ReLU), plain SGD lr {args.lr:g} (no momentum, "
        f"no weight decay), batch {args.batch_size}, {args.epochs} epochs, one seed per net; zoo of "
        f"{args.fit_nets} nets (seeds {seeds[0]}..{seeds[args.fit_nets - 1]}) for fitting the Flow and Bijection "
        f"connections, {args.pairs} pairs of {args.eval_nets} other nets evaluated (unseen by every fit). Worst "
        f"accuracy over {args.num_points} evenly spaced t on {args.train_eval} training images (train) and the 10k "
        f"test images (test), mean ± std over pairs. Flows: 4 layers, conditioner width 64, {args.flow_iter} Adam "
        f"steps (lr 1e-3, 512 neurons per step), IAF with {args.iaf_blocks} blocks; Bijection: RealNVP trained "
        f"{args.bijection_iter} steps (one zoo pair, one t, one batch of 128 per step) from the identity flow. "
        f"WA refits on {args.wa_samples} training inputs; Bezier curves trained {args.curve_epochs} epoch(s) of "
        f"Adam 1e-3. "
        + (f"{args.depth} hidden layers: Flow and Bijection run layer by layer (one flow per hidden layer, the "
           f"transition layer refit on the WA inputs; Bijection trained through the refit). " if args.depth > 1 else "")
        + f"Fit times: {fit_t}. Mean log-likelihood per coordinate: {ll}. Total "
        f"{(time.perf_counter() - t_start) / 60:.0f} min."
    )
    if not args.no_report:
        title = "Connection methods of Anokhin & Yarotsky, learnable ones included"
        if args.depth > 1:
            title += f" ({args.depth} hidden layers, layer by layer)"
        append_report(title, command, text, notes=notes)


if __name__ == "__main__":
    main()
