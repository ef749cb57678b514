"""Shared helper of the character-level language-model benchmarks (symmetry_llama, char_gpt).

The corpus is the source text of a few modules of the Python standard library, read with
:func:`inspect.getsource` (bytes, clipped to 127; nothing downloaded). Models are trained with AdamW on
random windows and evaluated on windows of the held-out last 10%; the barrier is measured along the
linear path between two state_dicts with :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["corpus", "split", "batches", "loss_of", "train", "path_losses", "barrier", "cached_train",
           "CORPUS_MODULES"]

CORPUS_MODULES = ("argparse", "collections", "json.decoder", "typing")


def corpus() -> Tensor:
    """The source of :data:`CORPUS_MODULES`, joined by newlines, as byte ids in ``0..127``."""
    import importlib

    text = "\n".join(inspect.getsource(importlib.import_module(m)) for m in CORPUS_MODULES)
    return torch.tensor([min(b, 127) for b in text.encode("utf-8")], dtype=torch.long)


def split(data: Tensor) -> tuple[Tensor, Tensor]:
    """The first 90% (training) and the last 10% (held out)."""
    cut = int(0.9 * data.numel())
    return data[:cut], data[cut:]


def batches(data: Tensor, n: int, batch: int, seq: int, seed: int) -> list[Tensor]:
    """``n`` batches of ``batch`` random windows of ``seq + 1`` bytes (inputs and next-byte targets)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (n, batch), generator=g)
    return [torch.stack([data[s:s + seq + 1] for s in row.tolist()]) for row in starts]


def _logits(out: object) -> Tensor:
    return out.logits if hasattr(out, "logits") else out  # type: ignore[attr-defined,return-value]


def loss_of(model: nn.Module, state: Mapping[str, Tensor], chunks: list[Tensor]) -> float:
    """Mean next-byte cross-entropy (nats) of ``model`` run on ``state`` over ``chunks``."""
    total = 0.0
    with torch.no_grad():
        for c in chunks:
            logits = _logits(functional_call(model, dict(state), (c[:, :-1],), tie_weights=False))
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), c[:, 1:].reshape(-1)))
    return total / len(chunks)


def train(model: nn.Module, data: Tensor, *, steps: int, batch: int, seq: int, lr: float, seed: int,
          log_every: int = 0) -> None:
    """AdamW on ``steps`` batches of random windows of ``data`` (drawn from ``seed + 100``); ends in eval mode.

    ``log_every``: print the training loss every so many steps (0: never).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for i, c in enumerate(batches(data, steps, batch, seq, seed + 100)):
        logits = _logits(model(c[:, :-1]))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), c[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and (i + 1) % log_every == 0:
            print(f"step {i + 1}/{steps}: training loss {float(loss):.3f}", flush=True)
    model.eval()


def cached_train(model: nn.Module, path: Path, data: Tensor, args: argparse.Namespace, seed: int) -> float:
    """Load ``model``'s weights from ``path``, or train it (:func:`train` with ``args``' settings) and save them.

    Returns the seconds spent training (0 when loaded).
    """
    import time

    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return 0.0
    start = time.perf_counter()
    train(model, data, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=seed, log_every=25)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return time.perf_counter() - start


def path_losses(model: nn.Module, state_at: Callable[[float], Mapping[str, Tensor]], chunks: list[Tensor],
                points: int) -> list[float]:
    """Losses at ``points`` evenly spaced ``t`` on a path (``state_at(t)``: e.g. ``LinearPath.state_dict_at``)."""
    return [loss_of(model, state_at(i / (points - 1)), chunks) for i in range(points)]


def barrier(losses: list[float]) -> tuple[float, float]:
    """``(max minus the mean of the endpoints, midpoint loss)`` of a path's losses."""
    return max(losses) - 0.5 * (losses[0] + losses[-1]), losses[(len(losses) - 1) // 2]
