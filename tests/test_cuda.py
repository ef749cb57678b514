"""Every function keeps its ``device=``: on CUDA the results equal the CPU results.

Each test runs once per device in :data:`DEVICES`: ``"cpu"`` always (so the very same test body is
exercised on every machine) and ``"cuda"`` when a GPU is present (skipped otherwise). The reference is
always computed on the CPU; the run under test puts the models, states or curve on the device (and, where
the function has one, also passes ``device=`` with CPU inputs). Checked for each: the result equals the
CPU result (identical permutations for the matchers, on a planted problem whose optimum is clear-cut;
losses and states within float tolerance), it lives on the expected device, and the inputs are unchanged.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from builders import batches, mlp
from torch import Tensor, nn
from torch.testing import assert_close

from rebasin import (
    BezierCurve,
    RepairedPath,
    SinkhornRebasin,
    activation_matching,
    evaluate_path,
    fit_curve,
    merge,
    permute,
    random_permutation,
    repair,
    ste_matching,
    weight_matching,
)
from rebasin.trace import spec_from_model

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]
# GPU kernels sum in other orders than the CPU ones: statistics and losses agree to float32 rounding.
TOL = {"atol": 1e-4, "rtol": 1e-4}
# Learned tensors (Adam steps) and their losses: Adam's first steps are about lr * sign(grad), so a looser bound.
TRAINED = {"atol": 1e-3, "rtol": 1e-3}


# ---------------------------------------------------------------------------------------- helpers
def to(state: Mapping[str, Tensor], device: str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in state.items()}


def snapshot(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def assert_unchanged(state: Mapping[str, Tensor], before: Mapping[str, Tensor], device: str) -> None:
    assert state.keys() == before.keys()
    for k, v in state.items():
        assert v.device.type == device, f"{k} moved to {v.device}"
        assert torch.equal(v.detach().cpu(), before[k]), f"{k} was mutated"


def on_device(state: Mapping[str, Tensor], device: str) -> None:
    bad = [k for k, v in state.items() if v.device.type != device]
    assert not bad, f"not on {device}: {bad}"


def assert_states_close(got: Mapping[str, Tensor], want: Mapping[str, Tensor], **tol: Any) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert_close(got[k].detach().cpu(), v.detach().cpu(), **(tol or TOL), msg=lambda m, k=k: f"{k}: {m}")


def assert_same_perms(got: Mapping[str, Tensor], want: Mapping[str, Tensor], device: str = "cpu") -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].device.type == device, f"{k} on {got[k].device}"
        assert torch.equal(got[k].cpu(), want[k].cpu()), k


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))


def data(n: int = 64, batch: int = 16, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    return batches((6,), n, batch, seed=seed)


def tanh_mlp(width: int = 16, bn: bool = False, seed: int = 0) -> nn.Sequential:
    """``Linear -> [BatchNorm1d] -> Tanh`` twice, then a ``Linear``: no dead units, so no tied correlations
    whose order float rounding (CPU against GPU) could decide."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in in (6, width):
        layers += [nn.Linear(n_in, width), *([nn.BatchNorm1d(width)] if bn else []), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 3))


