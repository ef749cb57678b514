"""What a newcomer's first mistakes print: one clear RebasinError line each, nothing on stderr.

Each test pins the first line of the message (the part a user reads), so a change that makes one vaguer shows
up here. Inputs: wrong example shapes, dtypes and devices for tracing; modules where state_dicts are expected;
NaN checkpoints along a path; loaders that yield nothing; a spec that forgets BatchNorm on a fresh model; the
single-layer residual; Sinkhorn in a training loop; progress bars when stderr is not a terminal.
"""

from __future__ import annotations

import copy
import io
import re
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rebasin
from rebasin import PermutationSpec, RebasinError
from rebasin._common import progress_bar, progress_counter, progress_enabled
from rebasin.apps import training
from rebasin.apps.models import MLP, SmallCNN
from rebasin.matching import SinkhornConvergenceWarning, SinkhornInfo


def first_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    return str(err.value).splitlines()[0]


def bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture
def pair():
    torch.manual_seed(0)
    a, b = bn_mlp(), bn_mlp()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(16, 4)
    y = torch.randint(0, 3, (16,))
    spec = rebasin.spec_from_model(a, x[:2])
    return a, b, x, y, spec


# ------------------------------------------------------------------------------------------ tracing
def _without_models_line(line: str) -> str:
    """The message with the source line of ``rebasin/nets.py`` or ``rebasin/apps/models.py`` checked, then removed (it moves with edits)."""
    assert re.search(r" \((Linear|Conv2d), rebasin/(?:nets|apps/models)\.py:\d+\) raised", line), line
    return re.sub(r", rebasin/(?:nets|apps/models)\.py:\d+\)", ")", line)


def test_wrong_example_shape_names_the_cause_and_prints_nothing(capfd):
    with pytest.raises(RebasinError) as err:
        rebasin.spec_from_model(MLP(8, [16], 3), torch.randn(4, 9))
    assert _without_models_line(first_line(err)) == (
        "example_input (4, 9) float32 does not run through MLP: layers.0 (Linear) raised RuntimeError: mat1 and "
        "mat2 shapes cannot be multiplied (4x9 and 8x16); it was given (4, 9) float32 and holds weight (16, 8) "
        "float32, bias (16,) float32. Pass an input the model accepts (e.g. the first samples of one batch of "
        "its loader)."
    )
    assert "ShapeProp" not in str(err.value) and "%layers_0" not in str(err.value)
    out, errout = capfd.readouterr()
    assert errout == "" and out == ""


def test_flat_input_to_an_image_model(capfd):
    with pytest.raises(RebasinError) as err:
        rebasin.spec_from_model(SmallCNN(channels=(4, 8, 8)), torch.randn(4, 784))
    assert _without_models_line(first_line(err)) == (
        "example_input (4, 784) float32 does not run through SmallCNN: features.0 (Conv2d) raised RuntimeError: "
        "Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: [4, 784]; it was given "
        "(4, 784) float32 and holds weight (4, 1, 3, 3) float32, bias (4,) float32. Pass an input the model "
        "accepts (e.g. the first samples of one batch of its loader)."
    )
    assert capfd.readouterr().err == ""


def test_float16_model_with_a_float32_example(capfd):
    with pytest.raises(RebasinError) as err:
        rebasin.spec_from_model(MLP(8, [16], 3).half(), torch.randn(4, 8))
    assert _without_models_line(first_line(err)) == (
        "example_input (4, 8) float32 does not run through MLP: layers.0 (Linear) raised RuntimeError: mat1 and "
        "mat2 must have the same dtype, but got Float and Half; it was given (4, 8) float32 and holds weight "
        "(16, 8) float16, bias (16,) float16; example_input is float32 but the model's state is float16 "
        "('layers.0.weight'); convert the inputs (x.to(torch.float16)) or the model (model.to(torch.float32)). "
        "Pass an input the model accepts (e.g. the first samples of one batch of its loader)."
    )
    assert capfd.readouterr().err == ""


