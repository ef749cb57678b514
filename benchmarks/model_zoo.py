"""Model zoo: for every family of issue 25, how much traces, whether the spec is exact, whether a planted permutation comes back.

Every model is tiny and random (``benchmarks/_zoo.py``: ``transformers`` configs, torchvision constructors
with small settings, plain PyTorch; nothing downloaded) and is traced with the default (pin, don't refuse).
Columns:

* ``perms``: permutations in the spec (a structured one, heads and units inside them, counts once);
* ``permutable / pinned units`` (``spec.coverage``) and ``pinned modules``, the modules with pinned units
  (layer indices folded to ``*``); the reasons are listed under the table;
* ``max abs dy``: the largest absolute output difference of ``spec.check`` over seeds 1, 2 and 3 (each draws a
  random permutation after giving every norm weight, bias and statistic random values), next to the
  largest output magnitude; ``FAIL`` when the check raises; ``float64 max abs dy``: the same difference on a float64 copy
  of the model and input, where rounding no longer hides a small error (about 1e-16 when exact). Hugging Face's
  RMSNorm forms (Llama, Mistral, Qwen2, Gemma, T5) compute in float32 whatever the input's dtype, so their
  float64 rows stay at float32 rounding (about 1e-7 of the output); with those casts patched out the Llama and
  T5 rows drop to 4e-16 and 2e-15;
* ``planted recovered``: for each of 10 planted permutations (``random_permutation(spec, seed=s)``,
  s = 0..9) applied to the weights, ``weight_matching(spec, a, b, seed=0)`` (cold start) is asked for it
  back: ``yes (10/10)`` when every time every permutation is the planted one's inverse and the weights come
  back bit for bit, else ``no`` with the recovered count and, per failed seed, the number of wrong
  permutations;
* ``trace s`` / ``wm s``: wall time of ``spec_from_model(model, x, check=False)`` (the first trace of a family
  includes registering its rules) and the median of those ``weight_matching`` calls.

Run ``python benchmarks/model_zoo.py`` (under a minute on one CPU thread); ``--only NAME`` runs some rows,
``--no-report`` skips writing the section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import re
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _zoo
import torch
from torch import nn

import rebasin
from rebasin import RebasinError, permute, random_permutation, spec_from_model, weight_matching

#: seeds of the planted permutations (``random_permutation(spec, seed=...)``)
PLANTED_SEEDS = range(10)

HF = importlib.util.find_spec("transformers") is not None

#: row name: (builder, whether it runs here). Gemma and Phi only where ``transformers`` has them.
MODELS: dict[str, tuple[Callable[[], tuple[nn.Module, Any]], bool]] = {
    "LlamaForCausalLM (GQA 4/2)": (_zoo.llama, HF and _zoo.has_llm("Llama")),
    "MistralForCausalLM (GQA 4/2)": (_zoo.mistral, _zoo.has_llm("Mistral")),
    "Qwen2ForCausalLM (GQA 4/2)": (_zoo.qwen2, _zoo.has_llm("Qwen2")),
    "GPTNeoXForCausalLM (rotary 25%)": (_zoo.gpt_neox, _zoo.has_llm("GPTNeoX")),
    "GemmaForCausalLM (MQA 4/1)": (_zoo.gemma, _zoo.has_llm("Gemma")),
    "PhiForCausalLM (rotary 50%)": (_zoo.phi, _zoo.has_llm("Phi")),
    "T5ForConditionalGeneration": (_zoo.t5, HF),
    "SwinForImageClassification (HF)": (_zoo.swin_hf, HF),
    "torchvision swin_t (small)": (_zoo.swin_torchvision, True),
    "torchvision convnext (small)": (_zoo.convnext, True),
    "torchvision efficientnet (small)": (_zoo.efficientnet, True),
    "MLP-Mixer": (_zoo.mixer, True),
    "einsum attention": (_zoo.einsum_net, True),
    "CLIPModel (logits_per_image)": (_zoo.clip, HF),
    "WhisperForConditionalGeneration": (_zoo.whisper, HF),
    "torchvision ShuffleNetV2 (small)": (_zoo.shufflenet, True),
    "input residual MLP": (_zoo.input_residual, True),
}


def _folded(modules: list[str], limit: int = 3) -> str:
    """Module paths with layer indices folded to ``*``, unique, at most ``limit`` shown."""
    seen: list[str] = []
    for m in modules:
        f = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", m) or "(model)"
        if f not in seen:
            seen.append(f)
    return ", ".join(seen[:limit]) + (f", +{len(seen) - limit} more" if len(seen) > limit else "")


def run_one(make: Callable[[], tuple[nn.Module, Any]]) -> dict[str, Any]:
    """Trace, check and plant-and-recover one model; the row's values (and the pin reasons) as a dict."""
    torch.manual_seed(0)
    model, x = make()
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rebasin.RebasinWarning)  # pins are read from spec.coverage below
        t0 = time.perf_counter()
        spec = spec_from_model(model, x, check=False)
        trace_s = time.perf_counter() - t0
    cov = spec.coverage
    pinned_modules = [m for m, (_, pinned) in cov.modules.items() if pinned]
    by_reason: dict[str, list[str]] = {}
    for pin in cov.pins:
        by_reason.setdefault(pin.reason, []).append(pin.module)
    reasons = [f"{_folded(mods, limit=8)}: {reason}" for reason, mods in by_reason.items()]
    out: dict[str, Any] = {
        "perms": len(spec.perms), "permutable": cov.permutable, "pinned": cov.pinned,
        "pinned_modules": _folded(pinned_modules) if pinned_modules else "none", "reasons": reasons,
        "trace_s": trace_s,
    }
    worst, scale = 0.0, 0.0
    try:
        for seed in (1, 2, 3):
            worst = max(worst, spec.check(model, x, seed=seed))
        with torch.no_grad():
            y = model(**x) if isinstance(x, dict) else model(x)
        leaf = y.logits if hasattr(y, "logits") else y
        scale = float(leaf.abs().max())
        out["equiv"] = f"{worst:.1e} (of {scale:.2g})"
    except RebasinError as err:
        out["equiv"] = "FAIL: " + str(err).split(";")[0]
    # the same check in float64, where float32 rounding no longer hides a small error (read, not judged)
    wide = copy.deepcopy(model).double()
    x64 = torch.utils._pytree.tree_map(lambda t: t.double() if torch.is_tensor(t) and t.is_floating_point() else t, x)
    out["equiv64"] = f"{max(spec.check(wide, x64, seed=s, atol=math.inf) for s in (1, 2, 3)):.1e}"
    state_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    failed, wm_s, out["wrong"] = [], [], []
    for planted_seed in PLANTED_SEEDS:
        planted = random_permutation(spec, seed=planted_seed)
        state_b = permute(spec, planted, state_a)
        t0 = time.perf_counter()
        found = weight_matching(spec, state_a, state_b, seed=0)
        wm_s.append(time.perf_counter() - t0)
        wrong = [p for p in spec.perms if not torch.equal(found[p].long(), torch.argsort(planted[p]))]
        back = permute(spec, found, state_b)
        if wrong or not all(torch.equal(back[k], v) for k, v in state_a.items()):
            failed.append(f"seed {planted_seed}: {len(wrong)} of {len(spec.perms)} wrong")
            out["wrong"].append(f"seed {planted_seed}: {', '.join(wrong) or 'weights differ'}")
    out["wm_s"] = sorted(wm_s)[len(wm_s) // 2]
    n = len(PLANTED_SEEDS)
    out["planted"] = f"yes ({n}/{n})" if not failed else f"no ({n - len(failed)}/{n}; " + "; ".join(failed) + ")"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="run rows whose name contains this text (repeatable)")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()

    from _report import append_report, machine_summary, markdown_table

    rows, notes, skipped = [], [], []
    for name, (make, available) in MODELS.items():
        if args.only and not any(s.lower() in name.lower() for s in args.only):
            continue
        if not available:
            skipped.append(name)
            continue
        r = run_one(make)
        rows.append([name, r["perms"], f"{r['permutable']} / {r['pinned']}", r["pinned_modules"], r["equiv"],
                     r["equiv64"], r["planted"], f"{r['trace_s']:.2f}", f"{r['wm_s']:.2f}"])
        notes += [f"- {name}: pinned {reason}" for reason in r["reasons"]]
        if r["wrong"]:
            notes += [f"- {name}: wrong after weight matching, planted {w}" for w in r["wrong"]]
        print(" | ".join(str(v) for v in rows[-1]), flush=True)
    table = markdown_table(["model", "perms", "permutable / pinned units", "pinned modules",
                            "max abs dy (of max abs y)", "float64 max abs dy", "planted recovered", "trace s", "wm s"], rows)
    print()
    print(table)
    if notes:
        print("\n" + "\n".join(notes))
    if skipped:
        print("\nnot installed: " + ", ".join(skipped))
    if not args.no_report and not args.only:
        command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
        text = (__doc__.split("\n\n", 1)[1].rsplit("\n\nRun ", 1)[0] + "\n\nMachine: " + machine_summary() + ".")
        if skipped:
            text += " Not in the installed transformers: " + ", ".join(skipped) + "."
        body = table + ("\n\nWhy units are pinned / what failed:\n\n" + "\n".join(notes) if notes else "")
        path = append_report("Model zoo: coverage, equivalence, planted recovery", command, body, notes=text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