def planted(bn: bool = False, width: int = 16, noise: float = 0.01) -> tuple[nn.Module, nn.Module, dict[str, Tensor]]:
    """Model A, and B = a planted permutation of A plus a little noise: the matching optimum is clear-cut."""
    a = tanh_mlp(width, bn=bn)
    spec = spec_from_model(a, X)
    perms = random_permutation(spec, seed=1)
    g = torch.Generator().manual_seed(2)
    sb = {k: (v + noise * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
          for k, v in permute(spec, perms, a.state_dict()).items()}
    b = copy.deepcopy(a)
    b.load_state_dict(sb)
    if bn:  # distinct BatchNorm statistics, so that REPAIR and the BN reset have something to do
        for m in b.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_var.mul_(1.5)
    return a, b, perms


def moved(model: nn.Module, device: str) -> nn.Module:
    return copy.deepcopy(model).to(device)


# ---------------------------------------------------------------------------------------- matching
@pytest.mark.parametrize("device", DEVICES)
def test_spec_from_model_on_the_device(device):
    a = mlp(6, [16, 16], 3, bn=True, seed=0)
    want = spec_from_model(a, X)
    model = moved(a, device)
    before = snapshot(model.state_dict())
    got = spec_from_model(model, X.to(device))
    assert got.axes == want.axes and got.perms == want.perms
    assert_unchanged(model.state_dict(), before, device)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_matching_gives_the_cpu_permutations(device):
    a, b, _ = planted()
    spec = spec_from_model(a, X)
    sa, sb = a.state_dict(), b.state_dict()
    want = weight_matching(spec, sa, sb, seed=0)
    da, db = to(sa, device), to(sb, device)
    before = snapshot(db)
    assert_same_perms(weight_matching(spec, da, db, seed=0), want)  # CPU permutations, as everywhere
    assert_unchanged(db, before, device)
    assert_same_perms(weight_matching(spec, sa, sb, seed=0, device=device), want)
    # the permuted state stays where B is
    aligned = permute(spec, want, db)
    on_device(aligned, device)
    assert_states_close(aligned, permute(spec, want, sb), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_activation_matching_gives_the_cpu_permutations(device):
    """The loader yields CPU batches, as a DataLoader does: the spec is traced from them on the models' device."""
    a, b, _ = planted()
    want = activation_matching(a, b, data())
    ga, gb = moved(a, device), moved(b, device)
    before = snapshot(gb.state_dict())
    assert_same_perms(activation_matching(ga, gb, data()), want)
    assert_unchanged(gb.state_dict(), before, device)
    assert_same_perms(activation_matching(a, b, data(), device=device), want)
    assert next(a.parameters()).device.type == "cpu"  # device= copies the states, never moves the models
    # and the planted problem is solved: B permuted by the result is A again
    spec = spec_from_model(a, X)
    back = permute(spec, want, b.state_dict())
    assert_states_close(back, a.state_dict(), atol=0.05, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_ste_matching_takes_the_cpu_steps(device):
    a, b, _ = planted()
    opts = {"epochs": 2, "lr": 1e-2, "n_iter": 20, "seed": 0, "return_info": True}
    want, want_info = ste_matching(a, b, data(), **opts)
    ga, gb = moved(a, device), moved(b, device)
    before = snapshot(gb.state_dict())
    got, info = ste_matching(ga, gb, data(), **opts)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k].cpu(), want[k].cpu()), k
    assert_close(torch.tensor(info.losses), torch.tensor(want_info.losses), **TRAINED)
    assert_unchanged(gb.state_dict(), before, device)


@pytest.mark.parametrize("cost", ["l2", "midpoint"])
@pytest.mark.parametrize("device", DEVICES)
def test_sinkhorn_fit_takes_the_cpu_steps(device, cost):
    a, b, _ = planted()
    # started at weight matching's (planted) permutations: the hard permutations are clear-cut, not decided
    # by float rounding between near-equal logits
    opts = {"cost": cost, "init": "weight_matching", "seed": 3, "tau": 1.0, "n_iter": 20}
    fit = {"steps": 8} if cost == "l2" else {"epochs": 2}
    loader = None if cost == "l2" else data()

    ref = SinkhornRebasin(a, b, example_input=X, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few Sinkhorn iterations need not converge
        want = ref.fit(loader, lr=0.1, **fit)
        ga, gb = moved(a, device), moved(b, device)
        before = snapshot(gb.state_dict())
        module = SinkhornRebasin(ga, gb, example_input=X.to(device), **opts)
        got = module.fit(loader, lr=0.1, **fit)
        # the device= of fit moves a CPU-built module there
        other = SinkhornRebasin(a, b, example_input=X, **opts)
        via_arg = other.fit(loader, lr=0.1, device=device, **fit)
    assert_close(torch.tensor(got), torch.tensor(want), **TRAINED)
    assert_close(torch.tensor(via_arg), torch.tensor(want), **TRAINED)
    for m in (module, other):
        for k, v in ref.logits.items():
            assert m.logits[k].device.type == device
            assert_close(m.logits[k].detach().cpu(), v.detach(), **TRAINED)
        hard = m.hard_permutations()
        for k, p in ref.hard_permutations().items():
            assert torch.equal(hard[k].cpu(), p.cpu()), k
    assert_unchanged(gb.state_dict(), before, device)


# ---------------------------------------------------------------------------------------- REPAIR and paths
@pytest.mark.parametrize("closed_form", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_repair_equals_the_cpu_result(device, closed_form):
    a, b, _ = planted()
    sa, sb = a.state_dict(), b.state_dict()
    spec = spec_from_model(a, X)
    want = repair(a, sa, sb, 0.5, data(), spec=spec, closed_form=closed_form).state_dict()
    model = moved(a, device)
    da, db = to(sa, device), to(sb, device)
    before = snapshot(db)
    got = repair(model, da, db, 0.5, data(), spec=spec, closed_form=closed_form)
    on_device(got.state_dict(), device)
    assert_states_close(got.state_dict(), want)
    assert_unchanged(db, before, device)
    # device= with CPU inputs: the returned module is moved there, the input model stays
    via_arg = repair(a, sa, sb, 0.5, data(), spec=spec, closed_form=closed_form, device=device)
    on_device(via_arg.state_dict(), device)
    assert_states_close(via_arg.state_dict(), want)
    assert next(a.parameters()).device.type == "cpu"


@pytest.mark.parametrize("device", DEVICES)
def test_repaired_path_with_batchnorm_equals_the_cpu_path(device):
    a, b, _ = planted(bn=True)
    sa, sb = a.state_dict(), b.state_dict()
    want = RepairedPath(a, sa, sb, data()).state_dict_at(0.3)
    model = moved(a, device)
    path = RepairedPath(model, to(sa, device), to(sb, device), data())
    got = path.state_dict_at(0.3)
    on_device(got, device)
    assert_states_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_path_equals_the_cpu_losses(device):
    a, b, _ = planted(bn=True)
    sa, sb = a.state_dict(), b.state_dict()
    opts = {"num_points": 3, "bn_loader": data(seed=1)}
    want = evaluate_path(a, sa, sb, data(), **opts)
    model = moved(a, device)
    da, db = to(sa, device), to(sb, device)
    before = snapshot(db)
    for got in (evaluate_path(model, da, db, data(), **opts), evaluate_path(a, sa, sb, data(), device=device, **opts)):
        assert_close(torch.tensor(got.loss), torch.tensor(want.loss), **TOL)
        assert got.accuracy == pytest.approx(want.accuracy, abs=1 / 64 + 1e-12)  # at most one argmax may flip
    assert_unchanged(db, before, device)
    assert_unchanged(model.state_dict(), snapshot(moved(a, "cpu").state_dict()), device)
    # a REPAIRed path evaluated on the device
    rp = evaluate_path(model, None, None, data(), num_points=3, path=RepairedPath(model, da, db, data()))
    rp_cpu = evaluate_path(a, None, None, data(), num_points=3, path=RepairedPath(a, sa, sb, data()))
    assert_close(torch.tensor(rp.loss), torch.tensor(rp_cpu.loss), **TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_fit_curve_takes_the_cpu_steps(device):
    a, b, _ = planted()
    sa, sb = a.state_dict(), b.state_dict()
    ref = BezierCurve(sa, sb, num_bends=3)
    want = fit_curve(a, ref, data(), epochs=2, lr=1e-2, seed=4)
    model = moved(a, device)
    curve = BezierCurve(to(sa, device), to(sb, device), num_bends=3)
    got = fit_curve(model, curve, data(), epochs=2, lr=1e-2, seed=4)
    assert_close(torch.tensor(got.loss), torch.tensor(want.loss), **TRAINED)
    assert all(p.device.type == device for p in curve.parameters())
    for (k, p), (_, q) in zip(curve.named_parameters(), ref.named_parameters(), strict=True):
        assert_close(p.detach().cpu(), q.detach(), **TRAINED, msg=lambda m, k=k: f"{k}: {m}")
    # device= moves a CPU curve there
    other = BezierCurve(sa, sb, num_bends=3)
    fit_curve(a, other, data(), epochs=2, lr=1e-2, seed=4, device=device)
    assert all(p.device.type == device for p in other.parameters())
    assert_states_close(other.state_dict_at(0.5), ref.state_dict_at(0.5), **TRAINED)


@pytest.mark.parametrize("method", ["weight_matching", "activation_matching"])
@pytest.mark.parametrize("device", DEVICES)
def test_merge_equals_the_cpu_merge(device, method):
    # A and two planted permutations of it (different noise): the alignments are clear-cut
    models = [planted(noise=0.0)[0], planted(noise=0.01)[1], planted(noise=0.02)[1]]
    opts = {"method": method, "loader": data(), "example_input": X}
    want = merge(models, **opts).state_dict()
    moved_models = [moved(m, device) for m in models]
    before = [snapshot(m.state_dict()) for m in moved_models]
    got = merge(moved_models, **{**opts, "example_input": X.to(device)})
    on_device(got.state_dict(), device)
    assert_states_close(got.state_dict(), want)
    for m, b in zip(moved_models, before, strict=True):
        assert_unchanged(m.state_dict(), b, device)
    via_arg = merge(models, device=device, **opts)
    on_device(via_arg.state_dict(), device)
    assert_states_close(via_arg.state_dict(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_pam_equals_the_cpu_run(device):
    """One round (its outputs do not hinge on a backtracking decision that float rounding could flip)."""
    from rebasin.paths import proximal_alternating_minimization

    a, b, _ = planted()
    sa, sb = a.state_dict(), b.state_dict()
    opts = {"example_input": X, "rounds": 1, "theta_steps": 3, "lr": 1e-2, "seed": 5}
    want = proximal_alternating_minimization(a, sa, sb, data(), **opts)
    model = moved(a, device)
    db = to(sb, device)
    before = snapshot(db)
    runs = [proximal_alternating_minimization(model, to(sa, device), db, data(), **{**opts, "example_input": X.to(device)}),
            proximal_alternating_minimization(a, sa, sb, data(), device=device, **opts)]
    assert_unchanged(db, before, device)
    for got in runs:
        assert_same_perms(got.perms, want.perms)
        assert_close(torch.tensor(got.history), torch.tensor(want.history), **TRAINED)
        assert all(p.device.type == device for p in got.curve.parameters())
        assert_states_close(got.curve.state_dict_at(0.5), want.curve.state_dict_at(0.5), **TRAINED)
        assert all(s.device.type == device for s in got.soft.values())


@pytest.mark.parametrize("device", DEVICES)
def test_continual_line_fits_compute_on_the_given_device(device):
    """MC-SGD's line fits with a CPU model (batch norm buffers included) and ``device=``: the CPU result, there."""
    from continual.lines import fit_on_lines, fit_paired_lines  # no Avalanche import

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    a = {n: p.detach().clone() for n, p in model.named_parameters()}
    b = {n: p + 0.3 * torch.randn_like(p) for n, p in a.items()}
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    before = snapshot(model.state_dict())
    lines = [(a, (x[:10], y[:10]), 4), (b, (x[10:], y[10:]), 5)]
    for fit in (
        lambda dev: fit_paired_lines(model, a, lines, n_points=3, lr=0.05, momentum=0.8, epochs=2, seed=1,
                                     device=dev),
        lambda dev: fit_paired_lines(model, a, lines, n_points=3, lr=0.05, epochs=2, seed=1, step_every="epoch",
                                     device=dev),
        lambda dev: fit_on_lines(model, b, [a, b], (x, y), points=(0.5, 1.0), lr=0.05, momentum=0.8, epochs=2,
                                 batch_size=8, seed=1, device=dev),
    ):
        want, got = fit("cpu"), fit(device)
        on_device(got.state, device)
        assert_states_close(got.state, want.state)
        assert got.steps == want.steps
        assert_close(torch.tensor([got.loss_before, got.loss_after]), torch.tensor([want.loss_before, want.loss_after]),
                     **TOL)
    assert_unchanged(model.state_dict(), before, "cpu")
