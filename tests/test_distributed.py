"""Under torch.distributed, every function that reads a loader reduces across ranks.

Two gloo processes on CPU (started once for the module, see ``dist_workers``) each hold half of the
batches; their result must equal one process on all the batches (identical permutations, statistics
within 1e-6), be the same on both ranks, and bad input must raise RebasinError on *every* rank.
"""

from __future__ import annotations

import warnings
from typing import Any

import dist_workers as dw
import pytest
import torch
from torch.testing import assert_close

from rebasin import RebasinError, activation_matching, evaluate_path, repair, reset_bn_stats
from rebasin._distributed import reducer
from rebasin.matching import activation_correlations

TOL = {"atol": 1e-6, "rtol": 1e-6}


@pytest.fixture(scope="module")
def world() -> list[dict[str, Any]]:
    return dw.run_world()


def ok(world: list[dict[str, Any]], name: str) -> list[Any]:
    """Both ranks' results of scenario ``name`` (failing with the worker's traceback if one raised)."""
    out = []
    for rank, results in enumerate(world):
        assert name in results, f"rank {rank} did not finish {name!r} (hang or crash)"
        got = results[name]
        assert got[0] == "ok", f"rank {rank} raised in {name!r}:\n{got[3]}"
        out.append(got[1])
    return out


def errors(world: list[dict[str, Any]], name: str) -> list[str]:
    out = []
    for rank, results in enumerate(world):
        assert name in results, f"rank {rank} did not finish {name!r} (hang or crash)"
        got = results[name]
        assert got[0] == "error", f"rank {rank} returned normally in {name!r}"
        assert got[1] == "RebasinError", got[3]
        out.append(got[2])
    return out


def assert_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k, value in want.items():
        assert_close(got[k], value, **TOL, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------- union == one process
def test_reset_bn_stats_equals_one_process_on_all_batches(world):
    a, _ = dw.models(bn=True)
    want = reset_bn_stats(a, a.state_dict(), dw.data())
    for got in ok(world, "reset_bn"):
        assert_states(got, want)


def test_evaluate_path_equals_one_process_on_all_batches(world):
    a, b = dw.models(bn=True)
    want = evaluate_path(a, a.state_dict(), b.state_dict(), dw.data(), num_points=3, bn_loader=dw.data(seed=1))
    for got in ok(world, "evaluate_path"):
        assert got["n"] == want.metadata["num_examples"] == 64
        assert_close(torch.tensor(got["loss"]), torch.tensor(want.loss), **TOL)
        assert got["accuracy"] == pytest.approx(want.accuracy, abs=1e-12)


@pytest.mark.parametrize("closed_form", [False, True])
def test_repair_equals_one_process_on_all_batches(world, closed_form):
    a, b = dw.models()
    want = repair(a, a.state_dict(), b.state_dict(), 0.5, dw.data(), spec=dw.spec_of(a),
                  closed_form=closed_form).state_dict()
    for got in ok(world, "repair_closed_form" if closed_form else "repair"):
        assert_states(got, want)


def test_repair_with_batchnorm_equals_one_process_on_all_batches(world):
    a, b = dw.models(bn=True)
    want = repair(a, a.state_dict(), b.state_dict(), 0.5, dw.data()).state_dict()
    for got in ok(world, "repair_bn"):
        assert_states(got, want)


def test_activation_matching_identical_permutations_and_correlations(world):
    a, b = dw.models()
    perms = activation_matching(a, b, dw.data())
    corr = activation_correlations(a, b, dw.data())
    got = ok(world, "activation")
    for res in got:
        assert res["perms"].keys() == perms.keys()
        for k in perms:
            assert torch.equal(res["perms"][k], perms[k])
        for k in corr:
            assert_close(res["corr"][k], corr[k], **TOL)
    # the shards disagree on their own, so the agreement above is the reduction's doing
    alone = [activation_correlations(a, b, dw.shard(dw.data(), r)) for r in range(2)]
    k = next(iter(corr))
    assert not torch.allclose(alone[0][k], alone[1][k])


def test_group_keyword_chooses_the_process_group(world):
    a, b = dw.models()
    perms = activation_matching(a, b, dw.data())
    for got in ok(world, "activation_group"):
        assert all(torch.equal(got[k], perms[k]) for k in perms)


@pytest.mark.parametrize("gram", [False, True])
def test_cka_equals_one_process_on_all_batches(world, gram):
    want = dw.cka_of(dw.data(), gram=gram)
    for got in ok(world, "cka_gram" if gram else "cka"):
        assert got == pytest.approx(want, abs=1e-9)
    alone = [dw.cka_of(dw.shard(dw.data(), r)) for r in range(2)]
    assert ok(world, "cka_nosync") == pytest.approx(alone, abs=1e-12)
    assert abs(alone[0] - want) > 1e-6


def test_merge_with_activation_matching_and_repair_equals_one_process(world):
    want = dw.merged(dw.data())
    for got in ok(world, "merge"):
        assert_states(got["state"], want["state"])
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-9)
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)