def test_example_on_another_device(capfd):
    # a meta example stands in for a GPU example given to a CPU model (a meta model with a CPU example is
    # traced on meta: tests/test_meta_spec.py)
    with pytest.raises(RebasinError) as err:
        rebasin.spec_from_model(MLP(8, [16], 3), torch.randn(4, 8, device="meta"))
    line = _without_models_line(first_line(err))
    assert line.startswith(
        "example_input (4, 8) float32 on meta does not run through MLP: layers.0 (Linear) raised RuntimeError: "
        "Tensor on device cpu is not on the expected device meta!"
    )
    assert ("example_input is on meta but the model's state is on cpu ('layers.0.weight'); move the inputs (or "
            "the model) to one device") in line
    assert capfd.readouterr().err == ""


def test_a_function_node_that_fails_is_named_with_its_operands(capfd):
    class Sum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 6)

        def forward(self, x):
            return self.a(x) + self.b(x)

    with pytest.raises(RebasinError) as err:
        rebasin.spec_from_model(Sum(), torch.randn(2, 4))
    at = f"tests/test_bad_inputs.py:{Sum.forward.__code__.co_firstlineno + 1}"
    assert first_line(err) == (
        f"example_input (2, 4) float32 does not run through Sum: the + in Sum.forward ({at}) raised RuntimeError: The size of "
        "tensor a (8) must match the size of tensor b (6) at non-singleton dimension 1; it was given (2, 8) "
        "float32, (2, 6) float32. Pass an input the model accepts (e.g. the first samples of one batch of its "
        "loader)."
    )
    assert capfd.readouterr().err == ""


def test_strict_must_be_a_bool():
    with pytest.raises(RebasinError, match=r"strict must be True or False, got 'yes'"):
        rebasin.spec_from_model(MLP(8, [16], 3), torch.randn(2, 8), strict="yes")


def test_spec_check_with_a_wrong_example():
    model = MLP(8, [16], 3)
    spec = rebasin.spec_from_model(model, torch.randn(2, 8))
    with pytest.raises(RebasinError) as err:
        spec.check(model, torch.randn(4, 9))
    assert first_line(err) == (
        "spec.check could not run MLP on example_input (4, 9) float32: RuntimeError: mat1 and mat2 shapes cannot "
        "be multiplied (4x9 and 8x16). Pass an input the model accepts"
    )


# ------------------------------------------------------------------------------------------ spec.check
def _spec_without_bn() -> PermutationSpec:
    return PermutationSpec({
        "0.weight": ("P", None), "0.bias": ("P",),
        "1.weight": (None,), "1.bias": (None,), "1.running_mean": (None,), "1.running_var": (None,),
        "1.num_batches_tracked": (),
        "3.weight": (None, "P"), "3.bias": (None,),
    })  # fmt: skip


def test_spec_check_fails_a_spec_that_leaves_batchnorm_unpermuted_on_a_fresh_model():
    model = bn_mlp()  # fresh: BatchNorm weight 1, bias 0, running stats 0 / 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 4)
    with pytest.raises(RebasinError) as err:
        _spec_without_bn().check(model, x)
    assert first_line(err).startswith("the spec is wrong for this model: permuting the weights changed the outputs")
    # the randomisation happened on a copy; the right spec passes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert rebasin.spec_from_model(model, x).check(model, x) < 1e-5


def test_spec_check_catches_a_layernorm_left_unpermuted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    wrong = PermutationSpec({
        "0.weight": ("P", None), "0.bias": ("P",), "1.weight": (None,), "1.bias": (None,),
        "3.weight": (None, "P"), "3.bias": (None,),
    })  # fmt: skip
    with pytest.raises(RebasinError, match="the spec is wrong for this model"):
        wrong.check(model, torch.randn(5, 4))


# ------------------------------------------------------------------------------------------ single-layer residual
class _OneLayerResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.w, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + F.relu(self.w(h))
        return self.out(h)


def test_single_layer_residual_is_traced_as_p_w_pt_and_is_exact():
    torch.manual_seed(0)
    model = _OneLayerResidual()
    spec = rebasin.spec_from_model(model, torch.randn(2, 4))  # includes the functional check
    assert spec.axes["w.weight"] == ("P0", "P0")
    a = model.state_dict()
    perms = rebasin.random_permutation(spec, seed=3)
    b = rebasin.permute(spec, perms, a)
    found = rebasin.weight_matching(spec, a, b)
    assert all(torch.equal(t, a[k]) for k, t in rebasin.permute(spec, found, b).items())


