"""Speed of tracing and weight matching a Llama-style LLM (``transformers``, built from a config, no download).

Two ``LlamaForCausalLM`` models (default: 12 layers, width 768, 12 query heads and 4 key/value heads,
intermediate 2048, vocabulary 32000) are initialised from two seeds. The script times

* ``trace``: :func:`rebasin.trace.trace_model` on model A (the dynamic tracer), with the functional check
  ``spec.check`` that makes the spec exact, and without it;
* ``weight matching``: :func:`rebasin.weight_matching` of A and B;
* the floor, as in ``gpt2_speed.py`` (its ``trace_and_match`` times all of this): one sweep of similarity matmuls over every
  stretch of every axis each permutation acts on, plus one ``linear_sum_assignment`` per permutation and
  one per head permutation (``sweep = floor_matmul + floor_lsa``). The default (``start="auto"``) builds
  the layer-wise start (every permutation solved once: one sweep) and descends once, from it when it is
  above the identity (``start="best"``, the default before 2026-12-08, also descends from the identity
  unless the first end point is provably optimal). Two floors are reported: of the *kept path*
  (``sweep x (1 + the kept descent's sweeps)``: what the returned answer's own path needs, the issue's
  1.25x target) and of the *work done* (``sweep x (1 + every descent's sweeps)``: the implementation's
  overhead). ``start="identity"`` is also timed against ``sweep x its sweeps``, the floor as defined
  before the start existed.

The spec per layer: the residual stream (shared), the key/value heads (4, moving whole blocks of q/k/v rows),
the query heads structured by their key/value head (groups of 3), the SwiGLU units (gate and up share them).

Run ``nice -n 10 env OMP_NUM_THREADS=2 python benchmarks/llm_speed.py`` (a few minutes, about 2 GB of memory; ``--layers``,
``--width`` ... to shrink it); ``--no-report`` skips writing docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import append_report, machine_summary, markdown_table
from gpt2_speed import trace_and_match


def build(seed: int, args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, max_position_embeddings=64)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(cfg).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=8, help="example input length")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the floor timings (min kept)")
    parser.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--report-file", default=None)
    args = parser.parse_args(argv)

    model_a, model_b = build(0, args), build(1, args)
    x = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
    rows, spec, a = trace_and_match(model_a, model_b, x, args.repeats)
    table = markdown_table(["step", "seconds", "CPU seconds", "note"], rows)
    print(table)
    if not args.no_report:
        command = "OMP_NUM_THREADS={} python benchmarks/llm_speed.py {}".format(
            torch.get_num_threads(), " ".join(shlex.quote(s) for s in (argv or sys.argv[1:])))
        n_params = sum(v.numel() for v in a.values()) / 1e6
        notes = (f"Machine: {machine_summary()}. LlamaConfig with {args.layers} layers, width {args.width}, "
                 f"{args.heads} query heads and {args.kv_heads} key/value heads, intermediate {args.intermediate}, "
                 f"vocabulary {args.vocab} ({n_params:.0f}M parameters), two random initialisations; example "
                 f"input (1, {args.seq}) tokens. The spec: {len(spec.perms)} permutations, per layer the key/value "
                 "heads, the query heads structured by them, the SwiGLU units; the residual stream shared. The "
                 "trace includes spec.check (a random permutation, randomised norms, two forwards).\n")
        path = append_report("Llama trace and weight matching speed (llm_speed)", command.strip(), table,
                             notes=notes, path=args.report_file)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
