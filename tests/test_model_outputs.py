"""Models whose output is not a plain tensor: a ``transformers`` ``ModelOutput``, a dict with ``"logits"``, a
tuple whose first element is the logits. Every evaluation (loss and accuracy) and every default loss reads the
logits in it, in the Python API and on the command line; token-id models can be traced from the command line.
"""

from __future__ import annotations

from collections.abc import Mapping

import builders
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rebasin
from rebasin import RebasinError
from rebasin.apps.cli import main

T = pytest.importorskip("transformers")
from transformers.modeling_outputs import SequenceClassifierOutput

from rebasin.trace import hf_rules

hf_rules.register()  # at import, as in test_hf_models: the conftest guard against registry leaks then sees them

KINDS = ["model_output", "dict", "tuple"]


class Wrapped(nn.Module):
    """A small MLP whose output is wrapped as ``kind`` (``"tensor"``: plain logits, the control)."""

    def __init__(self, kind: str, seed: int = 0, bn: bool = False) -> None:
        super().__init__()
        self.kind = kind
        self.net = builders.mlp(4, [8], 3, bn=bn, seed=seed)

    def forward(self, x: torch.Tensor):
        logits = self.net(x)
        if self.kind == "model_output":
            return SequenceClassifierOutput(logits=logits)
        if self.kind == "dict":
            return {"logits": logits, "probs": logits.softmax(-1)}
        if self.kind == "tuple":
            return logits, logits.softmax(-1)
        return logits


def _pair(kind: str, bn: bool = False):
    a, b = Wrapped(kind, 0, bn).eval(), Wrapped(kind, 1, bn).eval()
    return a, b, a.state_dict(), b.state_dict()


def _loader():
    return builders.batches((4,), 24, 8, seed=3)


def user_loss(output, target):
    """A user's loss that reads the logits itself (what worked before, with accuracy dropped)."""
    logits = output["logits"] if isinstance(output, Mapping) else output[0] if isinstance(output, tuple) else output
    return F.cross_entropy(logits, target)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss_fn", [None, user_loss], ids=["default_loss", "user_loss"])
def test_evaluate_path_reads_the_logits(kind, loss_fn):
    _, _, sa, sb = _pair(kind)
    ref = rebasin.evaluate_path(Wrapped("tensor"), sa, sb, _loader(), num_points=3, loss_fn=loss_fn)
    got = rebasin.evaluate_path(Wrapped(kind), sa, sb, _loader(), num_points=3, loss_fn=loss_fn)
    assert got.accuracy is not None, "accuracy silently dropped"
    torch.testing.assert_close(torch.tensor(got.loss), torch.tensor(ref.loss))
    assert got.accuracy == ref.accuracy


@pytest.mark.parametrize("kind", KINDS)
def test_repair_compare_merge_and_landscape_read_the_logits(kind):
    a, b, sa, sb = _pair(kind, bn=True)
    ca, cb, _, _ = _pair("tensor", bn=True)
    loader = _loader()
    # REPAIR, with BatchNorm
    got = rebasin.evaluate_path(a, sa, sb, loader, num_points=3, repair=True, repair_loader=loader)
    ref = rebasin.evaluate_path(ca, sa, sb, loader, num_points=3, repair=True, repair_loader=loader)
    assert got.accuracy == ref.accuracy and got.accuracy is not None
    # merge + compare_merge (the ensemble included)
    example = torch.randn(2, 4)
    spec = rebasin.spec_from_model(ca, example)
    merged, info = rebasin.merge([a, b], spec=spec, loader=loader, return_info=True)
    merged_ref, info_ref = rebasin.merge([ca, cb], spec=spec, loader=loader, return_info=True)
    cmp = rebasin.compare_merge([a, b], merged, info, loader, loader=loader)
    cmp_ref = rebasin.compare_merge([ca, cb], merged_ref, info_ref, loader, loader=loader)
    assert cmp.accuracy == cmp_ref.accuracy and cmp.accuracy["ensemble"] is not None
    assert cmp.loss["models"] == pytest.approx(cmp_ref.loss["models"])
    assert {k: v for k, v in cmp.loss.items() if k != "models"} == pytest.approx(
        {k: v for k, v in cmp_ref.loss.items() if k != "models"})
    # landscape: error along the path, the Hessian's default loss, CKA of the outputs
    mc = rebasin.landscape.mode_connectivity(a, sa, sb, loader, num_points=3, metric="error")
    mc_ref = rebasin.landscape.mode_connectivity(ca, sa, sb, loader, num_points=3, metric="error")
    assert mc.result.accuracy == mc_ref.result.accuracy and mc.mc == mc_ref.mc
    x, y = loader[0]
    h = float(rebasin.landscape.hessian_top_eigenvalue(a, (x, y), n_iter=5, tol=1.0))
    h_ref = float(rebasin.landscape.hessian_top_eigenvalue(ca, (x, y), n_iter=5, tol=1.0))
    assert h == pytest.approx(h_ref, rel=1e-4)
    assert float(rebasin.landscape.cka(a, b, loader)) == pytest.approx(float(rebasin.landscape.cka(ca, cb, loader)))


