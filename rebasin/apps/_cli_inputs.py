"""What the command line reads and writes, checked before any expensive work runs.

Every function here turns a bad input — a checkpoint that is not there, a factory that cannot be
imported or returns the wrong thing, a loader whose first batch does not fit the model, an output path
that cannot be written — into one :class:`RebasinError` sentence naming the option and the value, so
``rebasin ...`` ends with exit status 2 and one line on stderr, before it aligns, evaluates or trains.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._common import as_args, cross_entropy_of, evaluating, first_line, head, split_batch
from .._errors import RebasinError
from ..spec.checkpoint import open_checkpoint

__all__ = [
    "build_model",
    "check_output_dir",
    "check_output_file",
    "EXAMPLE_DTYPES",
    "example_dtype",
    "example_input",
    "float_ids_error",
    "example_shape",
    "has_batchnorm",
    "importable_from_cwd",
    "load_factory",
    "load_state",
    "loader_from",
    "model_from",
]


@contextlib.contextmanager
def importable_from_cwd() -> Iterator[None]:
    """Let ``package.module`` names resolve from the current folder, as ``python -m`` does.

    The ``rebasin`` console script does not put the working directory on ``sys.path`` (``python -m
    rebasin`` does), so ``--model mynet:mlp`` next to ``mynet.py`` would only work one way. The folder is
    added for the import and removed again; the imported modules stay imported.
    """
    cwd = os.getcwd()
    added = "" not in sys.path and cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_factory(spec: str, option: str = "--model") -> Any:
    """The callable named by ``'package.module:function'`` (imported from the current folder too)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RebasinError(f"{option} must look like 'package.module:factory', got {spec!r}")
    try:
        with importable_from_cwd():
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RebasinError(f"cannot import module {module_name!r} for {option}: {exc}") from exc
    except Exception as exc:  # the user's module failed while importing: one user error
        raise RebasinError(f"importing {module_name!r} for {option} failed: {_one_line(exc)}") from exc
    try:
        factory = getattr(module, attr)
    except AttributeError as exc:
        raise RebasinError(f"module {module_name!r} has no attribute {attr!r} (for {option} {spec})") from exc
    if not callable(factory):
        raise RebasinError(f"{option} {spec} is not a function to call (it is an object of type {type(factory).__name__})")
    return factory


def _call(factory: Any, spec: str, option: str) -> Any:
    try:
        return factory()
    except RebasinError as exc:
        raise RebasinError(f"{option} {spec} failed: {exc}") from exc
    except Exception as exc:  # any failure of the user's factory is one user error
        raise RebasinError(f"calling {option} {spec}() failed: {_one_line(exc)}") from exc


