r"""Merging ``N`` models of one architecture into one: align all into one basin, average, REPAIR.

Algorithm (a "merge many" in the spirit of Ainsworth et al. 2023, with any matcher of
:func:`rebasin.align`):

1. Align every model to the reference model (``reference=``); the reference is never permuted, so
   the merged model lives in its basin.
2. Repeat: align each non-reference model (its original weights) to the average of the *other*
   aligned models (leave-one-out, so a model is not pulled towards itself), until no permutation
   changes or ``n_iter`` rounds were run.
3. Average the aligned state_dicts.
4. Optionally REPAIR (:func:`rebasin.repair` with uniform weights): every permuted channel
   of the average gets the mean of the ``N`` aligned models' channel statistics — BatchNorm
   statistics reset, other channels corrected in their producing layer.

:func:`merge` measures nothing it was not asked for: with ``return_info=True`` and an ``eval_loader`` its
:class:`MergeInfo` holds the merged model's loss and accuracy, nothing else. :func:`compare_merge` is the
separate, explicit benchmark of a merge against its baselines (each input model, the naive average, the
aligned average before REPAIR, the output ensemble).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    check_int,
    first_inputs,
    forward_with_state,
    logits_of,
    module_with_state,
    resolve_device,
    split_batch,
    state_of,
    to_device,
)
from ._distributed import Reducer, fingerprint, guarded, reducer
from ._errors import RebasinError
from .matching.alignment import Alignment
from .matching.registry import get_matcher
from .paths import repairing  # the module: merge(repair=...) is a flag, repairing.repair the function
from .paths.linear import combine
from .paths.running import evaluate_state
from .spec.checkpoint import LazyState, meta_state, open_checkpoint, read_rows, save_permuted
from .spec.core import PermutationSpec, permute_unchecked
from .spec.hf_folder import PretrainedFolder, check_new_folder, open_pretrained, save_pretrained_permuted
from .spec.transforms import transform_matrix

__all__ = ["MergeComparison", "MergeInfo", "compare_merge", "merge", "merge_checkpoints"]

State = Mapping[str, Tensor]


@dataclass(frozen=True)
class MergeInfo:
    """What :func:`merge` did, and (with an ``eval_loader``) how good the merged model is.

    Attributes
    ----------
    method
        The matcher used (a name of the matcher registry).
    reference
        Index of the model whose basin the merged model lives in.
    spec
        The permutation spec used.
    alignments
        One :class:`rebasin.Alignment` per input model: the alignment into the reference's basin that the
        merge used (the last accepted round; ``state_b`` is that model's permuted state_dict, so the
        info keeps ``N - 1`` state_dicts alive; ``model_a``, ``state_a`` and ``model_b`` are left None),
        ``None`` for the reference (never permuted).
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
    loss, accuracy
        The merged model's mean loss (cross-entropy) and accuracy on ``eval_loader``; ``None`` without an
        ``eval_loader`` (accuracy also ``None`` when the batches are not classification). Baselines are
        :func:`compare_merge`'s job.
    """

    method: str
    reference: int
    spec: PermutationSpec
    alignments: list[Alignment | None]
    rounds: int
    converged: bool
    changes: list[int]
    repaired: bool
    time_s: float
    loss: float | None = field(default=None)
    accuracy: float | None = field(default=None)

    @property
    def perms(self) -> list[dict[str, Tensor]]:
        """One ``{perm: LongTensor}`` per input model mapping it into the reference's basin (``{}`` for the reference)."""
        return [{} if a is None else dict(a.perms) for a in self.alignments]


@dataclass(frozen=True)
class MergeComparison:
    """A merge next to its baselines, from :func:`compare_merge`.

    Attributes
    ----------
    accuracy, loss
        ``{"models": [...], "naive": ..., "naive_repair": ..., "aligned_average": ..., "merged": ...,
        "ensemble": ...}``: each input model, the plain average of the unaligned weights, that average
        REPAIRed (only when the merge was REPAIRed), the aligned average before REPAIR, the merged model,
        and the ensemble of the inputs (mean logits). Accuracies are ``None`` for non-classification data.
    """

    accuracy: dict[str, Any]
    loss: dict[str, Any]


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


