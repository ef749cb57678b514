"""The ``rebasin`` command line: demo end to end with tiny settings, align, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rebasin.apps.cli import main


def test_demo_writes_results_and_alignment_beats_naive(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out", str(out),
            "--epochs", "8",
            "--width", "32",
            "--num-points", "5",
            "--methods", "weight_matching,activation_matching,sinkhorn_l2,weight_matching+repair,weight_matching+bezier",
            "--sinkhorn-epochs", "1",
            "--curve-epochs", "1",
            "--device", "cpu",
        ]
    )
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    methods = payload["methods"]
    assert set(methods) == {
        "naive", "weight_matching", "activation_matching", "sinkhorn_l2",
        "weight_matching+repair", "weight_matching+bezier",
    }
    for name in ("weight_matching", "activation_matching", "weight_matching+repair", "weight_matching+bezier"):
        assert methods["naive"]["barrier"]["loss"] > methods[name]["barrier"]["loss"]
        assert methods[name]["time_s"] >= 0
    assert [methods[m]["path"] for m in ("naive", "weight_matching+repair", "weight_matching+bezier")] == [
        "linear", "repair", "bezier",
    ]
    # the repaired and curved rows reuse the weight-matched B: their endpoints are the same models
    wm, rep = payload["paths"]["weight_matching"], payload["paths"]["weight_matching+bezier"]
    assert wm["loss"][0] == pytest.approx(rep["loss"][0]) and wm["loss"][-1] == pytest.approx(rep["loss"][-1])
    assert (out / "results.md").read_text().count("|") > 20
    assert (out / "paths.png").read_bytes()[:4] == b"\x89PNG"
    assert "weight_matching" in capsys.readouterr().out


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def wide_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 3))


def _save(path, seed, factory=small_net):
    torch.manual_seed(seed)
    torch.save(factory().state_dict(), path)


def test_align_command_writes_aligned_state(tmp_path):
    a, b, out = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "b_aligned.pt"
    _save(a, 0)
    torch.manual_seed(0)
    model = small_net()
    perm = torch.randperm(8)
    sd = model.state_dict()
    sd = {"0.weight": sd["0.weight"][perm], "0.bias": sd["0.bias"][perm], "2.weight": sd["2.weight"][:, perm], "2.bias": sd["2.bias"]}
    torch.save(sd, b)
    factory = f"{__name__}:small_net"
    code = main(["align", str(a), str(b), "--model", factory, "--example-shape", "1,4", "-o", str(out)])
    assert code == 0
    aligned = torch.load(out, weights_only=True)
    reference = torch.load(a, weights_only=True)
    for k in reference:
        torch.testing.assert_close(aligned[k], reference[k])


def rng_free_net() -> nn.Module:
    """``small_net`` built without advancing the caller's global RNG."""
    with torch.random.fork_rng():
        return small_net()


@pytest.mark.parametrize("command", ["align", "merge"])
def test_example_shape_input_leaves_the_global_rng_alone(tmp_path, command):
    # main() may run inside a caller's process: the --example-shape input comes from a seeded generator
    a, b, out = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "out.pt"
    _save(a, 0)
    _save(b, 1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    code = main([command, str(a), str(b), "--model", f"{__name__}:rng_free_net", "--example-shape", "1,4", "-o", str(out)])
    assert code == 0
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--method", "magic"], "weight_matching"),
        (["--model", "no_such_module_xyz:f"], "cannot import module"),
        (["--model", "tests_missing_colon"], "package.module:factory"),
        (["--example-shape", "1,x"], "example-shape"),
    ],
)
def test_align_errors_are_one_line(tmp_path, capsys, argv_tail, message):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    _save(a, 0)
    _save(b, 1)
    argv = ["align", str(a), str(b), "--model", f"{__name__}:small_net", "--example-shape", "1,4", "-o", str(tmp_path / "o.pt")]
    # later options override earlier ones in argparse
    code = main(argv + argv_tail)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_missing_file_and_mismatched_architecture(tmp_path, capsys):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    _save(a, 0)
    _save(b, 1, factory=wide_net)
    common = ["--model", f"{__name__}:small_net", "--example-shape", "1,4", "-o", str(tmp_path / "o.pt")]
    assert main(["align", str(a), str(tmp_path / "missing.pt"), *common]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["align", str(a), str(b), *common]) == 2
    assert "does not match the architecture" in capsys.readouterr().err


def test_demo_rejects_unknown_method(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path), "--methods", "nope", "--epochs", "1", "--width", "8"])
    assert code == 2
    assert "unknown method" in capsys.readouterr().err


def test_cl_forwards_to_the_continual_comparison(capfd):
    pytest.importorskip("avalanche")
    assert main(["cl", "--help"]) == 0  # a child process: continual is never imported by the CLI itself
    assert "continual.compare" in capfd.readouterr().out


def test_landscape_command_reports_metrics(tmp_path, capsys, monkeypatch):
    import importlib

    from rebasin.apps.data import digits_tensors

    # run_landscape imports the metrics from here at call time; imported here, since run alone nothing else has
    landscape = importlib.import_module("rebasin.landscape")
    batches = []
    real = landscape.hessian_top_eigenvalue

    def spy(model, batch, **kw):
        batches.append(batch)
        return real(model, batch, **kw)

    monkeypatch.setattr(landscape, "hessian_top_eigenvalue", spy)
    out = tmp_path / "land"
    code = main(["landscape", "--out", str(out), "--epochs", "15", "--width", "64", "--num-points", "5",
                 "--curve-epochs", "1", "--device", "cpu"])
    assert code == 0
    # the Hessian's batch pairs every image with its own label
    x_all, y_all = digits_tensors()
    label_of = {tuple(row.tolist()): int(label) for row, label in zip(x_all, y_all)}
    x, y = batches[0]
    assert len(batches) == 2 and len(y) == 512
    assert [label_of[tuple(row.tolist())] for row in x] == y.tolist()
    report = json.loads((out / "landscape.json").read_text())
    pairs = report["pairs"]
    # CKA is invariant to permuting hidden units: aligning B does not change it
    for kind in ("outputs", "last_hidden"):
        assert pairs["unaligned"]["cka"][kind] == pytest.approx(pairs["weight-matched"]["cka"][kind], rel=1e-6)
        assert 0 < pairs["unaligned"]["cka"][kind] <= 1
    # alignment improves the linear path's connectivity (mc closer to zero or positive)
    assert pairs["weight-matched"]["mc"]["linear"] > pairs["unaligned"]["mc"]["linear"]
    assert report["worst_accuracy"]["OT"] > report["worst_accuracy"]["Linear"]
    assert report["hessian"]["A"]["trace"] > 0
    assert "worst test accuracy" in capsys.readouterr().out


def test_demo_rows_do_not_depend_on_which_rows_ran_before(tmp_path):
    common = ["--epochs", "3", "--width", "16", "--num-points", "3", "--curve-epochs", "1", "--device", "cpu",
              "--sinkhorn-epochs", "1", "--no-progress"]
    barriers = []
    for i, methods in enumerate(["weight_matching+bezier", "ot,sinkhorn_l2,weight_matching+bezier"]):
        assert main(["demo", "--out", str(tmp_path / str(i)), "--methods", methods, *common]) == 0
        payload = json.loads((tmp_path / str(i) / "results.json").read_text())
        barriers.append(payload["methods"]["weight_matching+bezier"]["barrier"])
    assert barriers[0] == barriers[1]
