"""Barriers between two character-level Llama models trained from two seeds: permutations, signs, rotations.

Two tiny ``LlamaForCausalLM`` (from a config, no download) are trained from seeds 0 and 1 on the source text of
a few modules of the Python standard library (bytes; nothing downloaded). The loss along the linear path from
A to the aligned B is measured on held-out text for:

* naive: B as it is;
* weight matching: permutations of every class (stream, heads, MLP units);
* signed stream: ``transform_matching`` with a signed permutation of the residual stream (permutations elsewhere);
* folded, weight matching / orthogonal stream: both models with their RMSNorm scales folded into the readers
  (``fold_rmsnorm``; the same functions), then permutations only, or an orthogonal stream map by Procrustes;
* folded + learned orthogonal stream: the Procrustes answer refined by ``learn_transforms`` (Cayley
  parametrisation, the task loss at a random point of the path per step, on training text; permutations kept).
* folded, orthogonal stream + heads: the same, with heads paired by their QK/OV circuits and maps inside them
  (``heads="orthogonal"``: rotations per rotary frequency pair on q/k and orthogonal v/o maps;
  ``heads="invertible"``: invertible v/o maps, q/k as before).

Barrier = max over the path of the loss minus the mean of the endpoints (11 points). One seed pair: read the
pattern, not the digits. Run ``OMP_NUM_THREADS=2 python benchmarks/symmetry_llama.py`` (a few minutes on two
cores; ``--steps``, ``--width`` ... to change it); ``--no-report`` skips writing docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _charlm import barrier, batches, corpus, loss_of, path_losses, split, train
from _report import append_report, machine_summary, markdown_table

from rebasin import LinearPath, permute, weight_matching
from rebasin.matching import learn_transforms, transform_matching
from rebasin.spec import apply_transforms, fold_rmsnorm
from rebasin.trace import symmetry_kinds, trace_model


def build(seed: int, args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=args.width, intermediate_size=2 * args.width,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.heads, max_position_embeddings=args.seq)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--learn-steps", type=int, default=200, help="steps of the learned orthogonal stream")
    parser.add_argument("--learn-lr", type=float, default=1e-2)
    parser.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--report-file", default=None)
    args = parser.parse_args(argv)

    data = corpus()
    train_data, test_data = split(data)
    chunks = batches(test_data, 8, 32, args.seq, 0)
    start = time.time()
    models = [build(s, args) for s in (0, 1)]
    for s, m in enumerate(models):
        train(m, train_data, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=s)
    train_s = time.time() - start
    model = models[0]
    a, b = ({k: v.detach().clone() for k, v in m.state_dict().items()} for m in models)
    x = chunks[0][:2, :-1]
    tr = trace_model(model, x)
    spec = tr.spec
    kinds = symmetry_kinds(model, x, trace=tr)
    stream = spec.axes["model.norm.weight"][0]
    rows = []

    def row(name: str, sa: dict, sb: dict, seconds: float) -> None:
        bar, mid = barrier(path_losses(model, LinearPath(sa, sb).state_dict_at, chunks, args.points))
        rows.append([name, bar, mid, seconds])
        print(rows[-1], flush=True)

    row("naive (identity)", a, b, 0.0)
    t0 = time.time()
    perms = weight_matching(spec, a, b)
    row("weight matching (permutations)", a, permute(spec, perms, b), time.time() - t0)
    t0 = time.time()
    signed = transform_matching(spec, a, b, kinds=kinds)
    row("signed stream + permutations", a, apply_transforms(spec, signed, b, kinds=kinds), time.time() - t0)
    fa, fb = fold_rmsnorm(spec, a, kinds), fold_rmsnorm(spec, b, kinds)
    row("folded, naive", fa, fb, 0.0)
    t0 = time.time()
    row("folded, weight matching (permutations)", fa, permute(spec, weight_matching(spec, fa, fb), fb),
        time.time() - t0)
    t0 = time.time()
    fsigned = transform_matching(spec, fa, fb, kinds=kinds)
    row("folded, signed stream + permutations", fa, apply_transforms(spec, fsigned, fb, kinds=kinds), time.time() - t0)
    t0 = time.time()
    ortho = transform_matching(spec, fa, fb, kinds=kinds, use={stream: "orthogonal"})
    row("folded, orthogonal stream + permutations", fa, apply_transforms(spec, ortho, fb, kinds=kinds),
        time.time() - t0)
    t0 = time.time()
    fit_batches = [(c[:, :-1], c[:, 1:]) for c in batches(train_data, args.learn_steps, args.batch, args.seq, 7)]
    learned = learn_transforms(model, model, fit_batches, spec=spec, kinds=kinds, learn=[stream], init=ortho,
                               loss_fn=lambda out, y: F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                                                      y.reshape(-1)),
                               lr=args.learn_lr, state_a=fa, state_b=fb, seed=0)
    row("folded, learned orthogonal stream + permutations", fa, learned.state_b, time.time() - t0)
    for kind in ("orthogonal", "invertible"):  # maps inside heads: rotary q/k per-pair rotations, v/o of this kind
        t0 = time.time()
        heads = transform_matching(spec, fa, fb, kinds=kinds, use={stream: "orthogonal"}, heads=kind)
        row(f"folded, orthogonal stream + {kind} heads + permutations", fa,
            apply_transforms(spec, heads, fb, kinds=kinds), time.time() - t0)
    naive = rows[0][1]
    table = markdown_table(["path", "test-loss barrier", "/ naive", "midpoint loss", "align time (s)"],
                           [[r[0], r[1], r[1] / naive if naive > 0 else float("nan"), r[2], r[3]] for r in rows])
    print(table)
    if not args.no_report:
        command = "OMP_NUM_THREADS={} python benchmarks/symmetry_llama.py {}".format(
            torch.get_num_threads(), " ".join(shlex.quote(s) for s in (argv or sys.argv[1:])))
        la, lb = loss_of(model, a, chunks), loss_of(model, b, chunks)
        notes = (f"Machine: {machine_summary()}. Two LlamaForCausalLM ({args.layers} layers, width {args.width}, "
                 f"{args.heads} heads, SwiGLU {2 * args.width}, byte vocabulary 128) trained {args.steps} steps "
                 f"(AdamW {args.lr}, batch {args.batch} x {args.seq} bytes) from seeds 0 and 1 on the source of "
                 f"argparse, collections, json.decoder and typing ({data.numel()} bytes, last 10% held out); test "
                 f"loss A {la:.3f}, B {lb:.3f} nats per byte; training took {train_s:.0f} s for both. Barrier = max "
                 f"minus mean of the endpoints over {args.points} points on 8 x 32 held-out windows. 'Folded': both "
                 "models with their RMSNorm scales folded into the readers (same functions, another path). 'Learned': "
                 f"the orthogonal stream's Procrustes answer refined by learn_transforms ({args.learn_steps} steps, "
                 f"Adam {args.learn_lr}, loss at one uniform t per step, on {args.learn_steps} training batches).\n")
        path = append_report("Llama from two seeds: signed and orthogonal stream (symmetry_llama)", command.strip(),
                             table, notes=notes, path=args.report_file)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