def _same_alignment(p: Alignment, q: Alignment) -> bool:
    """Equal permutations and (for transform matchers) equal transforms, orthogonal maps to ``1e-4``."""
    if not _same_perms(p.perms, q.perms):
        return False
    if p.transforms is None or q.transforms is None:
        return p.transforms is q.transforms
    if set(p.transforms) != set(q.transforms):
        return False
    for name, t in p.transforms.items():
        u = q.transforms[name]
        a, b = transform_matrix(t), transform_matrix(u)
        if a.shape != b.shape or (a.numel() and float((a - b.to(a.device)).abs().max()) > 1e-4):
            return False
    return True


def _prepared(matcher: Any, models: Sequence[nn.Module], reference: int, example_input: Any,
              options: dict[str, Any]) -> tuple[list[nn.Module], dict[str, Any]]:
    """The models after the matcher's ``prepare`` hook (rewritten once, against the reference) and its options."""
    ref = matcher.prepare(models[reference], models[reference], example_input, dict(options))
    out = [ref.model_a if i == reference else matcher.prepare(m, m, example_input, ref.options).model_a
           for i, m in enumerate(models)]
    return out, ref.options


def _ensemble(
    models: Sequence[nn.Module],
    states: Sequence[State],
    loader: Iterable[Any],
    device: torch.device,
    red: Reducer | None = None,
) -> tuple[float, float | None]:
    """Loss / accuracy of the mean-logit ensemble (summed over ``red``'s ranks when given)."""
    works = [{k: v.to(device) for k, v in s.items()} for s in states]
    loss_sum, n, correct, classification, batches = 0.0, 0, 0, True, 0
    with guarded(red, "the ensemble's evaluation") as outcome, torch.no_grad():
        for batch in loader:
            batches += 1
            x, y = split_batch(batch)
            if y is None:
                raise RebasinError("evaluation needs (inputs, targets) batches")
            x, y = to_device(x, device), to_device(y, device)
            out = sum(logits_of(forward_with_state(models[0], w, x, eval_mode=True)) for w in works) / len(works)
            m = int(y.shape[0])
            loss_sum += float(F.cross_entropy(out, y)) * m  # type: ignore[arg-type]  # the model's output is a Tensor; the helper's return type admits a float
            n += m
            classification = classification and not y.is_floating_point() and out.ndim == y.ndim + 1  # type: ignore[union-attr]  # the model's output is a Tensor; the helper's return type admits a float
            if classification:
                correct += int((out.argmax(1) == y).sum())  # type: ignore[union-attr]  # the model's output is a Tensor; the helper's return type admits a float
        outcome.count, outcome.key = batches, fingerprint(works)
    if red is not None:
        loss_sum, total_n, total_correct, not_classification = red.sum_numbers(
            loss_sum, n, correct, float(not classification)
        )
        n, correct, classification = int(total_n), int(total_correct), not_classification == 0
    if n == 0:
        raise RebasinError("the evaluation loader yielded no batches")
    return loss_sum / n, (correct / n if classification else None)