def test_hessian_metrics_equal_one_process_on_all_batches(world):
    with warnings.catch_warnings():  # converged or not after 20 power iterations, the iterates must agree
        warnings.simplefilter("ignore")
        want = dw.hessian(dw.data())
    for got in ok(world, "hessian"):
        assert got["top"] == pytest.approx(want["top"], rel=1e-9)
        assert got["trace"] == pytest.approx(want["trace"], rel=1e-9)


# ---------------------------------------------------------------------------------------- the fitters: same steps
def test_ste_takes_the_steps_of_one_process_on_the_union_batches(world):
    want = dw.ste(dw.union(dw.data()))
    for got in ok(world, "ste"):
        assert all(torch.equal(got["perms"][k], want["perms"][k]) for k in want["perms"])
        assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), atol=1e-5, rtol=1e-5)


def test_sinkhorn_fit_takes_the_steps_of_one_process_on_the_union_batches(world):
    want = dw.sinkhorn_fit(dw.union(dw.data()))
    got = ok(world, "sinkhorn")
    for res in got:
        assert all(torch.equal(res["perms"][k], want["perms"][k]) for k in want["perms"])
        assert_close(torch.tensor(res["history"]), torch.tensor(want["history"]), atol=1e-5, rtol=1e-5)
        for k in want["logits"]:
            assert_close(res["logits"][k], want["logits"][k], atol=1e-5, rtol=1e-5)
    for k in want["logits"]:  # decided once: bitwise the same on both ranks
        assert torch.equal(got[0]["logits"][k], got[1]["logits"][k])


def test_fit_curve_takes_the_steps_of_one_process_on_the_union_batches(world):
    want = dw.curve_fit(dw.union(dw.data()))
    got = ok(world, "fit_curve")
    for res in got:
        assert_close(torch.tensor(res["losses"]), torch.tensor(want["losses"]), atol=1e-6, rtol=1e-6)
        for k in want["bends"]:
            assert_close(res["bends"][k], want["bends"][k], atol=1e-5, rtol=1e-5)
    for k in want["bends"]:
        assert torch.equal(got[0]["bends"][k], got[1]["bends"][k])


def test_mode_connectivity_with_a_bezier_curve_is_reduced(world):
    """BatchNorm in training mode normalises each rank's batch: the fit differs from one process on the
    union batch (as under DDP without SyncBatchNorm), so here the ranks must agree with each other."""
    got = ok(world, "mode_connectivity")
    assert got[0]["mc"] == got[1]["mc"]
    assert got[0]["values"] == got[1]["values"]