@pytest.mark.parametrize("kind", KINDS)
def test_default_training_losses_read_the_logits(kind):
    a, b, sa, sb = _pair(kind)
    ca, cb, _, _ = _pair("tensor")
    loader = _loader()
    curve, curve_ref = rebasin.BezierCurve(sa, sb, num_bends=3), rebasin.BezierCurve(sa, sb, num_bends=3)
    rebasin.fit_curve(a, curve, loader, epochs=1)
    rebasin.fit_curve(ca, curve_ref, loader, epochs=1)
    for k, v in curve_ref.state_dict_at(0.5).items():
        torch.testing.assert_close(curve.state_dict_at(0.5)[k], v)
    got = rebasin.align(a, b, method="ste", loader=loader, max_steps=2)
    ref = rebasin.align(ca, cb, method="ste", loader=loader, max_steps=2)
    assert {k: v.tolist() for k, v in got.perms.items()} == {k: v.tolist() for k, v in ref.perms.items()}


def test_an_output_without_logits_is_a_clear_error():
    class NoLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return {"scores": self.lin(x)}

    m = NoLogits()
    with pytest.raises(RebasinError, match=r"keys \['scores'\].*'logits'.*loss_fn="):
        rebasin.evaluate_path(m, m.state_dict(), m.state_dict(), _loader(), num_points=2)


# ----------------------------------------------------------------------------- Hugging Face BERT
SEQ, VOCAB = 8, 40


def bert() -> nn.Module:
    """A tiny BertForSequenceClassification, built from a config (for ``--model``); global RNG untouched."""
    cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=16, num_labels=3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return T.BertForSequenceClassification(cfg).eval()


def bert_data() -> list:
    """``transformers``-style batches: dicts of ``input_ids`` and ``labels``."""
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (4, SEQ), generator=g),
             "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(3)]


@pytest.fixture(scope="module")
def bert_checkpoints(tmp_path_factory):
    """A, B (A with a planted permutation) and C (another init) as .pt files."""
    d = tmp_path_factory.mktemp("bert")
    model = bert()
    spec = rebasin.spec_from_model(model, bert_data()[0]["input_ids"][:2])
    a = model.state_dict()
    torch.save(a, d / "a.pt")
    torch.save(permute_planted(spec, a), d / "b.pt")
    return d, spec, a


def permute_planted(spec, state):
    return rebasin.permute(spec, rebasin.random_permutation(spec, seed=1), state)


def test_bert_evaluate_path_loss_and_accuracy(bert_checkpoints):
    _, _, a = bert_checkpoints
    model, batches = bert(), bert_data()
    res = rebasin.evaluate_path(model, a, a, batches, num_points=2)
    with torch.no_grad():
        logits = [model(input_ids=b["input_ids"]).logits for b in batches]
    labels = [b["labels"] for b in batches]
    loss = sum(F.cross_entropy(lo, y) * len(y) for lo, y in zip(logits, labels)) / sum(len(y) for y in labels)
    acc = sum(int((lo.argmax(1) == y).sum()) for lo, y in zip(logits, labels)) / sum(len(y) for y in labels)
    assert res.loss[0] == pytest.approx(float(loss), rel=1e-5) and res.accuracy == (acc, acc)


def test_bert_cli_traces_token_ids_and_evaluates(bert_checkpoints, tmp_path, capsys):
    d, _, a = bert_checkpoints
    model = ["--model", f"{__name__}:bert"]
    ab = [str(d / "a.pt"), str(d / "b.pt")]
    # a float example for a token-id model: one line saying how to give integer inputs
    assert main(["align", *ab, *model, "--example-shape", "2,8", "-o", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "--example-dtype long" in err and "--data" in err and err.count("\n") == 1 and "Traceback" not in err
    # --example-dtype long, or the first batch of --data: the planted permutation is undone
    for how in (["--example-shape", "2,8", "--example-dtype", "long"], ["--data", f"{__name__}:bert_data"]):
        out = tmp_path / "aligned.safetensors"
        assert main(["align", *ab, *model, *how, "-o", str(out)]) == 0, capsys.readouterr().err
        got = rebasin.open_checkpoint(out)
        for k, v in a.items():
            torch.testing.assert_close(got[k], v)
    assert main(["align", *ab, *model, "--example-shape", "2,8", "--example-dtype", "complex", "-o",
                 str(tmp_path / "y.pt")]) == 2
    assert "--example-dtype must be one of" in capsys.readouterr().err
    # rebasin path: loss and accuracy of a ModelOutput model
    capsys.readouterr()
    assert main(["path", *ab, *model, "--data", f"{__name__}:bert_data", "--num-points", "3",
                 "--out", str(tmp_path / "path")]) == 0, capsys.readouterr().err
    import json

    payload = json.loads((tmp_path / "path" / "results.json").read_text())
    assert payload["endpoints"]["a"]["accuracy"] is not None
    assert payload["methods"]["linear"]["barrier"]["accuracy"] is not None
    # rebasin merge --eval-data: accuracy of every model, the average, the merged one and the ensemble
    capsys.readouterr()
    assert main(["merge", *ab, *model, "--example-shape", "2,8", "--example-dtype", "long",
                 "--eval-data", f"{__name__}:bert_data", "-o", str(tmp_path / "m.pt")]) == 0
    assert "accuracy on --eval-data" in capsys.readouterr().out