def merge(
    models: Sequence[nn.Module],
    *,
    method: str = "weight_matching",
    loader: Iterable[Any] | None = None,
    reference: int = 0,
    n_iter: int = 10,
    repair: bool = True,
    spec: PermutationSpec | None = None,
    example_input: Any = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    eval_loader: Iterable[Any] | None = None,
    closed_form: bool = False,
    max_batches: int | None = None,
    return_info: bool = False,
    sync: bool = True,
    group: Any = None,
    **options: Any,
) -> nn.Module | tuple[nn.Module, MergeInfo]:
    r"""Merge ``N`` models of one architecture into a single model.

    All models are aligned into the reference model's basin with the named matcher (iterating:
    each model is re-aligned to the leave-one-out average of the others until the permutations
    stop changing), their state_dicts are averaged, and the average is optionally REPAIRed so that
    every permuted channel has the mean of the ``N`` aligned models' channel statistics (see
    :func:`rebasin.repair`).

    Parameters
    ----------
    models
        ``N >= 2`` modules of one architecture (same class, keys, shapes, dtypes). Not modified.
    method
        A registered matcher (``rebasin.matcher_names()``), run through :func:`rebasin.align`:
        ``"weight_matching"`` (no data needed), ``"activation_matching"``, ``"ste"``, ``"sinkhorn"``,
        ``"ot"``, ``"identity"`` (naive averaging), or one registered with :func:`rebasin.register_matcher`.
    loader
        ``(inputs, targets)`` batches: data for the data-driven matchers, for REPAIR and for tracing
        the spec.
    reference
        Index of the model whose basin (unit order) the merged model keeps.
    n_iter
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
        Where to compute; defaults to the reference model's device. The result is moved there. Passed
        to the matcher when it takes a ``device`` option (every built-in matcher does).
    eval_loader
        With ``return_info=True``: data on which the merged model's loss and accuracy are measured for
        the info. Without it nothing is evaluated. To compare the merge with its baselines (naive
        average, each model, the ensemble) call :func:`compare_merge`.
    closed_form, max_batches
        REPAIR options (see :func:`rebasin.repair`).
    return_info
        Also return a :class:`MergeInfo`.
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default): REPAIR's
        statistics and the evaluation are summed over the ranks of ``group`` (None: the default group), and
        both go to the matcher when it takes them (activation matching, STE and Sinkhorn do), so every rank
        merges with the statistics of the union of the shards. ``sync=False``: this process's data only.
    options
        Passed on to the matcher through :func:`rebasin.align` (unknown options are an error, raised
        before anything runs). With ``method="transform_matching"``, ``symmetry="signed"`` or
        ``"orthogonal"`` aligns every model to the reference by signed permutations or orthogonal maps where
        the architecture admits them (a round changes nothing when every transform stays within ``1e-4``).

    Returns
    -------
    nn.Module or (nn.Module, MergeInfo)
        A new module (deep copy of the reference) holding the merged state; parameters keep the
        reference's ``requires_grad`` flags. When the matcher rewrites the models first (transform matching
        with ``symmetry="orthogonal"`` folds LayerNorms into RMSNorms), a copy of the rewritten reference:
        the merge lives in that architecture.

    Raises
    ------
    RebasinError
        For fewer than two models, models of different architectures, a bad ``reference`` or
        ``n_iter``, an unknown method or option, a data-driven matcher or ``repair=True`` without a
        loader.

    Examples
    --------
    >>> merged = merge([m1, m2, m3, m4], loader=train_loader)                           # doctest: +SKIP
    >>> merged, info = merge([m1, m2], loader=train_loader, eval_loader=test_loader,
    ...                      return_info=True)                                          # doctest: +SKIP
    >>> info.accuracy, info.rounds                                                      # doctest: +SKIP
    """
    # align is looked up at call time, so a test can watch every alignment merge makes
    from .matching.alignment import align
    from .trace.tracing import spec_for

    states = _check_models(models)
    n = len(models)
    if isinstance(reference, bool) or not isinstance(reference, int) or not -n <= reference < n:
        raise RebasinError(f"reference must be an index into the {n} models, got {reference!r}")
    reference %= n
    check_int(n_iter, "n_iter (alignment rounds)")
    matcher = get_matcher(method)
    matcher.check_options(options)
    if matcher.prepare is not None:  # e.g. transform matching: every model folded once, the kinds found once
        if example_input is None and loader is not None:
            example_input = first_inputs(loader)  # read once: every later alignment traces on it too
        models, options = _prepared(matcher, models, reference, example_input, options)
        states = [state_of(m) for m in models]
    if matcher.needs_data and loader is None:
        raise RebasinError(f"merge(method={method!r}) needs data for its matcher: pass loader=")
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
    alignments: list[Alignment | None] = [None] * n
    uniform_rest = [1.0 / (n - 1)] * (n - 1)

    def aligned(i: int) -> State:
        found = alignments[i]
        return states[i] if found is None else found.state_b

    # A matcher that declares the standard keyword init (weight matching, Sinkhorn) is warm-started from the
    # model's current permutations in the later rounds. Weight matching's
    # sweeps never lower the objective, so each re-alignment can only raise the sum of pairwise
    # similarities and the rounds settle. From the identity every round it lands in a different local
    # optimum now and then, and the rounds keep changing (4 digits MLPs 64-128-128-10: 17 rounds to
    # settle from the identity, 7 warm-started).
    # (the registry passes init, device, sync and group only to matchers that declare them, so nothing here
    # tests a matcher's name or signature)
    warm = "init" not in options

    def align_to(target: nn.Module, i: int) -> Alignment:
        previous = alignments[i]
        extra = {"init": dict(previous.perms)} if warm and previous is not None else {}
        standard = {k: v for k, v in (("sync", sync), ("group", group)) if k not in options}
        found = align(target, models[i], method=method, loader=loader, spec=spec, seed=seed, device=device,
                      example_input=example_input, **options, **standard, **extra)
        # the info keeps B's aligned state only, not the target model (an average) each alignment ran against
        return dataclasses.replace(found, model_a=None, state_a=None, model_b=None)

    for i in range(n):  # round 1: everyone to the reference
        if i != reference:
            alignments[i] = align_to(ref_model, i)
    rounds, changes, converged = 1, [], n == 2
    while not converged and rounds < n_iter:
        changed = 0
        for i in range(n):
            if i == reference:
                continue
            others = [aligned(j) for j in range(n) if j != i]
            new = align_to(module_with_state(ref_model, combine(others, uniform_rest)), i)
            current = alignments[i]
            if current is None or not _same_alignment(current, new):
                changed += 1
                alignments[i] = new
        rounds += 1
        changes.append(changed)
        converged = changed == 0

    uniform = [1.0 / n] * n
    aligned_states = [aligned(i) for i in range(n)]
    if repair:
        merged_state = repairing.repair(
            ref_model, aligned_states, uniform, loader, spec=spec, closed_form=closed_form, max_batches=max_batches,  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
            device=device, sync=sync, group=group,
        )
    else:
        merged_state = combine(aligned_states, uniform)
    merged = module_with_state(ref_model, merged_state, device)
    elapsed = time.perf_counter() - start
    if not return_info:
        return merged
    loss = accuracy = None
    if eval_loader is not None:
        loss, accuracy, _ = evaluate_state(ref_model, merged_state, eval_loader, loss_fn=None, device=device,
                                           name="merged", sync=sync, group=group)
    info = MergeInfo(
        method=method,
        reference=reference,
        spec=spec,
        alignments=alignments,
        rounds=rounds,
        converged=converged,
        changes=changes,
        repaired=bool(repair),
        time_s=elapsed,
        loss=loss,
        accuracy=accuracy,
    )
    return merged, info


