"""Every use of an alignment on transformed states: align -> paths, barriers, REPAIR, curves, merge, checkpoints
on disk, the command line and the continual plugin, with signed permutations (a tiny Llama from a config:
RMSNorms, no elementwise function on the stream) and orthogonal maps (``rebasin.apps.models.ViT``, whose
LayerNorms align folds into RMSNorms; the Llama with its RMSNorm scales folded).

Norm scales and shifts are randomised, so a fold or a transform that is wrong at a norm shows in the outputs.
"""

from __future__ import annotations

import warnings

import builders
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from rebasin import (
    BezierCurve,
    LinearPath,
    RebasinError,
    RepairedPath,
    align,
    barrier,
    evaluate_path,
    fit_curve,
    merge,
    open_checkpoint,
    save_permuted,
    save_state,
)
from rebasin.apps.cli import main
from rebasin.apps.models import ViT
from rebasin.paths.running import evaluate_state
from rebasin.spec import (
    SignedPermutation,
    apply_transforms,
    random_orthogonal,
    random_signed_permutation,
    transform_entries,
)
from rebasin.spec import checkpoint as checkpoint_module
from rebasin.trace import hf_rules, llm_rules, symmetry_kinds, trace_model

T = pytest.importorskip("transformers")
VOCAB = 40


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama (width 16, 4 heads, 2 key/value heads) with random RMSNorm scales."""
    return builders.tiny_llama(vocab=VOCAB, hidden=16, intermediate=24, positions=16, seed=seed, norm_seed=100 + seed)


hf_rules.register()  # the first trace registers these rules for good; here, for the conftest's guard
llm_rules.register(tiny_llama())


def tiny_vit(seed: int = 0) -> nn.Module:
    """``rebasin.apps.models.ViT`` on 8x8 images (width 16, 2 heads) with random LayerNorm scales and shifts."""
    torch.manual_seed(seed)
    model = ViT(image_size=8, patch_size=4, width=16, depth=1, heads=2)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model.eval()


def lm_loss(out, y):
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


def _tokens(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (2, 6), generator=g), torch.randint(0, VOCAB, (2, 6), generator=g))
            for _ in range(2)]


def _images(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def _loss(model: nn.Module, loader, loss_fn=None) -> float:
    return evaluate_state(model, model.state_dict(), loader, loss_fn=loss_fn, device="cpu")[0]


# --------------------------------------------------------------------------- align -> paths -> REPAIR -> curves
def test_signed_llama_path_ends_are_the_two_models():
    a, b = tiny_llama(0), tiny_llama(1)
    before_a, before_b = _copy(a), _copy(b)
    data = _tokens()
    res = align(a, b, method="transform_matching", symmetry="signed", example_input=data[0][0])
    _unchanged(a, before_a)
    _unchanged(b, before_b)
    stream = res.spec.axes["model.norm.weight"][0]
    assert isinstance(res.transforms[stream], SignedPermutation)
    assert stream not in res.perms and set(res.perms) | {stream} == set(res.transforms)
    assert res.model_a is a and res.kinds is not None  # nothing folded: the states belong to A's architecture
    reference = apply_transforms(res.spec, res.transforms, b.state_dict(), kinds=res.kinds)  # the algebra's own
    for k, v in reference.items():
        assert torch.equal(res.state_b[k], v), k
    with torch.no_grad():  # B's transformed state is B's function
        assert_close(torch.func.functional_call(a, res.state_b, (data[0][0],)).logits, b(data[0][0]).logits,
                     rtol=1e-5, atol=1e-5)
    path = evaluate_path(res.model_a, LinearPath(res.state_a, res.state_b), data, num_points=3, loss_fn=lm_loss)
    assert_close(path.loss[0], _loss(a, data, lm_loss), rtol=1e-6, atol=1e-6)
    assert_close(path.loss[-1], _loss(b, data, lm_loss), rtol=1e-5, atol=1e-5)
    assert barrier(path) == pytest.approx(max(path.loss) - (path.loss[0] + path.loss[-1]) / 2)


def test_orthogonal_vit_is_folded_and_every_use_runs_on_the_folded_states():
    a, b = tiny_vit(0), tiny_vit(1)
    before_a, before_b = _copy(a), _copy(b)
    data = _images()
    res = align(a, b, method="transform_matching", symmetry="orthogonal", loader=data)
    _unchanged(a, before_a)
    _unchanged(b, before_b)
    stream = res.spec.axes["pos"][2]
    q = res.transforms[stream]
    assert q.ndim == 2 and q.is_floating_point()
    assert_close(q @ q.T, torch.eye(q.shape[0]), rtol=0, atol=1e-5)
    assert isinstance(res.model_a.norm, nn.RMSNorm) and isinstance(a.norm, nn.LayerNorm)
    assert isinstance(res.model_b.norm, nn.RMSNorm)
    loss_a, loss_b = _loss(a, data), _loss(b, data)
    # the path, REPAIR and a curve all start at A and end at B
    line = evaluate_path(res.model_a, LinearPath(res.state_a, res.state_b), data, num_points=3)
    repaired = evaluate_path(res.model_a, RepairedPath(res.model_a, res.state_a, res.state_b, data), data,
                             num_points=3)
    curve = BezierCurve(res.state_a, res.state_b, num_bends=3)
    fit_curve(res.model_a, curve, data, epochs=1, lr=1e-3, seed=0, device="cpu", progress=False)
    bent = evaluate_path(res.model_a, curve, data, num_points=3)
    for path in (line, repaired, bent):
        assert_close(path.loss[0], loss_a, rtol=1e-5, atol=1e-5)
        assert_close(path.loss[-1], loss_b, rtol=1e-5, atol=1e-5)
    # the rotation is not a permutation in disguise: weight matching alone leaves a different midpoint
    plain = align(a, b, method="weight_matching", loader=data)
    naive_mid = evaluate_path(a, LinearPath(plain.state_a, plain.state_b), data, num_points=3).loss[1]
    assert line.loss[1] != pytest.approx(naive_mid)


def test_orthogonal_llama_folds_its_rmsnorm_scales_in_the_same_architecture():
    a, b = tiny_llama(0), tiny_llama(1)
    data = _tokens()
    res = align(a, b, method="transform_matching", symmetry="orthogonal", example_input=data[0][0])
    assert res.model_a is not a and type(res.model_a) is type(a)
    assert set(res.state_a) == set(a.state_dict())
    assert bool((res.state_a["model.norm.weight"] == 1).all())
    path = evaluate_path(res.model_a, LinearPath(res.state_a, res.state_b), data, num_points=3, loss_fn=lm_loss)
    assert_close(path.loss[0], _loss(a, data, lm_loss), rtol=1e-5, atol=1e-5)
    assert_close(path.loss[-1], _loss(b, data, lm_loss), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- merge
def _planted(model: nn.Module, x: torch.Tensor, seed: int) -> nn.Module:
    """A copy of ``model`` with a random signed permutation of the stream and permutations elsewhere."""
    from rebasin import random_permutation

    tr = trace_model(model, x)
    kinds = symmetry_kinds(model, x, trace=tr)
    stream = tr.spec.axes["model.norm.weight"][0]
    plant = dict(random_permutation(tr.spec, seed=seed))
    plant[stream] = random_signed_permutation(tr.spec.sizes[stream], seed=seed + 1)
    out = tiny_llama(0)
    out.load_state_dict(apply_transforms(tr.spec, plant, _copy(model), kinds=kinds))
    return out


def test_merge_of_three_transformed_copies_is_the_model():
    a = tiny_llama(0)
    data = _tokens()
    x = data[0][0]
    b, c = _planted(a, x, 5), _planted(a, x, 9)
    merged, info = merge([a, b, c], method="transform_matching", symmetry="signed", repair=False, example_input=x,
                         return_info=True)
    assert info.converged and info.alignments[0] is None
    assert all(isinstance(al.transforms[al.spec.axes["model.norm.weight"][0]], SignedPermutation)
               for al in info.alignments[1:])
    for k, v in a.state_dict().items():
        assert_close(merged.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_merge_of_three_vits_with_orthogonal_maps_and_repair():
    models = [tiny_vit(s) for s in range(3)]
    data = _images()
    merged, info = merge(models, method="transform_matching", symmetry="orthogonal", loader=data, n_iter=3,
                         return_info=True)
    assert isinstance(merged.norm, nn.RMSNorm)  # the merge lives in the folded architecture
    assert all(al.transforms is not None for al in info.alignments[1:])
    assert torch.isfinite(torch.tensor(_loss(merged, data)))


# --------------------------------------------------------------------------- checkpoints on disk
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
@pytest.mark.parametrize("symmetry", ["signed", "orthogonal"])
def test_transformed_checkpoint_on_disk_equals_the_state_in_memory(tmp_path, monkeypatch, dtype, ext, symmetry):
    a, b = tiny_llama(0), tiny_llama(1)
    res = align(a, b, method="transform_matching", symmetry=symmetry, example_input=_tokens()[0][0])
    src = {k: v.to(dtype) for k, v in res.model_b.state_dict().items()}  # B in the architecture aligned
    save_state(src, tmp_path / f"b{ext}")
    expected = transform_entries(res.spec, res.transforms, src, kinds=res.kinds)
    if dtype == torch.float32:
        for k, v in res.state_b.items():
            assert torch.equal(expected[k], v), k
    out = tmp_path / f"b_aligned{ext}"
    save_permuted(res.spec, res.transforms, open_checkpoint(tmp_path / f"b{ext}"), out, kinds=res.kinds)
    got = open_checkpoint(out)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == dtype
        assert torch.equal(got[k], v), k
    # in slices of rows: the embeddings (no class on their rows) go through a few rows at a time
    monkeypatch.setattr(checkpoint_module, "ROW_CHUNK_BYTES", 64)
    chunked = tmp_path / f"b_chunked{ext}"
    save_permuted(res.spec, res.transforms, open_checkpoint(tmp_path / f"b{ext}"), chunked, kinds=res.kinds)
    for k, v in expected.items():
        assert_close(open_checkpoint(chunked)[k], v, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_save_permuted_refuses_illegal_transforms(tmp_path):
    a = tiny_llama(0)
    x = _tokens()[0][0]
    tr = trace_model(a, x)
    kinds = symmetry_kinds(a, x, trace=tr)
    stream = tr.spec.axes["model.norm.weight"][0]
    q = random_orthogonal(tr.spec.sizes[stream], seed=0)
    with pytest.raises(RebasinError, match="fold"):  # its RMSNorm scales are not ones
        save_permuted(tr.spec, {stream: q}, a.state_dict(), tmp_path / "o.safetensors", kinds=kinds)
    with pytest.raises(RebasinError, match="kinds="):
        save_permuted(tr.spec, {stream: random_signed_permutation(tr.spec.sizes[stream])}, a.state_dict(),
                      tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


# --------------------------------------------------------------------------- bad inputs
def test_a_symmetry_the_model_does_not_admit_names_the_module_and_the_op():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 4)
    with pytest.raises(RebasinError, match=r"symmetry='signed'.*module '1' \(ReLU\)"):
        align(a, b, method="transform_matching", symmetry="signed", example_input=x)
    with pytest.raises(RebasinError, match="symmetry must be"):
        align(a, b, method="transform_matching", symmetry="rotation", example_input=x)
    with pytest.raises(RebasinError, match="example_input= or loader="):
        align(a, b, method="transform_matching")
    # the default, symmetry="auto", is weight matching where no class admits more
    res = align(a, b, method="transform_matching", example_input=x)
    assert set(res.perms) == set(res.transforms)
    vit_a, vit_b = tiny_vit(0), tiny_vit(1)
    with pytest.raises(RebasinError, match="leave spec=None"):  # the spec of the models before folding
        align(vit_a, vit_b, method="transform_matching", symmetry="orthogonal", loader=_images(),
              spec=trace_model(vit_a, _images()[0][0]).spec)
    fc1 = trace_model(vit_a, _images()[0][0]).spec.axes["blocks.0.fc1.weight"][0]
    with pytest.raises(RebasinError, match=r"gelu after module 'blocks\.0\.fc1'"):  # a GELU's units stay permutations
        align(vit_a, vit_b, method="transform_matching", use={fc1: "signed"}, loader=_images())


# --------------------------------------------------------------------------- the command line
def llama_factory() -> nn.Module:
    return tiny_llama(0)


def vit_factory() -> nn.Module:
    return tiny_vit(0)


def mlp_factory() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_cli_align_and_merge_with_symmetry(tmp_path, capsys):
    a, b = tiny_llama(0), tiny_llama(1)
    x = _tokens()[0][0]
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    torch.save(_planted(a, x, 5).state_dict(), tmp_path / "c.pt")
    model = ["--model", f"{__name__}:llama_factory", "--example-shape", "2,6", "--example-dtype", "long"]
    out = tmp_path / "b_signed.safetensors"
    assert main(["align", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), *model, "--symmetry", "signed",
                 "-o", str(out), "--save-perms", str(tmp_path / "t.pt")]) == 0
    assert "transform_matching (signed)" in capsys.readouterr().out
    got = open_checkpoint(out)
    with torch.no_grad():  # B's function, in A's basin
        y = torch.func.functional_call(a, {k: got[k] for k in got}, (x,)).logits
        assert_close(y, b(x).logits, rtol=1e-5, atol=1e-5)
    saved = torch.load(tmp_path / "t.pt", weights_only=False)
    assert any(isinstance(t, SignedPermutation) for t in saved.values())
    # merge with orthogonal maps: the RMSNorm scales are folded, the merged file loads into the same model
    merged = tmp_path / "m.pt"
    assert main(["merge", str(tmp_path / "a.pt"), str(tmp_path / "c.pt"), *model, "--symmetry", "orthogonal",
                 "-o", str(merged)]) == 0
    m = llama_factory()
    m.load_state_dict(torch.load(merged, weights_only=True))
    with torch.no_grad():
        assert_close(m(x).logits, a(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("factory", "extra", "message"), [
    ("llama_factory", ["--example-dtype", "long", "--symmetry", "orthogonal"], "RMSNorm scales are not all ones"),
    ("vit_factory", ["--symmetry", "orthogonal"], "has LayerNorms"),
    ("mlp_factory", ["--symmetry", "signed"], r"module '1' \(ReLU\)"),
    ("mlp_factory", ["--symmetry", "signed", "--method", "ot"], "runs --method transform_matching"),
    ("mlp_factory", ["--symmetry", "rotation"], "--symmetry must be one of"),
])
def test_cli_refuses_what_cannot_be_done_in_one_line(tmp_path, capsys, factory, extra, message):
    import re

    model = globals()[factory]()
    torch.save(model.state_dict(), tmp_path / "a.pt")
    torch.save(model.state_dict(), tmp_path / "b.pt")
    shape = {"llama_factory": "2,6", "vit_factory": "2,1,8,8", "mlp_factory": "2,4"}[factory]
    code = main(["align", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model", f"{__name__}:{factory}",
                 "--example-shape", shape, "-o", str(tmp_path / "o.pt"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "o.pt").exists()


# --------------------------------------------------------------------------- the continual plugin
class RMSResidual(nn.Module):
    """16 features -> a residual stream of width 12 with RMSNorms -> 4 classes (admits signed and orthogonal maps)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm1 = nn.Linear(16, 12), nn.RMSNorm(12)
        self.fc1, self.fc2 = nn.Linear(12, 20), nn.Linear(20, 12)
        self.norm, self.out = nn.RMSNorm(12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.fc2(torch.relu(self.fc1(self.norm1(h))))
        return self.out(self.norm(h))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:No loggers specified")
def test_continual_plugin_merges_with_transforms():
    pytest.importorskip("avalanche")
    from avalanche.training import Naive

    from continual.benchmarks import synthetic
    from continual.plugin import RebasinMergePlugin

    bench = synthetic(3, seed=0, train_per_class=16, test_per_class=8)
    for symmetry in ("signed", "orthogonal"):
        torch.manual_seed(0)
        model = RMSResidual()
        plugin = RebasinMergePlugin(alpha=0.5, matcher="transform_matching", matcher_options={"symmetry": symmetry})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strategy = Naive(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                             criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, eval_mb_size=64,
                             plugins=[plugin])
            for exp in bench.train_stream:
                strategy.train(exp)
        assert [h.experience for h in plugin.history] == [1, 2]
        stream = next(iter(t for t in plugin.history[-1].transforms.values() if not isinstance(t, torch.Tensor)
                           or t.ndim == 2))
        assert isinstance(stream, SignedPermutation) if symmetry == "signed" else stream.ndim == 2
        if symmetry == "orthogonal":  # merged in the folded parametrisation: the scales are ones
            assert bool((model.norm.weight == 1).all())
        assert all(torch.isfinite(p).all() for p in model.parameters())
