"""Checkpoints read one tensor at a time, and permuted checkpoints written one tensor at a time.

:func:`open_checkpoint` gives a read-only mapping ``key -> tensor`` over a file on disk that reads a
tensor's bytes only when the tensor is asked for, into a fresh buffer that nothing else holds: once the
caller drops the tensor, nothing of it stays in memory. :meth:`Checkpoint.meta` gives every entry as a
``meta``-device tensor (shape and dtype, no data) for checks such as :meth:`PermutationSpec.validate`.

:func:`save_permuted` permutes a checkpoint (or a state_dict) tensor by tensor and streams the result to a
``.safetensors`` file, so its peak memory is about one tensor; :func:`save_state` writes a state_dict as it
is. Both choose the format by the output's extension (:func:`output_format`: ``.safetensors``, or a torch
``.pt`` / ``.pth`` / ``.bin`` file) and keep every tensor's dtype unless told otherwise. A tensor larger than :data:`ROW_CHUNK_BYTES`
whose first axis no permutation acts on (a token embedding) goes through in slices of rows
(:meth:`Checkpoint.read_rows`, :func:`row_ranges`), so the peak is about one such slice instead.

In this layer (with the spec) because writing a permuted checkpoint applies the spec; the matchers above
read checkpoints through the same mapping.

The ``.safetensors`` format is parsed here (an 8-byte little-endian header length, a JSON header
``{key: {"dtype", "shape", "data_offsets": [begin, end]}}``, then the raw little-endian bytes); the
``safetensors`` package is not needed.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._errors import RebasinError
from .core import PermutationSpec, check_permutations
from .transforms import SignedPermutation, SymmetryKinds, Transform, check_transforms, transform_entries

__all__ = ["ROW_CHUNK_BYTES", "Checkpoint", "LazyState", "fresh_buffer", "meta_state", "open_checkpoint", "output_format",
           "read_rows", "row_ranges", "save_permuted", "save_state"]

# Tensors larger than this many bytes are read, matched and written in slices of rows (along the first axis)
# when no permutation acts on that axis (an embedding of 50257 x 768 floats is 154 MB; two of them, A's and
# B's, would otherwise be whole in memory at once). Read at call time, so tests can shrink it.
ROW_CHUNK_BYTES = 16 * 2**20

# Buffers from this size up get their own anonymous memory mapping (see fresh_buffer).
_MAPPED_FROM = 1 << 20


def fresh_buffer(nbytes: int) -> Tensor:
    """A ``uint8`` CPU tensor of ``nbytes`` bytes (contents undefined) that nothing else holds.

    From 1 MiB up it lies in its own anonymous memory mapping, returned to the system as soon as the
    tensor is dropped. Reading many big tensors one after the other through the C heap instead leaves
    freed holes that later, differently sized, requests cannot reuse (glibc raises its mmap threshold
    after a big block is freed, so the next ones land on the heap): on two GPT-2 checkpoints that raised
    the peak resident memory of the lazy weight matching by about 100 MB.
    """
    if nbytes < _MAPPED_FROM:
        return torch.empty(nbytes, dtype=torch.uint8)
    flags = getattr(mmap, "MAP_PRIVATE", None)
    if flags is None:  # pragma: no cover - Windows: no mmap flags; plain memory
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=torch.uint8)  # the tensor keeps the mapping alive


_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
        ("BOOL", "bool"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    )
    if hasattr(torch, attr)
}
_NAMES = {dt: name for name, dt in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def _check_host() -> None:
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise RebasinError("safetensors checkpoints are little-endian; this machine is not")


class LazyState(Mapping[str, Tensor]):
    """A read-only mapping ``key -> tensor`` that produces each tensor on access and knows every shape up front.

    Subclasses implement ``__getitem__``, ``__iter__``, ``__len__`` and :meth:`meta`; :func:`save_permuted`
    and the lazy weight matching read such mappings one tensor at a time and take shapes from :meth:`meta`.
    """

    def meta(self, key: str | None = None) -> Tensor | dict[str, Tensor]:  # pragma: no cover - abstract
        """A ``meta``-device tensor (shape and dtype) for ``key``, or a dict of all of them."""
        raise NotImplementedError

    def read_rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``self[key]`` (along its first axis) as a tensor the caller owns.

        This default reads the whole tensor and slices it; :class:`Checkpoint` reads only those rows.
        """
        return self[key][start:stop].clone()

    def __setitem__(self, key: str, value: object) -> None:
        raise TypeError(f"a {type(self).__name__} is read-only; copy it into a dict to change {key!r}")

    def __delitem__(self, key: str) -> None:
        raise TypeError(f"a {type(self).__name__} is read-only; copy it into a dict to delete {key!r}")