# ------------------------------------------------------------------------------------------ states
def test_modules_where_state_dicts_are_expected(pair):
    a, b, x, y, spec = pair
    with pytest.raises(RebasinError) as err:
        rebasin.weight_matching(spec, a, b)
    assert first_line(err) == (
        "state_a must be a state_dict (a mapping key -> tensor), got the module Sequential; pass its .state_dict()"
    )
    perms = rebasin.weight_matching(spec, a.state_dict(), b.state_dict())
    with pytest.raises(RebasinError) as err:
        rebasin.permute(spec, perms, b)
    assert first_line(err) == (
        "expected a state_dict (a mapping key -> tensor), got the module Sequential; pass its .state_dict()"
    )
    for call in (
        lambda: rebasin.interpolate(a, b, 0.5),
        lambda: rebasin.evaluate_path(a, a, b, [(x, y)], num_points=3),
        lambda: rebasin.matching.ot_matching(spec, a, b),
        lambda: rebasin.repair(a, a, b, 0.5, [(x, y)], spec=spec),
        lambda: rebasin.paths.weight_adjusted_path(a, a, b, x, spec=spec),
    ):
        with pytest.raises(RebasinError, match=r"^state_a must be a state_dict .* got the module Sequential"):
            call()
    with pytest.raises(RebasinError, match=r"^state_a must be a state_dict \(a mapping key -> tensor\), got list$"):
        rebasin.weight_matching(spec, list(a.state_dict().values()), b.state_dict())


def test_nan_checkpoint_on_a_path_names_the_key(pair):
    a, b, x, y, _ = pair
    sb = {k: v.clone() for k, v in b.state_dict().items()}
    sb["0.weight"][0, 0] = float("nan")
    with pytest.raises(RebasinError) as err:
        rebasin.evaluate_path(a, a.state_dict(), sb, [(x, y)], num_points=3)
    assert first_line(err) == (
        "'0.weight' (shape (8, 4)) of state_b contains 1 NaN value(s) of 32: a diverged checkpoint cannot be "
        "aligned, interpolated or evaluated; use a finite state"
    )
    sa = {k: v.clone() for k, v in a.state_dict().items()}
    sa["3.bias"][1] = float("inf")
    with pytest.raises(RebasinError, match=r"^'3.bias' \(shape \(3,\)\) of state_a contains 1 inf value\(s\) of 3"):
        rebasin.evaluate_path(a, sa, b.state_dict(), [(x, y)], num_points=3)


def test_nan_inside_a_path_object_names_t_and_the_key(pair):
    a, b, x, y, _ = pair
    sa, sb = a.state_dict(), b.state_dict()

    def noisy(t: float):
        state = rebasin.interpolate(sa, sb, t)
        if 0 < t < 1:
            state["1.running_var"] = state["1.running_var"] * float("nan")
        return state

    with pytest.raises(RebasinError) as err:
        rebasin.evaluate_path(a, None, None, [(x, y)], path=noisy, num_points=3)
    assert first_line(err) == (
        "'1.running_var' (shape (8,)) of the state at t=0.5 of the path noisy contains 8 NaN value(s) of 8: a "
        "diverged checkpoint cannot be aligned, interpolated or evaluated; use a finite state"
    )


def test_nan_loss_with_finite_states_and_nan_barrier(pair):
    a, b, x, y, _ = pair

    def nan_loss(out, target):
        return F.cross_entropy(out, target) * float("nan")

    with pytest.raises(RebasinError) as err:
        rebasin.evaluate_path(a, a.state_dict(), b.state_dict(), [(x, y)], num_points=3, loss_fn=nan_loss)
    assert first_line(err).startswith("the loss at t=0 is nan although every entry of the state at t=0 is finite")
    with pytest.raises(RebasinError) as err:
        rebasin.barrier([0.1, float("nan"), 0.2])
    assert first_line(err) == (
        "the loss curve is NaN or inf at t=[0.5]: a barrier of it is undefined (was a state along the path not "
        "finite?)"
    )


