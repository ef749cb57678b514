"""Traced specs are functionally exact: permuting the weights by a random permutation keeps the outputs.

Every model gets non-trivial BatchNorm running statistics and random norm affine parameters before
the check, so a missing permutation of a running statistic or of a LayerNorm / GroupNorm scale shows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from builders import randomize_norms_
from torch import nn

from rebasin import PermutationSpec, permute, random_permutation, spec_from_model
from rebasin._common import forward_with_state, state_of
from rebasin.apps.models import MLP, VGG, ResNet20, SmallCNN


def max_output_change(model: nn.Module, spec: PermutationSpec, x: torch.Tensor, seed: int = 1) -> float:
    """Largest |f(permuted weights)(x) - f(weights)(x)| in eval mode; checks the permutation did something."""
    state = state_of(model)
    perms = random_permutation(spec, seed=seed, sizes=spec.validate(state))
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms.values() if len(p) > 2)
    moved = permute(spec, perms, state)
    assert any(not torch.equal(moved[k], state[k]) for k in state), "the permutation changed no tensor"
    y0 = forward_with_state(model, state, x, eval_mode=True)
    y1 = forward_with_state(model, moved, x, eval_mode=True)
    return float((y0 - y1).abs().max())


class CustomMLP(nn.Module):
    """An MLP with its own forward (functional activations, no Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 9)
        self.fc2 = nn.Linear(9, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        h = torch.tanh(self.fc2(h) * 0.5)
        return self.out(h)


def _sequential_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


VEC = (3, 6)
IMG = (2, 3, 8, 8)
CASES = {
    "mlp-sequential": (_sequential_mlp, VEC, 2),
    "mlp-custom-forward": (CustomMLP, VEC, 2),
    "mlp-layernorm": (lambda: MLP(6, [8, 7], 3, norm="layernorm"), VEC, 2),
    "mlp-batchnorm": (lambda: MLP(6, [8, 7], 3, norm="batchnorm"), VEC, 2),
    "mlp-gelu": (lambda: MLP(6, [8, 7], 3, activation="gelu"), VEC, 2),
    "mlp-tanh-dropout": (lambda: MLP(6, [8, 7], 3, activation="tanh", dropout=0.3), VEC, 2),
    "vgg-flatten": (lambda: VGG([4, "M", 8, "M"], image_size=8, classifier_hidden=(6,)), IMG, 3),
    "vgg-flatten-bn": (lambda: VGG([4, "M", 8, "M"], image_size=8, batch_norm=True), IMG, 2),
    "vgg-avgpool": (lambda: VGG([4, "M", 8], image_size=8, head="avgpool"), IMG, 2),
    "vgg-avgpool-bn": (lambda: VGG([4, "M", 8], image_size=8, head="avgpool", batch_norm=True), IMG, 2),
    "smallcnn": (lambda: SmallCNN(channels=(4, 6, 8)), (2, 1, 12, 12), 3),
}
for _norm in ("batchnorm", "layernorm", "groupnorm1"):
    for _k in (1, 3):
        CASES[f"resnet20-{_norm}-k{_k}"] = (
            lambda n=_norm, k=_k: ResNet20(width=0.25, norm=n, shortcut_kernel=k), IMG, 12)


@pytest.mark.parametrize("name", list(CASES))
def test_traced_spec_is_exact(name: str) -> None:
    make, shape, n_perms = CASES[name]
    torch.manual_seed(0)
    model = randomize_norms_(make())
    x = torch.randn(shape)
    spec = spec_from_model(model, x)
    assert len(spec.perms) == n_perms
    assert max_output_change(model, spec, x) <= 1e-5


def test_torchvision_resnet18() -> None:
    torch.manual_seed(0)
    model = randomize_norms_(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    spec = spec_from_model(model, x, check=False)
    # 4 residual streams + one inner permutation per basic block (8 blocks)
    assert len(spec.perms) == 12
    assert spec.axes["fc.weight"][0] is None and spec.axes["conv1.weight"][1] is None
    assert spec.axes["layer2.0.downsample.1.running_var"] == spec.axes["layer2.0.bn2.running_var"]
    assert max_output_change(model, spec, x) <= 1e-5


def test_torchvision_vgg11_bn() -> None:
    torch.manual_seed(0)
    model = randomize_norms_(torchvision.models.vgg11_bn(num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    spec = spec_from_model(model, x, check=False)
    assert len(spec.perms) == 8 + 2  # 8 convs, 2 hidden classifier Linears
    # AdaptiveAvgPool2d(7) -> flatten: the first classifier Linear sees each channel 49 times
    assert spec.blocks == {("classifier.0.weight", 1): 49}
    assert max_output_change(model, spec, x) <= 1e-5


def test_broken_spec_is_detected() -> None:
    """The equivalence measure can fail: dropping the permutation of one running_var breaks it."""
    torch.manual_seed(0)
    model = randomize_norms_(ResNet20(width=0.25))
    x = torch.randn(IMG)
    spec = spec_from_model(model, x)
    axes = dict(spec.axes)
    axes["layer1.0.norm1.running_var"] = (None,)
    assert max_output_change(model, PermutationSpec(axes), x) > 1e-4
