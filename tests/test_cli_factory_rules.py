"""A model factory given to the command line (``--model pkg.mod:factory``) registers its own layer rules.

The factory module is written to a temporary folder and imported by ``rebasin align`` from there. Its layer
(``AddmmLinear``) computes with ``torch.addmm``, which the tracer does not know: without the factory's rule the
hidden units could not be aligned. B is a planted permutation of A, so an alignment that used the rule gives
back A exactly. Registration at import and inside the factory (called once per model) are both shown; every
test runs in a registration scope and forgets the module afterwards.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

import rebasin
from rebasin.apps.cli import main
from rebasin.spec.core import permute, random_permutation

_LAYER = '''
import torch
from torch import nn

import rebasin


class AddmmLinear(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight.t())


ROLES = {"weight": ("out", "in"), "bias": ("out",)}
'''

FACTORIES = {
    "at_import": _LAYER + '''
rebasin.register_module(AddmmLinear, params=ROLES, feature_dim=-1)


def build():
    return nn.Sequential(AddmmLinear(6, 16), nn.ReLU(), AddmmLinear(16, 16), nn.Tanh(), AddmmLinear(16, 3))
''',
    "in_factory": _LAYER + '''

def build():
    rebasin.register_module(AddmmLinear, params=ROLES, feature_dim=-1)  # on every call: the same rule is a no-op
    return nn.Sequential(AddmmLinear(6, 16), nn.ReLU(), AddmmLinear(16, 16), nn.Tanh(), AddmmLinear(16, 3))
''',
}


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """Write one factory module to ``tmp_path`` (the working folder) and yield its name; forget it afterwards."""
    names: list[str] = []

    def write(kind: str) -> str:
        name = f"rule_factory_{kind}_{len(names)}"
        (tmp_path / f"{name}.py").write_text(FACTORIES[kind])
        names.append(name)
        return name

    monkeypatch.chdir(tmp_path)
    with rebasin.trace.registration_scope():
        yield write
    for name in names:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_factory_rules_take_effect_for_the_command_line(factory_module, tmp_path: Path, kind: str) -> None:
    name = factory_module(kind)
    sys.path.insert(0, str(tmp_path))
    try:
        build = importlib.import_module(name).build
        model = build()
    finally:
        sys.path.remove(str(tmp_path))
    spec = rebasin.spec_from_model(model, torch.randn(2, 6))
    assert spec.perms == ("P0", "P1") and spec.axes["2.weight"] == ("P1", "P0")
    state_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state_b = permute(spec, random_permutation(spec, seed=3), state_a)
    torch.save(state_a, tmp_path / "A.pt")
    torch.save(state_b, tmp_path / "B.pt")
    code = main(["align", "A.pt", "B.pt", "--model", f"{name}:build", "--example-shape", "2,6", "-o", "aligned.pt",
                 "--save-perms", "perms.pt"])
    assert code == 0
    aligned = torch.load(tmp_path / "aligned.pt")
    for key, value in state_a.items():
        torch.testing.assert_close(aligned[key], value, rtol=0, atol=0)
    assert sorted(torch.load(tmp_path / "perms.pt")) == ["P0", "P1"]
