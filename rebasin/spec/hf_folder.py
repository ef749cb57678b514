"""Hugging Face model folders read and written one tensor at a time.

A model folder is what ``transformers``' ``save_pretrained`` writes: ``config.json`` (and small files
such as ``generation_config.json`` or a tokenizer), and the weights as one ``model.safetensors`` or as
shards ``model-0000i-of-0000n.safetensors`` listed by ``model.safetensors.index.json`` (``{"metadata":
{...}, "weight_map": {key: shard}}``). :func:`open_pretrained` opens such a folder as one read-only
mapping ``key -> tensor`` over all its shards (a :class:`LazyState`: each tensor is read on access, see
:func:`rebasin.open_checkpoint`); :func:`save_pretrained_permuted` writes a permuted copy as a folder laid
out like a given one (the same shards holding the same keys, the index, the small files copied), so that
``from_pretrained`` loads it, streaming each shard with :func:`rebasin.save_permuted`.

Nothing here needs ``transformers``: the folder's layout is plain JSON and safetensors. The model (and so
the spec) is built from ``config.json`` by :func:`rebasin.spec_from_pretrained`, a layer above.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from .._errors import RebasinError
from .checkpoint import Checkpoint, LazyState, meta_state, open_checkpoint, read_rows, save_permuted
from .core import PermutationSpec, check_permutations

__all__ = ["CONFIG_NAME", "INDEX_NAME", "WEIGHTS_NAME", "PretrainedFolder", "check_new_folder", "open_pretrained",
           "save_pretrained_permuted"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Files of weights in any format: never copied into a written folder (they would not hold the permuted weights).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")


def _is_weights(name: str) -> bool:
    return name.lower().endswith(_WEIGHT_SUFFIXES) or name.lower().endswith(".index.json")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RebasinError(f"cannot read {what} {path}: {err}") from None
    if not isinstance(obj, dict):
        raise RebasinError(f"{what} {path} does not hold a JSON object")
    return obj


class PretrainedFolder(LazyState):
    """A read-only mapping ``key -> tensor`` over a Hugging Face model folder; built by :func:`open_pretrained`.

    ``folder[key]`` reads that tensor from its shard into a new CPU tensor, ``read_rows`` reads a slice of
    its rows, ``keys()``, ``len()``, ``in`` and :meth:`meta` read no tensor data: like :class:`Checkpoint`,
    over all the shards.

    Attributes
    ----------
    path
        The folder.
    config
        ``config.json``, parsed.
    weight_map
        ``{key: shard file name}`` in the folder's order (one entry per key; a single file maps every key
        to ``model.safetensors``).
    index_metadata
        The index's ``"metadata"`` (``{}`` for a single file, or ``None`` when there is no index).
    shards
        ``{shard file name: Checkpoint}``.
    """

    def __init__(self, path: Path, config: dict[str, Any], weight_map: dict[str, str],
                 index_metadata: dict[str, Any] | None, shards: dict[str, Checkpoint]) -> None:
        self.path = path
        self.config = config
        self.weight_map = weight_map
        self.index_metadata = index_metadata
        self.shards = shards

    @property
    def architecture(self) -> str | None:
        """The first entry of ``config.json``'s ``architectures`` (``"GPT2LMHeadModel"``), or ``None``."""
        archs = self.config.get("architectures")
        return str(archs[0]) if isinstance(archs, list) and archs else None

    def _shard(self, key: str) -> Checkpoint:
        if key not in self.weight_map:
            raise KeyError(key)
        return self.shards[self.weight_map[key]]

    def __getitem__(self, key: str) -> Tensor:
        return self._shard(key)[key]

    def read_rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``self[key]``, reading only those rows (:meth:`Checkpoint.read_rows`)."""
        return self._shard(key).read_rows(key, start, stop)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def __contains__(self, key: object) -> bool:
        return key in self.weight_map

    def __repr__(self) -> str:
        return (f"PretrainedFolder({str(self.path)!r}, {self.architecture or 'no architecture'}, {len(self)} tensors "
                f"in {len(self.shards)} shard{'s' if len(self.shards) != 1 else ''})")

    def meta(self, key: str | None = None) -> Tensor | dict[str, Tensor]:
        """Shape and dtype without data: a ``meta``-device tensor for ``key``, or a dict of all of them."""
        if key is not None:
            return self._shard(key).meta(key)
        metas: dict[str, dict[str, Tensor]] = {name: ckpt.meta() for name, ckpt in self.shards.items()}  # type: ignore[misc]  # meta() without a key returns the dict of every tensor; the return type covers both forms
        return {k: metas[name][k] for k, name in self.weight_map.items()}


def open_pretrained(path: str | os.PathLike[str]) -> PretrainedFolder:
    """Open a Hugging Face model folder (what ``save_pretrained`` writes) as one lazy, read-only mapping.

    Parameters
    ----------
    path
        A folder with ``config.json`` and either ``model.safetensors`` or ``model.safetensors.index.json``
        and the shards it lists.

    Returns
    -------
    PretrainedFolder
        A ``Mapping[str, Tensor]`` over every shard: pass it wherever a state_dict or a
        :class:`rebasin.spec.Checkpoint` is read (:func:`rebasin.weight_matching`, :func:`rebasin.merge_checkpoints`,
        :func:`save_pretrained_permuted`). Tied weights appear once, as ``save_pretrained`` stored them.

    Raises
    ------
    RebasinError
        If ``path`` is not a folder, has no ``config.json``, holds no safetensors weights (a folder of
        ``pytorch_model.bin`` files is named, with the fix), or its index and shards disagree (a key the
        index lists that its shard lacks, a shard that is missing, a key in two shards).

    Examples
    --------
    >>> import tempfile, json, os, torch
    >>> from rebasin import open_pretrained, save_permuted, PermutationSpec
    >>> d = tempfile.mkdtemp()
    >>> _ = open(os.path.join(d, "config.json"), "w").write(json.dumps({"architectures": ["MyNet"]}))
    >>> save_permuted(PermutationSpec({"w": (None, None)}), {}, {"w": torch.ones(2, 3)}, os.path.join(d, "model.safetensors"))
    >>> folder = open_pretrained(d)
    >>> folder.architecture, list(folder), tuple(folder.meta("w").shape)
    ('MyNet', ['w'], (2, 3))
    """
    p = Path(os.fspath(path))
    if not p.is_dir():
        raise RebasinError(f"{str(p)!r} is not a folder; a Hugging Face model folder is what model.save_pretrained(path) "
                           "writes (config.json and model.safetensors or its shards)")
    if not (p / CONFIG_NAME).is_file():
        raise RebasinError(f"{str(p)!r} has no config.json, so it is not a Hugging Face model folder; save the model "
                           "with model.save_pretrained(path), or pass a checkpoint file instead of the folder")
    config = _read_json(p / CONFIG_NAME, "the config")
    if (p / INDEX_NAME).is_file():
        index = _read_json(p / INDEX_NAME, "the index")
        raw_map, metadata = index.get("weight_map"), index.get("metadata", {})
        if not isinstance(raw_map, dict) or not raw_map or not all(isinstance(v, str) for v in raw_map.values()):
            raise RebasinError(f"the index {p / INDEX_NAME} has no 'weight_map' of key -> shard file name")
        weight_map = {str(k): v for k, v in raw_map.items()}
        index_metadata: dict[str, Any] | None = metadata if isinstance(metadata, dict) else {}
    elif (p / WEIGHTS_NAME).is_file():
        weight_map, index_metadata = {}, None
    else:
        others = sorted(f.name for f in p.iterdir() if f.is_file() and _is_weights(f.name))
        hint = (f"it holds {others[:4]}: load the model and save it again with model.save_pretrained(path) "
                "(safetensors is the default)") if others else "save the model with model.save_pretrained(path)"
        raise RebasinError(f"{str(p)!r} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; {hint}")
    shards: dict[str, Checkpoint] = {}
    for name in dict.fromkeys(weight_map.values()) if weight_map else [WEIGHTS_NAME]:
        if Path(name).name != name or not (p / name).is_file():
            raise RebasinError(f"the index {p / INDEX_NAME} lists the shard {name!r}, which is not a file in {str(p)!r}")
        shards[name] = open_checkpoint(p / name)
    if not weight_map:
        weight_map = {k: WEIGHTS_NAME for k in shards[WEIGHTS_NAME]}
    for name, ckpt in shards.items():
        listed = {k for k, n in weight_map.items() if n == name}
        held = set(ckpt)
        if listed - held:
            raise RebasinError(f"the index {p / INDEX_NAME} puts {sorted(listed - held)[:6]} in {name}, which does not "
                               "hold them (an incomplete or mixed folder)")
        elsewhere = sorted(k for k in held - listed if k in weight_map)
        if elsewhere:
            raise RebasinError(f"{p / name} holds {elsewhere[:6]}, which the index puts in another shard")
    return PretrainedFolder(p, config, weight_map, index_metadata, shards)


def check_new_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder to write a model into: it must not exist yet, or be an empty folder.

    Raises
    ------
    RebasinError
        If ``path`` is a file or a folder that is not empty (old shards must not mix with new ones).
    """
    out = Path(os.fspath(path))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RebasinError(f"cannot write the model folder {str(out)!r}: it exists and is "
                           f"{'a file' if not out.is_dir() else 'not empty'}; choose a new folder or remove it")
    return out