def test_float16_model_with_float32_data():
    torch.manual_seed(0)
    model = MLP(8, [16], 3).half()
    data = [(torch.randn(16, 8), torch.randint(0, 3, (16,)))]
    with pytest.raises(RebasinError) as err:
        rebasin.evaluate_path(model, model.state_dict(), model.state_dict(), data, num_points=3)
    assert first_line(err) == (
        "MLP cannot run on these inputs: the inputs are float32 but the model's state is float16 "
        "('layers.0.weight'); convert the inputs (x.to(torch.float16)) or the model (model.to(torch.float32)) "
        "(torch: mat1 and mat2 must have the same dtype, but got Float and Half)"
    )


def test_a_failure_unrelated_to_dtype_or_device_is_left_alone():
    model = MLP(8, [16], 3)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        training.evaluate(model, [(torch.randn(4, 9), torch.randint(0, 3, (4,)))])


# ------------------------------------------------------------------------------------------ empty loaders
def _empty_loader_calls(a, b, x, y, spec):
    sa, sb = (None, None) if a is None else (a.state_dict(), b.state_dict())
    return {
        "activation_matching": lambda: rebasin.activation_matching(a, b, [], spec=spec),
        "activation_correlations": lambda: rebasin.matching.activation_correlations(a, b, [], spec=spec),
        "activation_matching (traced)": lambda: rebasin.activation_matching(a, b, []),
        "reset_bn_stats": lambda: rebasin.reset_bn_stats(a, sa, []),
        "reset_bn_stats_": lambda: rebasin.paths.reset_bn_stats_(copy.deepcopy(a), []),
        "repair": lambda: rebasin.repair(a, sa, sb, 0.5, [], spec=spec),
        "repair_states": lambda: rebasin.paths.repair_states(a, [sa, sb], [0.5, 0.5], [], spec=spec),
        "repaired_path": lambda: rebasin.paths.repaired_path(a, sa, sb, [], spec=spec).state_dict_at(0.5),
        "channel_stats": lambda: rebasin.paths.channel_stats(a, sa, [], spec=spec),
        "evaluate_path": lambda: rebasin.evaluate_path(a, sa, sb, [], num_points=3),
        "evaluate_path bn_loader": lambda: rebasin.evaluate_path(a, sa, sb, [(x, y)], num_points=3, bn_loader=[]),
        "evaluate_path repair_loader": lambda: rebasin.evaluate_path(
            a, sa, sb, [(x, y)], num_points=3, repair=True, repair_loader=[], spec=spec),
        "merge": lambda: rebasin.merge([a, b], loader=[], spec=spec),
        "merge activation": lambda: rebasin.merge([a, b], method="activation_matching", loader=[], spec=spec),
        "cka": lambda: rebasin.landscape.cka(a, b, []),
        "mode_connectivity": lambda: rebasin.landscape.mode_connectivity(a, sa, sb, [], curve="linear", num_points=3),
        "mode_connectivity fit_loader": lambda: rebasin.landscape.mode_connectivity(
            a, sa, sb, [(x, y)], curve="bezier", fit_loader=[], epochs=1, num_points=3),
        "fit_curve": lambda: rebasin.fit_curve(a, rebasin.BezierCurve(sa, sb), [], epochs=1),
        "proximal_alternating_minimization": lambda: rebasin.paths.proximal_alternating_minimization(
            a, sa, sb, [], spec=spec, rounds=1, theta_steps=1),
        "ste_matching": lambda: rebasin.ste_matching(a, b, [], spec=spec),
        "SinkhornRebasin.fit": lambda: rebasin.SinkhornRebasin(a, b, spec=spec, cost="midpoint").fit([]),
        "align activation": lambda: rebasin.align(a, b, method="activation_matching", loader=[], spec=spec),
        "align ste": lambda: rebasin.align(a, b, method="ste", loader=[], spec=spec),
        "align sinkhorn": lambda: rebasin.align(a, b, method="sinkhorn", loader=[], spec=spec),
        "fit_classifier_": lambda: training.fit_classifier_(copy.deepcopy(a), [], epochs=1),
        "evaluate": lambda: training.evaluate(a, []),
    }  # fmt: skip


EMPTY_CALLS = list(_empty_loader_calls(*(None,) * 5))


