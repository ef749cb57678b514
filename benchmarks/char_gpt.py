"""Barriers between two character-level GPTs trained from two seeds, LayerNorm and RMSNorm: which symmetry pays.

    OMP_NUM_THREADS=2 python benchmarks/char_gpt.py --norm layernorm
    OMP_NUM_THREADS=2 python benchmarks/char_gpt.py --norm rmsnorm

Models, built from ``transformers`` configs (nothing downloaded), 4 layers, width 128, 4 heads, byte
vocabulary 128, untied input and output embeddings, no dropout:

* ``layernorm``: ``GPT2LMHeadModel`` (pre-LN, GELU MLP 4x, learned positions);
* ``rmsnorm``: ``LlamaForCausalLM`` (RMSNorm, SwiGLU MLP 2x, rotary positions).

Two of each are trained from seeds ``s`` and ``s + 1`` on the source of a few standard-library modules
(:mod:`_charlm`; checkpoints cached in ``--cache``). B is aligned to A in several ways and the loss along
the linear path is measured on held-out text. Rows (``--rows``):

* ``naive``: B as it is; ``wm``: weight matching, permutations of every class (stream, heads, MLP units);
* ``signed``: a signed permutation of the residual stream (``transform_matching``; RMSNorm models only,
  a LayerNorm stream is refused) at its default start (weight matching's permutations of every class;
  never below weight matching's objective); ``signed_cold``: ``start="identity"``, the cold start it had before;
* ``folded_*``: both models folded first (GPT-2: ``fold_layernorm``, LayerNorm to scale-free RMSNorm;
  Llama: ``fold_rmsnorm``, RMSNorm scales into the readers), the same functions on another path:
  ``folded_naive``, ``folded_wm`` (permutations), ``folded_signed``, ``folded_ortho`` (an orthogonal
  stream map by Procrustes, permutations elsewhere; from weight matching's permutations, and
  ``folded_ortho_cold`` with ``start="identity"``);
* ``am``: activation matching (permutations); ``am_repair``: + REPAIR;
* ``folded_ortho_repair``: ``folded_ortho`` + REPAIR; ``folded_ortho_am``: the orthogonal stream map of
  ``folded_ortho``, then activation matching of the other classes with the stream fixed;
  ``folded_ortho_am_repair``: the same + REPAIR;
* ``folded_learned``: the stream map of ``folded_ortho`` refined on the loss along the path
  (``learn_transforms``: ``--learn-steps`` training batches, Adam ``--learn-lr``, one uniform t per step;
  the defaults are symmetry_llama's, not tuned here); ``folded_learned_repair``: + REPAIR.

Barrier = max over 11 points of the loss minus the mean of the endpoints. One seed pair.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _charlm import barrier, batches, cached_train, corpus, loss_of, path_losses, split
from _report import append_report, machine_summary, markdown_table
from _symmetry_rows import Aligned, SymmetryPair, run_rows

DEFAULT_ROWS = ("naive,wm,signed,signed_cold,folded_naive,folded_wm,folded_signed,folded_ortho,folded_ortho_cold,am,"
                "am_repair,folded_ortho_repair,folded_ortho_am,folded_ortho_am_repair,folded_learned,folded_learned_repair")


def build(norm: str, seed: int, args: argparse.Namespace) -> nn.Module:
    """A fresh model of the ``norm`` variant, initialised from ``seed``."""
    import transformers

    if norm == "layernorm":
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=args.width, n_layer=args.layers, n_head=args.heads,
                                      n_positions=args.seq, tie_word_embeddings=False, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        cls = transformers.GPT2LMHeadModel
    else:
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=args.width, intermediate_size=2 * args.width,
                                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                       num_key_value_heads=args.heads, max_position_embeddings=args.seq,
                                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(cfg).eval()


def checkpoint(norm: str, seed: int, args: argparse.Namespace) -> Path:
    return Path(args.cache) / (f"chargpt_{norm}_l{args.layers}_w{args.width}_h{args.heads}_s{args.seq}_b{args.batch}"
                               f"_n{args.steps}_lr{args.lr:g}_seed{seed}.pt")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--norm", choices=("layernorm", "rmsnorm"), default="layernorm")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0, help="the pair is trained from seeds SEED and SEED + 1")
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches of 32 windows")
    parser.add_argument("--stat-batches", type=int, default=8, help="training batches of 32 windows for AM / REPAIR")
    parser.add_argument("--learn-steps", type=int, default=200, help="steps (batches) of the learned orthogonal stream")
    parser.add_argument("--learn-lr", type=float, default=1e-2)
    parser.add_argument("--rows", default=DEFAULT_ROWS)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "rebasin-bench"))
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--report-file", default=None)
    args = parser.parse_args(argv)

    train_data, test_data = split(corpus())
    chunks = batches(test_data, args.eval_batches, 32, args.seq, 0)
    stats = [(c[:, :-1],) for c in batches(train_data, args.stat_batches, 32, args.seq, 7 + args.seed)]
    models, train_s = [], 0.0
    for seed in (args.seed, args.seed + 1):
        m = build(args.norm, seed, args)
        train_s += cached_train(m, checkpoint(args.norm, seed, args), train_data, args, seed)
        models.append(m)
    print(f"trained in {train_s:.0f}s (0 = cached)", flush=True)
    if args.train_only:
        return
    x = chunks[0][:2, :-1]
    fit = [(c[:, :-1], c[:, 1:]) for c in batches(train_data, args.learn_steps, args.batch, args.seq, 11 + args.seed)]
    pair = SymmetryPair(models[0], models[1], x, stats, seed=args.seed, fit_batches=fit, learn_lr=args.learn_lr,
                        loss_fn=lambda out, y: F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                                               y.reshape(-1)))

    def evaluate(al: Aligned) -> tuple[float, float]:
        losses = path_losses(al.model, al.state_at, chunks, args.points)
        return barrier(losses)

    rows = run_rows(pair, args.rows.split(","), evaluate)
    naive = next((r[1] for r in rows if r[0].startswith("naive") and isinstance(r[1], float)), None)
    table = markdown_table(["path", "test-loss barrier", "/ naive", "midpoint loss", "align time (s)"],
                           [[r[0], r[1], (r[1] / naive if naive and isinstance(r[1], float) else "-"), r[2], r[3]]
                            for r in rows])
    print(table)
    if not args.no_report:
        command = "OMP_NUM_THREADS={} python benchmarks/char_gpt.py {}".format(
            torch.get_num_threads(), " ".join(shlex.quote(s) for s in (argv or sys.argv[1:])))
        la, lb = loss_of(models[0], models[0].state_dict(), chunks), loss_of(models[1], models[1].state_dict(), chunks)
        kind = ("GPT2LMHeadModel (LayerNorm, GELU MLP 4x)" if args.norm == "layernorm"
                else "LlamaForCausalLM (RMSNorm, SwiGLU MLP 2x, rotary)")
        notes = (f"Machine: {machine_summary()}. Two {kind}, {args.layers} layers, width {args.width}, {args.heads} "
                 f"heads, byte vocabulary 128, untied embeddings, trained {args.steps} steps (AdamW {args.lr}, batch "
                 f"{args.batch} x {args.seq} bytes) from seeds {args.seed} and {args.seed + 1} on the source of "
                 "argparse, collections, json.decoder and typing (last 10% held out); held-out loss A "
                 f"{la:.3f}, B {lb:.3f} nats per byte. Barrier = max minus mean of the endpoints over {args.points} "
                 f"points on {args.eval_batches} x 32 held-out windows; activation matching / REPAIR statistics from "
                 f"{args.stat_batches} x 32 training windows; learned stream: {args.learn_steps} steps, Adam {args.learn_lr}.")
        title = f"Character-level GPT from two seeds, {args.norm}: barriers per symmetry (char_gpt)"
        path = append_report(title, command.strip(), table, notes=notes, path=args.report_file)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