class Checkpoint(LazyState):
    """A read-only mapping ``key -> tensor`` over a checkpoint file; built by :func:`open_checkpoint`.

    Each ``ckpt[key]`` reads that tensor from disk and returns a new CPU tensor that the caller owns (it
    does not alias the file or any other result); :meth:`read_rows` reads a slice of rows of one tensor.
    ``keys()``, ``len()``, ``in`` and :meth:`meta` read no tensor data. Item assignment and deletion raise
    ``TypeError`` (the mapping is read-only).

    Attributes
    ----------
    path
        The file.
    format
        ``"safetensors"`` or ``"pt"``.
    """

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.format = fmt
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self._tensors: dict[str, Tensor] = {}
        if fmt == "safetensors":
            self._read_header()
        else:
            self._open_pt()

    # ------------------------------------------------------------------ reading
    def _read_header(self) -> None:
        _check_host()
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise RebasinError(f"{self.path} is not a safetensors file: it has {size} bytes, fewer than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise RebasinError(f"{self.path} is not a valid safetensors file: its header claims {n} bytes but the file "
                                   f"has {size} (truncated or not safetensors)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, ValueError) as err:
                raise RebasinError(f"{self.path} is not a valid safetensors file: its header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise RebasinError(f"{self.path} is not a valid safetensors file: its header is not a JSON object")
        base = 8 + n
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype_name, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise RebasinError(f"{self.path}: malformed safetensors header entry for {key!r}: {info!r}") from None
            if dtype_name not in _DTYPES:
                raise RebasinError(f"{self.path}[{key!r}] has dtype {dtype_name!r}, which this torch cannot hold")
            dtype = _DTYPES[dtype_name]
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if begin < 0 or end - begin != nbytes:
                raise RebasinError(f"{self.path}[{key!r}]: the header gives {end - begin} bytes for a {dtype_name} tensor "
                                   f"of shape {shape} ({nbytes} bytes)")
            if base + end > size:
                raise RebasinError(f"{self.path} is truncated: {key!r} ends at byte {base + end} but the file has {size}")
            self._entries[str(key)] = (dtype, shape, base + begin, nbytes)

    def _open_pt(self) -> None:
        try:
            state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # torch raises many types for a bad file; all mean "cannot read"
            raise RebasinError(f"cannot read {self.path} as a torch checkpoint: {type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}") from None
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise RebasinError(f"{self.path} does not hold a state_dict (a mapping key -> tensor)")
        for key, t in state.items():
            self._tensors[str(key)] = t
            self._entries[str(key)] = (t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())

    def _read(self, key: str) -> Tensor:
        dtype, shape, offset, nbytes = self._entries[key]
        if self.format == "pt":
            return _copy(self._tensors[key])  # a private copy; the source stays a file mapping
        return self._pread(key, offset, nbytes).view(dtype).reshape(shape)

    def _pread(self, key: str, offset: int, nbytes: int) -> Tensor:
        """``nbytes`` bytes of the file from ``offset`` into a fresh ``uint8`` buffer."""
        buf = fresh_buffer(nbytes)
        if nbytes:
            view = memoryview(buf.numpy())  # type: ignore[arg-type]  # numpy's stubs omit the buffer protocol
            fd = os.open(self.path, os.O_RDONLY)
            try:
                done = 0
                while done < nbytes:
                    got = os.preadv(fd, [view[done:]], offset + done)
                    if got == 0:
                        raise RebasinError(f"{self.path} is truncated: reading {key!r} stopped at byte {offset + done}")
                    done += got
            finally:
                os.close(fd)
        return buf

    def read_rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``self[key]`` (along its first axis), reading only those rows from disk.

        Equal to ``self[key][start:stop]``, as a new CPU tensor the caller owns; a ``.safetensors`` file is
        read from the rows' byte range only (rows are contiguous on disk), a ``.pt`` file's mapped tensor
        is sliced and the slice copied.

        Raises
        ------
        KeyError
            If ``key`` is not in the checkpoint.
        RebasinError
            If the tensor is a scalar, or ``start:stop`` is not a range ``0 <= start <= stop <= rows``.
        """
        if key not in self._entries:
            raise KeyError(key)
        dtype, shape, offset, _ = self._entries[key]
        if not shape:
            raise RebasinError(f"{self.path}[{key!r}] is a scalar; it has no rows to read")
        if isinstance(start, bool) or isinstance(stop, bool) or not isinstance(start, int) or not isinstance(stop, int) \
                or not 0 <= start <= stop <= shape[0]:
            raise RebasinError(f"rows {start!r}:{stop!r} of {self.path}[{key!r}] are not a range inside its {shape[0]} rows")
        if self.format == "pt":
            return _copy(self._tensors[key][start:stop])
        row = 1
        for s in shape[1:]:
            row *= s
        row *= torch.empty((), dtype=dtype).element_size()
        buf = self._pread(key, offset + start * row, (stop - start) * row)
        return buf.view(dtype).reshape((stop - start, *shape[1:]))

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, key: str) -> Tensor:
        if key not in self._entries:
            raise KeyError(key)
        return self._read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors, format={self.format!r})"

    def meta(self, key: str | None = None) -> Tensor | dict[str, Tensor]:
        """Shape and dtype without data: a ``meta``-device tensor for ``key``, or a dict of all of them.

        The dict passes :meth:`PermutationSpec.validate` (without ``finite=True``), so a spec can be
        checked against a checkpoint of any size without reading it.
        """
        if key is not None:
            if key not in self._entries:
                raise KeyError(key)
            dtype, shape, _, _ = self._entries[key]
            return torch.empty(shape, dtype=dtype, device="meta")
        return {k: torch.empty(s, dtype=d, device="meta") for k, (d, s, _, _) in self._entries.items()}


def _copy(t: Tensor) -> Tensor:
    """A contiguous copy of ``t`` in a :func:`fresh_buffer` (a plain clone for an empty, quantized or sparse tensor)."""
    if not t.numel() or t.is_quantized or t.layout != torch.strided:
        return t.clone()
    return fresh_buffer(t.numel() * t.element_size()).view(t.dtype).reshape(t.shape).copy_(t)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint file as a read-only mapping that reads each tensor from disk on access.

    Parameters
    ----------
    path
        A ``.safetensors`` file, or a torch ``.pt`` / ``.pth`` / ``.bin`` file holding a state_dict (or a
        dict with a ``"state_dict"`` entry) saved by :func:`torch.save`.

    Returns
    -------
    Checkpoint
        A ``Mapping[str, Tensor]``: ``ckpt[key]`` reads one tensor into a new CPU tensor, and
        ``ckpt.read_rows(key, start, stop)`` reads only rows ``start:stop`` of it. Pass it wherever
        a state_dict is read (:func:`rebasin.weight_matching` then matches without holding either model,
        :func:`save_permuted` writes a permuted copy tensor by tensor).

    Raises
    ------
    RebasinError
        If the file does not exist, has another extension, or is not a valid checkpoint (a truncated
        safetensors file is detected here, from its header and size).

    Notes
    -----
    Memory. A ``.safetensors`` tensor is read with ``os.preadv`` into a fresh buffer: the process
    holds only the tensors the caller keeps. A ``.pt`` file is opened with
    ``torch.load(mmap=True, weights_only=True)`` and each access copies the tensor out of the mapping:
    the file pages a read touches stay mapped and count in the process's resident memory (RSS,
    ``VmHWM``) until the checkpoint is dropped, although the kernel can reclaim them (they are page
    cache, not private memory). For a flat memory profile convert ``.pt`` files to safetensors once.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> from rebasin import open_checkpoint, save_permuted, PermutationSpec
    >>> d = tempfile.mkdtemp()
    >>> torch.save({"w": torch.ones(2, 3)}, os.path.join(d, "m.pt"))
    >>> ckpt = open_checkpoint(os.path.join(d, "m.pt"))
    >>> list(ckpt), tuple(ckpt.meta("w").shape)
    (['w'], (2, 3))
    >>> ckpt.read_rows("w", 1, 2)
    tensor([[1., 1., 1.]])
    """
    p = Path(os.fspath(path))
    suffix = p.suffix.lower()
    if p.is_dir():
        raise RebasinError(f"{str(p)!r} is a folder, not a checkpoint file; open a Hugging Face model folder "
                           "(save_pretrained's config.json and safetensors shards) with rebasin.open_pretrained")
    if suffix == ".safetensors":
        fmt = "safetensors"
    elif suffix in (".pt", ".pth", ".bin"):
        fmt = "pt"
    else:
        raise RebasinError(f"cannot open {str(p)!r} as a checkpoint: unsupported extension {suffix or '(none)'!r}; "
                           "use .safetensors or a torch .pt/.pth/.bin file")
    if not p.is_file():
        raise RebasinError(f"checkpoint file {str(p)!r} does not exist")
    return Checkpoint(p, fmt)


def meta_state(source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Shapes and dtypes of ``source`` as ``meta`` tensors (no data is read from a :class:`LazyState`)."""
    if not isinstance(source, Mapping):
        raise RebasinError(f"expected a state_dict or a Checkpoint (a mapping key -> tensor), got {type(source).__name__}")
    if isinstance(source, LazyState):
        meta = source.meta()
        assert isinstance(meta, dict)
        return meta
    return {k: (torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, Tensor) else v) for k, v in source.items()}


def read_rows(source: Mapping[str, Tensor], key: str, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of ``source[key]``: :meth:`LazyState.read_rows` for a lazy mapping (only those
    rows are read), a slice (a view) of the tensor for a state_dict."""
    if isinstance(source, LazyState):
        return source.read_rows(key, start, stop)
    return source[key][start:stop]


def row_ranges(spec: PermutationSpec, key: str, meta: Tensor, chunk_bytes: int | None = None) -> list[tuple[int, int]] | None:
    """Row slices ``[(start, stop), ...]`` covering ``key``'s first axis in pieces of at most ``chunk_bytes``
    (at least one row each), or ``None`` when the tensor is to be handled whole.

    A tensor is cut into rows only when it is larger than ``chunk_bytes`` (default :data:`ROW_CHUNK_BYTES`)
    and no permutation acts on its first axis or groups it (``spec.axes[key][0] is None``, no grouped axis):
    then permuting a slice of rows gives the same rows of the permuted tensor, and sums over the rows (the
    similarities and objectives of weight matching) split into sums over the slices.
    """
    limit = ROW_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    axes = spec.axes[key]
    if not axes or axes[0] is not None or any((key, a) in spec.grouped for a in range(len(axes))):
        return None
    rows = meta.shape[0] if meta.ndim else 0
    nbytes = meta.numel() * meta.element_size()
    if rows < 2 or nbytes <= limit:
        return None
    step = max(1, limit // max(1, nbytes // rows))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _tensor_bytes(t: Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")  # type: ignore[arg-type]  # numpy's stubs omit the buffer protocol


_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def output_format(path: str | os.PathLike[str]) -> str:
    """The format a checkpoint written to ``path`` gets, from its extension: ``"safetensors"`` or ``"pt"``.

    ``.safetensors`` is a safetensors file, ``.pt`` / ``.pth`` / ``.bin`` a :func:`torch.save` file. Every
    writer of the toolkit (:func:`save_state`, :func:`save_permuted`, :func:`rebasin.merge_checkpoints`,
    ``rebasin align -o`` and ``rebasin merge -o``) chooses the format here.

    Raises
    ------
    RebasinError
        For any other extension (the path and the extensions that work are named).
    """
    p = Path(os.fspath(path))
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in _TORCH_SUFFIXES:
        return "pt"
    raise RebasinError(f"cannot write {str(p)!r}: unsupported extension {suffix or '(none)'!r}; "
                       "use .safetensors (streamed) or a torch .pt/.pth/.bin file")


def save_state(
    state: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    dtypes: Mapping[str, torch.dtype] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a state_dict (or a :class:`Checkpoint`) to ``path`` in the format its extension names.

    Parameters
    ----------
    state
        ``{key: tensor}``, or a lazy mapping such as a :class:`Checkpoint` (then read one tensor at a
        time). Not mutated.
    path
        ``.safetensors``: a safetensors file, streamed tensor by tensor (a lazy tensor above
        :data:`ROW_CHUNK_BYTES` in slices of rows); ``.pt`` / ``.pth`` / ``.bin``: :func:`torch.save` of
        the whole state_dict (memory: one model). See :func:`output_format`.
    dtypes
        ``{key: dtype}`` to write some tensors in another dtype than they have, e.g. the dtypes of the
        checkpoint a float32 model was loaded from (``{k: v.dtype for k, v in original.items()}``), so a
        bfloat16 checkpoint goes back to disk in bfloat16. Keys not given keep their dtype.
    metadata
        Optional ``{str: str}`` stored in the safetensors header's ``__metadata__`` (not written to
        torch files).

    Raises
    ------
    RebasinError
        An unsupported extension, a ``state`` that is not a mapping of tensors, ``dtypes`` naming a key
        the state does not have, or a dtype safetensors cannot store. The file is written to a temporary
        name next to ``path`` and renamed at the end: on any error nothing is written.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> from rebasin import open_checkpoint, save_state
    >>> out = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_state({"w": torch.ones(2, 3)}, out, dtypes={"w": torch.bfloat16})
    >>> open_checkpoint(out)["w"].dtype
    torch.bfloat16
    """
    fmt = output_format(path)
    meta = meta_state(state)
    bad = next((k for k, v in meta.items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        raise RebasinError(f"state[{bad!r}] is a {type(meta[bad]).__name__}, not a tensor: a state_dict maps keys to tensors")
    unknown = sorted(set(dtypes or {}) - set(meta))
    if unknown:
        raise RebasinError(f"dtypes names {unknown[:6]}, which are not in the state (its keys: {list(meta)[:6]}...)")
    wrong = {k: v for k, v in (dtypes or {}).items() if not isinstance(v, torch.dtype)}
    if wrong:
        raise RebasinError(f"dtypes must map keys to torch dtypes (torch.bfloat16, ...), got {wrong}")
    out_meta = {k: (m.to(dtypes[k]) if dtypes and k in dtypes else m) for k, m in meta.items()}

    def pieces(key: str) -> Iterator[Tensor]:
        m = meta[key]
        nbytes = m.numel() * m.element_size()
        if not isinstance(state, LazyState) or m.ndim == 0 or m.shape[0] < 2 or nbytes <= ROW_CHUNK_BYTES:
            yield state[key]
            return
        step = max(1, ROW_CHUNK_BYTES // max(1, nbytes // m.shape[0]))
        for a in range(0, m.shape[0], step):
            yield state.read_rows(key, a, min(a + step, m.shape[0]))

    _write_checkpoint(Path(os.fspath(path)), fmt, out_meta, pieces, metadata)


def save_permuted(
    spec: PermutationSpec,
    perms: Mapping[str, Transform],
    source: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    kinds: SymmetryKinds | None = None,
) -> None:
    """Write ``permute(spec, perms, source)`` (or ``apply_transforms(spec, perms, source, kinds=kinds)``) to
    ``path``, one tensor at a time.

    Every tensor keeps its dtype (a bfloat16 checkpoint is written in bfloat16; an orthogonal map of a 16-bit
    tensor is computed in float32 and rounded once).

    Parameters
    ----------
    spec
        Permutation spec of the architecture.
    perms
        ``{perm: LongTensor (n,)}`` (missing names are the identity), as returned by the matchers; or, with
        ``kinds``, any transforms of :mod:`rebasin.spec.transforms` (signed permutations, orthogonal maps:
        ``Alignment.transforms``). An orthogonal map needs whole rows or columns along the axes it acts on;
        a big tensor whose first axis no class acts on still goes in slices of rows (the map acts along the
        other axes, whole in every slice), so the memory stays about one slice.
    source
        A :class:`Checkpoint` from :func:`open_checkpoint` or a state_dict. Not mutated.
    path
        Output file, in the format its extension names (:func:`output_format`): ``.safetensors`` is
        streamed (the header is computed from the shapes and dtypes first, then each tensor is read,
        permuted, written and dropped, so the peak memory is about one tensor, and a tensor above
        :data:`ROW_CHUNK_BYTES` whose first axis is not permuted goes in slices of rows, so it is never
        whole in memory); ``.pt`` / ``.pth`` / ``.bin`` gathers the whole permuted state_dict and calls
        :func:`torch.save` (memory: one model).
    metadata
        Optional ``{str: str}`` stored in the safetensors header's ``__metadata__``.
    kinds
        Which classes admit signed and orthogonal maps, and their norm scales (``Alignment.kinds``,
        :func:`rebasin.trace.symmetry_kinds`); needed as soon as a transform is not a permutation.

    Raises
    ------
    RebasinError
        If ``source`` does not match the spec (the key is named), ``perms`` are not permutations (or legal
        transforms, :func:`rebasin.spec.check_transforms`) of the right sizes, or the extension is
        unsupported. The file is written to a temporary name next
        to ``path`` and renamed at the end: on any error nothing is written.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> from rebasin import PermutationSpec, open_checkpoint, permute, save_permuted
    >>> spec = PermutationSpec({"w1": ("P", None), "w2": (None, "P")})
    >>> s = {"w1": torch.arange(6.).reshape(3, 2), "w2": torch.arange(3.).reshape(1, 3)}
    >>> p = {"P": torch.tensor([2, 0, 1])}
    >>> out = os.path.join(tempfile.mkdtemp(), "permuted.safetensors")
    >>> save_permuted(spec, p, s, out)
    >>> torch.equal(open_checkpoint(out)["w2"], permute(spec, p, s)["w2"])
    True
    """
    out = Path(os.fspath(path))
    fmt = output_format(out)
    meta = meta_state(source)
    sizes = spec.validate(meta, name="source")
    if not any(isinstance(t, SignedPermutation) or _is_matrix(t) for t in perms.values()):
        check_permutations(spec, perms, sizes)  # type: ignore[arg-type]  # no transform is more than a permutation here
    else:
        rotated = [p for p, t in perms.items() if _is_matrix(t)]
        scales = {k: source[k] for p in rotated for k in (kinds.scales.get(p, ()) if kinds is not None else ())}
        check_transforms(spec, perms, sizes, kinds=kinds, scale_values=scales)

    def pieces(key: str) -> Iterator[Tensor]:
        for rows in row_ranges(spec, key, meta[key]) or [None]:  # type: ignore[list-item]  # [None] stands for one read of the whole tensor; a big tensor in slices of rows
            part = source[key] if rows is None else read_rows(source, key, *rows)
            yield transform_entries(spec, perms, {key: part}, kinds=kinds)[key]

    _write_checkpoint(out, fmt, {k: meta[k] for k in spec.axes}, pieces, metadata)


def _is_matrix(t: object) -> bool:
    """Whether ``t`` is (meant as) an orthogonal map: a 2-D floating tensor."""
    return isinstance(t, Tensor) and t.ndim == 2 and t.is_floating_point()


def _write_checkpoint(out: Path, fmt: str, meta: dict[str, Tensor], pieces: Any,
                      metadata: Mapping[str, str] | None) -> None:
    """Write the tensors ``pieces(key)`` yields (whole, or consecutive slices of rows) for every key of
    ``meta``, each cast to ``meta[key].dtype``, to ``out`` in format ``fmt`` (atomically).

    The one writer behind :func:`save_state` and :func:`save_permuted`: a safetensors file is streamed
    (its header comes from ``meta``), a torch file gathers the state_dict and calls :func:`torch.save`.
    """

    def cast(key: str, t: Tensor) -> Tensor:
        return t if t.dtype == meta[key].dtype else t.to(meta[key].dtype)

    if fmt == "pt":
        def save(f: object) -> None:
            state = {}
            for key in meta:
                parts = [cast(key, t).detach().cpu() for t in pieces(key)]
                state[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
            torch.save(state, f)  # type: ignore[arg-type]  # the writer gets the opened binary file, typed object

        _atomic_write(out, save)
        return
    _check_host()
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, t in meta.items():
        if t.dtype not in _NAMES:
            raise RebasinError(f"{key!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it

    def write(f: object) -> None:
        f.write(struct.pack("<Q", len(raw)))  # type: ignore[attr-defined]  # the writer gets the opened binary file, typed object
        f.write(raw)  # type: ignore[attr-defined]  # the writer gets the opened binary file, typed object
        for key, m in meta.items():
            rows = 0
            for t in pieces(key):  # slices of rows are contiguous in the file
                t = cast(key, t)
                rows += t.shape[0] if t.ndim else 1
                if t.ndim != m.ndim or tuple(t.shape[1:]) != tuple(m.shape[1:]):  # pragma: no cover - defensive
                    raise RebasinError(f"{key!r} changed shape while it was written")
                f.write(_tensor_bytes(t))  # type: ignore[attr-defined]  # the writer gets the opened binary file, typed object
                del t
            if rows != (m.shape[0] if m.ndim else 1):  # pragma: no cover - defensive
                raise RebasinError(f"{key!r} changed shape while it was written")

    _atomic_write(out, write)


def _atomic_write(path: Path, write: object) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``; rename it to ``path`` only on success."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise RebasinError(f"cannot write {str(path)!r}: the directory {str(directory)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)  # type: ignore[operator]  # write is the chosen format writer, typed object
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
