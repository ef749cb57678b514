"""Factories for the command-line tests (``--model cli_factories:mlp`` and friends), good and bad.

Not a test module: ``tests/test_cli_workflow.py`` puts this folder on the child processes' PYTHONPATH.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rebasin.apps.data import digits_loaders


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def mlp_bn() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 10),
    )


def train_data() -> torch.utils.data.DataLoader:
    return digits_loaders(batch_size=64, seed=0)[0]


def test_data() -> torch.utils.data.DataLoader:
    return digits_loaders(batch_size=256, seed=0)[1]


def few_batches() -> list:
    """Four training batches: enough data for the data-driven matchers, cheap."""
    return [batch for _, batch in zip(range(4), train_data())]


# ----------------------------------------------------------------------------- bad factories
def a_tensor() -> torch.Tensor:
    return torch.zeros(3)


def no_batches() -> list:
    return []


def one_shot():
    yield torch.zeros(2, 64), torch.zeros(2, dtype=torch.long)


def wrong_width() -> list:
    return [(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))]


def inputs_only() -> list:
    return [torch.zeros(4, 64)]


def broken() -> list:
    raise OSError("the data folder is not mounted")


NOT_A_FUNCTION = 3


# ----------------------------------------------------------------------------- a matcher that leaves a trace
def register_sentinel() -> None:
    """Register ``sentinel``: weight matching that first touches ``matcher_ran`` in the working directory."""
    from rebasin import register_matcher
    from rebasin.matching.weight import weight_matching

    def sentinel(spec, state_a, state_b, *, model_a=None, model_b=None, loader=None, seed=0, device=None):
        """Weight matching that leaves a file behind (so a test sees that alignment ran)."""
        Path("matcher_ran").touch()
        return weight_matching(spec, state_a, state_b, seed=seed)

    register_matcher("sentinel", sentinel, overwrite=True)


def save_trained(factory, path: Path, seed: int, epochs: int = 8) -> None:
    """Train ``factory()`` on the digits from ``seed`` and save its state_dict at ``path``."""
    from rebasin.apps.training import fit_classifier_, seeded_model

    model = seeded_model(factory, seed=seed)
    fit_classifier_(model, train_data(), epochs=epochs, lr=1e-3, seed=seed, progress=False)
    torch.save(model.state_dict(), path)
