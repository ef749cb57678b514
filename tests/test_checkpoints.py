"""Checkpoints on disk: open_checkpoint (read one tensor at a time), save_permuted (stream a permuted copy)
and weight matching over checkpoints (the lazy engine, same permutations as in memory)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

from rebasin import (
    PermutationSpec,
    RebasinError,
    open_checkpoint,
    permute,
    random_permutation,
    save_permuted,
    spec_from_model,
    weight_matching,
)
from rebasin.matching.weight_lazy import weight_matching_lazy
from rebasin.spec import Checkpoint


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 3),
    )


def _save(state: dict[str, torch.Tensor], path) -> Checkpoint:
    """Write ``state`` as ``path`` (.pt with torch.save, .safetensors through save_permuted with no perms)."""
    if str(path).endswith(".pt"):
        torch.save(state, path)
    else:
        spec = PermutationSpec({k: (None,) * v.ndim for k, v in state.items()})
        save_permuted(spec, {}, state, path)
    return open_checkpoint(path)


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_round_trip_and_read_only(tmp_path, make_mlp, ext):
    state = _state(make_mlp(4, [6], 3, bn=True, seed=0))
    state["extra.half"] = torch.randn(3, 2).to(torch.bfloat16)
    state["extra.scalar"] = torch.tensor(2.5, dtype=torch.float64)
    ckpt = _save(state, tmp_path / f"m{ext}")
    assert list(ckpt) == list(state) and len(ckpt) == len(state) and "0.weight" in ckpt
    for k, v in state.items():
        got = ckpt[k]
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
        meta = ckpt.meta(k)
        assert meta.device.type == "meta" and meta.shape == v.shape and meta.dtype == v.dtype
    got = ckpt["0.weight"]
    got.add_(1.0)  # the caller owns what it reads: the next read is unchanged
    assert torch.equal(ckpt["0.weight"], state["0.weight"])
    with pytest.raises(TypeError, match="read-only"):
        ckpt["0.weight"] = torch.zeros(6, 4)  # type: ignore[index]  # the wrong type is the input under test
    with pytest.raises(TypeError, match="read-only"):
        del ckpt["0.weight"]  # type: ignore[attr-defined]  # the wrong type is the input under test
    with pytest.raises(KeyError):
        ckpt["nope"]


def test_safetensors_file_matches_the_reference_library(tmp_path, make_mlp):
    st = pytest.importorskip("safetensors.torch")
    state = _state(make_mlp(4, [6], 3, seed=0))
    _save(state, tmp_path / "m.safetensors")
    theirs = st.load_file(str(tmp_path / "m.safetensors"))
    assert all(torch.equal(theirs[k], state[k]) for k in state)
    st.save_file(state, str(tmp_path / "ref.safetensors"))
    ours = open_checkpoint(tmp_path / "ref.safetensors")
    assert all(torch.equal(ours[k], state[k]) for k in state)


def _concat_spec_and_state():
    torch.manual_seed(3)
    hid = 5
    lstm = nn.LSTM(4, hid, batch_first=True)
    spec = PermutationSpec(
        {"weight_ih_l0": ("G", None), "weight_hh_l0": ("G", "H"), "bias_ih_l0": ("G",), "bias_hh_l0": ("G",)},
        concat={"G": (("H", hid),) * 4},
    )
    return spec, _state(lstm)


def _cases(make_mlp):
    mlp = make_mlp(4, [8, 6], 3, seed=0)
    cnn = _cnn(0)
    x = torch.randn(2, 3, 4, 4)
    yield spec_from_model(mlp, torch.randn(2, 4)), _state(mlp)
    yield spec_from_model(cnn, x), _state(cnn)
    yield _concat_spec_and_state()
    lin = nn.Linear(6, 6)
    yield PermutationSpec({"weight": ("P", "P"), "bias": ("P",)}), _state(lin)
    conv = nn.Conv2d(6, 9, 3, groups=3)
    yield PermutationSpec(
        {"weight": ("O", "I", None, None), "bias": ("O",)},
        structure={"I": ("G", 2), "O": ("G", 3)},
        grouped={("weight", 1): 3},
    ), _state(conv)


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_save_permuted_equals_permute(tmp_path, make_mlp, ext):
    for i, (spec, state) in enumerate(_cases(make_mlp)):
        perms = random_permutation(spec, seed=i + 1, sizes=spec.validate(state))
        expected = permute(spec, perms, state)
        src = _save(state, tmp_path / f"src{i}.safetensors")
        for source in (state, src):
            out = tmp_path / f"out{i}{ext}"
            save_permuted(spec, perms, source, out)
            got = open_checkpoint(out)
            assert list(got) == list(spec.axes)
            for k in expected:
                assert torch.equal(got[k], expected[k]), (i, k)


def test_lazy_weight_matching_gives_the_in_memory_permutations(tmp_path, make_mlp):
    a = _state(make_mlp(5, [16, 12, 10], 3, seed=0))
    b = _state(make_mlp(5, [16, 12, 10], 3, seed=1))
    spec = spec_from_model(make_mlp(5, [16, 12, 10], 3, seed=0), torch.randn(2, 5))
    ca, cb = _save(a, tmp_path / "a.safetensors"), _save(b, tmp_path / "b.pt")
    for seed in (0, 3):
        ref, info_ref = weight_matching(spec, a, b, seed=seed, return_info=True)
        got, info = weight_matching(spec, ca, cb, seed=seed, return_info=True)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
        assert info.n_sweeps == info_ref.n_sweeps and info.n_solves == info_ref.n_solves
        assert (info.n_full_builds, info.n_lowrank_updates) == (info_ref.n_full_builds, info_ref.n_lowrank_updates)
        assert info.objective == pytest.approx(info_ref.objective, rel=1e-5)
    # a permuted copy of A is recovered exactly, from checkpoints
    perms = random_permutation(spec, seed=7, sizes=spec.validate(a))
    save_permuted(spec, perms, ca, tmp_path / "ap.safetensors")
    back, info = weight_matching(spec, ca, open_checkpoint(tmp_path / "ap.safetensors"), return_info=True)
    moved = permute(spec, back, dict(open_checkpoint(tmp_path / "ap.safetensors")))
    assert all(torch.equal(moved[k], a[k]) for k in a)


def test_lazy_engine_on_a_concatenation_finds_the_optimum():
    for spec, state in (_concat_spec_and_state(),):
        perms = random_permutation(spec, seed=2, sizes=spec.validate(state))
        noisy = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) for k, v in state.items()}
        b = permute(spec, perms, noisy)
        got, _ = weight_matching_lazy(spec, state, b)
        moved = permute(spec, got, b)
        # the objective at the answer is at least that at the true inverse permutations
        truth = permute(spec, {k: torch.argsort(v) for k, v in perms.items()}, b)
        dot = sum(float((state[k] * moved[k]).sum()) for k in state)
        best = sum(float((state[k] * truth[k]).sum()) for k in state)
        assert dot >= best - 1e-4


def _structured_specs() -> dict[str, tuple[PermutationSpec, nn.Module]]:
    """Hand-written structured specs (as in tests/test_spec_structure.py) and a module to draw weights from."""
    e, h, hid = 12, 3, 5
    mha = PermutationSpec(
        {"in_proj_weight": ("QKV", "R"), "in_proj_bias": ("QKV",), "out_proj.weight": ("R", "VO"), "out_proj.bias": ("R",)},
        structure={"QK": ("H", e // h), "VO": ("H", e // h)},
        concat={"QKV": (("QK", e), ("QK", e), ("VO", e))},
    )
    grouped = PermutationSpec({"weight": ("O", "I", None, None), "bias": ("O",)},
                              structure={"I": ("G", 2), "O": ("G", 3)}, grouped={("weight", 1): 3})
    lstm = PermutationSpec(
        {"weight_ih_l0": ("G", None), "weight_hh_l0": ("G", "H"), "bias_ih_l0": ("G",), "bias_hh_l0": ("G",)},
        concat={"G": (("H", hid),) * 4},
    )
    pwp = PermutationSpec({"weight": ("P", "P"), "bias": ("P",)})
    return {
        "mha": (mha, lambda: nn.MultiheadAttention(e, h)),
        "grouped": (grouped, lambda: nn.Conv2d(6, 9, 3, groups=3)),
        "lstm": (lstm, lambda: nn.LSTM(4, hid)),
        "pwp": (pwp, lambda: nn.Linear(16, 16)),
    }


@pytest.mark.parametrize("name", ["mha", "grouped", "lstm", "pwp"])
def test_lazy_structured_specs_give_the_in_memory_permutations(tmp_path, name):
    spec, make = _structured_specs()[name]
    torch.manual_seed(0)
    a, b = _state(make()), _state(make())
    ca, cb = _save(a, tmp_path / "a.safetensors"), _save(b, tmp_path / "b.pt")
    for seed in (0, 1, 2):
        ref, info_ref = weight_matching(spec, a, b, seed=seed, return_info=True)
        got, info = weight_matching(spec, ca, cb, seed=seed, return_info=True)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), (name, seed)
        assert (info.n_sweeps, info.n_solves, info.n_skipped) == (info_ref.n_sweeps, info_ref.n_solves, info_ref.n_skipped)
        assert (info.n_full_builds, info.n_lowrank_updates) == (info_ref.n_full_builds, info_ref.n_lowrank_updates)
        assert info.objective == pytest.approx(info_ref.objective, rel=1e-6)
        assert info.initial_objective == pytest.approx(info_ref.initial_objective, rel=1e-6)
    # a permuted copy of A (heads moved, units moved inside heads), streamed to disk: same answer as in memory
    # (a lone block can stop in a local optimum from the identity, in memory as well)
    perms = random_permutation(spec, seed=3, sizes=spec.validate(a))
    save_permuted(spec, perms, ca, tmp_path / "ap.safetensors")
    planted = open_checkpoint(tmp_path / "ap.safetensors")
    back, ref = weight_matching(spec, ca, planted), weight_matching(spec, a, permute(spec, perms, a))
    assert all(torch.equal(back[k], ref[k]) for k in ref), name
    back = weight_matching(spec, ca, planted, init={k: torch.argsort(v) for k, v in perms.items()})
    moved = permute(spec, back, dict(planted))
    assert all(torch.equal(moved[k], a[k]) for k in a), name  # the truth is a fixed point


def test_lazy_structured_unit_with_init_and_plain_neighbours(tmp_path):
    # an MHA block between two plain layers: structured units, plain units and low-rank updates side by side
    e, h = 8, 2
    spec = PermutationSpec(
        {"inp.weight": ("R", None), "inp.bias": ("R",),
         "in_proj_weight": ("QKV", "R"), "in_proj_bias": ("QKV",), "out_proj.weight": ("S", "VO"), "out_proj.bias": ("S",),
         "head.weight": (None, "S")},
        structure={"QK": ("H", e // h), "VO": ("H", e // h)},
        concat={"QKV": (("QK", e), ("QK", e), ("VO", e))},
    )
    g = torch.Generator().manual_seed(4)

    def draw() -> dict[str, torch.Tensor]:
        shapes = {"inp.weight": (e, 5), "inp.bias": (e,), "in_proj_weight": (3 * e, e), "in_proj_bias": (3 * e,),
                  "out_proj.weight": (e, e), "out_proj.bias": (e,), "head.weight": (3, e)}
        return {k: torch.randn(v, generator=g) for k, v in shapes.items()}

    a, b = draw(), draw()
    ca, cb = _save(a, tmp_path / "a.safetensors"), _save(b, tmp_path / "b.safetensors")
    init = random_permutation(spec, seed=5, sizes=spec.validate(a))
    for kwargs in ({"init": init}, {"n_iter": 0, "init": init}, {"n_iter": 1}, {"seed": 4}):
        ref = weight_matching(spec, a, b, **kwargs)
        got = weight_matching(spec, ca, cb, **kwargs)
        assert all(torch.equal(ref[k], got[k]) for k in ref), kwargs


@pytest.fixture(scope="module")
def tiny_gpt2():
    """A 2-layer, 32-wide GPT-2 from a config, its spec and a second model (module scope: tracing registers
    transformers' Conv1D layer rule once, before the per-test registry guard)."""
    transformers = pytest.importorskip("transformers")
    import warnings

    from rebasin.trace import trace_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model_a = transformers.GPT2LMHeadModel(cfg).eval()
    model_b = transformers.GPT2LMHeadModel(cfg).eval()
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    return trace_model(model_a, x).spec, _state(model_a), _state(model_b)


def test_lazy_tiny_gpt2_gives_the_in_memory_permutations(tmp_path, tiny_gpt2):
    spec, a, b = tiny_gpt2
    assert spec.structure
    a = {k: v for k, v in a.items() if k in spec.axes}
    b = {k: v for k, v in b.items() if k in spec.axes}
    ca, cb = _save(a, tmp_path / "a.safetensors"), _save(b, tmp_path / "b.safetensors")
    ref, info_ref = weight_matching(spec, a, b, return_info=True)
    got, info = weight_matching(spec, ca, cb, return_info=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert (info.n_sweeps, info.n_solves, info.n_lowrank_updates) == (info_ref.n_sweeps, info_ref.n_solves, info_ref.n_lowrank_updates)
    assert info.objective == pytest.approx(info_ref.objective, rel=1e-6)


def test_bad_inputs(tmp_path, make_mlp):
    state = _state(make_mlp(4, [6], 3, seed=0))
    spec = spec_from_model(make_mlp(4, [6], 3, seed=0), torch.randn(2, 4))
    with pytest.raises(RebasinError, match="does not exist"):
        open_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "m.npz").write_bytes(b"x")
    with pytest.raises(RebasinError, match="unsupported extension"):
        open_checkpoint(tmp_path / "m.npz")
    with pytest.raises(RebasinError, match="unsupported extension"):
        save_permuted(spec, {}, state, tmp_path / "out.npz")
    # keys that do not match the spec: the key is named, and nothing is written
    other = _state(make_mlp(4, [6, 6], 3, seed=0))
    ck = _save(other, tmp_path / "other.safetensors")
    good = _save(state, tmp_path / "good.safetensors")
    with pytest.raises(RebasinError, match="2.weight|4.weight"):
        weight_matching(spec, good, ck)
    with pytest.raises(RebasinError, match="4.weight"):
        save_permuted(spec, {}, ck, tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # a shape that does not match
    wide = dict(state)
    wide["2.weight"] = torch.randn(3, 7)
    with pytest.raises(RebasinError, match="2.weight"):
        weight_matching(spec, good, _save(wide, tmp_path / "wide.safetensors"))
    # NaN: the same error as in memory
    bad = dict(state)
    bad["0.bias"] = bad["0.bias"].clone()
    bad["0.bias"][1] = float("nan")
    with pytest.raises(RebasinError, match=r"state_b\['0.bias'\].*NaN"):
        weight_matching(spec, state, bad)
    with pytest.raises(RebasinError, match=r"state_b\['0.bias'\].*NaN"):
        weight_matching(spec, good, _save(bad, tmp_path / "nan.safetensors"))
    # bad perms for save_permuted
    with pytest.raises(RebasinError, match="not a permutation"):
        save_permuted(spec, {"P0": torch.zeros(6, dtype=torch.long)}, good, tmp_path / "x.safetensors")
    # truncated and malformed safetensors files
    raw = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-5])
    with pytest.raises(RebasinError, match="truncated"):
        open_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(RebasinError, match="not a safetensors file"):
        open_checkpoint(tmp_path / "tiny.safetensors")
    body = b"{not json"
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(RebasinError, match="not JSON"):
        open_checkpoint(tmp_path / "junk.safetensors")
    head = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "size.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 8)
    with pytest.raises(RebasinError, match="4 bytes"):
        open_checkpoint(tmp_path / "size.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(RebasinError, match="cannot read"):
        open_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(RebasinError, match="state_dict or a Checkpoint"):
        save_permuted(spec, {}, [1, 2], tmp_path / "y.safetensors")  # type: ignore[arg-type]  # the wrong type is the input under test


def cli_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 3))