def test_pam_takes_the_steps_of_one_process_on_the_union_batches(world):
    want = dw.pam(dw.union(dw.data()))
    got = ok(world, "pam")
    for res in got:
        assert all(torch.equal(res["perms"][k], want["perms"][k]) for k in want["perms"])
        assert res["changed"] == want["changed"]
        assert_close(torch.tensor(res["history"]), torch.tensor(want["history"]), atol=1e-5, rtol=1e-5)
        assert res["finetune"] == pytest.approx(want["finetune"], abs=1e-5)
        for k in want["bends"]:
            assert_close(res["bends"][k], want["bends"][k], atol=1e-5, rtol=1e-5)
        for k in want["soft"]:
            assert_close(res["soft"][k], want["soft"][k], atol=1e-4, rtol=1e-4)
    for k in want["bends"]:  # decided once: bitwise the same on both ranks
        assert torch.equal(got[0]["bends"][k], got[1]["bends"][k])
    for rank, res in enumerate(ok(world, "pam_nosync")):  # opting out: this rank's shard alone
        alone = dw.pam(dw.shard(dw.data(), rank), sync=False)
        assert_close(torch.tensor(res["history"]), torch.tensor(alone["history"]))


@pytest.mark.parametrize("name", ["unequal_ste", "unequal_sinkhorn", "unequal_curve"])
def test_shards_of_different_lengths_raise_on_every_rank(world, name):
    for msg in errors(world, name):
        assert "different numbers of batches" in msg


# ---------------------------------------------------------------------------------------- opting out
def test_sync_false_gives_per_shard_statistics(world):
    a, _ = dw.models(bn=True)
    for rank, got in enumerate(ok(world, "reset_bn_nosync")):
        assert_states(got, reset_bn_stats(a, a.state_dict(), dw.shard(dw.data(), rank)))
    for rank, got in enumerate(ok(world, "sinkhorn_nosync")):
        want = dw.sinkhorn_fit(dw.shard(dw.data(), rank), sync=False)
        assert_close(torch.tensor(got["history"]), torch.tensor(want["history"]))
    a, b = dw.models()
    for rank, got in enumerate(ok(world, "activation_nosync")):
        want = activation_correlations(a, b, dw.shard(dw.data(), rank))
        for k in want:
            assert_close(got["corr"][k], want[k], **TOL)


def test_sync_and_group_arguments_without_a_process_group():
    assert reducer(True) is None and reducer(False) is None
    with pytest.raises(RebasinError, match="no initialised process group"):
        reducer(True, group=object())
    with pytest.raises(RebasinError, match="sync=False"):
        reducer(False, group=object())
    with pytest.raises(RebasinError, match="sync must be True or False"):
        reducer("yes")  # type: ignore[arg-type]  # the wrong type is the input under test


# ---------------------------------------------------------------------------------------- bad input: every rank raises
@pytest.mark.parametrize("name", ["mismatch_shapes", "mismatch_activation", "mismatch_sinkhorn"])
def test_ranks_with_different_shapes_raise_on_every_rank(world, name):
    for msg in errors(world, name):
        assert "disagree on the spec or the model/state shapes" in msg


@pytest.mark.parametrize("kind", ["reset", "evaluate", "activation", "repair"])
def test_ranks_with_and_without_batchnorm_raise_on_every_rank(world, kind):
    """A rank whose model has no BatchNorm used to return from reset_bn_stats before any collective, leaving
    the other rank's reduction to pair with its *next* collective (a hang, or a garbled later call)."""
    for msg in errors(world, f"bn_mismatch_{kind}"):
        assert "disagree on the spec or the model/state shapes" in msg


def test_a_rank_failing_before_the_agreement_raises_on_every_rank(world):
    first, second = errors(world, "no_perms_sinkhorn")
    assert "rank 1 of 2 failed" in first and "no permutations" in first
    assert "no permutations" in second


@pytest.mark.parametrize(
    "name", ["empty_reset", "empty_activation", "empty_repair", "empty_evaluate", "empty_sinkhorn", "empty_cka",
             "empty_hessian", "empty_pam"]
)
def test_a_rank_with_an_empty_shard_raises_on_every_rank(world, name):
    msgs = errors(world, name)
    assert "rank" in msgs[0] and ("empty shard" in msgs[0] or "no batch" in msgs[0])
    assert "empty shard" in msgs[1] or "no batch" in msgs[1]


def test_the_group_still_works_after_the_errors(world):
    a, _ = dw.models(bn=True)
    want = reset_bn_stats(a, a.state_dict(), dw.data())
    for got in ok(world, "after_errors"):
        assert_states(got, want)
