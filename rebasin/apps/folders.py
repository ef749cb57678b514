"""``rebasin align`` and ``rebasin merge`` on Hugging Face model folders (what ``save_pretrained`` writes).

The model is built from ``config.json`` on the meta device and traced there (or ``--model`` builds it),
the weights are read one tensor at a time across the shards, and the output is a new folder laid out like
the input (config and small files copied, the same shards, the index), which ``from_pretrained`` loads:
neither model is ever whole in memory. Weight matching is the method (the others run the models on data).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .._errors import RebasinError
from ..matching.registry import get_matcher
from ..spec.core import PermutationSpec
from ..spec.hf_folder import PretrainedFolder, check_new_folder, open_pretrained
from ._cli_inputs import build_model, check_output_file, example_dtype, example_shape, float_ids_error
from .demo import device_from_name

__all__ = ["align_folders", "any_folder", "merge_folders"]


def any_folder(paths: list[str]) -> bool:
    """Whether one of the command's model paths is a folder (then all must be model folders)."""
    return any(Path(p).is_dir() for p in paths)


def _open_all(paths: list[str], command: str) -> list[PretrainedFolder]:
    files = [p for p in paths if not Path(p).is_dir()]
    if files:
        raise RebasinError(f"{command} got model folders and {files[:3]}, which {'is' if len(files) == 1 else 'are'} "
                           "not folders; give Hugging Face model folders only, or checkpoint files only")
    return [open_pretrained(p) for p in paths]


def _only_weight_matching(args: argparse.Namespace, command: str, data_options: tuple[str, ...]) -> None:
    if not get_matcher(args.method).reads_checkpoints:
        raise RebasinError(f"{command} on model folders uses weight_matching (read one tensor at a time), got --method "
                           f"{args.method}; for a data-driven method load the models with from_pretrained and call "
                           "rebasin.align / rebasin.merge")
    given = [f"--{o.replace('_', '-')}" for o in data_options if getattr(args, o, None)]
    if given:
        raise RebasinError(f"{command} on model folders does not run the models, so {', '.join(given)} cannot be used; "
                           "load them with from_pretrained and call rebasin.merge for REPAIR or evaluation")


def _example(args: argparse.Namespace) -> tuple[int, ...] | torch.Tensor | None:
    """The tracing input ``--example-shape`` / ``--example-dtype`` ask for: None (made from config.json), a bare
    shape (token ids for a text model, else zeros), or zeros of that shape in ``--example-dtype``. The model is
    traced on the meta device, so the values are never read; zeros are valid ids for every embedding."""
    dtype_name = getattr(args, "example_dtype", None)
    if args.example_shape is None:
        if dtype_name is not None:
            raise RebasinError(f"--example-dtype {dtype_name} sets the dtype of the --example-shape input, and no "
                               "--example-shape was given; for model folders give both (e.g. --example-shape 2,8 "
                               "--example-dtype long) or neither (the input is then made from config.json)")
        return None
    shape = example_shape(args.example_shape)
    return shape if dtype_name is None else torch.zeros(shape, dtype=example_dtype(dtype_name))


def _spec(args: argparse.Namespace, first: PretrainedFolder, others: list[PretrainedFolder], *,
          need_perms: bool) -> PermutationSpec:
    """The spec of ``first`` (from its config, or ``--model``; ``--strict`` as for checkpoints, coverage printed),
    after checking that ``others`` hold the same model; with ``need_perms`` an empty spec is an error."""
    from ..trace.pretrained import same_pretrained_architecture, spec_from_pretrained

    example = _example(args)
    model = None if args.model is None else build_model(args.model)
    try:
        spec = spec_from_pretrained(first, example, model=model, strict=args.strict)
    except (RebasinError, RuntimeError) as exc:
        hint = float_ids_error(exc, str(first.architecture), args.example_shape, getattr(args, "example_dtype", None))
        if hint is None:
            raise
        raise hint from exc
    del model
    same_pretrained_architecture(spec, first, others, example_input=example)
    if spec.coverage is not None:
        print(spec.coverage.summary())
    if need_perms and not spec.perms:
        raise RebasinError(f"nothing to align: tracing {first.architecture} left no permutation (every hidden unit "
                           "is pinned to the identity or reaches the output; the warning above names them)")
    return spec


def align_folders(args: argparse.Namespace) -> None:
    """``rebasin align DIR_A DIR_B -o DIR``: B aligned to A, written as a model folder laid out like B."""
    from ..spec.hf_folder import save_pretrained_permuted

    _only_weight_matching(args, "rebasin align", ("data",))
    folder_a, folder_b = _open_all([args.model_a, args.model_b], "rebasin align")
    output = check_new_folder(args.output)
    perms_file = None if args.save_perms is None else check_output_file(args.save_perms, "--save-perms")
    spec = _spec(args, folder_a, [folder_b], need_perms=True)
    start = time.perf_counter()
    perms = get_matcher(args.method)(spec, folder_a, folder_b, seed=args.seed, device=device_from_name(args.device)).perms
    save_pretrained_permuted(spec, perms, folder_b, output)
    print(f"aligned {args.model_b} to {args.model_a} with {args.method} (one tensor at a time) in "
          f"{time.perf_counter() - start:.2f} s -> {output} (a model folder: from_pretrained loads it)", flush=True)
    if perms_file is not None:
        torch.save(perms, perms_file)
        sizes = ", ".join(f"{k} ({len(v)})" for k, v in perms.items()) or "none"
        print(f"permutations {sizes} -> {perms_file}", flush=True)


def merge_folders(args: argparse.Namespace) -> None:
    """``rebasin merge DIR_A DIR_B ... -o DIR``: the folders merged by weight matching into a folder like the reference."""
    from ..merging import merge_checkpoints

    _only_weight_matching(args, "rebasin merge", ("data", "repair", "eval_data"))
    folders = _open_all(list(args.models), "rebasin merge")
    check_new_folder(args.output)
    reference = folders[args.reference]
    spec = _spec(args, reference, [f for f in folders if f is not reference], need_perms=False)
    start = time.perf_counter()
    merge_checkpoints(spec, folders, args.output, reference=args.reference, n_iter=args.n_iter, seed=args.seed,
                      device=device_from_name(args.device))
    print(f"merged {len(folders)} model folders with weight_matching (one tensor at a time) in "
          f"{time.perf_counter() - start:.2f} s -> {args.output} (a model folder: from_pretrained loads it)", flush=True)
