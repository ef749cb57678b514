"""Pin, don't refuse: what the tracer cannot prove safe is pinned to the identity, reported, and counted.

The default keeps the rest of the model permutable (one warning names the pinned units by module path and
source line); ``strict=True`` refuses as before; ``spec.coverage`` counts permutable and pinned hidden units.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rebasin
from rebasin import (
    PermutationSpec,
    RebasinError,
    RebasinWarning,
    permute,
    random_permutation,
    spec_from_model,
    weight_matching,
)
from rebasin.apps.cli import main
from rebasin.spec import SpecCoverage


def _line(cls: type, text: str) -> str:
    """``tests/test_pinning.py:N`` of the line of ``cls.forward`` containing ``text``."""
    lines, start = inspect.getsourcelines(cls.forward)
    return f"tests/test_pinning.py:{start + next(i for i, ln in enumerate(lines) if text in ln)}"


def _pin_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in rec if issubclass(w.category, RebasinWarning)]


class InputResidual(nn.Module):
    """``head(relu(x + l2(relu(bn(l1(x))))))``: the input pins the stream; l1's 32 units could move."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.bn, self.l2, self.head = nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(x + self.l2(F.relu(self.bn(self.l1(x))))))


_X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tracer", ["fx", "dynamic"])
def test_input_residual_pins_the_stream_and_keeps_the_hidden_units_permutable(tracer):
    model = InputResidual().eval()
    before = copy.deepcopy(model.state_dict())
    spec, msgs = _pin_warnings(spec_from_model, model, _X, tracer=tracer)  # the functional check runs
    assert len(msgs) == 1, msgs
    where = "the \\+" if tracer == "fx" else "Tensor\\.add"
    assert re.search(rf"- l2: 16 unit\(s\) pinned: {where} in InputResidual\.forward "
                     rf"\({re.escape(_line(InputResidual, 'x + self.l2'))}\): [^\n]*unpermuted", msgs[0]), msgs[0]
    assert "node '" not in msgs[0] and "add_" not in msgs[0]
    assert spec.axes["l1.weight"] == ("P0", None) and spec.axes["bn.running_mean"] == ("P0",)
    assert spec.axes["l2.weight"] == (None, "P0") and spec.axes["l2.bias"] == (None,)
    assert dict(spec.sizes) == {"P0": 32}
    assert dict(spec.coverage.modules) == {"l1": (32, 0), "l2": (0, 16)}
    assert (spec.coverage.permutable, spec.coverage.pinned) == (32, 16)
    (pin,) = spec.coverage.pins
    assert pin.module == "l2" and pin.units == 16 and pin.line == _line(InputResidual, "x + self.l2")
    for seed in (1, 2, 3):  # equivalence with randomised BatchNorm statistics
        spec.check(model, _X, seed=seed)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is not mutated
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # the recorder's are gone


def test_weight_matching_recovers_a_planted_permutation_of_the_free_units():
    torch.manual_seed(0)
    model = InputResidual().eval()
    with pytest.warns(RebasinWarning, match="pinned"):
        spec = spec_from_model(model, _X)
    state_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    planted = random_permutation(spec, seed=7)
    assert not torch.equal(planted["P0"], torch.arange(32))
    state_b = permute(spec, planted, state_a)
    perms = weight_matching(spec, state_a, state_b, seed=0)
    back = permute(spec, perms, state_b)
    for k in state_a:
        torch.testing.assert_close(back[k], state_a[k], rtol=0, atol=0)
    y_a = torch.func.functional_call(model, state_a, (_X,))
    y_b = torch.func.functional_call(model, state_b, (_X,))
    torch.testing.assert_close(y_b, y_a)


def test_strict_refuses_the_input_residual_naming_module_path_and_line():
    with pytest.raises(RebasinError) as info:
        spec_from_model(InputResidual(), _X, strict=True)
    msg = str(info.value)
    assert f"the + in InputResidual.forward ({_line(InputResidual, 'x + self.l2')})" in msg, msg
    assert "['P1']" in msg and "unpermuted" in msg and "Without strict=True" in msg and "node '" not in msg


class UnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cumsum(F.relu(self.a(x)), -1)  # mixes a's units: no rule knows it
        return self.c(F.relu(self.b(h)))


def test_an_unknown_op_pins_its_input_and_the_rest_stays_permutable():
    spec, msgs = _pin_warnings(spec_from_model, UnknownOp(), torch.randn(3, 5))
    assert len(msgs) == 1
    assert f"- a: 8 unit(s) pinned: torch.cumsum in UnknownOp.forward ({_line(UnknownOp, 'cumsum')}): " in msgs[0]
    assert spec.axes["a.weight"] == (None, None) and spec.axes["b.weight"] == ("P0", None)
    assert dict(spec.coverage.modules) == {"a": (0, 8), "b": (6, 0)}
    with pytest.raises(RebasinError, match=re.escape(f"torch.cumsum in UnknownOp.forward ({_line(UnknownOp, 'cumsum')})")):
        spec_from_model(UnknownOp(), torch.randn(3, 5), strict=True)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.mix = nn.Linear(6, 6), nn.Bilinear(6, 6, 6)  # nn.Bilinear has no layer rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inner(x))
        return self.mix(h, h)


class WithUnregistered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.head = nn.Linear(4, 6), Block(), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.block(F.relu(self.stem(x)))))


@pytest.mark.parametrize("tracer", ["fx", "dynamic"])
def test_a_module_without_a_rule_pins_instead_of_refusing(tracer):
    model = WithUnregistered().eval()
    spec, msgs = _pin_warnings(spec_from_model, model, torch.randn(3, 4), tracer=tracer)
    assert len(msgs) == 1, msgs
    line = _line(Block, "self.mix(h, h)")
    assert f"- block.inner: 6 unit(s) pinned: block.mix (Bilinear, {line}): module type Bilinear" in msgs[0], msgs[0]
    assert "- block.mix: 6 unit(s) pinned: no rule gave permutations to its weights (weight)" in msgs[0]
    assert spec.perms == ("P0",) and spec.axes["stem.weight"] == ("P0", None)
    assert dict(spec.coverage.modules) == {"stem": (6, 0), "block.inner": (0, 6), "block.mix": (0, 6)}
    with pytest.raises(RebasinError, match=re.escape(f"block.mix (Bilinear, {line})")):
        spec_from_model(model, torch.randn(3, 4), strict=True, tracer=tracer)


