"""Every checkpoint writer keeps the format the output's extension names and every tensor's dtype.

``.safetensors`` -> a real safetensors file (the ``safetensors`` package reads it), ``.pt`` / ``.pth`` /
``.bin`` -> a ``torch.save`` file; a bfloat16 or float16 checkpoint comes back in bfloat16 / float16, in
``rebasin align -o``, ``rebasin merge -o``, :func:`rebasin.save_permuted`, :func:`rebasin.merge_checkpoints`
and :func:`rebasin.save_state`, whatever the inputs' format.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rebasin import (
    RebasinError,
    merge_checkpoints,
    open_checkpoint,
    permute,
    random_permutation,
    save_permuted,
    save_state,
    spec_from_model,
    weight_matching,
)
from rebasin.apps.cli import main

safetensors_torch = pytest.importorskip("safetensors.torch")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EXTS = [".pt", ".safetensors"]


def small_net() -> nn.Module:
    """Built without touching the caller's global RNG (the CLI builds it with ``--model``)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _write_input(state: dict[str, torch.Tensor], path) -> None:
    """An input checkpoint as users write it: ``torch.save`` or the ``safetensors`` package."""
    if str(path).endswith(".safetensors"):
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def _read_output(path) -> dict[str, torch.Tensor]:
    """The written file, read by the reader its extension names (a wrong format fails here)."""
    raw = open(path, "rb").read(2)
    if str(path).endswith(".safetensors"):
        assert raw != b"PK", f"{path} is a torch zip file, not safetensors"
        return safetensors_torch.load_file(str(path))
    assert raw == b"PK", f"{path} is not a torch.save zip file"
    return torch.load(path, weights_only=True)


def _three(dtype: torch.dtype):
    """A state in ``dtype`` and two copies of it with planted permutations (same function)."""
    model = small_net()
    spec = spec_from_model(model, torch.randn(2, 4))
    a = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    others = [permute(spec, random_permutation(spec, seed=s), a) for s in (1, 2)]
    return spec, a, others


def _three_files(tmp_path, dtype: torch.dtype, ext: str):
    """:func:`_three` written as a, b, c with extension ``ext``: ``(spec, a, [paths])``."""
    spec, a, others = _three(dtype)
    paths = [tmp_path / f"{n}{ext}" for n in "abc"]
    for state, p in zip((a, *others), paths):
        _write_input(state, p)
    return spec, a, paths


def _check(out: dict[str, torch.Tensor], a: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    assert list(out) == list(a) or set(out) == set(a)
    for k, v in a.items():
        assert out[k].dtype == dtype, f"{k}: written as {out[k].dtype}, the input was {dtype}"
        # a planted permutation is undone exactly; the average of three equal models is the model, up to
        # float32 rounding, and exactly in bfloat16/float16 (averaged in float32, rounded once on writing)
        exact = {} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(out[k], v, **exact)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_ext", EXTS)
@pytest.mark.parametrize("out_ext", EXTS)
@pytest.mark.parametrize("command", ["align", "merge"])
def test_cli_keeps_format_and_dtype(tmp_path, command, out_ext, in_ext, dtype):
    spec, a, paths = _three_files(tmp_path, dtype, in_ext)
    out = tmp_path / f"out{out_ext}"
    inputs = paths[:2] if command == "align" else paths
    code = main([command, *map(str, inputs), "--model", f"{__name__}:small_net", "--example-shape", "1,4",
                 "-o", str(out)])
    assert code == 0
    _check(_read_output(out), a, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_ext", EXTS)
@pytest.mark.parametrize("out_ext", [*EXTS, ".bin"])
@pytest.mark.parametrize("api", ["save_permuted", "merge_checkpoints", "save_state"])
def test_python_api_keeps_format_and_dtype(tmp_path, api, out_ext, in_ext, dtype):
    spec, a, paths = _three_files(tmp_path, dtype, in_ext)
    out = tmp_path / f"out{out_ext}"
    if api == "save_permuted":
        ckpt_b = open_checkpoint(paths[1])
        save_permuted(spec, weight_matching(spec, open_checkpoint(paths[0]), ckpt_b), ckpt_b, out)
    elif api == "merge_checkpoints":
        merge_checkpoints(spec, paths, out)
    else:
        save_state(open_checkpoint(paths[0]), out)
    _check(_read_output(out), a, dtype)


def test_save_state_casts_to_the_dtypes_asked(tmp_path):
    state = {"w": torch.randn(3, 2), "n": torch.tensor(4)}
    for ext in (".pt", ".safetensors"):
        save_state(state, tmp_path / f"s{ext}", dtypes={"w": torch.bfloat16})
        got = _read_output(tmp_path / f"s{ext}")
        assert got["w"].dtype == torch.bfloat16 and got["n"].dtype == torch.int64
        torch.testing.assert_close(got["w"], state["w"].to(torch.bfloat16), rtol=0, atol=0)
    assert state["w"].dtype == torch.float32  # the input is not changed


def test_save_state_bad_inputs(tmp_path):
    with pytest.raises(RebasinError, match=r"\.npz.*\.safetensors"):
        save_state({"w": torch.zeros(2)}, tmp_path / "out.npz")
    with pytest.raises(RebasinError, match="mapping"):
        save_state([torch.zeros(2)], tmp_path / "out.pt")  # type: ignore[arg-type]  # the wrong type is the input under test
    with pytest.raises(RebasinError, match="'w'.*tensor"):
        save_state({"w": 3}, tmp_path / "out.pt")  # type: ignore[dict-item]  # the wrong type is the input under test
    with pytest.raises(RebasinError, match="'v'.*not in the state"):
        save_state({"w": torch.zeros(2)}, tmp_path / "out.pt", dtypes={"v": torch.float16})
    with pytest.raises(RebasinError, match="torch dtypes.*'bf16'"):
        save_state({"w": torch.zeros(2)}, tmp_path / "out.pt", dtypes={"w": "bf16"})  # type: ignore[dict-item]  # the wrong type is the input under test
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("command", ["align", "merge"])
def test_cli_refuses_an_unknown_output_extension_before_any_work(tmp_path, capsys, command):
    spec, a, (b, _) = _three(torch.float32)
    for state, name in ((a, "a.pt"), (b, "b.pt")):
        torch.save(state, tmp_path / name)
    code = main([command, str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model", f"{__name__}:small_net",
                 "--example-shape", "1,4", "-o", str(tmp_path / "out.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "-o" in err and ".npz" in err and ".safetensors" in err and err.count("\n") == 1
    assert not (tmp_path / "out.npz").exists()
