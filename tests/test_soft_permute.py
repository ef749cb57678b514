"""soft_permute (differentiable permute), perm_to_matrix and matrix_to_perm."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from rebasin import PermutationSpec, RebasinError, permute, random_permutation
from rebasin.matching import sinkhorn
from rebasin.spec import matrix_to_perm, perm_to_matrix, soft_permute


def mlp_case() -> tuple[PermutationSpec, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    spec = PermutationSpec(
        {
            "0.weight": ("P0", None),
            "0.bias": ("P0",),
            "2.weight": ("P1", "P0"),
            "2.bias": ("P1",),
            "4.weight": (None, "P1"),
            "4.bias": (None,),
        }
    )
    return spec, {k: v.detach().clone() for k, v in m.state_dict().items()}


def conv_bn_case() -> tuple[PermutationSpec, dict[str, torch.Tensor], nn.Module]:
    """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> Flatten -> Linear: BN stats and channel-major blocks."""
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 3 * 3, 2),
    )  # fmt: skip
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    axes: dict = {"0.weight": ("C0", None, None, None), "0.bias": ("C0",)}
    for key in ("weight", "bias", "running_mean", "running_var"):
        axes[f"1.{key}"] = ("C0",)
        axes[f"4.{key}"] = ("C1",)
    axes.update(
        {
            "1.num_batches_tracked": (),
            "3.weight": ("C1", "C0", None, None),
            "3.bias": ("C1",),
            "4.num_batches_tracked": (),
            "7.weight": (None, "C1"),
            "7.bias": (None,),
        }
    )
    spec = PermutationSpec(axes, blocks={("7.weight", 1): 9})
    return spec, {k: v.detach().clone() for k, v in m.state_dict().items()}, m


def hard(perms: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {k: perm_to_matrix(p, dtype=dtype) for k, p in perms.items()}


@pytest.mark.parametrize("case", ["mlp", "conv_bn_blocks"])
def test_hard_matrices_equal_permute_exactly(case):
    spec, sd = mlp_case() if case == "mlp" else conv_bn_case()[:2]
    perms = random_permutation(spec, seed=3, sizes=spec.validate(sd))
    got = soft_permute(spec, hard(perms), sd)
    want = permute(spec, perms, sd)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype
        assert torch.equal(got[k], want[k]), k
    # one permutation at a time (the others identity) also agrees
    for name in spec.perms:
        one = soft_permute(spec, {name: perm_to_matrix(perms[name])}, sd)
        ref = permute(spec, {name: perms[name]}, sd)
        assert all(torch.equal(one[k], ref[k]) for k in sd)


def test_hard_soft_permute_keeps_the_function():
    spec, sd, m = conv_bn_case()
    perms = random_permutation(spec, seed=5, sizes=spec.validate(sd))
    out = soft_permute(spec, hard(perms), sd)
    x = torch.randn(4, 2, 5, 5)
    m.eval()
    y0 = torch.func.functional_call(m, sd, (x,))
    y1 = torch.func.functional_call(m, out, (x,))
    assert_close(y1, y0, atol=1e-5, rtol=1e-5)


def test_missing_names_are_identity_and_untouched_tensors_are_passed_through():
    spec, sd, _ = conv_bn_case()
    out = soft_permute(spec, {}, sd)
    assert all(out[k] is sd[k] for k in sd)
    out = soft_permute(spec, {"C1": perm_to_matrix(torch.tensor([2, 0, 1]))}, sd)
    assert out["0.weight"] is sd["0.weight"]  # only C0 acts there
    assert out["4.num_batches_tracked"] is sd["4.num_batches_tracked"]
    assert out["4.num_batches_tracked"].dtype == torch.int64


def test_inputs_not_mutated():
    spec, sd, _ = conv_bn_case()
    before = {k: v.clone() for k, v in sd.items()}
    mats = {p: sinkhorn(torch.randn(n, n), n_iter=50) for p, n in spec.validate(sd).items()}
    mats_before = {k: v.clone() for k, v in mats.items()}
    soft_permute(spec, mats, sd)
    assert all(torch.equal(sd[k], before[k]) for k in sd)
    assert all(torch.equal(mats[k], mats_before[k]) for k in mats)


def test_soft_contraction_formula_and_blocks():
    # new[i] = sum_j M[i, j] old[j] on the permuted axis; blocks read the axis as (n, k).
    spec = PermutationSpec({"a": ("P", None), "b": (None, "P")}, blocks={("b", 1): 2})
    m = torch.rand(3, 3, dtype=torch.float64)
    a = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(5, 6, dtype=torch.float64)
    out = soft_permute(spec, {"P": m}, {"a": a, "b": b})
    assert_close(out["a"], m @ a)
    want_b = torch.einsum("ij,ojk->oik", m, b.reshape(5, 3, 2)).reshape(5, 6)
    assert_close(out["b"], want_b)


def test_doubly_stochastic_matrix_preserves_axis_sums():
    spec, sd = mlp_case()
    g = torch.Generator().manual_seed(0)
    mats = {p: sinkhorn(torch.randn(n, n, generator=g), n_iter=500) for p, n in spec.validate(sd).items()}
    out = soft_permute(spec, mats, sd)
    assert_close(out["0.bias"].sum(), sd["0.bias"].sum(), atol=1e-5, rtol=1e-5)
    assert_close(out["2.weight"].sum(), sd["2.weight"].sum(), atol=1e-5, rtol=1e-5)


def test_gradients_reach_matrices_logits_and_state():
    spec, sd = mlp_case()
    sd = {k: v.double().requires_grad_() for k, v in sd.items()}
    sizes = spec.validate(sd)
    g = torch.Generator().manual_seed(0)
    logits = {p: torch.randn(n, n, generator=g, dtype=torch.float64, requires_grad=True) for p, n in sizes.items()}
    target = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in sd.items()}
    mats = {p: sinkhorn(l, n_iter=300) for p, l in logits.items()}  # noqa: E741 - l holds the logits
    out = soft_permute(spec, mats, sd)
    loss = sum(((out[k] - target[k]) ** 2).sum() for k in sd)
    loss.backward()
    for p, l in logits.items():  # noqa: E741 - l holds the logits
        assert l.grad is not None and torch.isfinite(l.grad).all() and l.grad.abs().sum() > 0, p
    for k, v in sd.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, k


def test_gradcheck_matrix_and_state():
    spec = PermutationSpec({"w": ("P", "Q"), "b": ("P",)}, blocks={("w", 1): 2})
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mp = torch.rand(3, 3, dtype=torch.float64, requires_grad=True)
    mq = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)

    def f(w, b, mp, mq):
        out = soft_permute(spec, {"P": mp, "Q": mq}, {"w": w, "b": b})
        return out["w"], out["b"]

    assert torch.autograd.gradcheck(f, (w, b, mp, mq))


def test_matrix_cast_to_state_dtype():
    spec, sd = mlp_case()
    perms = random_permutation(spec, seed=1, sizes=spec.validate(sd))
    out = soft_permute(spec, hard(perms, dtype=torch.float64), sd)
    assert all(out[k].dtype == torch.float32 for k in out)


def test_bad_matrix_shapes_and_names():
    spec, sd = mlp_case()
    with pytest.raises(RebasinError, match=r"'P0' has shape \(5, 5\).*size 6.*'0.weight'.*\(6, 3\)"):
        soft_permute(spec, {"P0": torch.eye(5)}, sd)
    with pytest.raises(RebasinError, match=r"'P0'.*\(6, 6\)"):
        soft_permute(spec, {"P0": torch.ones(6, 3)}, sd)
    with pytest.raises(RebasinError, match="unknown permutation 'P9'"):
        soft_permute(spec, {"P9": torch.eye(6)}, sd)
    with pytest.raises(RebasinError, match="perm_to_matrix"):
        soft_permute(spec, {"P0": torch.arange(6)}, sd)
    with pytest.raises(RebasinError, match="floating"):
        soft_permute(spec, {"P0": torch.eye(6, dtype=torch.int64)}, sd)
    bad = dict(sd)
    bad["0.bias"] = torch.zeros(7)
    with pytest.raises(RebasinError, match="0.bias"):
        soft_permute(spec, {}, bad)


def test_integer_tensor_on_permuted_axis_is_an_error():
    spec = PermutationSpec({"w": ("P", None), "idx": ("P",)})
    sd = {"w": torch.randn(3, 2), "idx": torch.arange(3)}
    with pytest.raises(RebasinError, match=r"'idx'.*torch.int64.*'P'"):
        soft_permute(spec, {"P": torch.eye(3)}, sd)


# ---------------------------------------------------------------------------- conversions
def test_perm_to_matrix_is_eye_indexed():
    p = torch.tensor([2, 0, 3, 1])
    assert torch.equal(perm_to_matrix(p), torch.eye(4)[p])
    m = perm_to_matrix(p, dtype=torch.float64)
    assert m.dtype == torch.float64 and m.device == p.device
    assert_close(m @ torch.arange(4.0, dtype=torch.float64), p.double())


@pytest.mark.parametrize("bad", [torch.tensor([0, 0, 1]), torch.tensor([0, 3, 1]), torch.tensor([-1, 0, 1]), torch.zeros(2, 2, dtype=torch.long), torch.tensor([0.0, 1.0])])
def test_perm_to_matrix_rejects_non_permutations(bad):
    with pytest.raises(RebasinError, match="perm_to_matrix"):
        perm_to_matrix(bad)


def test_matrix_to_perm_maximises_and_batches():
    g = torch.Generator().manual_seed(0)
    p = torch.randperm(7, generator=g)
    noisy = perm_to_matrix(p) + 0.3 * torch.rand(7, 7, generator=g)
    assert torch.equal(matrix_to_perm(noisy), p)
    s = sinkhorn(noisy * 5, n_iter=500)
    assert torch.equal(matrix_to_perm(s), p)
    q = torch.randperm(7, generator=g)
    batch = torch.stack([perm_to_matrix(p), perm_to_matrix(q)])
    assert torch.equal(matrix_to_perm(batch), torch.stack([p, q]))
    with pytest.raises(RebasinError, match="square"):
        matrix_to_perm(torch.zeros(3, 4))
    with pytest.raises(RebasinError, match="NaN"):
        matrix_to_perm(torch.full((2, 2), float("nan")))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.permutations(list(range(n)))))
def test_round_trip_property(perm):
    p = torch.tensor(perm, dtype=torch.long)
    m = perm_to_matrix(p)
    assert torch.equal(matrix_to_perm(m), p)
    # the matrix acts like index_select, and its transpose like the inverse permutation
    x = torch.arange(len(perm), dtype=torch.float32)
    assert torch.equal(m @ x, x[p])
    assert torch.equal(matrix_to_perm(m.T), torch.argsort(p))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_and_matrices():
    spec, sd, _ = conv_bn_case()
    perms = random_permutation(spec, seed=3, sizes=spec.validate(sd))
    sd_cuda = {k: v.cuda() for k, v in sd.items()}
    got = soft_permute(spec, hard(perms), sd_cuda)  # CPU matrices are moved to the tensors' device
    want = permute(spec, perms, sd)
    for k in sd:
        assert got[k].device.type == "cuda"
        assert torch.equal(got[k].cpu(), want[k])
    assert torch.equal(matrix_to_perm(perm_to_matrix(perms["C0"]).cuda()).cpu(), perms["C0"])