def compare_merge(
    models: Sequence[nn.Module],
    merged: nn.Module,
    info: MergeInfo,
    eval_loader: Iterable[Any],
    *,
    loader: Iterable[Any] | None = None,
    closed_form: bool = False,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    sync: bool = True,
    group: Any = None,
) -> MergeComparison:
    r"""Benchmark a merge against its baselines on ``eval_loader`` (an explicit, separate measurement).

    Evaluates each input model, the naive average of the unaligned weights, that average REPAIRed
    (when the merge was REPAIRed: the same REPAIR on unaligned weights), the aligned average before
    REPAIR (from ``info.alignments``), the merged model and the ensemble of the inputs (mean logits;
    ``N`` forward passes per batch). Costs ``2N + 3`` passes over ``eval_loader`` plus, with REPAIR, the
    REPAIR passes over ``loader``.

    Parameters
    ----------
    models
        The models given to :func:`merge` (in the same order). Not modified.
    merged, info
        What ``merge(models, ..., return_info=True)`` returned.
    eval_loader
        ``(inputs, targets)`` batches to evaluate on.
    loader
        The data the merge REPAIRed with; needed when ``info.repaired`` (for the naive average REPAIRed).
    closed_form, max_batches
        The REPAIR options the merge used.
    device
        Where to evaluate; defaults to the reference model's device.
    sync, group
        As in :func:`merge`: every evaluation (the ensemble's too) and REPAIR reduce over the ranks.

    Returns
    -------
    MergeComparison

    Raises
    ------
    RebasinError
        Models that do not match ``info`` (count or architecture), or a REPAIRed merge without ``loader``.

    Examples
    --------
    >>> merged, info = merge(models, loader=train_loader, return_info=True)          # doctest: +SKIP
    >>> cmp = compare_merge(models, merged, info, test_loader, loader=train_loader)  # doctest: +SKIP
    >>> cmp.accuracy["merged"] - cmp.accuracy["naive"]                               # doctest: +SKIP
    """
    states = _check_models(models)
    n = len(states)
    if not isinstance(info, MergeInfo):
        raise RebasinError(f"info must be the MergeInfo that merge(return_info=True) returned, got {type(info).__name__}")
    if len(info.alignments) != n:
        raise RebasinError(f"info describes a merge of {len(info.alignments)} models, but {n} models were given")
    if info.repaired and loader is None:
        raise RebasinError(
            "the merge was REPAIRed: pass loader= (the data it REPAIRed with) so the naive average is REPAIRed "
            "the same way"
        )
    ref_model = models[info.reference]
    device = resolve_device(ref_model, device=device)
    uniform = [1.0 / n] * n
    aligned = [states[i] if a is None else a.state_b for i, a in enumerate(info.alignments)]
    candidates: dict[str, State] = {"naive": combine(states, uniform)}
    if info.repaired:
        candidates["naive_repair"] = repairing.repair(
            ref_model, states, uniform, loader, spec=info.spec, closed_form=closed_form, max_batches=max_batches,  # type: ignore[arg-type]  # Optional narrowed by earlier logic mypy cannot follow
            device=device, sync=sync, group=group,
        )
    candidates["aligned_average"] = combine(aligned, uniform)
    candidates["merged"] = state_of(merged)
    accuracy: dict[str, Any] = {"models": []}
    loss: dict[str, Any] = {"models": []}
    for s in states:
        lo, acc, _ = evaluate_state(ref_model, s, eval_loader, loss_fn=None, device=device, sync=sync, group=group)
        loss["models"].append(lo)
        accuracy["models"].append(acc)
    for name, s in candidates.items():  # type: ignore[assignment]  # the name is reused for read-only candidate states
        loss[name], accuracy[name] = evaluate_state(ref_model, s, eval_loader, loss_fn=None, device=device, name=name,
                                                    sync=sync, group=group)[:2]
    loss["ensemble"], accuracy["ensemble"] = _ensemble(models, states, eval_loader, device, reducer(sync, group))
    return MergeComparison(accuracy=accuracy, loss=loss)


