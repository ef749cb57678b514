"""align(): one entry point for every matcher — convention, options checked, inputs untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import rebasin
from rebasin import RebasinError, align, permute, random_permutation, spec_from_model


def planted_pair(seed: int = 0):
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(64, 5)
    spec = spec_from_model(a, x[:2])
    b = copy.deepcopy(a)
    b.load_state_dict(permute(spec, random_permutation(spec, seed=seed + 1), a.state_dict()))
    loader = [(x[i : i + 16], torch.randint(0, 3, (16,))) for i in range(0, 64, 16)]
    return a, b, spec, loader


@pytest.mark.parametrize("method", ["weight_matching", "activation_matching", "ot"])
def test_matchers_undo_a_planted_permutation_and_leave_models_alone(method):
    a, b, spec, loader = planted_pair()
    before_a, before_b = copy.deepcopy(a.state_dict()), copy.deepcopy(b.state_dict())
    res = align(a, b, method=method, loader=loader)
    assert res.method == method and res.time_s >= 0
    assert set(res.perms) == set(spec.perm_to_axes)
    for k, v in a.state_dict().items():
        assert_close(res.state_b[k], v, rtol=0, atol=0)
    assert_close(permute(res.spec, res.perms, b.state_dict()), res.state_b)
    for model, before in ((a, before_a), (b, before_b)):
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k])
    for k, v in res.state_b.items():  # no entry aliases B (the output layer's bias is not permuted)
        assert v.data_ptr() != b.state_dict()[k].data_ptr()


def test_identity_is_the_naive_baseline():
    a, b, _, loader = planted_pair()
    res = align(a, b, method="identity", loader=loader)
    assert res.perms == {}
    for k, v in b.state_dict().items():
        assert torch.equal(res.state_b[k], v)
    res.state_b["0.weight"].add_(1.0)  # a copy: B is untouched
    assert not torch.equal(res.state_b["0.weight"], b.state_dict()["0.weight"])


def test_spec_is_traced_from_example_input_or_loader():
    a, b, spec, loader = planted_pair()
    assert align(a, b, example_input=torch.randn(2, 5)).spec.axes == spec.axes
    assert align(a, b, loader=loader).spec.axes == spec.axes
    with pytest.raises(RebasinError, match="example_input"):
        align(a, b)


def test_bad_methods_and_options_are_named():
    a, b, spec, loader = planted_pair()
    with pytest.raises(RebasinError, match="unknown method 'wm'"):
        align(a, b, method="wm", spec=spec)
    with pytest.raises(RebasinError, match=r"unknown option\(s\) \['max_iters'\]"):
        align(a, b, method="weight_matching", spec=spec, max_iters=3)
    with pytest.raises(RebasinError, match="needs data"):
        align(a, b, method="activation_matching", spec=spec)
    other = nn.Sequential(nn.Linear(5, 17), nn.ReLU(), nn.Linear(17, 12), nn.ReLU(), nn.Linear(12, 3))
    with pytest.raises(RebasinError):
        align(a, other, spec=spec)


def test_every_method_is_listed_with_its_target():
    assert {"identity", "weight_matching", "activation_matching", "ste", "sinkhorn", "ot", "transform_matching"} == set(
        rebasin.matcher_names())


def test_align_reading_the_example_from_a_shuffled_loader_draws_no_global_randomness():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import rebasin

    torch.manual_seed(0)
    a, b = (torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)) for _ in range(2))
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.zeros(16, dtype=torch.long)), batch_size=4,
                        shuffle=True)  # no generator: iterating it draws a seed from the global RNG
    before = torch.random.get_rng_state()
    rebasin.align(a, b, loader=loader)
    assert torch.equal(torch.random.get_rng_state(), before)