def _readable(folder: Path) -> None:
    """Give ``folder`` and its files the permissions of a folder made by ``mkdir`` (temporary files are private)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~mask)


class _Keys(LazyState):
    """The entries ``keys`` of a mapping, read through to it (one shard's worth of a source)."""

    def __init__(self, source: Mapping[str, Tensor], keys: list[str], meta: dict[str, Tensor]) -> None:
        self._source, self._keys, self._meta = source, keys, {k: meta[k] for k in keys}

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._meta:
            raise KeyError(key)
        return self._source[key]

    def read_rows(self, key: str, start: int, stop: int) -> Tensor:
        return read_rows(self._source, key, start, stop)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def meta(self, key: str | None = None) -> Tensor | dict[str, Tensor]:
        return dict(self._meta) if key is None else self._meta[key]


def save_pretrained_permuted(
    spec: PermutationSpec,
    perms: Mapping[str, Tensor],
    source: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    like: PretrainedFolder | None = None,
) -> None:
    """Write ``permute(spec, perms, source)`` as a Hugging Face model folder laid out like ``like``.

    The folder gets ``like``'s small files (``config.json``, ``generation_config.json``, tokenizer files:
    every file that does not hold weights), the same shards with the same keys in each (the dtypes of
    ``source``, so a ``bfloat16`` model stays ``bfloat16``), and, for a sharded ``like``, the index with
    its ``total_size`` recomputed. Each shard is streamed by :func:`rebasin.save_permuted`, one tensor (or
    one slice of rows of a big unpermuted tensor) at a time; ``from_pretrained`` loads the result.

    Parameters
    ----------
    spec
        Spec of the stored keys (:func:`rebasin.spec_from_pretrained` leaves out tied weights the folder
        does not store).
    perms
        ``{perm: LongTensor (n,)}`` (missing names are the identity), as returned by the matchers.
    source
        The tensors to permute: a :class:`PretrainedFolder`, a :class:`Checkpoint`, any :class:`LazyState` (the
        average :func:`rebasin.merge_checkpoints` computes) or a state_dict, with ``like``'s keys and shapes.
        Not mutated.
    path
        The folder to write. It must not exist yet or be empty (old shards must not mix with new ones); it
        is written under a temporary name next to it and renamed at the end, so on any error nothing is there.
    like
        The folder whose layout to copy; default ``source`` (which must then be a :class:`PretrainedFolder`).

    Raises
    ------
    RebasinError
        If ``source`` does not match the spec or ``like`` (the keys are named), ``perms`` are not
        permutations of the right sizes, or ``path`` is a file, a folder that is not empty, or one of the
        folders being read.
    """
    if like is None:
        if not isinstance(source, PretrainedFolder):
            raise RebasinError("save_pretrained_permuted needs like=open_pretrained(folder) (the layout to copy) when "
                               f"the source is a {type(source).__name__}, not a model folder")
        like = source
    if not isinstance(like, PretrainedFolder):
        raise RebasinError(f"like must be a folder from rebasin.open_pretrained, got {type(like).__name__}")
    out = check_new_folder(path)
    if any(out.resolve() == r.path.resolve() for r in (like, source) if isinstance(r, PretrainedFolder)):
        raise RebasinError(f"cannot write the folder {str(out)!r}: it is a folder being read; choose a new folder")
    meta = meta_state(source)
    sizes = spec.validate(meta, name=f"the weights to write to {out}")
    spec.validate(like.meta(), name=str(like.path))  # type: ignore[arg-type]  # meta() without a key returns the dict of every tensor; the return type covers both forms
    check_permutations(spec, perms, sizes)
    differ = [k for k in like.weight_map if like.meta(k).shape != meta[k].shape]  # type: ignore[union-attr]  # meta() without a key returns the dict of every tensor; the return type covers both forms
    if differ:
        raise RebasinError(f"the weights to write differ in shape from {like.path} at {differ[:6]}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RebasinError(f"cannot create the folder of {str(out)!r}: {err.strerror or err}") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        total = 0
        for name in like.shards:
            keys = [k for k, n in like.weight_map.items() if n == name]
            part = spec.subset(keys)
            save_permuted(part, {p: v for p, v in perms.items() if p in part.perm_to_axes}, _Keys(source, keys, meta),
                          tmp / name, metadata={"format": "pt"})
            total += sum(meta[k].numel() * meta[k].element_size() for k in keys)
        if like.index_metadata is not None:
            index = {"metadata": {**like.index_metadata, "total_size": total}, "weight_map": dict(like.weight_map)}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        for f in sorted(like.path.iterdir()):
            if f.is_file() and not f.name.startswith(".") and not _is_weights(f.name):
                shutil.copyfile(f, tmp / f.name)
        _readable(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
