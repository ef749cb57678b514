"""The private layer every other module shares: argument checks, devices, batches, modes, progress.

Nothing here knows about permutations. Each helper has one meaning for the whole toolkit:

* **a batch** is ``(inputs, targets, *rest)`` (a tuple or list; ``rest`` is ignored), a bare tensor of
  inputs, or a mapping. In a mapping the targets are the entry named ``"labels"``, ``"label"``,
  ``"targets"``, ``"target"`` or ``"y"`` (the first present), and the other entries are the model's
  keyword inputs — the layout of ``transformers`` batches.
* **inputs** are a tensor (one positional argument), a tuple/list (positional arguments) or a mapping
  (keyword arguments); :func:`forward_with_state` calls the model accordingly.
* **an output** is what the model returns: a tensor of logits, a mapping with a ``"logits"`` entry (a
  ``transformers`` ``ModelOutput``, a dict) or a tuple/list whose first element is the logits;
  :func:`logits_of` finds them, and :func:`cross_entropy_of` is the default loss of every function that
  takes ``loss_fn`` (a ``loss_fn`` of the user's receives the output as the model returns it).
* **a device** is the one passed, else the device of the model(s); two models on different devices
  without ``device=`` are an error, never a silent copy.
* **an int/float argument** is checked with :func:`check_int` / :func:`check_float`, which reject bools
  and name the argument.

The module is private (``rebasin._common``) but its names are public within the package: modules import
them by name, never another module's underscored helpers.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._errors import RebasinError

__all__ = [
    "State",
    "tensor_leaves",
    "check_int",
    "check_float",
    "check_positive",
    "check_number_in",
    "check_same_layout",
    "require_state",
    "check_state_for_model",
    "check_pair",
    "check_finite",
    "as_state",
    "paired_states",
    "module_with_state",
    "state_of",
    "model_device",
    "resolve_device",
    "to_device",
    "split_batch",
    "TARGET_KEYS",
    "as_args",
    "head",
    "first_inputs",
    "nonempty",
    "cycle_batches",
    "forward_with_state",
    "logits_of",
    "find_logits",
    "cross_entropy_of",
    "describe_tensors",
    "input_mismatch",
    "first_line",
    "evaluating",
    "training",
    "own_global_rng",
    "only_training",
    "progress_bar",
    "progress_counter",
    "progress_enabled",
]

State = Mapping[str, Tensor]


# ---------------------------------------------------------------------------------------- arguments
def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``, else :class:`RebasinError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RebasinError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_float(value: Any, name: str) -> float:
    """``float(value)`` if it is a finite real number (not a bool), else :class:`RebasinError`."""
    try:
        out = float(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise RebasinError(f"{name} must be a finite real number, got {value!r}") from err
    if isinstance(value, bool) or not math.isfinite(out):
        raise RebasinError(f"{name} must be a finite real number, got {value!r}")
    return out


def check_positive(value: Any, name: str) -> float:
    """``float(value)`` if it is a finite real number above 0 (not a bool), else :class:`RebasinError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise RebasinError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_number_in(
    value: Any, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """``float(value)`` if it is a real number (not a bool) in the interval, else :class:`RebasinError`.

    The interval is ``[low, high]``, open on a side with ``low_open`` / ``high_open``; the message
    writes it that way, e.g. ``momentum must be a number in [0, 1), got 1.0``.
    """
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and (low < value if low_open else low <= value) and (value < high if high_open else value <= high))
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise RebasinError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def require_state(obj: Any, name: str) -> None:
    """:class:`RebasinError` unless ``obj`` is a state_dict-like mapping (a module gets its own message)."""
    subject = "expected a state_dict" if name == "state_dict" else f"{name} must be a state_dict"
    if isinstance(obj, nn.Module):
        raise RebasinError(f"{subject} (a mapping key -> tensor), got the module {type(obj).__name__}; "
                           "pass its .state_dict()")
    if not isinstance(obj, Mapping):
        raise RebasinError(f"{subject} (a mapping key -> tensor), got {type(obj).__name__}")


def check_same_layout(state_a: State, state_b: State, names: tuple[str, str] = ("state_a", "state_b")) -> None:
    """Same keys and shapes in both state_dicts, else an error listing the differences."""
    na, nb = names
    require_state(state_a, na)
    require_state(state_b, nb)
    only_a = [k for k in state_a if k not in state_b]
    only_b = [k for k in state_b if k not in state_a]
    shapes = [
        f"{k!r}: {tuple(state_a[k].shape)} vs {tuple(state_b[k].shape)}"
        for k in state_a
        if k in state_b and state_a[k].shape != state_b[k].shape
    ]
    if only_a or only_b or shapes:
        parts = []
        if only_a:
            parts.append(f"keys only in {na}: {only_a[:12]}")
        if only_b:
            parts.append(f"keys only in {nb}: {only_b[:12]}")
        if shapes:
            parts.append(f"shapes differ ({na[-1]} vs {nb[-1]}): " + "; ".join(shapes[:12]))
        raise RebasinError(f"{na} and {nb} do not have the same layout: " + "; ".join(parts))


def check_state_for_model(model: nn.Module, state: State, name: str = "state") -> None:
    """``state`` has exactly the model's keys and shapes, else an error listing the differences."""
    require_state(state, name)
    ref = model.state_dict(keep_vars=True)
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    shapes = [
        f"{k!r}: {tuple(state[k].shape)} (model: {tuple(ref[k].shape)})"
        for k in ref
        if k in state and state[k].shape != ref[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"missing keys: {missing}"] if missing else []
        parts += [f"unexpected keys: {unexpected}"] if unexpected else []
        parts += ["wrong shapes: " + "; ".join(shapes)] if shapes else []
        raise RebasinError(f"{name} does not fit the model ({type(model).__name__}): " + "; ".join(parts))


def check_pair(state_a: State, state_b: State) -> None:
    """Two endpoint states: same layout, same dtypes, every floating entry finite."""
    check_same_layout(state_a, state_b)
    diff = [f"{k!r}: {state_a[k].dtype} vs {state_b[k].dtype}" for k in state_a if state_a[k].dtype != state_b[k].dtype]
    if diff:
        raise RebasinError("state_a and state_b have different dtypes: " + "; ".join(diff[:8]))
    check_finite(state_a, "state_a")
    check_finite(state_b, "state_b")


def check_finite(state: State, name: str) -> None:
    """:class:`RebasinError` naming the first floating entry of ``state`` holding NaN or inf (one host sync if none).

    A meta entry (a shape without values, e.g. from a model built under ``torch.device("meta")``) is refused
    too: whatever checks finiteness goes on to compute with the values.
    """
    floats = [(k, v) for k, v in state.items() if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex())]
    if not floats:
        return
    meta = next((k for k, v in floats if v.is_meta), None)
    if meta is not None:
        raise RebasinError(
            f"{meta!r} of {name} is on meta (a shape without values, e.g. from a model built under "
            "torch.device('meta')): this needs real weights; load them first (model.to_empty(device=...) and "
            "load_state_dict)"
        )
    flags = [torch.isfinite(v.detach()).all() for _, v in floats]
    if bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
        return
    for (key, v), ok in zip(floats, flags, strict=True):
        if not bool(ok):
            nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
            what = " and ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if p)
            raise RebasinError(
                f"{key!r} (shape {tuple(v.shape)}) of {name} contains {what} value(s) of {v.numel()}: a diverged "
                "checkpoint cannot be aligned, interpolated or evaluated; use a finite state"
            )


def as_state(obj: State | nn.Module, name: str) -> dict[str, Tensor]:
    """A detached state_dict from a module or a mapping of tensors (an error naming ``name`` otherwise)."""
    if isinstance(obj, nn.Module):
        return state_of(obj)
    if not isinstance(obj, Mapping):
        raise RebasinError(f"{name} must be a state_dict (mapping of tensors) or an nn.Module, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise RebasinError(f"{name} has non-tensor entries: {bad[:8]}")
    return {k: v.detach() for k, v in obj.items()}


# ---------------------------------------------------------------------------------------- devices
def state_of(model: nn.Module) -> dict[str, Tensor]:
    """The model's full state_dict (parameters and buffers), detached, sharing storage."""
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for an empty model)."""
    for t in model.state_dict(keep_vars=True).values():
        return t.device
    return torch.device("cpu")


def resolve_device(*models: nn.Module | None, device: torch.device | str | None = None) -> torch.device:
    """``device`` if given, else the one device all ``models`` are on (an error if they differ)."""
    if device is not None:
        return torch.device(device)
    found = [(i, model_device(m)) for i, m in enumerate(models) if m is not None]
    if not found:
        return torch.device("cpu")
    first = found[0][1]
    for _i, d in found[1:]:
        if d != first:
            raise RebasinError(
                f"the models are on different devices ({first} and {d}): move them to one device, or "
                "pass device= to run there (the models are not moved)"
            )
    return first


def paired_states(
    model_a: nn.Module,
    model_b: nn.Module,
    device: torch.device,
    *,
    state_a: State | None = None,
    state_b: State | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Detached state_dicts of two models of one architecture on ``device`` (no copy when already there).

    ``state_a`` / ``state_b``, when given, are used instead of the models' own states (the models are then
    only the architecture); each must fit its model (keys and shapes).
    """
    if state_a is not None:
        check_state_for_model(model_a, state_a, "state_a")
    if state_b is not None:
        check_state_for_model(model_b, state_b, "state_b")
    sa = {k: v.detach().to(device) for k, v in (state_of(model_a) if state_a is None else state_a).items()}
    sb = {k: v.detach().to(device) for k, v in (state_of(model_b) if state_b is None else state_b).items()}
    keys_a, keys_b = set(sa), set(sb)
    if keys_a != keys_b:
        only_a, only_b = sorted(keys_a - keys_b), sorted(keys_b - keys_a)
        raise RebasinError(
            "model_a and model_b have different architectures: key(s) only in model_a "
            f"{only_a[:12]}, key(s) only in model_b {only_b[:12]}"
        )
    diff = [f"{k}: {tuple(sa[k].shape)} vs {tuple(sb[k].shape)}" for k in sa if sa[k].shape != sb[k].shape]
    if diff:
        raise RebasinError("model_a and model_b have different architectures (shapes differ): " + "; ".join(diff[:12]))
    return sa, sb


def module_with_state(model: nn.Module, state: State, device: torch.device | None = None) -> nn.Module:
    """A deep copy of ``model`` holding ``state`` (parameters keep their ``requires_grad`` flags)."""
    new = copy.deepcopy(model)
    if device is not None:
        new.to(device)
    with torch.no_grad():
        new.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
    return new


def to_device(x: Any, device: torch.device) -> Any:
    """Tensors inside (nested) tuples, lists and mappings moved to ``device``; other values as they are."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


# ---------------------------------------------------------------------------------------- batches
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a loader batch; ``targets`` is None when the batch has none.

    ``(x, y, *rest)`` → ``(x, y)``; ``(x,)`` or a tensor ``x`` → ``(x, None)``; a mapping → (the other
    entries as keyword inputs, the entry named by the first of :data:`TARGET_KEYS` present).
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) >= 2 else None)
    if isinstance(batch, Mapping) and batch:
        key = next((k for k in TARGET_KEYS if k in batch), None)
        inputs = {k: v for k, v in batch.items() if k != key}
        return inputs, (None if key is None else batch[key])
    raise RebasinError(
        f"cannot read a batch of type {type(batch).__name__}: a loader must yield (inputs, targets, ...) "
        "tuples, tensors of inputs, or mappings of keyword inputs (with the targets under 'labels')"
    )


def as_args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for ``model(...)`` from inputs (tensor, tuple/list or mapping)."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def head(x: Any, n: int = 2) -> Any:
    """The first ``n`` samples of (nested) inputs, e.g. an example input for tracing."""
    if isinstance(x, Tensor):
        return x[:n] if x.ndim else x
    if isinstance(x, (tuple, list)):
        return type(x)(head(v, n) for v in x)
    if isinstance(x, Mapping):
        return {k: head(v, n) for k, v in x.items()}
    return x


def first_inputs(loader: Iterable[Any], n: int = 2) -> Any:
    """The first ``n`` samples of the inputs of ``loader``'s first batch.

    A ``DataLoader`` without its own ``generator`` draws its shuffling seed from the global RNG when
    iterated; the global state is restored afterwards, so reading an example draws no global randomness.
    """
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            return head(split_batch(batch)[0], n)
    raise RebasinError("the loader yielded no batch, so no example input can be read from it")


def nonempty(loader: Iterable[Any], what: str) -> Iterator[Any]:
    """Iterate ``loader``, raising :class:`RebasinError` naming ``what`` if it yields no batch."""
    count = 0
    for batch in loader:
        count += 1
        yield batch
    if count == 0:
        raise RebasinError(
            f"{what}: the loader yielded no batches (an empty dataset, an exhausted iterator, or drop_last=True "
            "with fewer samples than batch_size?)"
        )


def cycle_batches(loader: Iterable[Any], what: str) -> Iterator[Any]:
    """Batches of ``loader`` forever, pass after pass (a new ``iter`` each pass); :class:`RebasinError`
    naming ``what`` (as :func:`nonempty`) when a pass yields no batch."""
    while True:
        yield from nonempty(loader, what)


# ---------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def evaluating(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block and restore each one's flag afterwards."""
    if not enabled:
        yield model
        return
    with only_training(model, ()):
        yield model


@contextlib.contextmanager
def only_training(model: nn.Module, modules: Iterable[nn.Module]) -> Iterator[None]:
    """Eval mode for every submodule except ``modules`` (training mode); all flags restored afterwards."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for m in modules:
            m.train()
        yield
    finally:
        for m, f in flags.items():
            m.training = f


@contextlib.contextmanager
def own_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG (dropout) seeded by ``seed`` inside the block, and restored afterwards.

    Forks the CPU generator and, for a CUDA ``device``, that device's generator.
    """
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def training(model: nn.Module) -> Iterator[None]:
    """Training mode for the block; every submodule's flag restored afterwards."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.train()
        yield
    finally:
        for m, f in flags.items():
            m.training = f


def forward_with_state(
    model: nn.Module, state: Mapping[str, Tensor], inputs: Any, *, eval_mode: bool = False
) -> Any:
    """``model(inputs)`` with its parameters and buffers replaced by ``state`` (strict; see :func:`as_args`).

    Non-persistent buffers (not part of a state_dict) keep the model's own values.

    When the call fails and the floating inputs differ from the state in dtype or device, the error is a
    :class:`RebasinError` saying so (with torch's message); any other failure propagates unchanged.
    """
    args, kwargs = as_args(inputs)
    full = dict(state)
    persistent = model.state_dict(keep_vars=True)
    for key, buf in model.named_buffers():  # non-persistent buffers (a causal mask) are not in a state_dict
        if key not in full and key not in persistent:
            full[key] = buf
    try:
        with evaluating(model, eval_mode):
            return functional_call(model, full, args, kwargs, strict=True, tie_weights=False)
    except (RuntimeError, TypeError) as err:
        mismatch = input_mismatch(inputs, state)
        if mismatch is None:
            raise
        raise RebasinError(
            f"{type(model).__name__} cannot run on these inputs: {mismatch} "
            f"(torch: {first_line(err)})"
        ) from err


def find_logits(output: Any) -> Tensor | None:
    """The logits in a model's output, or ``None`` when it holds none (see :func:`logits_of`)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):  # a transformers ModelOutput is an OrderedDict
        logits = output.get("logits")
        return logits if isinstance(logits, Tensor) else None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: the output itself when it is a tensor, its ``"logits"`` entry when it is
    a mapping (a ``transformers`` ``ModelOutput`` such as ``SequenceClassifierOutput``, a dict), its first
    element when it is a tuple or list (``return_dict=False`` outputs).

    Raises
    ------
    RebasinError
        Any other output, described, with the way out (``loss_fn=``).
    """
    logits = find_logits(output)
    if logits is not None:
        return logits
    if isinstance(output, Mapping):
        what = f"a {type(output).__name__} with keys {list(output)[:8]} and no tensor 'logits'"
    elif isinstance(output, (tuple, list)):
        what = f"a {type(output).__name__} whose first element is {type(output[0]).__name__ if output else 'missing'}"
    else:
        what = f"a {type(output).__name__}"
    raise RebasinError(
        f"the model returned {what}; the default loss and the accuracy need logits: return a tensor, a dict or "
        "ModelOutput with 'logits', or a tuple whose first element is the logits, or pass loss_fn=(output, target) -> loss"
    )


def cross_entropy_of(output: Any, target: Tensor) -> Tensor:
    """``F.cross_entropy(logits_of(output), target)``: the default loss wherever a ``loss_fn`` is taken."""
    return torch.nn.functional.cross_entropy(logits_of(output), target)


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


def tensor_leaves(x: Any) -> list[Tensor]:
    """The tensors of a (nested) value: tuples, lists, dicts, ``transformers`` outputs."""
    leaves, _ = torch.utils._pytree.tree_flatten(x)
    return [v for v in leaves if isinstance(v, Tensor)]


def describe_tensors(x: Any, limit: int = 4) -> str:
    """``(4, 9) float32`` for a tensor; the tensors of (nested) inputs joined by ``, ``; ``a <type>`` otherwise."""
    tensors = tensor_leaves(x)
    if not tensors:
        return f"a {type(x).__name__}"
    parts = [f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in tensors[:limit]]
    if len({t.device for t in tensors}) > 1 or tensors[0].device.type != "cpu":
        parts = [f"{p} on {t.device}" for p, t in zip(parts, tensors, strict=False)]
    return ", ".join(parts) + (f", ... ({len(tensors) - limit} more)" if len(tensors) > limit else "")


def input_mismatch(inputs: Any, state: Mapping[str, Tensor]) -> str | None:
    """Why ``inputs`` cannot meet ``state``: a dtype or device difference in words, or None if there is none.

    Compares the first floating input tensor with the first floating entry of the state (dtype), and the first
    input tensor with the first state entry (device).
    """
    xs = tensor_leaves(inputs)
    entries = [(k, v) for k, v in state.items() if isinstance(v, Tensor)]
    if not xs or not entries:
        return None
    key, ref = entries[0]
    if xs[0].device != ref.device:
        return (f"the inputs are on {xs[0].device} but the model's state is on {ref.device} ({key!r}); "
                "move the inputs (or the model) to one device")
    fx = next((t for t in xs if t.is_floating_point()), None)
    fkey, fref = next(((k, v) for k, v in entries if v.is_floating_point()), (None, None))
    if fx is not None and fref is not None and fx.dtype != fref.dtype:
        have, want = str(fx.dtype).removeprefix("torch."), str(fref.dtype).removeprefix("torch.")
        return (f"the inputs are {have} but the model's state is {want} ({fkey!r}); convert the inputs "
                f"(x.to({fref.dtype})) or the model (model.to({fx.dtype}))")
    return None


# ---------------------------------------------------------------------------------------- progress
def progress_enabled(enabled: bool | None) -> bool:
    """``enabled`` itself, or for None: whether a bar can be seen, i.e. stderr is a terminal or a Jupyter kernel.

    A piped or logged run (stderr a file or a pipe) gets no bar, so its log is not filled with carriage-return
    updates. Every library ``progress=`` parameter defaults to None and is resolved here.
    """
    if enabled is not None:
        return bool(enabled)
    try:
        if bool(getattr(sys.stderr, "isatty", lambda: False)()):
            return True
    except ValueError:  # a closed stream
        return False
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress_bar(iterable: Iterable[Any], enabled: bool | None, **kwargs: Any) -> Iterable[Any]:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` (None: see :func:`progress_enabled`)."""
    if not progress_enabled(enabled):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


@contextlib.contextmanager
def progress_counter(enabled: bool | None, total: int | None, **kwargs: Any) -> Iterator[Any]:
    """A ``tick(**postfix)`` that advances a tqdm bar of ``total`` steps by one (a no-op when not enabled).

    For loops whose steps are not one iterable (epochs of batches); ``enabled`` as in :func:`progress_bar`.
    The bar is closed when the block ends.
    """
    if not progress_enabled(enabled):
        yield lambda **postfix: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, **kwargs)

    def tick(**postfix: Any) -> None:
        bar.update(1)
        if postfix:
            bar.set_postfix(**postfix)

    try:
        yield tick
    finally:
        bar.close()