@pytest.mark.parametrize("name", EMPTY_CALLS)
def test_every_data_driven_function_refuses_an_empty_loader(pair, name):
    call = _empty_loader_calls(*pair)[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RebasinError, match=r"yielded no (batch|batches|samples)") as err:
            call()
    assert len(str(err.value).splitlines()) == 1


def test_empty_loader_messages_of_the_training_loops(pair):
    a, b, x, y, spec = pair
    hint = ("the loader yielded no batches (an empty dataset, an exhausted iterator, or drop_last=True with fewer "
            "samples than batch_size?)")
    with pytest.raises(RebasinError) as err:
        rebasin.ste_matching(a, b, [], spec=spec)
    assert first_line(err) == f"ste_matching: {hint}"
    with pytest.raises(RebasinError) as err:
        rebasin.SinkhornRebasin(a, b, spec=spec, cost="midpoint").fit([])
    assert first_line(err) == f"SinkhornRebasin.fit: {hint}"
    with pytest.raises(RebasinError) as err:
        training.fit_classifier_(copy.deepcopy(a), [], epochs=1)
    assert first_line(err) == f"fit_classifier_: {hint}"


# ------------------------------------------------------------------------------------------ sinkhorn warnings
def test_sinkhorn_in_a_training_loop_warns_once_per_call_site():
    torch.manual_seed(0)
    logits = torch.randn(16, 16, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("default")  # Python's default: once per (text, category, location)
        for _ in range(400):
            s = rebasin.matching.sinkhorn(logits * 3 + 0.1 * torch.randn(16, 16), tau=0.01, n_iter=20)
            (s * torch.randn(16, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
    converge = [w for w in rec if "did not converge" in str(w.message)]
    assert len(converge) == 1
    w = converge[0].message
    assert isinstance(w, SinkhornConvergenceWarning) and isinstance(w, UserWarning)
    assert w.residual > 1e-6 and w.tol == 1e-6 and w.n_iter == 20 and w.tau == 0.01 and w.n == 16
    assert len(rec) <= 2  # plus at most one singular-backward warning, from the one backward site


def test_sinkhorn_return_info_gives_the_residual():
    torch.manual_seed(0)
    logits = torch.randn(6, 6)
    s, info = rebasin.matching.sinkhorn(logits, tau=1.0, n_iter=500, return_info=True)
    assert isinstance(info, SinkhornInfo) and info.converged and info.residual <= 1e-6
    assert info.n_iter < 500 and torch.allclose(s.sum(-1), torch.ones(6), atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = rebasin.matching.sinkhorn(logits * 50, tau=0.01, n_iter=3, return_info=True, warn=False)
    assert info.converged is False and info.residual > 1e-6 and info.n_iter == 3
    _, info = rebasin.matching.sinkhorn(logits, n_iter=7, tol=None, return_info=True)
    assert info == SinkhornInfo(residual=None, n_iter=7, converged=None)
    plain = rebasin.matching.sinkhorn(logits, n_iter=7, warn=False)
    assert torch.equal(plain, rebasin.matching.sinkhorn(logits, n_iter=7, warn=False, return_info=True)[0])


# ------------------------------------------------------------------------------------------ progress bars
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_none_follows_whether_stderr_is_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_enabled(None) is False and progress_enabled(True) is True
    assert list(progress_bar(range(3), None)) == [0, 1, 2]
    assert sys.stderr.getvalue() == ""
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert progress_enabled(None) is True and progress_enabled(False) is False
    with progress_counter(None, 2, desc="x", file=tty) as tick:
        tick(loss="1")
        tick()
    assert "x" in tty.getvalue()


def test_library_calls_draw_no_bar_when_stderr_is_not_a_terminal(pair, monkeypatch):
    a, b, x, y, spec = pair
    sa, sb = a.state_dict(), b.state_dict()
    data = [(x, y)] * 3
    log = io.StringIO()  # a piped or logged run
    monkeypatch.setattr(sys, "stderr", log)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebasin.SinkhornRebasin(a, b, spec=spec, cost="midpoint").fit(data)
        rebasin.fit_curve(a, rebasin.BezierCurve(sa, sb), data, epochs=2)
        rebasin.ste_matching(a, b, data, spec=spec)
        rebasin.evaluate_path(a, sa, sb, data, num_points=3)
        rebasin.landscape.mode_connectivity(a, sa, sb, data, curve="linear", num_points=3)
        training.fit_classifier_(copy.deepcopy(a), data, epochs=1)
    assert log.getvalue() == ""


def test_progress_true_still_draws_a_bar(pair, monkeypatch):
    a, b, x, y, spec = pair
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    rebasin.evaluate_path(a, a.state_dict(), b.state_dict(), [(x, y)], num_points=3, progress=True)
    assert "path" in log.getvalue()


def test_counts_that_are_not_ints_are_refused_by_the_shared_check():
    """max_batches / epochs / max_steps go through _common.check_int: 2.5 or True is not a count."""
    import torch
    from torch import nn

    from rebasin import activation_matching, ste_matching

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    with pytest.raises(RebasinError, match=r"max_batches must be an int >= 1, got 2.5"):
        activation_matching(model, model, data, max_batches=2.5)
    with pytest.raises(RebasinError, match=r"epochs must be an int >= 0, got 1.5"):
        ste_matching(model, model, data, epochs=1.5)
    with pytest.raises(RebasinError, match=r"max_steps must be an int >= 0, got True"):
        ste_matching(model, model, data, max_steps=True)


# ------------------------------------------------------------------------------------------ symmetry kinds
def test_orthogonal_map_through_a_gelu(capfd):
    from rebasin.spec import apply_transforms, random_orthogonal
    from rebasin.trace import symmetry_kinds

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    x = torch.randn(2, 4)
    spec = rebasin.spec_from_model(model, x)
    with pytest.raises(RebasinError) as err:
        apply_transforms(spec, {"P0": random_orthogonal(8, seed=0)}, model.state_dict(),
                         kinds=symmetry_kinds(model, x))
    assert first_line(err) == (
        "class 'P0' admits transforms up to 'permutation', not 'orthogonal': module '1' (GELU) is not known to "
        "commute with a rotation or sign flip of its input (an elementwise function, a mean over the features, or "
        "a module the analysis does not know). Transform it by a permutation only"
    )
    out, errout = capfd.readouterr()
    assert errout == "" and out == ""



def test_learned_orthogonal_map_through_a_gelu_and_a_nan_loss(capfd):
    from rebasin.matching import learn_transforms
    from rebasin.trace import fold_layernorm, symmetry_kinds

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3))
    x = torch.randn(2, 4)
    folded = fold_layernorm(model, x)
    spec, kinds = rebasin.spec_from_model(folded, x), symmetry_kinds(folded, x)
    data = [(torch.randn(4, 4), torch.randint(0, 3, (4,)))]
    with pytest.raises(RebasinError) as err:
        learn_transforms(folded, folded, data, spec=spec, kinds=kinds, learn=["P1"])
    assert first_line(err) == (
        "class 'P1' admits transforms up to 'permutation', not 'orthogonal': module '3' (GELU) is not known to "
        "commute with a rotation or sign flip of its input (an elementwise function, a mean over the features, or "
        "a module the analysis does not know). Transform it by a permutation only"
    )
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    with pytest.raises(RebasinError) as err:
        learn_transforms(folded, folded, data, spec=spec, kinds=kinds, loss_fn=lambda out, y: out.sum() / 0 * 0)
    assert first_line(err) == ("TransformRebasin.fit: the cost is nan at step 1; the fit stopped (the models are "
                               "untouched). Lower lr, check the loss and the data")
    assert all(torch.equal(v, before[k]) for k, v in folded.state_dict().items())
    out, errout = capfd.readouterr()
    assert errout == "" and out == ""

def test_fold_layernorm_of_a_post_ln_block():
    class PostLN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.f, self.norm, self.out = nn.Linear(3, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.inp(x))
            return self.out(self.norm(h + self.f(h)))

    torch.manual_seed(0)
    with pytest.raises(RebasinError) as err:
        rebasin.trace.fold_layernorm(PostLN(), torch.randn(2, 3))
    assert first_line(err).startswith("fold_layernorm: cannot fold the LayerNorm 'norm': its output goes into add")