def test_cli_align_on_safetensors_streams_the_aligned_checkpoint(tmp_path, capsys):
    from rebasin.apps.cli import main

    torch.manual_seed(0)
    a = _state(cli_net())
    spec = spec_from_model(cli_net(), torch.randn(2, 4))
    perms = random_permutation(spec, seed=3, sizes=spec.validate(a))
    _save(a, tmp_path / "a.safetensors")
    save_permuted(spec, perms, a, tmp_path / "b.safetensors")
    for out in ("out.safetensors", "out.pt"):
        code = main(["align", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--model",
                     f"{__name__}:cli_net", "--example-shape", "1,4", "-o", str(tmp_path / out),
                     "--save-perms", str(tmp_path / "perms.pt"), "--device", "cpu"])
        assert code == 0 and "one tensor at a time" in capsys.readouterr().out
        aligned = open_checkpoint(tmp_path / out)
        assert all(torch.equal(aligned[k], a[k]) for k in a)
    # the in-memory path reads safetensors too (another matcher), and writes a .safetensors output
    code = main(["align", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--model",
                 f"{__name__}:cli_net", "--example-shape", "1,4", "-o", str(tmp_path / "id.safetensors"),
                 "--method", "identity", "--device", "cpu"])
    assert code == 0
    assert torch.equal(open_checkpoint(tmp_path / "id.safetensors")["0.weight"], open_checkpoint(tmp_path / "b.safetensors")["0.weight"])
    code = main(["align", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--model",
                 f"{__name__}:cli_net", "--example-shape", "1,4", "-o", str(tmp_path / "x.npz"), "--device", "cpu"])
    assert code == 2 and ".safetensors" in capsys.readouterr().err