def load_state(path: str) -> dict[str, torch.Tensor]:
    """The state_dict saved at ``path`` (a ``{"state_dict": ...}`` checkpoint is unwrapped)."""
    p = Path(path)
    if not p.is_file():
        raise RebasinError(f"no such file: {path}")
    if p.suffix == ".safetensors":
        return dict(open_checkpoint(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable checkpoint is one user error
        if "weights only load failed" in str(exc).lower():
            raise RebasinError(
                f"cannot read {path} as a torch state_dict: it is not a torch.save file of tensors (save "
                "model.state_dict(), not the model; torch.load(weights_only=True) refused it)"
            ) from exc
        raise RebasinError(f"cannot read {path} as a torch state_dict: {_one_line(exc)[:200]}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RebasinError(f"{path} does not hold a state_dict (a dict of tensors)")
    return obj


def build_model(factory_spec: str) -> nn.Module:
    """``factory()`` for ``--model``, checked to be an ``nn.Module`` (its own freshly built weights)."""
    model = _call(load_factory(factory_spec), factory_spec, "--model")
    if not isinstance(model, nn.Module):
        raise RebasinError(f"--model {factory_spec} returned {type(model).__name__}, not an nn.Module")
    return model


def model_from(factory_spec: str, state: Mapping[str, torch.Tensor], label: str) -> nn.Module:
    """``factory()`` with ``state`` loaded (strictly); a mismatch names the checkpoint and the factory."""
    model = build_model(factory_spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(" ".join(str(exc).strip().splitlines()[:3]).split())  # one line, no tabs
        raise RebasinError(f"{label} does not match the architecture of {factory_spec}: {first}") from exc
    return model


def example_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` -> ``(1, 3, 32, 32)``."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError as exc:
        raise RebasinError(f"--example-shape must be comma-separated integers, got {text!r}") from exc
    if not shape or any(s <= 0 for s in shape):
        raise RebasinError(f"--example-shape must be positive integers, got {text!r}")
    return shape


#: ``--example-dtype`` names: floating inputs are drawn from a normal distribution, integer ones (token ids)
#: uniformly below the smallest embedding table of the model.
EXAMPLE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                  "bfloat16": torch.bfloat16, "long": torch.int64, "int64": torch.int64, "int32": torch.int32}


def example_dtype(name: str) -> torch.dtype:
    """The dtype an ``--example-dtype`` name stands for (:data:`EXAMPLE_DTYPES`)."""
    if name not in EXAMPLE_DTYPES:
        raise RebasinError(f"--example-dtype must be one of {', '.join(EXAMPLE_DTYPES)}, got {name!r}")
    return EXAMPLE_DTYPES[name]


def float_ids_error(exc: Exception, what: str, shape_text: str | None, dtype_name: str | None) -> RebasinError | None:
    """The error for tracing a token-id model on floating ``--example-shape`` values (torch's "Expected tensor
    for argument #1 'indices'"), or None when ``exc`` is something else."""
    if shape_text is None or not example_dtype(dtype_name or "float32").is_floating_point or "'indices'" not in str(exc):
        return None
    return RebasinError(
        f"{what} takes integer inputs (token ids), but --example-shape {shape_text} gave {dtype_name or 'float32'} "
        f"values: pass --example-dtype long (ids below the embedding size) or --data (its first batch is traced) "
        f"({first_line(exc)})")


def example_input(shape_text: str, dtype_name: str | None, model: nn.Module, seed: int) -> torch.Tensor:
    """The ``--example-shape`` / ``--example-dtype`` input for tracing ``model``, drawn from a generator seeded
    by ``seed`` (never from the global RNG).

    A floating dtype gives standard normal values; an integer dtype gives ids in ``[0, n)`` with ``n`` the
    smallest ``num_embeddings`` of the model's ``nn.Embedding`` layers (2 when it has none), so every id is
    valid for every table. ``dtype_name`` None (not given) is float32.
    """
    shape = example_shape(shape_text)
    dtype, gen = example_dtype(dtype_name or "float32"), torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(*shape, generator=gen).to(dtype)
    tables = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return torch.randint(0, min(tables, default=2), shape, generator=gen, dtype=dtype)


def loader_from(
    spec: str, option: str, model: nn.Module, *, targets: bool
) -> tuple[Iterable[Any], Any]:
    """The loader ``spec``'s factory returns, and the first two inputs of its first batch.

    Checked on the spot, at the cost of one batch: the factory returns a re-iterable loader (not a
    tensor, a dataset dict, a model or a one-shot generator), its first batch reads as ``(inputs,
    targets)`` (targets only when ``targets``), and ``model`` runs on it — with a cross-entropy loss
    against the targets when ``targets`` — so a wrong loader never surfaces after an alignment or a
    curve fit.
    """
    obj = _call(load_factory(spec, option), spec, option)
    what = f"{option} {spec}"
    if isinstance(obj, (str, bytes, Mapping, torch.Tensor, nn.Module)) or not isinstance(obj, Iterable):
        raise RebasinError(
            f"{what} returned {type(obj).__name__}, not a loader: return an iterable of (inputs, targets) batches, "
            "such as a torch DataLoader"
        )
    if iter(obj) is obj:
        raise RebasinError(
            f"{what} returned a one-shot {type(obj).__name__} (a generator or iterator), which is used up after one "
            "pass: return a DataLoader or a list of batches"
        )
    try:
        batch = next(iter(obj))
    except StopIteration:
        raise RebasinError(f"{what} returned an empty loader: it yielded no batches") from None
    except Exception as exc:  # the user's loader failed on its first batch
        raise RebasinError(f"reading the first batch of {what} failed: {_one_line(exc)}") from exc
    try:
        x, y = split_batch(batch)
    except RebasinError as exc:
        raise RebasinError(f"{what}: {exc}") from exc
    if targets and y is None:
        raise RebasinError(f"{what} yields batches without targets; this command needs (inputs, targets) batches")
    args, kwargs = as_args(x)
    try:
        with torch.no_grad(), evaluating(model):
            out = model(*args, **kwargs)
            if targets:
                cross_entropy_of(out, y)
    except Exception as exc:  # a batch that does not fit the model is one user error
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise RebasinError(
            f"the model does not run on the first batch of {what} (inputs {shape}): {_one_line(exc)}"
        ) from exc
    return obj, head(x)


def check_output_file(path: str, option: str) -> Path:
    """``path`` as a writable file: its folder is created now; a folder at ``path`` is an error."""
    p = Path(path)
    if p.is_dir():
        raise RebasinError(f"{option} {path} is a folder; give a file name")
    _make_dir(p.parent, f"the folder of {option} {path}")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise RebasinError(f"{option} {path} is not writable")
    return p


def check_output_dir(path: str, option: str) -> Path:
    """``path`` as a writable folder, created now; a file at ``path`` is an error."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RebasinError(f"{option} {path} is a file, not a folder")
    _make_dir(p, f"{option} {path}")
    if not os.access(p, os.W_OK):
        raise RebasinError(f"{option} {path} is not writable")
    return p


def _make_dir(folder: Path, what: str) -> None:
    in_the_way = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise RebasinError(f"cannot create {what}: {in_the_way} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RebasinError(f"cannot create {what}: {exc.strerror or exc}") from exc


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that keeps running statistics."""
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(m, kinds) and m.track_running_stats for m in model.modules())
