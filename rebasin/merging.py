r"""Merging ``N`` models of one architecture into one: align all into one basin, average, REPAIR.

Algorithm (a "merge many" in the spirit of Ainsworth et al. 2023, with any matcher of
:func:`rebasin.align`):

1. Align every model to the reference model (``reference=``); the reference is never permuted, so
   the merged model lives in its basin.
2. Repeat: align each non-reference model (its original weights) to the average of the *other*
   aligned models (leave-one-out, so a model is not pulled towards itself), until no permutation
   changes or ``iterations`` rounds were run.
3. Average the aligned state_dicts.
4. Optionally REPAIR (:func:`rebasin.repair_states` with uniform weights): every permuted channel
   of the average gets the mean of the ``N`` aligned models' channel statistics — BatchNorm
   statistics reset, other channels corrected in their producing layer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import forward_with_state, module_with_state, resolve_device, split_batch, state_of, to_device
from ._errors import RebasinError
from .paths.linear import combine
from .paths.repairing import repair_states
from .paths.running import evaluate_state
from .spec.core import PermutationSpec

__all__ = ["merge", "MergeInfo"]

State = Mapping[str, Tensor]


@dataclass(frozen=True)
class MergeInfo:
    """What :func:`merge` did, and how good the result is.

    Attributes
    ----------
    method
        The matcher used.
    perms
        One ``{perm: LongTensor}`` per input model mapping it into the reference's basin
        (``{}`` for the reference).
    rounds
        Alignment rounds run (the first aligns to the reference).
    converged
        True when the last round changed no permutation (always True for ``N = 2``).
    changes
        Number of models whose permutations changed in each round after the first.
    repaired
        Whether REPAIR was applied.
    time_s
        Wall time of alignment, averaging and REPAIR (not of the evaluation).
    accuracy, loss
        With an evaluation loader: ``{"models": [...], "naive": ..., "naive_repair": ...,
        "aligned_average": ..., "merged": ..., "ensemble": ...}`` — each input model, the plain
        average of the unaligned weights, that average REPAIRed (only when ``repair=True``), the
        aligned average before REPAIR, the returned model, and the ensemble of the inputs (mean
        logits). ``None`` without data.
    """

    method: str
    perms: list[dict[str, Tensor]]
    rounds: int
    converged: bool
    changes: list[int]
    repaired: bool
    time_s: float
    accuracy: dict[str, Any] | None = field(default=None)
    loss: dict[str, Any] | None = field(default=None)


def _check_models(models: Sequence[nn.Module]) -> list[dict[str, Tensor]]:
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise RebasinError(f"models must be a list of nn.Module, got {type(models).__name__}")
    if len(models) < 2:
        raise RebasinError(f"merge needs at least two models, got {len(models)}")
    bad = [i for i, m in enumerate(models) if not isinstance(m, nn.Module)]
    if bad:
        raise RebasinError(f"models[{bad[0]}] is a {type(models[bad[0]]).__name__}, not an nn.Module")
    states = [state_of(m) for m in models]
    ref_type, ref = type(models[0]), states[0]
    for i, (m, s) in enumerate(zip(models, states)):
        if i == 0:
            continue
        problems = []
        if type(m) is not ref_type:
            problems.append(f"class {type(m).__name__} vs {ref_type.__name__}")
        only_0 = [k for k in ref if k not in s]
        only_i = [k for k in s if k not in ref]
        if only_0:
            problems.append(f"keys only in models[0]: {only_0[:8]}")
        if only_i:
            problems.append(f"keys only in models[{i}]: {only_i[:8]}")
        shapes = [
            f"{k!r}: {tuple(ref[k].shape)} vs {tuple(s[k].shape)}"
            for k in ref
            if k in s and (ref[k].shape != s[k].shape or ref[k].dtype != s[k].dtype)
        ]
        if shapes:
            problems.append("shapes/dtypes differ (models[0] vs models[%d]): %s" % (i, "; ".join(shapes[:8])))
        if problems:
            raise RebasinError(
                f"merge needs models of one architecture, but models[{i}] differs from models[0]: "
                + "; ".join(problems)
            )
    return states


def _same_perms(p: Mapping[str, Tensor] | None, q: Mapping[str, Tensor]) -> bool:
    if p is None or set(p) != set(q):
        return False
    return all(torch.equal(p[k].cpu(), q[k].cpu()) for k in p)


def _ensemble(
    models: Sequence[nn.Module], states: Sequence[State], loader: Iterable[Any], device: torch.device
) -> tuple[float, float | None]:
    """Loss / accuracy of the mean-logit ensemble."""
    works = [{k: v.to(device) for k, v in s.items()} for s in states]
    loss_sum, n, correct, classification = 0.0, 0, 0, True
    with torch.no_grad():
        for batch in loader:
            x, y = split_batch(batch)
            if y is None:
                raise RebasinError("evaluation needs (inputs, targets) batches")
            x, y = to_device(x, device), to_device(y, device)
            out = sum(forward_with_state(models[0], w, x, eval_mode=True) for w in works) / len(works)
            m = int(y.shape[0])
            loss_sum += float(F.cross_entropy(out, y)) * m
            n += m
            classification = classification and not y.is_floating_point() and out.ndim == y.ndim + 1
            if classification:
                correct += int((out.argmax(1) == y).sum())
    if n == 0:
        raise RebasinError("the evaluation loader yielded no batches")
    return loss_sum / n, (correct / n if classification else None)


def merge(
    models: Sequence[nn.Module],
    *,
    method: str = "weight_matching",
    loader: Iterable[Any] | None = None,
    reference: int = 0,
    iterations: int = 10,
    repair: bool = True,
    spec: PermutationSpec | None = None,
    example_input: Any = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    eval_loader: Iterable[Any] | None = None,
    closed_form: bool = False,
    max_batches: int | None = None,
    return_info: bool = False,
    **options: Any,
) -> nn.Module | tuple[nn.Module, MergeInfo]:
    r"""Merge ``N`` models of one architecture into a single model.

    All models are aligned into the reference model's basin with the named matcher (iterating:
    each model is re-aligned to the leave-one-out average of the others until the permutations
    stop changing), their state_dicts are averaged, and the average is optionally REPAIRed so that
    every permuted channel has the mean of the ``N`` aligned models' channel statistics (see
    :func:`rebasin.repair_states`).

    Parameters
    ----------
    models
        ``N >= 2`` modules of one architecture (same class, keys, shapes, dtypes). Not modified.
    method
        Any matcher of :func:`rebasin.align`: ``"weight_matching"`` (no data needed),
        ``"activation_matching"``, ``"ste"``, ``"sinkhorn"``, or ``"identity"`` (naive averaging).
    loader
        ``(inputs, targets)`` batches: data for the data-driven matchers, for REPAIR, for tracing
        the spec and (unless ``eval_loader`` is given) for the accuracies in the info.
    reference
        Index of the model whose basin (unit order) the merged model keeps.
    iterations
        Maximum alignment rounds (>= 1); the first aligns every model to the reference.
    repair
        REPAIR the average (needs ``loader``; pass ``repair=False`` to merge without data).
    spec
        The permutation spec; traced from ``example_input`` or the loader's first batch if omitted.
    example_input
        Input for tracing the spec when neither ``spec`` nor ``loader`` is given.
    seed
        Passed to the matcher.
    device
        Where to compute; defaults to the reference model's device. The result is moved there.
    eval_loader
        Data for the accuracies of the info (default ``loader``).
    closed_form, max_batches
        REPAIR options (see :func:`rebasin.repair`).
    return_info
        Also return a :class:`MergeInfo`.
    options
        Passed on to the matcher through :func:`rebasin.align` (unknown options are an error).

    Returns
    -------
    nn.Module or (nn.Module, MergeInfo)
        A new module (deep copy of the reference) holding the merged state; parameters keep the
        reference's ``requires_grad`` flags.

    Raises
    ------
    RebasinError
        For fewer than two models, models of different architectures, a bad ``reference`` or
        ``iterations``, or ``repair=True`` without a loader.

    Examples
    --------
    >>> merged, info = merge([m1, m2, m3, m4], loader=train_loader, return_info=True)  # doctest: +SKIP
    >>> info.accuracy["merged"], info.accuracy["naive"]                               # doctest: +SKIP
    """
    from .matching.alignment import align
    from .trace.tracing import spec_for

    states = _check_models(models)
    n = len(models)
    if isinstance(reference, bool) or not isinstance(reference, int) or not -n <= reference < n:
        raise RebasinError(f"reference must be an index into the {n} models, got {reference!r}")
    reference %= n
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise RebasinError(f"iterations must be a positive int, got {iterations!r}")
    if repair and loader is None:
        raise RebasinError(
            "merge(repair=True) needs data to measure channel statistics: pass loader=, or repair=False"
        )
    ref_model = models[reference]
    device = resolve_device(ref_model, device=device)
    if spec is None:
        spec = spec_for(ref_model, example_input=example_input, loader=loader)
    elif not isinstance(spec, PermutationSpec):
        raise RebasinError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    spec.validate(states[0])

    start = time.perf_counter()
    perms: list[dict[str, Tensor] | None] = [None] * n
    aligned: list[dict[str, Tensor]] = [dict(s) for s in states]
    perms[reference] = {}
    uniform_rest = [1.0 / (n - 1)] * (n - 1)

    # Weight matching is warm-started from the model's current permutations in the later rounds: its
    # sweeps never lower the objective, so each re-alignment can only raise the sum of pairwise
    # similarities and the rounds settle. From the identity every round it lands in a different local
    # optimum now and then, and the rounds keep changing (4 digits MLPs 64-128-128-10: 17 rounds to
    # settle from the identity, 7 warm-started).
    warm = method == "weight_matching" and "init" not in options

    def align_to(target: nn.Module, i: int, init: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        extra = {"init": init} if warm and init is not None else {}
        res = align(target, models[i], method=method, loader=loader, spec=spec, seed=seed, device=device,
                    **options, **extra)
        return dict(res.perms), res.state_b

    for i in range(n):  # round 1: everyone to the reference
        if i != reference:
            perms[i], aligned[i] = align_to(ref_model, i)
    rounds, changes, converged = 1, [], n == 2
    while not converged and rounds < iterations:
        changed = 0
        for i in range(n):
            if i == reference:
                continue
            others = [aligned[j] for j in range(n) if j != i]
            target = module_with_state(ref_model, combine(others, uniform_rest))
            new_perms, new_state = align_to(target, i, perms[i])
            if not _same_perms(perms[i], new_perms):
                changed += 1
                perms[i], aligned[i] = new_perms, new_state
        rounds += 1
        changes.append(changed)
        converged = changed == 0

    uniform = [1.0 / n] * n
    average = combine(aligned, uniform)
    if repair:
        merged_state = repair_states(
            ref_model, aligned, uniform, loader, spec=spec, closed_form=closed_form, max_batches=max_batches, device=device
        )
    else:
        merged_state = average
    merged = module_with_state(ref_model, merged_state, device)
    elapsed = time.perf_counter() - start
    if not return_info:
        return merged

    accuracy: dict[str, Any] | None = None
    loss: dict[str, Any] | None = None
    data = eval_loader if eval_loader is not None else loader
    if data is not None:
        naive = combine(states, uniform)
        candidates: dict[str, State] = {"naive": naive}
        if repair:
            candidates["naive_repair"] = repair_states(
                ref_model, states, uniform, loader, spec=spec, closed_form=closed_form, max_batches=max_batches, device=device
            )
        candidates["aligned_average"] = average
        candidates["merged"] = merged_state
        accuracy, loss = {"models": []}, {"models": []}
        for s in states:
            lo, acc, _ = evaluate_state(ref_model, s, data, loss_fn=None, device=device)
            loss["models"].append(lo)
            accuracy["models"].append(acc)
        for name, s in candidates.items():
            loss[name], accuracy[name] = evaluate_state(ref_model, s, data, loss_fn=None, device=device, name=name)[:2]
        loss["ensemble"], accuracy["ensemble"] = _ensemble(models, states, data, device)
    info = MergeInfo(
        method=method,
        perms=[dict(p or {}) for p in perms],
        rounds=rounds,
        converged=converged,
        changes=changes,
        repaired=bool(repair),
        time_s=elapsed,
        accuracy=accuracy,
        loss=loss,
    )
    return merged, info