class Pinned(nn.Module):
    """A leaf whose rule knows its hidden units cannot move and says so with ``ctx.pin``."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in, self.w_out = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(4, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.roll(F.relu(x @ self.w_in.T), 1, -1) @ self.w_out.T


def _pinned_rule(ctx):
    hidden = ctx.new_permutation(size=5)
    ctx.assign("w_in", (hidden, ctx.input[-1]))
    ctx.assign("w_out", (ctx.input[-1], hidden))
    ctx.pin("torch.roll shifts the hidden units", hidden)
    return ctx.input


def test_a_rule_pins_on_purpose_and_strict_keeps_the_pin():
    model = nn.Sequential(nn.Linear(3, 4), Pinned(), nn.ReLU(), nn.Linear(4, 2))
    with rebasin.trace.registration_scope():
        rebasin.register_module(Pinned, rule=_pinned_rule)
        for strict in (False, True):
            spec, msgs = _pin_warnings(spec_from_model, model, torch.randn(2, 3), strict=strict)
            assert len(msgs) == 1 and "- 1: 5 unit(s) pinned: 1 (Pinned): torch.roll shifts the hidden units" in msgs[0]
            assert spec.axes["1.w_in"] == (None, "P0") and dict(spec.coverage.modules) == {"0": (4, 0), "1": (0, 5)}


class NothingLeft(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.l1(x))


def test_nothing_left_to_permute_warns_once_and_align_says_nothing_to_align():
    a, b = NothingLeft(), NothingLeft()
    state_b = copy.deepcopy(b.state_dict())
    spec, msgs = _pin_warnings(spec_from_model, a, torch.randn(2, 8))
    assert len(msgs) == 1 and "Nothing is left to permute: alignment has nothing to align" in msgs[0]
    assert spec.perms == () and (spec.coverage.permutable, spec.coverage.pinned) == (0, 8)
    res, msgs = _pin_warnings(rebasin.align, a, b, example_input=torch.randn(2, 8))  # traces A and B
    assert len(msgs) == 2 and "Nothing is left to permute" in msgs[0] and "nothing to align" in msgs[1], msgs
    assert res.perms == {}
    assert all(torch.equal(v, state_b[k]) for k, v in b.state_dict().items())  # nothing mutated


def test_coverage_is_plain_data_and_not_part_of_spec_equality():
    with pytest.warns(RebasinWarning):
        spec = spec_from_model(InputResidual(), _X)
    cov = spec.coverage
    assert SpecCoverage.from_dict(json.loads(json.dumps(cov.as_dict()))) == cov
    assert spec.with_sizes(InputResidual().state_dict()).coverage == cov
    assert spec.renamed({"P0": "hidden"}).coverage == cov
    assert PermutationSpec(spec.axes) == spec  # coverage is reporting, not structure
    assert "coverage: 32 of 48 hidden units permutable (66.7%), 16 pinned" in cov.summary()
    clean = spec_from_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 3))
    assert dict(clean.coverage.modules) == {"0": (4, 0)} and clean.coverage.pins == ()


# --------------------------------------------------------------------------- the command line
def input_residual() -> nn.Module:
    return InputResidual()


def nothing_left() -> nn.Module:
    return NothingLeft()


def _align_argv(tmp_path, factory, shape):
    """``rebasin align`` arguments for two checkpoints of ``factory`` (seeds 0 and 1); returns them and ``-o``."""
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for seed, path in enumerate(paths):
        torch.manual_seed(seed)
        torch.save(factory().state_dict(), path)
    out = tmp_path / "o.pt"
    return ["align", *map(str, paths), "--model", f"{__name__}:{factory.__name__}", "--example-shape", shape,
            "-o", str(out)], out


def test_cli_align_prints_coverage_and_strict_refuses(tmp_path, capsys):
    argv, out = _align_argv(tmp_path, input_residual, "4,16")
    with pytest.warns(RebasinWarning, match="- l2: 16 unit"):
        assert main(argv) == 0
    assert "coverage: 32 of 48 hidden units permutable (66.7%), 16 pinned" in capsys.readouterr().out
    assert out.exists()
    assert main(argv + ["--strict"]) == 2
    err = capsys.readouterr().err
    assert "error: spec_from_model(strict=True) cannot prove the + in InputResidual.forward (" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_align_exits_2_when_nothing_is_left_to_align(tmp_path, capsys):
    argv, out = _align_argv(tmp_path, nothing_left, "2,8")
    with pytest.warns(RebasinWarning, match="Nothing is left to permute"):
        assert main(argv) == 2
    captured = capsys.readouterr()
    assert "error: nothing to align: tracing NothingLeft left no permutation" in captured.err
    assert "coverage: 0 of 8 hidden units permutable" in captured.out
    assert not out.exists()


def test_a_small_llama_traces_and_aligns_what_it_can_instead_of_being_refused():
    """Rules for RMSNorm / rotary attention may pin nothing at all; whatever is pinned is named by module path."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with rebasin.trace.registration_scope():  # tracing registers the transformers rules on demand
        spec, msgs = _pin_warnings(spec_from_model, model, torch.randint(0, 64, (1, 8)))  # the check runs
    assert len(msgs) <= 1
    for line in (msgs[0].splitlines()[1:] if msgs else []):
        if line.startswith("  - "):
            assert re.match(r"  - model\.[\w.]+: \d+ unit\(s\) pinned: .* in model\.[\w.]+ \(transformers/[\w/]+\.py:"
                            r"\d+\): ", line), line
    assert spec.coverage.permutable >= 2 * 64  # at least the MLP units of both layers
    state_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state_b = permute(spec, random_permutation(spec, seed=3), state_a)
    back = permute(spec, weight_matching(spec, state_a, state_b), state_b)
    assert all(torch.equal(back[k], state_a[k]) for k in state_a)
