"""Hugging Face model folders end to end: ``rebasin align DIR_A DIR_B -o DIR`` and ``rebasin merge DIR ... -o DIR``.

Tiny GPT-2, BERT and ViT models (random weights, randomised LayerNorms) are saved with ``save_pretrained``, as
one file and as shards (``max_shard_size``); B is A with a planted permutation and a little noise. The
command builds the model from ``config.json`` on the meta device, reads the shards one tensor at a time and
writes a folder that ``from_pretrained`` loads: it computes B's function, is as close to A as the planted
permutation allows, keeps the layout, the small files and the dtypes. Bad folders end with one line, exit 2.
Skipped without ``transformers``.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

import rebasin
from rebasin import RebasinError
from rebasin.apps.cli import main
from rebasin.spec.core import permute, random_permutation

T = pytest.importorskip("transformers")

from rebasin.trace import hf_rules

hf_rules.register()  # registered for good the first time a transformers model is traced; see test_hf_models.py

SEQ, VOCAB, WIDTH, HEADS = 8, 50, 32, 4


def _gpt2(heads: int = HEADS) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = T.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=WIDTH, n_layer=2, n_head=heads,
                           bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(cfg)


def _bert() -> torch.nn.Module:
    cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
                       intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return T.BertForSequenceClassification(cfg)


def _vit() -> torch.nn.Module:
    cfg = T.ViTConfig(image_size=16, patch_size=4, hidden_size=WIDTH, num_hidden_layers=2,
                      num_attention_heads=HEADS, intermediate_size=64, num_labels=3)
    return T.ViTForImageClassification(cfg)


MODELS = {"gpt2": _gpt2, "bert": _bert, "vit": _vit}


def _inputs(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if name == "vit":
        return torch.randn(3, 3, 16, 16, generator=g)
    return torch.randint(0, VOCAB, (3, SEQ), generator=g)


def _model(name: str, seed: int) -> torch.nn.Module:
    """A tiny model with random LayerNorm scales and shifts (a permutation they miss changes the outputs)."""
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
    return model


def _save(model: torch.nn.Module, path, shard: bool) -> None:
    model.save_pretrained(path, **({"max_shard_size": "20KB"} if shard else {}))


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.float()


def _distance(folder_a, folder_b) -> float:
    a, b = rebasin.open_pretrained(folder_a), rebasin.open_pretrained(folder_b)
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)


def _pair(root, name: str, shard: bool, dtype: torch.dtype = torch.float32):
    """Folders A and B (A's stored tensors with a planted permutation, plus noise) and B's model in memory.

    B's folder is written by transformers itself: the permuted tensors go into a plain safetensors file,
    ``from_pretrained`` loads it and ``save_pretrained`` writes B in the layout under test.
    """
    _save(_model(name, 0).to(dtype), root / "a", shard)
    spec = rebasin.spec_from_pretrained(root / "a")
    stored = dict(rebasin.open_pretrained(root / "a"))
    planted = permute(spec, random_permutation(spec, seed=3), stored)
    g = torch.Generator().manual_seed(5)
    noisy = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in planted.items()}
    (root / "plain").mkdir()
    (root / "plain" / "config.json").write_text((root / "a" / "config.json").read_text())
    save_file(noisy, str(root / "plain" / "model.safetensors"), metadata={"format": "pt"})
    b = type(_model(name, 0)).from_pretrained(root / "plain").eval()
    _save(b, root / "b", shard)
    return root / "a", root / "b", b


def _cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.mark.parametrize("name,shard", [("gpt2", False), ("gpt2", True), ("bert", True), ("vit", False)])
def test_align_folders_computes_b_and_recovers_a(tmp_path, capsys, name, shard):
    folder_a, folder_b, model_b = _pair(tmp_path, name, shard)
    out = tmp_path / "out"
    assert _cli("align", folder_a, folder_b, "-o", out, "--device", "cpu") == 0
    assert "from_pretrained loads it" in capsys.readouterr().out
    # the layout of B: the same files (config, generation config, shards, index), the same keys in each shard
    assert sorted(os.listdir(out)) == sorted(os.listdir(folder_b))
    if shard:
        index_b = json.loads((folder_b / "model.safetensors.index.json").read_text())
        index_o = json.loads((out / "model.safetensors.index.json").read_text())
        assert index_o == index_b and len(set(index_o["weight_map"].values())) > 1
    assert (out / "config.json").read_text() == (folder_b / "config.json").read_text()
    aligned = type(model_b).from_pretrained(out).eval()
    x = _inputs(name)
    torch.testing.assert_close(_logits(aligned, x), _logits(model_b, x), rtol=1e-4, atol=1e-5)
    before, after = _distance(folder_a, folder_b), _distance(folder_a, out)
    assert after < 0.05 * before, (before, after)  # the planted permutation is undone; only the noise is left


def test_gpt2_tied_head_is_stored_once_and_follows_the_embedding(tmp_path):
    folder_a, folder_b, model_b = _pair(tmp_path, "gpt2", False)
    spec = rebasin.spec_from_pretrained(folder_b)
    assert "lm_head.weight" not in spec.axes and "transformer.wte.weight" in spec.axes
    assert _cli("align", folder_a, folder_b, "-o", tmp_path / "out", "--device", "cpu") == 0
    assert "lm_head.weight" not in rebasin.open_pretrained(tmp_path / "out")
    loaded = T.GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert not torch.equal(loaded.transformer.wte.weight, model_b.transformer.wte.weight)  # permuted, not copied


def test_bfloat16_folder_stays_bfloat16(tmp_path):
    folder_a, folder_b, _ = _pair(tmp_path, "gpt2", True, dtype=torch.bfloat16)
    out = tmp_path / "out"
    assert _cli("align", folder_a, folder_b, "-o", out, "--device", "cpu") == 0
    written = rebasin.open_pretrained(out)
    assert {m.dtype for m in written.meta().values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert T.GPT2LMHeadModel.from_pretrained(out).dtype == torch.bfloat16
    # the same function as B: compared in float32, where only the order of sums differs
    x = _inputs("gpt2")
    b32 = T.GPT2LMHeadModel.from_pretrained(folder_b, dtype=torch.float32).eval()
    o32 = T.GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(o32, x), _logits(b32, x), rtol=1e-4, atol=1e-5)
    assert _distance(folder_a, out) < 0.2 * _distance(folder_a, folder_b)
    assert _cli("merge", folder_a, folder_b, "-o", tmp_path / "merged", "--device", "cpu") == 0
    assert {m.dtype for m in rebasin.open_pretrained(tmp_path / "merged").meta().values()} == {torch.bfloat16}
    assert torch.isfinite(_logits(T.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval(), x)).all()


def test_merge_three_folders_loads_and_runs(tmp_path, capsys):
    folders = []
    for i in range(3):
        _save(_model("gpt2", i), tmp_path / f"m{i}", shard=True)
        folders.append(tmp_path / f"m{i}")
    out = tmp_path / "merged"
    assert _cli("merge", *folders, "-o", out, "--device", "cpu", "--reference", "1") == 0
    assert "merged 3 model folders" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == sorted(os.listdir(folders[1]))
    merged = T.GPT2LMHeadModel.from_pretrained(out).eval()
    y = _logits(merged, _inputs("gpt2"))
    assert torch.isfinite(y).all()
    # the Python API gives the same folder
    spec = rebasin.spec_from_pretrained(folders[1])
    rebasin.merge_checkpoints(spec, [rebasin.open_pretrained(f) for f in folders], tmp_path / "api", reference=1)
    api = rebasin.open_pretrained(tmp_path / "api")
    for key in api:
        torch.testing.assert_close(api[key], rebasin.open_pretrained(out)[key], rtol=0, atol=0)


def test_python_api_with_a_given_model(tmp_path):
    folder_a, folder_b, model_b = _pair(tmp_path, "bert", False)
    with torch.device("meta"):
        meta = _bert()
    spec = rebasin.spec_from_pretrained(folder_b, model=meta)
    assert spec == rebasin.spec_from_pretrained(folder_b)
    a, b = rebasin.open_pretrained(folder_a), rebasin.open_pretrained(folder_b)
    assert a.architecture == "BertForSequenceClassification" and len(a.shards) == 1
    perms = rebasin.weight_matching(spec, a, b, seed=0)
    rebasin.save_pretrained_permuted(spec, perms, b, tmp_path / "out")
    x = _inputs("bert")
    loaded = T.BertForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(loaded, x), _logits(model_b, x), rtol=1e-4, atol=1e-5)


def test_cli_model_factory_is_optional_and_accepted(tmp_path, monkeypatch):
    folder_a, folder_b, model_b = _pair(tmp_path, "vit", True)
    (tmp_path / "hf_folder_factory.py").write_text(
        "import torch, transformers as T\n"
        "def vit():\n"
        "    cfg = T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,\n"
        "                      num_attention_heads=4, intermediate_size=64, num_labels=3)\n"
        "    with torch.device('meta'):\n"
        "        return T.ViTForImageClassification(cfg)\n")
    monkeypatch.chdir(tmp_path)
    assert _cli("align", folder_a, folder_b, "-o", "out", "--device", "cpu", "--model", "hf_folder_factory:vit",
                "--example-shape", "1,3,16,16") == 0
    loaded = T.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(loaded, _inputs("vit")), _logits(model_b, _inputs("vit")), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def folders(tmp_path):
    _save(_model("gpt2", 0), tmp_path / "gpt2", shard=False)
    _save(_model("bert", 0), tmp_path / "bert", shard=False)
    _save(_gpt2(heads=8).eval(), tmp_path / "gpt2_8heads", shard=False)  # the same shapes, other heads
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.safetensors").write_bytes((tmp_path / "gpt2" / "model.safetensors").read_bytes())
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    torch.save({}, tmp_path / "file.pt")
    return tmp_path


def _error(capsys, *argv) -> str:
    assert _cli(*argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    return captured.err


@pytest.mark.parametrize("case,argv,expected", [
    ("no config.json", ("align", "gpt2", "noconfig"), "noconfig' has no config.json"),
    ("two architectures", ("align", "gpt2", "bert"), "holds a BertForSequenceClassification but"),
    ("other head count", ("align", "gpt2", "gpt2_8heads"), "hold different architectures: their config.json differ at ['n_head']"),
    ("folder and file", ("align", "gpt2", "file.pt"), "got model folders and ['"),
    ("pytorch_model.bin only", ("align", "gpt2", "bin"), "has neither model.safetensors nor"),
    ("merge two architectures", ("merge", "gpt2", "gpt2", "bert"), "holds a BertForSequenceClassification but"),
    ("output not empty", ("align", "gpt2", "gpt2", "-o", "full"), "it exists and is not empty"),
    ("data-driven method", ("align", "gpt2", "gpt2", "--method", "ste"), "uses weight_matching"),
    ("merge with repair", ("merge", "gpt2", "gpt2", "--repair", "--data", "x:y"), "cannot be used"),
    # --example-dtype is honoured for folders (it was ignored): floating ids are refused with the fix, a dtype
    # without a shape is refused, an unknown dtype is named
    ("float ids", ("align", "gpt2", "gpt2", "--example-shape", "2,8", "--example-dtype", "float32"),
     "takes integer inputs (token ids), but --example-shape 2,8 gave float32 values: pass --example-dtype long"),
    ("merge float ids", ("merge", "gpt2", "gpt2", "--example-shape", "2,8", "--example-dtype", "float16"),
     "gave float16 values: pass --example-dtype long"),
    ("dtype without shape", ("align", "gpt2", "gpt2", "--example-dtype", "long"),
     "--example-dtype long sets the dtype of the --example-shape input, and no --example-shape was given"),
    ("unknown dtype", ("merge", "gpt2", "gpt2", "--example-shape", "2,8", "--example-dtype", "complex"),
     "--example-dtype must be one of"),
])
def test_bad_folders_are_one_line_and_exit_2(folders, capsys, monkeypatch, case, argv, expected):
    monkeypatch.chdir(folders)
    if "-o" not in argv:
        argv = (*argv, "-o", "out")
    err = _error(capsys, *argv)
    assert expected in err, err
    if case in ("no config.json", "two architectures", "other head count"):  # the folders are named
        assert str(argv[2]) in err
    assert not (folders / "out").exists() or not any((folders / "out").iterdir())


def test_example_dtype_is_honoured_for_folders(tmp_path, monkeypatch):
    """``--example-shape 2,8 --example-dtype long`` traces on ids of that shape (an int32 input traces too)."""
    folder_a, folder_b, model_b = _pair(tmp_path, "gpt2", False)
    seen = []
    real = rebasin.trace.pretrained.spec_from_pretrained

    def spy(folder, example_input=None, **kw):
        seen.append(example_input)
        return real(folder, example_input, **kw)

    monkeypatch.setattr(rebasin.trace.pretrained, "spec_from_pretrained", spy)
    for dtype, torch_dtype in (("long", torch.int64), ("int32", torch.int32)):
        out = tmp_path / f"out_{dtype}"
        assert _cli("align", folder_a, folder_b, "-o", out, "--device", "cpu", "--example-shape", "2,8",
                    "--example-dtype", dtype) == 0
        assert isinstance(seen[-1], torch.Tensor) and seen[-1].dtype == torch_dtype and seen[-1].shape == (2, 8)
        loaded = T.GPT2LMHeadModel.from_pretrained(out).eval()
        torch.testing.assert_close(_logits(loaded, _inputs("gpt2")), _logits(model_b, _inputs("gpt2")),
                                   rtol=1e-4, atol=1e-5)


def test_checkpoint_files_still_need_model(folders, capsys, monkeypatch):
    monkeypatch.chdir(folders)
    assert "pass --model" in _error(capsys, "align", "file.pt", "file.pt", "-o", "x.pt")
    assert "pass --model" in _error(capsys, "merge", "file.pt", "file.pt", "-o", "x.pt")


def test_open_pretrained_bad_folders(folders):
    with pytest.raises(RebasinError, match="is not a folder"):
        rebasin.open_pretrained(folders / "file.pt")
    with pytest.raises(RebasinError, match="is a folder, not a checkpoint file; .* rebasin.open_pretrained"):
        rebasin.open_checkpoint(folders / "gpt2")
    sharded = folders / "sharded"
    _save(_model("gpt2", 0), sharded, shard=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    (sharded / last).unlink()
    with pytest.raises(RebasinError, match=f"lists the shard '{last}', which is not a file"):
        rebasin.open_pretrained(sharded)
    with pytest.raises(RebasinError, match="needs like="):
        rebasin.save_pretrained_permuted(rebasin.PermutationSpec({"w": (None,)}), {}, {"w": torch.ones(1)},
                                         folders / "new")


def test_docstring_examples_run():
    import doctest

    from rebasin.spec import core, hf_folder
    from rebasin.trace import pretrained

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    objs = (hf_folder.open_pretrained, pretrained.spec_from_pretrained, core.PermutationSpec.subset)
    tests = [t for obj in objs for t in finder.find(obj, globs={})]
    assert sum(len(t.examples) for t in tests) >= 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in tests:
            runner.run(t)
    assert runner.failures == 0


def test_spec_subset_keeps_structure_and_renames(tmp_path):
    _save(_model("bert", 0), tmp_path / "bert", shard=False)
    spec = rebasin.spec_from_pretrained(tmp_path / "bert")
    layer = [k for k in spec.axes if ".layer.0.attention." in k]
    part = spec.subset(layer)
    assert list(part.axes) == layer and part.structure and set(part.structure) <= set(spec.structure)
    assert dict(part.sizes) == {p: spec.sizes[p] for p in part.perms}
    renamed = spec.subset({k: "x." + k for k in layer})
    assert [renamed.axes["x." + k] for k in layer] == [spec.axes[k] for k in layer]
    assert dict(renamed.structure) == dict(part.structure)
    with pytest.raises(RebasinError, match="are not in it"):
        spec.subset(["nope"])
    with pytest.raises(RebasinError, match="the same new name"):
        spec.subset({layer[0]: "same", layer[1]: "same"})
