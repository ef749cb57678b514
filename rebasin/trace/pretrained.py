"""The spec of a Hugging Face model folder, traced on a model built from its ``config.json`` without weights.

:func:`spec_from_pretrained` builds the class named by ``config.json``'s ``architectures`` with
``transformers`` under ``torch.device("meta")`` (shapes, no values: nothing is allocated, whatever the
model's size), traces it with :func:`spec_from_model` on an input made from the config, and keeps the keys
the folder stores, under the names it stores them by (``transformers`` 5 renames some on saving): of two tied
weights (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``)
``save_pretrained`` stores one, and the spec keeps that one. :func:`same_pretrained_architecture` checks
that another folder holds the same architecture.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._errors import RebasinError
from ..spec.core import PermutationSpec
from ..spec.hf_folder import PretrainedFolder, open_pretrained
from .tracing import spec_from_model

__all__ = ["model_from_config", "same_pretrained_architecture", "spec_from_pretrained"]

# config.json entries that do not change the architecture (names, versions, labels, the stored dtype).
_NOT_STRUCTURAL = frozenset({"_name_or_path", "transformers_version", "dtype", "torch_dtype", "id2label", "label2id",
                             "_commit_hash", "finetuning_task", "problem_type"})


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise RebasinError("reading a Hugging Face model folder needs transformers: "
                           "pip install 'rebasin-toolkit[hf]'") from None
    return transformers


def _folder(folder: PretrainedFolder | str | os.PathLike[str]) -> PretrainedFolder:
    return folder if isinstance(folder, PretrainedFolder) else open_pretrained(folder)


def model_from_config(folder: PretrainedFolder | str | os.PathLike[str]) -> nn.Module:
    """The model class named by the folder's ``config.json`` (``architectures[0]``; ``AutoModel`` when it
    names none), built from the config under ``torch.device("meta")``, in eval mode: no weights are allocated.

    Raises
    ------
    RebasinError
        If ``transformers`` is missing, cannot read the config, has no class of that name, or building fails.
    """
    folder = _folder(folder)
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder.path))
    except Exception as err:  # transformers raises many types for a config it cannot read
        raise RebasinError(f"transformers cannot read {folder.path / 'config.json'}: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from None
    arch = folder.architecture
    cls = getattr(transformers, arch, None) if arch else None
    if arch and not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise RebasinError(f"{folder.path / 'config.json'} names the architecture {arch!r}, which the installed "
                           f"transformers {transformers.__version__} does not have; upgrade transformers or pass --model")
    try:
        with torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception as err:  # any failure to build from the config is one user error
        raise RebasinError(f"building {arch or 'AutoModel'} from {folder.path / 'config.json'} failed: "
                           f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return model.eval()


def _example(model: nn.Module, folder: PretrainedFolder, example_input: Any) -> Any:
    """``example_input``, or an input made from the config; a bare shape becomes token ids for a text model."""
    main = getattr(model, "main_input_name", None)
    config = getattr(model, "config", None)
    shape = example_input if isinstance(example_input, (tuple, list, torch.Size)) and example_input and \
        all(isinstance(s, int) and not isinstance(s, bool) for s in example_input) else None
    if example_input is not None and shape is None:
        return example_input
    if shape is not None and main != "input_ids":  # a bare shape for a model of images, audio, ...: zeros of it
        return torch.zeros(tuple(shape))
    if main == "input_ids":
        if shape is None:
            limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 8
            shape = (2, min(8, int(limit)))
        return torch.zeros(tuple(shape), dtype=torch.long)
    if main == "pixel_values" and config is not None and getattr(config, "image_size", None) is not None:
        size = config.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return torch.zeros(2, int(getattr(config, "num_channels", 3)), h, w)
    raise RebasinError(f"cannot make an example input for {type(model).__name__} of {folder.path} (its main input is "
                       f"{main!r}); pass example_input= (--example-shape on the command line)")


def _saved_names(model: nn.Module) -> dict[str, str]:
    """``{state_dict key: the name save_pretrained stores it under}``: ``transformers`` 5 saves some weights
    under their historical names (ViT's ``vit.layers.0.attention.q_proj`` as
    ``vit.encoder.layer.0.attention.attention.query``). Found by running its own renaming on meta tensors."""
    keys = list(model.state_dict(keep_vars=True))
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 stores the state_dict's own names
        return {k: k for k in keys}
    if not isinstance(model, PreTrainedModel):
        return {k: k for k in keys}
    state = {k: torch.empty(0, device="meta") for k in keys}  # one distinct tensor per key, to follow it by identity
    owner = {id(t): k for k, t in state.items()}
    saved = revert_weight_conversion(model, state)
    names = {owner[id(t)]: k for k, t in saved.items() if id(t) in owner}
    if len(names) != len(keys) or len(saved) != len(keys):
        changed = sorted(set(keys) - set(names))
        raise RebasinError(f"{type(model).__name__} is saved with its weights converted (fused or split by transformers, "
                           f"not only renamed), e.g. {changed[:3]}; its folders cannot be aligned tensor by tensor")
    return names


def _stored_keys(spec: PermutationSpec, model: nn.Module, folder: PretrainedFolder) -> PermutationSpec:
    """``spec`` under the names the folder stores, without the tied weights it does not store (their twin stays)."""
    saved = _saved_names(model)
    state = model.state_dict(keep_vars=True)
    owners: dict[int, list[str]] = {}
    for key, t in state.items():
        owners.setdefault(id(t), []).append(key)
    keep: dict[str, str] = {}
    for key in spec.axes:
        name = saved.get(key, key)
        twins = [k for k in owners.get(id(state[key]), []) if k != key and saved.get(k, k) in folder] \
            if key in state else []
        if name in folder or not twins:
            keep[key] = name
            continue
        twin = twins[0]
        same = spec.axes[twin] == spec.axes[key] and all(
            spec.blocks.get((twin, a), 1) == spec.blocks.get((key, a), 1) for a in range(len(spec.axes[key])))
        if not same:
            raise RebasinError(f"{type(model).__name__}: the tied weights {key!r} and {twin!r} carry different "
                               f"permutations ({spec.axes[key]} and {spec.axes[twin]}); {folder.path} stores only "
                               f"{saved.get(twin, twin)!r}, so the spec cannot be applied to it")
    return spec.subset(keep)


def spec_from_pretrained(
    folder: PretrainedFolder | str | os.PathLike[str],
    example_input: Any = None,
    *,
    model: nn.Module | None = None,
    check: bool = True,
    strict: bool = False,
) -> PermutationSpec:
    """The permutation spec of a Hugging Face model folder's weights, traced without loading them.

    Parameters
    ----------
    folder
        A folder written by ``save_pretrained`` (or one opened by :func:`rebasin.open_pretrained`).
    example_input
        An input for tracing, as :func:`spec_from_model` takes it. A bare shape such as ``(1, 16)`` is
        made into token ids for a model whose main input is ``input_ids``. Default: two sequences of
        8 tokens (at most the model's positions) for a text model, two images of ``config.image_size``
        for a vision model; other models need one.
    model
        The architecture to trace instead of building it from ``config.json``: any ``nn.Module`` (a meta
        model is free). Its state_dict keys must be the folder's, tied weights aside.
    check
        As :func:`spec_from_model` (skipped for a meta model: it has no values to run).
    strict
        As :func:`spec_from_model`: refuse what would otherwise be pinned to the identity.

    Returns
    -------
    PermutationSpec
        The spec of the keys the folder stores: of tied weights, the one ``save_pretrained`` kept (they
        carry one permutation, so permuting it permutes both). Validated against the folder's shapes.

    Raises
    ------
    RebasinError
        If the folder is not a model folder, ``transformers`` cannot build its architecture, the model
        does not trace, or its keys or shapes differ from the folder's (the keys are named).

    Examples
    --------
    >>> import tempfile, transformers, rebasin
    >>> cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16,
    ...                               bos_token_id=0, eos_token_id=0)
    >>> d = tempfile.mkdtemp()
    >>> transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    >>> spec = rebasin.spec_from_pretrained(d)
    >>> "lm_head.weight" in spec.axes, "transformer.wte.weight" in spec.axes
    (False, True)
    """
    folder = _folder(folder)
    built = model if model is not None else model_from_config(folder)
    if not isinstance(built, nn.Module):
        raise RebasinError(f"model must be an nn.Module, got {type(built).__name__}")
    spec = spec_from_model(built, _example(built, folder, example_input), check=check, strict=strict)
    spec = _stored_keys(spec, built, folder)
    spec.validate(folder.meta(), name=str(folder.path))  # type: ignore[arg-type]  # meta() without a key returns the dict of every tensor; the return type covers both forms
    return spec


def same_pretrained_architecture(spec: PermutationSpec, first: PretrainedFolder, others: Sequence[PretrainedFolder],
                                 *, example_input: Any = None) -> None:
    """Raise :class:`RebasinError` unless every folder of ``others`` holds ``first``'s architecture.

    ``spec`` is ``first``'s. The ``architectures`` entries must be equal; a folder whose ``config.json``
    differs from ``first``'s in an entry that may change the structure (a head count with equal shapes)
    is traced too and its spec compared. Keys and shapes are checked against ``spec``.
    """
    for other in others:
        if other.architecture != first.architecture:
            raise RebasinError(f"{other.path} holds a {other.architecture} but {first.path} a {first.architecture}; "
                               "align and merge models of one architecture")
        differ = sorted(k for k in set(first.config) | set(other.config)
                        if k not in _NOT_STRUCTURAL and first.config.get(k) != other.config.get(k))
        if differ and spec_from_pretrained(other, example_input) != spec:
            raise RebasinError(f"{other.path} and {first.path} hold different architectures: their config.json "
                               f"differ at {differ[:6]}")
        spec.validate(other.meta(), name=str(other.path))  # type: ignore[arg-type]  # meta() without a key returns the dict of every tensor; the return type covers both forms
