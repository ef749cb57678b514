"""Flow and Bijection connections (Anokhin & Yarotsky 2020): the flows, the paths and the fits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rebasin import RebasinError, barrier, evaluate_path
from rebasin.apps.models import MLP
from rebasin.paths import FlowConnection, NeuronFlow, fit_bijection_connection, fit_flow_connection

KINDS = ["realnvp", "iaf"]


def _perturbed_flow(kind: str, dim: int = 5, seed: int = 1) -> NeuronFlow:
    """A float64 flow whose layers are far from the identity (zero-initialised layers are trivial)."""
    flow = NeuronFlow(dim, kind=kind, n_layers=3, hidden=8, n_blocks=3, seed=seed,
                      mean=torch.linspace(-1, 1, dim), std=torch.linspace(0.5, 2, dim))
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


def _task(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 1).long()
    return x, y


def _zoo(n_models: int = 4, width: int = 16, steps: int = 150) -> list[dict[str, torch.Tensor]]:
    """Small trained one-hidden-layer nets (their own generators; the global RNG is not touched)."""
    return _trained_nets([width], seed_base=100, n_models=n_models, steps=steps)


def _trained_nets(hidden: list[int], *, seed_base: int, n_models: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """``n_models`` MLPs 4-hidden-3 trained on :func:`_task` with SGD, net ``k`` initialised from seed ``seed_base + k``."""
    x, y = _task()
    out = []
    for k in range(n_models):
        g = torch.Generator().manual_seed(seed_base + k)
        model = MLP(4, hidden, 3)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        out.append({k2: v.detach().clone() for k2, v in model.state_dict().items()})
    return out


@pytest.fixture(scope="module")
def zoo() -> list[dict[str, torch.Tensor]]:
    return _zoo()


# ------------------------------------------------------------------------------------------ flows
@pytest.mark.parametrize("kind", KINDS)
def test_flow_round_trip_to_float_precision(kind: str) -> None:
    flow = _perturbed_flow(kind)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    z, _ = flow(x)
    assert (z - x).abs().max() > 0.1  # the flow is not the identity
    torch.testing.assert_close(flow.inverse(z), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(flow(flow.inverse(x))[0], x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_flow_logdet_matches_autograd_jacobian(kind: str) -> None:
    flow = _perturbed_flow(kind)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, logdet = flow(x)
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i])
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-10)


def test_flow_log_prob_is_a_density_in_one_dimension_pair() -> None:
    # a 2-d flow: the density integrates to ~1 over a wide grid
    flow = _perturbed_flow("realnvp", dim=2)
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(0.3)
    grid = torch.linspace(-12, 12, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        mass = flow.log_prob(pts).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-3


def test_flow_bad_arguments() -> None:
    with pytest.raises(RebasinError, match="unknown flow kind"):
        NeuronFlow(4, kind="glow")
    with pytest.raises(RebasinError, match="std must be positive"):
        NeuronFlow(3, std=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(RebasinError, match="3 entries"):
        NeuronFlow(3, mean=torch.zeros(4))


# ------------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize("kind", KINDS)
def test_path_endpoints_exact_and_formula_round_trips(zoo, kind: str) -> None:
    model = MLP(4, [16], 3)
    conn = fit_flow_connection(model, zoo[:3], kind=kind, n_iter=20, hidden=8, dtype=torch.float64, seed=0)
    path = conn.path(zoo[3], zoo[0])  # a pair the flow never saw in full
    for t, ref in ((0.0, zoo[3]), (1.0, zoo[0])):
        out = path.state_dict_at(t)
        assert all(torch.equal(out[k], ref[k]) for k in ref)
        # the formula itself (no shortcut) returns the endpoint to float precision
        direct = conn.state_at(path.state_a, path.state_b, t)
        for k in ref:
            torch.testing.assert_close(direct[k], ref[k], rtol=0, atol=1e-6 if t == 1.0 else 1e-12)
    mid = path.state_dict_at(0.5)
    assert all(torch.isfinite(v).all() for v in mid.values())
    assert not torch.allclose(mid["layers.0.weight"], torch.lerp(zoo[3]["layers.0.weight"], zoo[0]["layers.0.weight"], 0.5))
    near = path.state_dict_at(1e-7)
    torch.testing.assert_close(near["layers.0.weight"], zoo[3]["layers.0.weight"], rtol=0, atol=1e-5)


def test_path_plugs_into_evaluate_path_and_barrier(zoo) -> None:
    model = MLP(4, [16], 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copies = [{k: v.clone() for k, v in s.items()} for s in zoo]
    conn = fit_flow_connection(model, zoo, n_iter=10, hidden=8, seed=0)
    x, y = _task(seed=5)
    res = evaluate_path(model, None, None, [(x, y)], num_points=5, path=conn.path(zoo[0], zoo[1]))
    ends = [evaluate_path(model, s, s, [(x, y)], num_points=2).accuracy[0] for s in (zoo[0], zoo[1])]
    assert res.accuracy[0] == ends[0] and res.accuracy[-1] == ends[1]
    assert res.metadata["path"] == "FlowPath"
    assert math.isfinite(barrier(res, metric="accuracy"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(c[k], s[k]) for c, s in zip(copies, zoo) for k in s)


def test_path_rejects_other_architecture(zoo) -> None:
    conn = fit_flow_connection(MLP(4, [16], 3), zoo, n_iter=2, hidden=8)
    other = MLP(4, [8], 3).state_dict()
    with pytest.raises(RebasinError):
        conn.path(other, other)


# ------------------------------------------------------------------------------------------ fits
def test_flow_fit_increases_likelihood_and_generalises(zoo) -> None:
    model = MLP(4, [16], 3)
    conn = fit_flow_connection(model, zoo[:3], n_iter=150, hidden=16, lr=3e-3, seed=0)
    assert conn.method == "flow" and len(conn.history) == 150
    assert conn.log_likelihood_end > conn.log_likelihood_start + 0.05
    assert sum(conn.history[-20:]) / 20 > sum(conn.history[:20]) / 20
    assert conn.log_likelihood(zoo[:3]) == pytest.approx(conn.log_likelihood_end, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_fits_repeat_and_leave_global_rng_alone(zoo, kind: str) -> None:
    model = MLP(4, [16], 3)
    x, y = _task(seed=3)
    state = torch.get_rng_state()
    c1 = fit_flow_connection(model, zoo, kind=kind, n_iter=5, hidden=8, seed=4)
    c2 = fit_flow_connection(model, zoo, kind=kind, n_iter=5, hidden=8, seed=4)
    b1 = fit_bijection_connection(model, zoo, [(x, y)], kind=kind, n_iter=4, hidden=8, seed=4)
    b2 = fit_bijection_connection(model, zoo, [(x, y)], kind=kind, n_iter=4, hidden=8, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in ((c1, c2), (b1, b2)):
        assert a.history == b.history
        for pa, pb in zip(a.flow.state_dict().values(), b.flow.state_dict().values()):
            assert torch.equal(pa, pb)
    c3 = fit_flow_connection(model, zoo, kind=kind, n_iter=5, hidden=8, seed=5)
    assert c3.history != c1.history


def test_bijection_lowers_the_path_loss_on_unseen_pairs() -> None:
    zoo = _zoo(n_models=6)
    model = MLP(4, [16], 3)
    x, y = _task(n=512, seed=7)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
    start = fit_bijection_connection(model, zoo[:4], batches, n_iter=0, hidden=16, seed=0)
    fitted = fit_bijection_connection(model, zoo[:4], batches, n_iter=120, hidden=16, lr=3e-3, seed=0)
    assert fitted.method == "bijection" and len(fitted.history) == 120

    def mean_path_loss(conn: FlowConnection) -> float:
        losses = []
        for a, b in ((zoo[4], zoo[5]), (zoo[5], zoo[4])):
            res = evaluate_path(model, None, None, [(x, y)], num_points=9, path=conn.path(a, b))
            losses.append(sum(res.loss) / len(res.loss))
        return sum(losses) / len(losses)

    assert mean_path_loss(fitted) < mean_path_loss(start)


def test_bijection_init_warm_start(zoo) -> None:
    model = MLP(4, [16], 3)
    flow = fit_flow_connection(model, zoo, n_iter=3, hidden=8, seed=0)
    x, y = _task()
    warm = fit_bijection_connection(model, zoo, [(x, y)], n_iter=0, init=flow)
    for pa, pb in zip(warm.flow.state_dict().values(), flow.flow.state_dict().values()):
        assert torch.equal(pa, pb)
    assert warm.flow is not flow.flow
    with pytest.raises(RebasinError, match="init must be a FlowConnection"):
        fit_bijection_connection(model, zoo, [(x, y)], n_iter=0, init="flow")  # type: ignore[arg-type]  # the wrong type is the input under test


# ------------------------------------------------------------------------------------------ bad zoos
def test_bad_zoo_is_a_clear_error(zoo) -> None:
    model = MLP(4, [16], 3)
    x, y = _task()
    with pytest.raises(RebasinError, match="at least 2"):
        fit_flow_connection(model, zoo[:1])
    with pytest.raises(RebasinError, match="at least 2"):
        fit_bijection_connection(model, zoo[:1], [(x, y)])
    with pytest.raises(RebasinError, match=r"states\[1\] does not fit"):
        fit_flow_connection(model, [zoo[0], MLP(4, [8], 3).state_dict()])
    nan = {k: v.clone() for k, v in zoo[1].items()}
    nan["layers.0.weight"][0, 0] = float("nan")
    with pytest.raises(RebasinError, match="NaN"):
        fit_flow_connection(model, [zoo[0], nan])
    with pytest.raises(RebasinError, match="list of state_dicts"):
        fit_flow_connection(model, zoo[0])  # type: ignore[arg-type]  # the wrong type is the input under test
    with pytest.raises(RebasinError, match="one hidden layer"):
        lone = torch.nn.Sequential(torch.nn.Linear(4, 3))
        fit_flow_connection(lone, [lone.state_dict()] * 2)
    with pytest.raises(RebasinError, match="norm layers"):
        fit_flow_connection(MLP(4, [8], 3, norm="layernorm"), [MLP(4, [8], 3, norm="layernorm").state_dict()] * 2)
    with pytest.raises(RebasinError, match="unknown flow kind"):
        fit_flow_connection(model, zoo, kind="maf")
    with pytest.raises(RebasinError, match="no batches"):
        fit_bijection_connection(model, zoo, [], n_iter=1)


# ------------------------------------------------------------------------------------------ several hidden layers
DEEP = [12, 10]


def _deep_zoo(n_models: int = 5, steps: int = 150) -> list[dict[str, torch.Tensor]]:
    """Small trained two-hidden-layer nets 4-12-10-3 (own generators)."""
    return _trained_nets(DEEP, seed_base=200, n_models=n_models, steps=steps)


@pytest.fixture(scope="module")
def deep_zoo() -> list[dict[str, torch.Tensor]]:
    return _deep_zoo()


@pytest.mark.parametrize("kind", KINDS)
def test_layerwise_path_endpoints_exact_and_stages(deep_zoo, kind: str) -> None:
    model = MLP(4, DEEP, 3)
    conn = fit_flow_connection(model, deep_zoo[:3], kind=kind, n_iter=30, hidden=8, n_blocks=3, seed=0)
    assert conn.layerwise and len(conn.flows) == 2
    assert [f.dim for f in conn.flows] == [4 + 1, 12 + 1]  # incoming weights and bias of each hidden layer
    x, _ = _task(seed=9)
    a, b = deep_zoo[3], deep_zoo[4]  # a pair the flows never saw
    path = conn.path(a, b, x)
    for t, ref in ((0.0, a), (1.0, b)):
        out = path.state_dict_at(t)
        assert all(torch.equal(out[k], ref[k]) for k in ref)
    # stage 1 of 3 (t in [0, 1/3]): hidden layer 0 on the flow path, layer 1 refit, the output layer at A
    mid = path.state_dict_at(1 / 6)
    assert torch.equal(mid["layers.4.weight"], a["layers.4.weight"])
    assert not torch.allclose(mid["layers.0.weight"], torch.lerp(a["layers.0.weight"], b["layers.0.weight"], 0.5))
    assert not torch.equal(mid["layers.2.weight"], a["layers.2.weight"])
    # stage 2: hidden layer 0 at B, hidden layer 1 moving, output layer refit
    mid2 = path.state_dict_at(0.5)
    assert torch.equal(mid2["layers.0.weight"], b["layers.0.weight"])
    # continuity: just inside a stage is close to its start (the flow round-trips)
    for t0 in (0.0, 1 / 3):
        s0, s1 = path.state_dict_at(t0), path.state_dict_at(t0 + 1e-7)
        for k in s0:
            torch.testing.assert_close(s1[k], s0[k], rtol=0, atol=1e-4)
    # the flow formula at the stage ends (skipped there) would return the ends to float precision
    for layer, key in enumerate(("layers.0", "layers.2")):
        u = torch.cat([a[f"{key}.weight"], a[f"{key}.bias"][:, None]], 1)
        with torch.no_grad():
            back = conn.flows[layer].inverse(conn.flows[layer](u)[0])
        torch.testing.assert_close(back, u, rtol=0, atol=1e-5)


def test_layerwise_path_plugs_into_evaluate_path_and_barrier(deep_zoo) -> None:
    model = MLP(4, DEEP, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copies = [{k: v.clone() for k, v in s.items()} for s in deep_zoo]
    conn = fit_flow_connection(model, deep_zoo[:3], n_iter=10, hidden=8, seed=0)
    x, y = _task(seed=5)
    path = conn.path(deep_zoo[3], deep_zoo[4], (x, y))
    res = evaluate_path(model, None, None, [(x, y)], num_points=7, path=path)
    ends = [evaluate_path(model, s, s, [(x, y)], num_points=2).loss[0] for s in (deep_zoo[3], deep_zoo[4])]
    assert res.loss[0] == pytest.approx(ends[0]) and res.loss[-1] == pytest.approx(ends[1])
    assert res.metadata["path"] == "FlowPath"
    assert math.isfinite(barrier(res))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(c[k], s[k]) for c, s in zip(copies, deep_zoo) for k in s)
    with pytest.raises(RebasinError, match="must lie in"):
        path.state_dict_at(1.5)


def test_layerwise_flow_path_is_not_much_worse_than_linear(deep_zoo) -> None:
    # a sanity check on a toy zoo, not a tuned claim: the worst loss along the layer-wise flow path stays
    # within a generous margin of the straight line's (in practice it is lower: the refit keeps the function)
    model = MLP(4, DEEP, 3)
    conn = fit_flow_connection(model, deep_zoo[:3], n_iter=100, hidden=16, lr=3e-3, seed=0)
    x, y = _task(n=512, seed=11)
    a, b = deep_zoo[3], deep_zoo[4]
    flow = evaluate_path(model, None, None, [(x, y)], num_points=13, path=conn.path(a, b, x))
    line = evaluate_path(model, a, b, [(x, y)], num_points=13)
    assert max(flow.loss) <= max(line.loss) + 0.25


@pytest.mark.parametrize("kind", KINDS)
def test_layerwise_seeded_fits_repeat(deep_zoo, kind: str) -> None:
    model = MLP(4, DEEP, 3)
    x, y = _task(seed=3)
    state = torch.get_rng_state()
    c1 = fit_flow_connection(model, deep_zoo[:3], kind=kind, n_iter=5, hidden=8, n_blocks=3, seed=4)
    c2 = fit_flow_connection(model, deep_zoo[:3], kind=kind, n_iter=5, hidden=8, n_blocks=3, seed=4)
    b1 = fit_bijection_connection(model, deep_zoo[:3], [(x, y)], kind=kind, n_iter=4, hidden=8, n_blocks=3, seed=4)
    b2 = fit_bijection_connection(model, deep_zoo[:3], [(x, y)], kind=kind, n_iter=4, hidden=8, n_blocks=3, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for p, q in ((c1, c2), (b1, b2)):
        assert p.history == q.history
        for fp, fq in zip(p.flows, q.flows):
            for tp, tq in zip(fp.state_dict().values(), fq.state_dict().values()):
                assert torch.equal(tp, tq)
    pa = b1.path(deep_zoo[3], deep_zoo[4], x).state_dict_at(0.3)
    pb = b2.path(deep_zoo[3], deep_zoo[4], x).state_dict_at(0.3)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_layerwise_bijection_trains_every_hidden_layer_flow(deep_zoo) -> None:
    model = MLP(4, DEEP, 3)
    x, y = _task(n=512, seed=7)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
    start = fit_bijection_connection(model, deep_zoo[:3], batches, n_iter=0, hidden=8, seed=0)
    fitted = fit_bijection_connection(model, deep_zoo[:3], batches, n_iter=30, hidden=8, lr=3e-3, seed=0,
                                      refit_batch=x[:256])
    assert fitted.method == "bijection" and len(fitted.history) == 30 and fitted.layerwise
    for f0, f1 in zip(start.flows, fitted.flows):  # both hidden layers' flows moved (gradients reach each stage)
        assert any(not torch.equal(p, q) for p, q in zip(f0.parameters(), f1.parameters()))
    res = evaluate_path(model, None, None, [(x, y)], num_points=7, path=fitted.path(deep_zoo[3], deep_zoo[4], x[:256]))
    assert all(math.isfinite(v) for v in res.loss)


def test_layerwise_bad_inputs_are_clear_errors(deep_zoo, zoo) -> None:
    model = MLP(4, DEEP, 3)
    x, y = _task()
    with pytest.raises(RebasinError, match=r"states\[1\] does not fit"):  # mixed depths
        fit_flow_connection(model, [deep_zoo[0], MLP(4, [12], 3).state_dict()])
    with pytest.raises(RebasinError, match=r"states\[1\] does not fit"):
        fit_bijection_connection(model, [deep_zoo[0], MLP(4, [12, 10, 10], 3).state_dict()], [(x, y)])
    with pytest.raises(RebasinError, match="norm layers|Linear layers"):
        deep_norm = MLP(4, DEEP, 3, norm="layernorm")
        fit_flow_connection(deep_norm, [deep_norm.state_dict()] * 2)
    conn = fit_flow_connection(model, deep_zoo[:2], n_iter=1, hidden=8)
    with pytest.raises(RebasinError, match="pass batch="):
        conn.path(deep_zoo[0], deep_zoo[1])
    with pytest.raises(RebasinError, match="does not fit|do not fit"):
        conn.path(zoo[0], zoo[1], x)
    with pytest.raises(RebasinError, match="one-hidden-layer formula"):
        conn.state_at(deep_zoo[0], deep_zoo[1], 0.5)
    shallow = fit_flow_connection(MLP(4, [16], 3), zoo[:2], n_iter=1, hidden=8)
    with pytest.raises(RebasinError, match="only used"):
        shallow.path(zoo[0], zoo[1], x)
    with pytest.raises(RebasinError, match="only used"):
        fit_bijection_connection(MLP(4, [16], 3), zoo[:2], [(x, y)], n_iter=1, refit_batch=x)
    with pytest.raises(RebasinError, match="another architecture"):
        fit_bijection_connection(model, deep_zoo[:2], [(x, y)], n_iter=0, init=shallow)