def test_docstring_examples_run():
    import doctest

    from rebasin.spec import checkpoint

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    tests = [t for obj in (checkpoint.open_checkpoint, checkpoint.save_permuted, checkpoint.save_state) for t in finder.find(obj, globs={})]
    assert sum(len(t.examples) for t in tests) >= 8
    for t in tests:
        runner.run(t)
    assert runner.failures == 0


def test_lazy_matches_in_memory_with_init_and_on_p_w_pt(tmp_path, make_mlp):
    a = _state(make_mlp(5, [12, 10], 3, bn=True, seed=0))
    b = _state(make_mlp(5, [12, 10], 3, bn=True, seed=1))
    spec = spec_from_model(make_mlp(5, [12, 10], 3, bn=True, seed=0), torch.randn(2, 5))
    init = random_permutation(spec, seed=5, sizes=spec.validate(a))
    ca, cb = _save(a, tmp_path / "a.safetensors"), _save(b, tmp_path / "b.safetensors")
    for kwargs in ({"init": init}, {"n_iter": 0, "init": init}, {"n_iter": 1}):
        ref = weight_matching(spec, a, b, **kwargs)
        got = weight_matching(spec, ca, cb, **kwargs)
        assert all(torch.equal(ref[k], got[k]) for k in ref), kwargs
    # one permutation on both axes of a tensor (P W P^T) and on a plain tensor: same steps as in memory
    g = torch.Generator().manual_seed(0)
    spec2 = PermutationSpec({"w": ("P", "P"), "v": ("P", None)})
    s_a = {"w": torch.randn(16, 16, generator=g), "v": torch.randn(16, 3, generator=g)}
    s_b = {"w": torch.randn(16, 16, generator=g), "v": torch.randn(16, 3, generator=g)}
    for seed in (0, 1):
        got, _ = weight_matching_lazy(spec2, s_a, s_b, seed=seed)
        ref = weight_matching(spec2, s_a, s_b, seed=seed)
        assert torch.equal(got["P"], ref["P"])


