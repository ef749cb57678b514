"""Weight matching recovers a planted permutation on every torchvision classification model that traces.

This is the check docs/extending.md tells users to run on their own models: B is A with a random
permutation of its hidden units, so the planted permutation is a global optimum of weight matching
(``sum_k <A_k, pi(B_k)>`` is at most ``sum_k |A_k|^2``, reached there). On freshly initialised models
the descent from the identity alone stopped at a local optimum and said it converged (squeezenet1_1:
24 of 25 permutations wrong); the layer-wise start (rebasin/matching/_start.py) fixes that.

Every name of ``torchvision.models.list_models(module=torchvision.models)`` is listed below (a new
torchvision model makes ``test_every_classifier_is_listed`` fail), each as

* a case: built with ``num_classes=10`` and a small input, at the smallest configuration of its family
  that still has every kind of block the family has (same constructor class, fewer layers or
  channels) so that the whole list runs in well under a minute;
* a larger member of a family checked here at a smaller size (the reason names the case);
* (MaxViT and ShuffleNetV2 trace with some units pinned to the identity; ``test_pinned_families_name_their_pins``
  keeps that honest).

Each case is checked fresh (torchvision's own initialisation: BatchNorm scales 1, shifts 0, many zero
biases) and perturbed (random norm parameters and statistics, 1 % noise on B).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch
import torchvision
from builders import randomize_norms_
from torch import nn
from torchvision.models import (
    convnext,
    densenet,
    maxvit,
    regnet,
    resnet,
    shufflenetv2,
    swin_transformer,
    vision_transformer,
)
from torchvision.models import vgg as tv_vgg

import rebasin

Builder = Callable[[], nn.Module]


def _narrow_classifier(model: nn.Module, in_features: int, width: int = 64) -> nn.Module:
    """AlexNet / VGG with their 4096-wide classifier replaced by a ``width``-wide one (same layers)."""
    layers = [nn.Linear(in_features, width), nn.ReLU(True), nn.Dropout(), nn.Linear(width, width), nn.ReLU(True),
              nn.Dropout(), nn.Linear(width, 10)]
    for m in layers:
        if isinstance(m, nn.Linear):  # VGG's initialisation of its classifier
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    model.classifier = nn.Sequential(*layers)
    return model


def _vgg(batch_norm: bool) -> nn.Module:
    cfg: list[int | str] = [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 512, "M"]  # VGG11's layout, narrower
    features = tv_vgg.make_layers(cfg, batch_norm=batch_norm)
    with torch.device("meta"):  # the 25088 x 4096 classifier is replaced before it is ever allocated
        model = tv_vgg.VGG(nn.Identity(), num_classes=10)
    model.features = features
    for m in features.modules():  # VGG's own initialisation of its features
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    return _narrow_classifier(model, 512 * 2 * 2)


def _alexnet() -> nn.Module:
    model = torchvision.models.alexnet(num_classes=10)
    model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    return _narrow_classifier(model, 256 * 2 * 2)


def _tv(name: str, **kw: object) -> Builder:
    return partial(getattr(torchvision.models, name), num_classes=10, **kw)


def _bottleneck_resnet(**kw: object) -> nn.Module:
    """A bottleneck ResNet with its first two stages only (the 2048-wide last stage is the slow part)."""
    model = resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, **kw)
    model.layer3, model.layer4 = nn.Identity(), nn.Identity()
    model.fc = nn.Linear(128 * resnet.Bottleneck.expansion, 10)
    return model


def _regnet(se_ratio: float | None) -> nn.Module:
    params = regnet.BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=se_ratio)
    return regnet.RegNet(params, num_classes=10)


# name -> (builder, input side)
CASES: dict[str, tuple[Builder, int]] = {
    "alexnet": (_alexnet, 64),
    "densenet121": (partial(densenet.DenseNet, growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16,
                            bn_size=2, num_classes=10), 32),
    "googlenet": (_tv("googlenet", aux_logits=False, init_weights=True), 32),
    "inception_v3": (_tv("inception_v3", aux_logits=False, init_weights=True), 75),
    "mnasnet0_5": (_tv("mnasnet0_5"), 32),
    "mobilenet_v2": (_tv("mobilenet_v2", width_mult=0.25), 32),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), 32),
    "regnet_x_400mf": (partial(_regnet, None), 32),
    "regnet_y_400mf": (partial(_regnet, 0.25), 32),
    "resnet18": (partial(resnet.ResNet, resnet.BasicBlock, [1, 1, 1, 1], num_classes=10), 32),
    "resnet50": (_bottleneck_resnet, 32),
    "resnext50_32x4d": (partial(_bottleneck_resnet, groups=4, width_per_group=4), 32),
    "squeezenet1_0": (_tv("squeezenet1_0"), 64),
    "squeezenet1_1": (_tv("squeezenet1_1"), 64),
    "vgg11": (partial(_vgg, False), 32),
    "vgg11_bn": (partial(_vgg, True), 32),
    "vit_b_16": (partial(vision_transformer.VisionTransformer, image_size=16, patch_size=8, num_layers=2, num_heads=2,
                         hidden_dim=16, mlp_dim=32, num_classes=10), 16),
}


def _same(case: str, how: str) -> str:
    return f"same blocks as the {case!r} case, {how}"


SMALLER: dict[str, str] = {
    "densenet161": _same("densenet121", "wider growth and deeper blocks"),
    "densenet169": _same("densenet121", "deeper blocks"),
    "densenet201": _same("densenet121", "deeper blocks"),
    "mnasnet0_75": _same("mnasnet0_5", "wider"),
    "mnasnet1_0": _same("mnasnet0_5", "wider"),
    "mnasnet1_3": _same("mnasnet0_5", "wider"),
    "mobilenet_v3_large": _same("mobilenet_v3_small", "more and wider blocks"),
    **{f"regnet_x_{s}": _same("regnet_x_400mf", "wider and deeper") for s in ("800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")},
    **{f"regnet_y_{s}": _same("regnet_y_400mf", "wider and deeper (regnet_y_128gf: 645M parameters)")
       for s in ("800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf")},
    "resnet34": _same("resnet18", "deeper"),
    "resnet101": _same("resnet50", "deeper"),
    "resnet152": _same("resnet50", "deeper"),
    "resnext101_32x8d": _same("resnext50_32x4d", "deeper and wider groups"),
    "resnext101_64x4d": _same("resnext50_32x4d", "deeper, more groups"),
    "wide_resnet50_2": _same("resnet50", "twice the bottleneck width"),
    "wide_resnet101_2": _same("resnet50", "deeper, twice the bottleneck width"),
    **{f"vgg{d}": _same("vgg11", "deeper") for d in (13, 16, 19)},
    **{f"vgg{d}_bn": _same("vgg11_bn", "deeper") for d in (13, 16, 19)},
    **{f"vit_{s}": _same("vit_b_16", "wider, deeper, other patch sizes (vit_h_14: 632M parameters)")
       for s in ("b_32", "l_16", "l_32", "h_14")},
}

# Families traced since the stochastic-depth, window-attention and Swin rules: checked like every case.
CASES.update({
    "convnext_tiny": (partial(convnext.ConvNeXt, [convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 1)],
                              num_classes=10), 32),
    "efficientnet_b0": (_tv("efficientnet_b0"), 32),
    "efficientnet_v2_s": (_tv("efficientnet_v2_s"), 32),
    "swin_t": (partial(swin_transformer.SwinTransformer, [4, 4], 8, [1, 1], [1, 2], [2, 2], num_classes=10), 32),
    "swin_v2_t": (partial(swin_transformer.SwinTransformer, [4, 4], 8, [1, 1], [1, 2], [2, 2],
                          block=swin_transformer.SwinTransformerBlockV2,
                          downsample_layer=swin_transformer.PatchMergingV2, num_classes=10), 32),
})
SMALLER.update({
    **{n: _same("convnext_tiny", "wider and deeper") for n in ("convnext_small", "convnext_base", "convnext_large")},
    **{f"efficientnet_b{i}": _same("efficientnet_b0", "wider, deeper, larger inputs") for i in range(1, 8)},
    **{n: _same("efficientnet_v2_s", "wider and deeper") for n in ("efficientnet_v2_m", "efficientnet_v2_l")},
    **{n: _same("swin_t", "wider and deeper") for n in ("swin_s", "swin_b")},
    **{n: _same("swin_v2_t", "wider and deeper") for n in ("swin_v2_s", "swin_v2_b")},
})

# Families with units the tracer pins to the identity (MaxViT's grid/window partitions, ShuffleNetV2's channel
# shuffle): the rest stays permutable and is checked like every case; test_pinned_families_name_their_pins keeps
# the pins honest.
PINNED = ("maxvit_t", "shufflenet_v2_x0_5")
CASES.update({
    "maxvit_t": (partial(maxvit.MaxVit, input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
                         block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.1, num_classes=10), 32),
    "shufflenet_v2_x0_5": (partial(shufflenetv2.ShuffleNetV2, [1, 1, 1], [8, 16, 32, 64, 128], num_classes=10), 32),
})
SMALLER.update({n: _same("shufflenet_v2_x0_5", "wider") for n in ("shufflenet_v2_x1_0", "shufflenet_v2_x1_5",
                                                                   "shufflenet_v2_x2_0")})


def test_every_classifier_is_listed():
    names = set(torchvision.models.list_models(module=torchvision.models))
    listed = set(CASES) | set(SMALLER)
    assert names - listed == set(), "new torchvision models: add them to CASES or SMALLER"
    assert listed - names == set()
    assert not set(CASES) & set(SMALLER)


@pytest.mark.parametrize("name", sorted(CASES))
def test_planted_permutation_is_recovered(name: str) -> None:
    builder, side = CASES[name]
    torch.manual_seed(0)
    model = builder().eval()
    spec = rebasin.spec_from_model(model, torch.randn(1, 3, side, side))
    for kind in ("fresh", "perturbed"):
        source = model if kind == "fresh" else randomize_norms_(model, 1)
        state_a = {k: v.clone() for k, v in source.state_dict().items()}
        planted = rebasin.random_permutation(spec, seed=1)
        state_b = rebasin.permute(spec, planted, state_a)
        if kind == "perturbed":
            g = torch.Generator().manual_seed(2)
            state_b = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g)
                       if v.is_floating_point() and v.numel() > 1 else v for k, v in state_b.items()}
        perms, info = rebasin.weight_matching(spec, state_a, state_b, return_info=True)
        expected = rebasin.invert(planted)
        wrong = [p for p in spec.perms if not torch.equal(perms[p], expected[p])]
        assert not wrong, f"{name} ({kind}): {len(wrong)} of {len(spec.perms)} permutations missed"
        assert info.converged and info.final_objective >= info.identity_objective
        if kind == "fresh":  # the planted permutation is the global optimum: sum_k |A_k|^2
            best = sum(float((v.double() ** 2).sum()) for k, v in state_a.items()
                       if v.is_floating_point() and any(a is not None for a in spec.axes[k]))
            assert info.final_objective == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("name", PINNED)
def test_pinned_families_name_their_pins(name: str) -> None:
    """strict=True refuses these families; by default their pinned units are named and counted, the rest moves."""
    builder, side = CASES[name]
    torch.manual_seed(0)
    model, x = builder().eval(), torch.randn(1, 3, side, side)
    with pytest.raises(rebasin.RebasinError):
        rebasin.spec_from_model(model, x, strict=True)
    with pytest.warns(rebasin.RebasinWarning, match="pinned"):
        spec = rebasin.spec_from_model(model, x)
    assert spec.coverage.pinned > 0 and spec.coverage.permutable > spec.coverage.pinned


def test_identity_start_alone_stops_at_a_local_optimum():
    """The cause: from the identity, the descent settles where each permutation fits its wrong neighbours."""
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=10).eval()
    spec = rebasin.spec_from_model(model, torch.randn(1, 3, 64, 64))
    state_a = model.state_dict()
    planted = rebasin.random_permutation(spec, seed=1)
    state_b = rebasin.permute(spec, planted, state_a)
    _, stuck = rebasin.weight_matching(spec, state_a, state_b, start="identity", return_info=True)
    _, found = rebasin.weight_matching(spec, state_a, state_b, return_info=True)
    assert stuck.converged and stuck.start == "identity"
    assert stuck.final_objective < 0.5 * found.final_objective  # 1,452 against 5,877
    assert found.start == "layerwise" and found.n_sweeps == 1  # exact start: one sweep confirms it


def test_checkpoints_on_disk_take_the_same_start(tmp_path, monkeypatch):
    """The engine over checkpoints (one tensor at a time, big tensors in slices of rows) starts the same way."""
    from safetensors.torch import save_file

    from rebasin.spec import checkpoint

    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=10).eval()
    spec = rebasin.spec_from_model(model, torch.randn(1, 3, 64, 64))
    state_a = model.state_dict()
    state_b = rebasin.permute(spec, rebasin.random_permutation(spec, seed=1), state_a)
    save_file({k: v.contiguous() for k, v in state_a.items()}, tmp_path / "a.safetensors")
    save_file({k: v.contiguous() for k, v in state_b.items()}, tmp_path / "b.safetensors")
    ref, info_ref = rebasin.weight_matching(spec, state_a, state_b, return_info=True)
    monkeypatch.setattr(checkpoint, "ROW_CHUNK_BYTES", 4096)  # the classifier is read in slices of rows
    got, info = rebasin.weight_matching(spec, rebasin.open_checkpoint(tmp_path / "a.safetensors"),
                                        rebasin.open_checkpoint(tmp_path / "b.safetensors"), return_info=True)
    assert all(torch.equal(ref[p], got[p]) for p in spec.perms)
    assert info.start == info_ref.start == "layerwise"
    assert info.identity_objective == pytest.approx(info_ref.identity_objective, rel=1e-6, abs=1e-6)
    assert info.final_objective == pytest.approx(info_ref.final_objective, rel=1e-6)
