"""Data loaders and the small training / evaluation helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rebasin import RebasinError
from rebasin.apps.data import (
    data_root_from_env,
    digits_loaders,
    digits_tensors,
    mnist_loaders,
    mnist_tensors,
    tensor_loader,
)
from rebasin.apps.training import evaluate, fit_classifier_, seeded_model


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def first_batch(loader):
    return next(iter(loader))


# ---------------------------------------------------------------- data


def test_digits_tensors():
    x, y = digits_tensors()
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))
    x.zero_()  # the in-process cache hands out copies
    assert float(digits_tensors()[0].max()) == 1.0


def test_digits_loaders_deterministic_by_seed():
    tr1, te1 = digits_loaders(batch_size=32, seed=3)
    tr2, te2 = digits_loaders(batch_size=32, seed=3)
    tr3, te3 = digits_loaders(batch_size=32, seed=4)
    assert len(tr1.dataset) + len(te1.dataset) == 1797 and len(te1.dataset) == 449
    for (xa, ya), (xb, yb) in zip(tr1, tr2):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(te1.dataset.tensors[0], te2.dataset.tensors[0])
    assert not torch.equal(te1.dataset.tensors[0], te3.dataset.tensors[0])
    assert not torch.equal(first_batch(tr1)[0], first_batch(tr3)[0])
    # a loader reshuffles between epochs, reproducibly
    e1, e2 = first_batch(tr1)[1], first_batch(tr1)[1]
    assert not torch.equal(e1, e2)
    # the test loader is not shuffled
    assert torch.equal(first_batch(te1)[1], te1.dataset.tensors[1][:32])


def test_digits_loaders_shapes_and_errors():
    tr, _ = digits_loaders(batch_size=16, flatten=False)
    assert first_batch(tr)[0].shape == (16, 1, 8, 8)
    with pytest.raises(RebasinError, match="test_fraction"):
        digits_loaders(test_fraction=1.0)
    with pytest.raises(RebasinError, match="batch_size"):
        tensor_loader(torch.zeros(4), torch.zeros(4), batch_size=0)
    with pytest.raises(RebasinError, match=r"\(4,\) and \(3,\)"):
        tensor_loader(torch.zeros(4), torch.zeros(3), batch_size=2)


def test_mnist_missing_root(tmp_path):
    root = tmp_path / "nothing-here"
    with pytest.raises(RebasinError, match=r"nothing-here.*MNIST/raw/train-images-idx3-ubyte"):
        mnist_tensors(root)


def test_data_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("REBASIN_TEST_ROOT", str(tmp_path))
    assert data_root_from_env("REBASIN_TEST_ROOT") == tmp_path
    monkeypatch.setenv("REBASIN_TEST_ROOT", "")
    assert data_root_from_env("REBASIN_TEST_ROOT") is None
    monkeypatch.delenv("REBASIN_TEST_ROOT")
    assert data_root_from_env("REBASIN_TEST_ROOT") is None


def _real_mnist_root():
    root = data_root_from_env()
    return root if root is not None and (root / "MNIST" / "raw").is_dir() else None


@pytest.mark.skipif(_real_mnist_root() is None, reason="REBASIN_DATA does not point at a local MNIST")
def test_real_mnist():
    root = _real_mnist_root()
    x, y = mnist_tensors(root, train=True)
    xt, yt = mnist_tensors(root, train=False)
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01
    tr, te = mnist_loaders(root, batch_size=50, train_subset=500, seed=1)
    assert len(tr.dataset) == 500 and len(te.dataset) == 10000
    assert first_batch(tr)[0].shape == (50, 784)


# ---------------------------------------------------------------- training helpers


def test_seeded_model_is_deterministic_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b, c = seeded_model(tiny_mlp, 7), seeded_model(tiny_mlp, 7), seeded_model(tiny_mlp, 8)
    assert torch.equal(torch.random.get_rng_state(), before)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_evaluate_matches_a_manual_computation_and_leaves_model_alone():
    model = seeded_model(tiny_mlp, 0)
    _, test = digits_loaders(batch_size=100)
    model.train()
    loss, acc = evaluate(model, test)
    x, y = test.dataset.tensors
    with torch.no_grad():
        out = model(x)
    assert loss == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-5)
    assert acc == pytest.approx(float((out.argmax(1) == y).double().mean()))
    assert model.training and model[0].training
    other = seeded_model(tiny_mlp, 1)
    loss_other, _ = evaluate(model, test, state=other.state_dict())
    assert loss_other == pytest.approx(evaluate(other, test)[0], rel=1e-12)


def test_fit_classifier_reaches_80_percent_on_digits_quickly():
    train, test = digits_loaders(batch_size=32, seed=0)
    model = seeded_model(tiny_mlp, 0)
    before = torch.random.get_rng_state()
    out = fit_classifier_(model, train, epochs=2, lr=1e-2, seed=0)  # ~0.2 s on one core
    assert out is model
    assert torch.equal(torch.random.get_rng_state(), before)
    _, acc = evaluate(model, test)
    assert acc > 0.8, acc
    # same seed and loader seed: the same weights
    again = fit_classifier_(seeded_model(tiny_mlp, 0), digits_loaders(batch_size=32, seed=0)[0], epochs=2, lr=1e-2)
    for pa, pb in zip(model.parameters(), again.parameters()):
        assert_close(pa, pb, rtol=0, atol=0)


def test_fit_classifier_errors_and_sgd():
    model = seeded_model(tiny_mlp, 0)
    train, _ = digits_loaders(batch_size=64)
    with pytest.raises(RebasinError, match="valid.*adam.*sgd"):
        fit_classifier_(model, train, epochs=1, optimizer="lbfgs")
    with pytest.raises(RebasinError, match="epochs"):
        fit_classifier_(model, train, epochs=0)
    w0 = model[0].weight.detach().clone()
    model.eval()
    fit_classifier_(model, train, epochs=1, optimizer="sgd", lr=0.05)
    assert not torch.equal(model[0].weight, w0)
    assert not model.training  # flags restored


def test_tensor_loader_never_draws_from_the_global_rng():
    """An unshuffled DataLoader without its own generator draws a base seed from torch's global RNG."""
    for shuffle in (False, True):
        loader = tensor_loader(torch.arange(10.0), torch.arange(10), batch_size=4, shuffle=shuffle)
        before = torch.get_rng_state()
        list(loader)
        assert torch.equal(torch.get_rng_state(), before)