def test_merge_checkpoints_equals_merge_without_repair(tmp_path, make_mlp):
    from rebasin import merge, merge_checkpoints

    models = [make_mlp(5, [12, 10], 3, bn=True, seed=s) for s in range(3)]
    spec = spec_from_model(models[0], torch.randn(2, 5))
    paths = []
    for i, m in enumerate(models):
        _save(_state(m), tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    for n in (2, 3):
        ref, info = merge(models[:n], spec=spec, repair=False, n_iter=5, return_info=True)
        perms = merge_checkpoints(spec, paths[:n], tmp_path / "merged.safetensors", n_iter=5)
        got = open_checkpoint(tmp_path / "merged.safetensors")
        expected = ref.state_dict()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-6)
        for a, p in zip(info.alignments[1:], perms[1:]):
            assert all(torch.equal(a.perms[k], p[k]) for k in p)
    with pytest.raises(RebasinError, match="two or more"):
        merge_checkpoints(spec, paths[:1], tmp_path / "x.safetensors")
    with pytest.raises(RebasinError, match="reference"):
        merge_checkpoints(spec, paths, tmp_path / "x.safetensors", reference=3)
    other = _save(_state(make_mlp(5, [12, 11], 3, bn=True, seed=0)), tmp_path / "other.safetensors")
    with pytest.raises(RebasinError, match="4.weight|sources\\[1\\]"):
        merge_checkpoints(spec, [paths[0], other], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------- row slices


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_read_rows_equals_a_slice_of_the_tensor(tmp_path, ext):
    g = torch.Generator().manual_seed(0)
    state = {"e": torch.randn(7, 3, 2, generator=g), "h": torch.randn(5, 4, generator=g).to(torch.bfloat16),
             "v": torch.randn(6, generator=g), "s": torch.tensor(1.5)}
    ckpt = _save(state, tmp_path / f"m{ext}")
    for key in ("e", "h", "v"):
        rows = state[key].shape[0]
        for a, b in ((0, rows), (0, 1), (2, 5), (rows - 1, rows), (3, 3)):
            got = ckpt.read_rows(key, a, b)
            assert got.dtype == state[key].dtype and torch.equal(got, state[key][a:b]), (key, a, b)
    got = ckpt.read_rows("e", 1, 3)
    got.add_(1.0)  # the caller owns the slice
    assert torch.equal(ckpt["e"], state["e"])
    with pytest.raises(KeyError):
        ckpt.read_rows("nope", 0, 1)
    with pytest.raises(RebasinError, match="scalar"):
        ckpt.read_rows("s", 0, 1)
    for a, b in ((-1, 2), (3, 2), (0, 8), (0.0, 2), (True, 2)):
        with pytest.raises(RebasinError, match="not a range"):
            ckpt.read_rows("e", a, b)  # type: ignore[arg-type]  # the wrong type is the input under test


def test_row_ranges_cut_only_big_tensors_with_an_unpermuted_first_axis():
    from rebasin.spec.checkpoint import row_ranges

    spec = PermutationSpec({"emb": (None, "P"), "w": ("P", None), "b": ("P",), "s": ()})
    meta = {"emb": torch.empty(10, 4, device="meta"), "w": torch.empty(4, 10, device="meta"),
            "b": torch.empty(4, device="meta"), "s": torch.empty((), device="meta")}
    assert row_ranges(spec, "emb", meta["emb"], 48) == [(0, 3), (3, 6), (6, 9), (9, 10)]  # 16-byte rows
    assert row_ranges(spec, "emb", meta["emb"], 1) == [(i, i + 1) for i in range(10)]  # at least one row each
    assert row_ranges(spec, "emb", meta["emb"], 160) is None  # small enough to read whole
    assert row_ranges(spec, "w", meta["w"], 8) is None  # P acts on the rows
    assert row_ranges(spec, "s", meta["s"], 1) is None
    spec, _ = _structured_specs()["grouped"]  # a grouped axis needs the rows (its permutation acts on axis 0 too)
    assert row_ranges(spec, "weight", torch.empty(9, 2, 3, 3, device="meta"), 8) is None


def _embedding_spec_and_states():
    """An embedding, a 3-d tensor with two permutations behind an unpermuted first axis, and plain layers."""
    spec = PermutationSpec({
        "emb": (None, "P"), "w1": ("Q", "P"), "b1": ("Q",), "t3": (None, "Q", "R"),
        "w2": ("R", "Q"), "b2": ("R",), "head": (None, "R"),
    })
    shapes = {"emb": (40, 12), "w1": (10, 12), "b1": (10,), "t3": (9, 10, 8), "w2": (8, 10), "b2": (8,), "head": (30, 8)}
    g = torch.Generator().manual_seed(11)
    return spec, *({k: torch.randn(v, generator=g) for k, v in shapes.items()} for _ in range(2))


@pytest.mark.parametrize("chunk_bytes", [1, 100, 1000])
def test_lazy_matching_in_slices_of_rows_gives_the_in_memory_permutations(tmp_path, chunk_bytes):
    spec, a, b = _embedding_spec_and_states()
    ca, cb = _save(a, tmp_path / "a.safetensors"), _save(b, tmp_path / "b.pt")
    init = random_permutation(spec, seed=2, sizes=spec.validate(a))
    for kwargs in ({}, {"seed": 3}, {"init": init}, {"n_iter": 1}):
        ref, info_ref = weight_matching(spec, a, b, return_info=True, **kwargs)
        for sa, sb in ((ca, cb), (a, cb)):
            got, info = weight_matching_lazy(spec, sa, sb, chunk_bytes=chunk_bytes, **kwargs)
            assert all(torch.equal(ref[k], got[k]) for k in ref), (chunk_bytes, kwargs)
            assert (info["n_sweeps"], info["n_solves"]) == (info_ref.n_sweeps, info_ref.n_solves)
            assert (info["n_full_builds"], info["n_lowrank_updates"]) == (info_ref.n_full_builds, info_ref.n_lowrank_updates)
            assert info["objective"] == pytest.approx(info_ref.objective, rel=1e-6)
            assert info["initial_objective"] == pytest.approx(info_ref.initial_objective, rel=1e-6)
    # NaN in a slice of rows is found, and named as in memory
    bad = dict(b)
    bad["emb"] = bad["emb"].clone()
    bad["emb"][37, 5] = float("inf")
    with pytest.raises(RebasinError, match=r"state_b\['emb'\] \(shape \(40, 12\)\).*NaN or inf"):
        weight_matching_lazy(spec, ca, _save(bad, tmp_path / "bad.safetensors"), chunk_bytes=chunk_bytes)
    for wrong in (0, -5, 1.5, True):
        with pytest.raises(RebasinError, match="chunk_bytes"):
            weight_matching_lazy(spec, ca, cb, chunk_bytes=wrong)  # type: ignore[arg-type]  # the wrong type is the input under test


def test_lazy_tiny_gpt2_in_slices_of_rows_gives_the_in_memory_permutations(tmp_path, tiny_gpt2, monkeypatch):
    from rebasin.spec import checkpoint

    spec, a, b = tiny_gpt2
    a = {k: v for k, v in a.items() if k in spec.axes}
    b = {k: v for k, v in b.items() if k in spec.axes}
    ca, cb = _save(a, tmp_path / "a.safetensors"), _save(b, tmp_path / "b.safetensors")
    assert spec.axes["transformer.wte.weight"][0] is None
    ref, info_ref = weight_matching(spec, a, b, return_info=True)
    monkeypatch.setattr(checkpoint, "ROW_CHUNK_BYTES", 700)  # the 50 x 32 embedding in 5-row slices
    got, info = weight_matching(spec, ca, cb, return_info=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert (info.n_sweeps, info.n_solves, info.n_lowrank_updates) == (info_ref.n_sweeps, info_ref.n_solves, info_ref.n_lowrank_updates)
    assert info.objective == pytest.approx(info_ref.objective, rel=1e-6)
    save_permuted(spec, got, cb, tmp_path / "bp.safetensors")
    expected = permute(spec, got, b)
    written = open_checkpoint(tmp_path / "bp.safetensors")
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def test_save_permuted_and_merge_in_slices_of_rows(tmp_path, make_mlp, monkeypatch):
    from rebasin import merge_checkpoints
    from rebasin.spec import checkpoint

    spec, a, b = _embedding_spec_and_states()
    ca = _save(a, tmp_path / "a.safetensors")
    _save(b, tmp_path / "b.safetensors")
    perms = random_permutation(spec, seed=4, sizes=spec.validate(a))
    ref_merge = merge_checkpoints(spec, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "m0.safetensors")
    monkeypatch.setattr(checkpoint, "ROW_CHUNK_BYTES", 100)
    expected = permute(spec, perms, a)
    for source in (a, ca):
        for ext in (".safetensors", ".pt"):
            save_permuted(spec, perms, source, tmp_path / f"out{ext}")
            got = open_checkpoint(tmp_path / f"out{ext}")
            assert list(got) == list(spec.axes) and all(torch.equal(got[k], expected[k]) for k in expected)
    # the safetensors file is the one written whole (the reference library reads it too)
    monkeypatch.setattr(checkpoint, "ROW_CHUNK_BYTES", 1 << 30)
    save_permuted(spec, perms, ca, tmp_path / "whole.safetensors")
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "out.safetensors").read_bytes()
    # the other cases of test_save_permuted_equals_permute, in slices of rows
    monkeypatch.setattr(checkpoint, "ROW_CHUNK_BYTES", 8)
    for i, (spec_i, state) in enumerate(_cases(make_mlp)):
        p = random_permutation(spec_i, seed=i + 1, sizes=spec_i.validate(state))
        save_permuted(spec_i, p, _save(state, tmp_path / f"src{i}.safetensors"), tmp_path / f"o{i}.safetensors")
        want, got = permute(spec_i, p, state), open_checkpoint(tmp_path / f"o{i}.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in want), i
    # merge_checkpoints reads and writes its aligned average in slices of rows: the same merged model
    perms_m = merge_checkpoints(spec, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "m1.safetensors")
    assert all(torch.equal(perms_m[1][k], ref_merge[1][k]) for k in spec.perms)
    m0, m1 = open_checkpoint(tmp_path / "m0.safetensors"), open_checkpoint(tmp_path / "m1.safetensors")
    assert all(torch.equal(m0[k], m1[k]) for k in spec.axes)


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_big_tensors_are_read_into_their_own_mappings(tmp_path, ext):
    from rebasin.spec.checkpoint import fresh_buffer

    g = torch.Generator().manual_seed(0)
    state = {"big": torch.randn(600, 700, generator=g), "d": torch.randn(300, 500, generator=g).double(),
             "empty": torch.zeros(0, 3)}
    ckpt = _save(state, tmp_path / f"m{ext}")
    for key, value in state.items():
        got = ckpt[key]
        assert got.dtype == value.dtype and torch.equal(got, value)
    rows = ckpt.read_rows("big", 100, 500)  # 1.1 MB: a mapping of its own
    assert torch.equal(rows, state["big"][100:500])
    rows.mul_(0.0)  # writable, and private
    assert torch.equal(ckpt.read_rows("big", 100, 500), state["big"][100:500])
    for n in (0, 5, 3 << 20):
        buf = fresh_buffer(n)
        assert buf.dtype == torch.uint8 and buf.shape == (n,)
        buf.fill_(7)
        assert int(buf.sum()) == 7 * n