class _AlignedAverage(LazyState):
    """``sum_i w_i permute(spec, perms_i, source_i)``, computed key by key on access (one tensor of each source)."""

    def __init__(self, spec: PermutationSpec, sources: Sequence[Mapping[str, Tensor]], perms: Sequence[Mapping[str, Tensor]],
                 weights: Sequence[float], meta: dict[str, Tensor]) -> None:
        self.spec, self.sources, self.perms, self.weights, self._meta = spec, list(sources), list(perms), list(weights), meta

    def __getitem__(self, key: str) -> Tensor:
        tensors = [{key: permute_unchecked(self.spec, p, {key: s[key]})[key]} for s, p in zip(self.sources, self.perms)]
        return combine(tensors, self.weights)[key]

    def read_rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``self[key]``, reading only those rows of each source when no permutation
        acts on the first axis (else the whole tensor, sliced)."""
        if not self.spec.axes[key] or self.spec.axes[key][0] is not None or any(k == key for k, _ in self.spec.grouped):
            return super().read_rows(key, start, stop)
        tensors = [{key: permute_unchecked(self.spec, p, {key: read_rows(s, key, start, stop)})[key]}
                   for s, p in zip(self.sources, self.perms)]
        return combine(tensors, self.weights)[key]

    def __iter__(self) -> Any:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def meta(self, key: str | None = None) -> Tensor | dict[str, Tensor]:
        return dict(self._meta) if key is None else self._meta[key]


def merge_checkpoints(
    spec: PermutationSpec,
    sources: Sequence[Any],
    path: Any,
    *,
    reference: int = 0,
    n_iter: int = 10,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[dict[str, Tensor]]:
    """Merge checkpoints on disk with weight matching, holding one tensor of each model at a time.

    The checkpoint counterpart of ``merge(models, method="weight_matching", repair=False)``, with the same
    rounds: every model is aligned to the reference, then re-aligned (warm-started) to the uniform average
    of the others, aligned, until the permutations stop changing or ``n_iter`` rounds ran; the aligned
    models are averaged. The averages are never stored: they are computed key by key when the lazy
    weight matching reads them, and the merged model is streamed to ``path`` by :func:`save_permuted`.
    REPAIR and the data-driven matchers need the models themselves: use :func:`merge` for them.

    Parameters
    ----------
    spec
        Permutation spec of the architecture.
    sources
        Two or more checkpoint paths (``.safetensors`` / ``.pt``), Hugging Face model folders, or mappings
        (:class:`rebasin.spec.Checkpoint`, :class:`rebasin.spec.PretrainedFolder`, state_dicts) with the same keys
        and shapes.
    path
        Output file, in the format its extension names: ``.safetensors`` (streamed) or a torch
        ``.pt`` / ``.pth`` / ``.bin`` file (gathered first). Every tensor keeps the sources' dtype; a
        bfloat16 or float16 average is computed in float32 and rounded once. When the reference is a model
        folder, a new folder laid out like it (:func:`rebasin.save_pretrained_permuted`), which
        ``from_pretrained`` loads.
    reference
        Index of the source whose unit order the merged model keeps.
    n_iter
        Alignment rounds at most (as :func:`merge`).
    seed, device
        As :func:`rebasin.weight_matching`.

    Returns
    -------
    list[dict[str, Tensor]]
        The permutations applied to each source (the identity for the reference).

    Raises
    ------
    RebasinError
        For fewer than two sources, sources that do not match the spec or each other, a bad
        ``reference`` or ``n_iter``, NaN or inf values, or an unsupported output extension (nothing is
        written then).
    """
    from .matching.weight import weight_matching

    if isinstance(sources, (str, Mapping)) or not isinstance(sources, Sequence) or len(sources) < 2:
        raise RebasinError("merge_checkpoints needs a list of two or more checkpoint paths or mappings")
    states = [s if isinstance(s, Mapping) else open_pretrained(s) if os.path.isdir(s) else open_checkpoint(s)
              for s in sources]
    n = len(states)
    if isinstance(reference, bool) or not isinstance(reference, int) or not -n <= reference < n:
        raise RebasinError(f"reference must be an index into the {n} sources, got {reference!r}")
    reference %= n
    like = states[reference] if isinstance(states[reference], PretrainedFolder) else None
    if like is not None:
        check_new_folder(path)  # before the rounds: a folder in the way is found now, not at the end
    check_int(n_iter, "n_iter (alignment rounds)")
    metas = [meta_state(s) for s in states]
    sizes = spec.validate(metas[0], name="sources[0]")
    for i, m in enumerate(metas[1:], 1):
        spec.validate(m, name=f"sources[{i}]")
        diff = [k for k in spec.axes if m[k].shape != metas[0][k].shape or m[k].dtype != metas[0][k].dtype]
        if diff:
            raise RebasinError(f"sources[{i}] differs from sources[0] in shape or dtype at {diff[:6]}")
    identity = {p: torch.arange(sizes[p]) for p in spec.perms}
    perms: list[dict[str, Tensor]] = [dict(identity) for _ in range(n)]
    for i in range(n):  # round 1: everyone to the reference
        if i != reference:
            perms[i] = weight_matching(spec, _AlignedAverage(spec, [states[reference]], [identity], [1.0], metas[0]),
                                       states[i], seed=seed, device=device)
    rounds, converged = 1, n == 2
    rest = [1.0 / (n - 1)] * (n - 1)
    while not converged and rounds < n_iter:
        changed = 0
        for i in range(n):
            if i == reference:
                continue
            others = [j for j in range(n) if j != i]
            target = _AlignedAverage(spec, [states[j] for j in others], [perms[j] for j in others], rest, metas[0])
            new = weight_matching(spec, target, states[i], init=perms[i], seed=seed, device=device)
            if not _same_perms(perms[i], new):
                changed += 1
                perms[i] = new
        rounds += 1
        converged = changed == 0
    merged = _AlignedAverage(spec, states, perms, [1.0 / n] * n, metas[reference])  # the reference's dtypes
    if like is not None:
        save_pretrained_permuted(spec, {}, merged, path, like=like)  # type: ignore[arg-type]  # like is a PretrainedFolder when merging folders (the only case that sets it)
    else:
        save_permuted(spec, {}, merged, path)
    return perms
