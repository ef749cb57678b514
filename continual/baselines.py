"""The strategies compared by ``python -m continual.compare``, built with one shared setup.

Every strategy gets the same model architecture (fresh copy), the same optimizer settings (AdamW by
default; SGD with momentum and a learning rate decayed per experience for MC-SGD's protocol), batch
size, epochs and evaluation plugin; the ones that replay use the same buffer size.

========================  ===================================================================
name                      strategy
========================  ===================================================================
``naive``                 ``Naive`` (fine-tuning)
``ewc``                   ``EWC(ewc_lambda=100)``
``lwf``                   ``LwF(alpha=1, temperature=2)``
``replay``                ``Replay(mem_size)``
``rebasin_merge``         ``Replay(mem_size)`` + :class:`RebasinMergePlugin` at its defaults (weight
                          matching; alpha chosen for each merge on a rotating fold of the buffer that the
                          experience does not train on, then one more pass over the held-out slice: no
                          storage besides the buffer); ``options`` override them, e.g. ``{"alpha": 0.5}``
``rebasin_merge_holdout`` ``Replay(mem_size)`` + :class:`RebasinMergePlugin` with ``alpha=AlphaPolicy()`` (the
                          defaults until issue 27): alpha chosen on 200 held-out samples of every task seen,
                          kept besides the buffer, every task weighted the same
``rebasin_merge_fold``    ``Replay(mem_size)`` + :class:`RebasinMergePlugin` with
                          ``alpha=AlphaPolicy(source="buffer_fold")``: alpha chosen on a rotating fold of
                          the buffer that the experience does not train on (no storage besides the buffer)
``rebasin_merge_refit``   ``rebasin_merge_fold`` with ``AlphaPolicy(refit=True)`` (the defaults' policy): once
                          alpha is chosen, one more pass over the held-out slice (with buffer samples)
``rebasin_merge_layer``   ``rebasin_merge_refit`` with ``AlphaPolicy(granularity="layer")``: one alpha per layer,
                          by a coordinate search from the best single alpha on the same fold
``naive_rebasin_merge``   ``Naive`` + :class:`RebasinMergePlugin` with ``alpha=AlphaPolicy()`` (no buffer to fold)
``rebasin_merge_zero``    ``Naive`` + :class:`RebasinMergePlugin` with ``alpha=AlphaPolicy(source="current")``:
                          no old sample stored (alpha chosen on the current task's held-out slice)
``si``                    Synaptic Intelligence (``si_lambda=1``): ``Naive`` + :class:`continual.si.SIPlugin`
                          (Avalanche's plugin with copied snapshots; Avalanche's own trains Naive on CPU)
``clewi``                 :class:`CLeWI` (Kozal et al. 2024; ``mem_size`` buffer, alpha 0.5, REPAIR)
``replay_eq_<name>``      ``Replay`` whose buffer holds as many samples as ``<name>`` stores in all (buffer
                          and any other samples; ``continual.compare`` adds it with the right ``mem_size``)
``rebasin_il``            :class:`RebasinIL` (``replay_mem_size=mem_size``): ``ReplayPlugin`` +
                          :class:`RebasinILPlugin`
``mcsgd``                 :class:`MCSGD` (Mirzadeh et al. 2021) with the same optimizer for the
                          continual step and ``mem_size // n_experiences`` samples per experience
                          in its episodic memory (the same total memory as Replay's buffer after
                          the last experience; ``options={"mem_size": k}`` sets it per experience)
========================  ===================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from rebasin import RebasinError

__all__ = ["OPTIMIZERS", "STRATEGIES", "EQUAL_STORAGE", "make_strategy", "mlp"]

#: The optimizers :func:`make_strategy` builds.
OPTIMIZERS = ("adamw", "sgd")

STRATEGIES = ("naive", "ewc", "lwf", "si", "replay", "rebasin_merge", "rebasin_merge_holdout", "rebasin_merge_fold",
              "rebasin_merge_refit", "rebasin_merge_layer",
              "naive_rebasin_merge",
              "rebasin_merge_zero", "rebasin_il", "mcsgd", "clewi")
#: Prefix of the equal-storage Replay controls (``replay_eq_rebasin_merge_holdout``: Replay with what it stores).
EQUAL_STORAGE = "replay_eq_"


def mlp(in_features: int = 784, hidden: int = 256, n_classes: int = 10, depth: int = 1,
        dropout: float = 0.0) -> nn.Module:
    """The reference model: ``rebasin.nets.MLP(in_features, [hidden] * depth, n_classes, dropout=dropout)``.

    It flattens its input. ``depth=2`` is MC-SGD's MLP (two hidden layers of 256; its Permuted MNIST
    configuration adds ``dropout=0.25``).
    """
    from rebasin.nets import MLP

    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise RebasinError(f"depth must be a positive int, got {depth!r}")
    return MLP(in_features, [hidden] * depth, n_classes, dropout=dropout)


def make_strategy(
    name: str,
    *,
    model: nn.Module,
    example_input: Any,
    lr: float = 1e-3,
    train_mb_size: int = 500,
    train_epochs: int = 5,
    eval_mb_size: int = 1000,
    mem_size: int = 1000,
    n_experiences: int | None = None,
    ewc_lambda: float = 100.0,
    device: str | torch.device = "cpu",
    evaluator: Any = None,
    plugins: list[Any] | None = None,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    optimizer: str = "adamw",
    momentum: float = 0.0,
    lr_decay: float = 1.0,
    min_lr: float = 0.0,
) -> Any:
    """Build the named strategy (see the module table) around ``model`` with AdamW(``lr``) or SGD.

    Parameters
    ----------
    name
        One of :data:`STRATEGIES`.
    model
        Trained in place by the strategy.
    example_input
        An input batch, used by the re-basin strategies to trace the model.
    mem_size
        Replay buffer size of the strategies that replay; MC-SGD keeps ``mem_size // n_experiences``
        samples (at least one) of every experience.
    n_experiences
        Number of experiences of the benchmark (only read by ``"mcsgd"``; required there unless
        ``options`` sets ``mem_size``).
    options
        Extra keyword arguments for the re-basin / MC-SGD plugin or strategy (e.g. ``{"alpha": 0.5}``).
    evaluator
        An Avalanche ``EvaluationPlugin`` (Avalanche's default when None).
    optimizer, momentum
        ``"adamw"`` (default; ``momentum`` must stay 0) or ``"sgd"`` (with ``momentum``).
    lr_decay, min_lr
        Below 1: the learning rate before experience ``k`` is ``max(min_lr, lr * lr_decay ** k)``
        (:class:`continual.optim.ExperienceLRDecay`, MC-SGD's schedule), for every strategy.

    Returns
    -------
    avalanche strategy
    """
    if name.startswith(EQUAL_STORAGE) and name[len(EQUAL_STORAGE):].split(" (")[0] in STRATEGIES:
        name = "replay"  # the control: Replay, with the mem_size it was given
    if name not in STRATEGIES:
        raise RebasinError(f"unknown strategy {name!r}; choose from {list(STRATEGIES)} or {EQUAL_STORAGE}<one of them>")
    from avalanche.training import EWC, LwF, Naive, Replay
    from avalanche.training.plugins.evaluation import default_evaluator

    from rebasin.checks import check_number_in

    from .clewi import CLeWI
    from .mcsgd import MCSGD
    from .optim import ExperienceLRDecay
    from .plugin import RebasinMergePlugin
    from .policy import AlphaPolicy
    from .si import SIPlugin
    from .strategy import RebasinIL

    options = dict(options or {})
    if optimizer not in OPTIMIZERS:
        raise RebasinError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    momentum = check_number_in(momentum, "momentum", 0, 1, high_open=True)
    if optimizer == "adamw" and momentum:
        raise RebasinError("momentum applies to optimizer='sgd' only")
    opt = (torch.optim.AdamW(model.parameters(), lr=lr) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum))
    plugins = list(plugins or [])
    decay = ExperienceLRDecay(lr_decay, min_lr=min_lr)  # checks both
    if lr_decay != 1.0:
        plugins.append(decay)
    common: dict[str, Any] = dict(
        model=model,
        optimizer=opt,
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=train_mb_size,
        train_epochs=train_epochs,
        eval_mb_size=eval_mb_size,
        device=device,
        evaluator=default_evaluator if evaluator is None else evaluator,
        plugins=plugins,
    )

    def replay_with_merge(**defaults: Any) -> Any:  # Replay + the merge plugin (``options`` over ``defaults``)
        plugin = RebasinMergePlugin(**{**defaults, **options}, model=model, example_input=example_input, seed=seed)
        return Replay(mem_size=mem_size, **{**common, "plugins": common["plugins"] + [plugin]})

    builders: dict[str, Callable[[], Any]] = {
        "naive": lambda: Naive(**common),
        "ewc": lambda: EWC(ewc_lambda=ewc_lambda, **common),
        "lwf": lambda: LwF(alpha=1.0, temperature=2.0, **common),
        "replay": lambda: Replay(mem_size=mem_size, **common),
        "rebasin_merge": lambda: replay_with_merge(),
        "rebasin_merge_holdout": lambda: replay_with_merge(alpha=AlphaPolicy()),
        "rebasin_merge_fold": lambda: replay_with_merge(alpha=AlphaPolicy(source="buffer_fold")),
        "rebasin_merge_refit": lambda: replay_with_merge(alpha=AlphaPolicy(source="buffer_fold", refit=True)),
        "rebasin_merge_layer": lambda: replay_with_merge(
            alpha=AlphaPolicy(source="buffer_fold", refit=True, granularity="layer")),
        "rebasin_merge_zero": lambda: Naive(
            **{**common, "plugins": common["plugins"] + [
                RebasinMergePlugin(
                    **{"alpha": AlphaPolicy(source="current"), **options}, model=model,
                    example_input=example_input, seed=seed,
                )
            ]},
        ),
        "si": lambda: Naive(**{**common, "plugins": common["plugins"] + [SIPlugin(si_lambda=1.0)]}),
        "clewi": lambda: CLeWI(mem_size=mem_size, example_input=example_input, seed=seed, **options, **common),
        "naive_rebasin_merge": lambda: Naive(
            **{**common, "plugins": common["plugins"] + [
                RebasinMergePlugin(**{"alpha": AlphaPolicy(), **options}, model=model, example_input=example_input,
                                   seed=seed)
            ]},
        ),
        "rebasin_il": lambda: RebasinIL(
            replay_mem_size=mem_size, example_input=example_input, seed=seed, **options, **common
        ),
        "mcsgd": lambda: MCSGD(**{
            "mem_size": options["mem_size"] if "mem_size" in options else _per_experience(mem_size, n_experiences),
            "seed": seed, **options}, **common),
    }
    if options and name in ("naive", "ewc", "lwf", "si", "replay"):
        raise RebasinError(f"options {sorted(options)} only apply to the re-basin strategies, not {name!r}")
    return builders[name]()


def _per_experience(mem_size: int, n_experiences: int | None) -> int:
    if isinstance(n_experiences, bool) or not isinstance(n_experiences, int) or n_experiences < 1:
        raise RebasinError(
            f"make_strategy('mcsgd') needs n_experiences= (a positive int) to split mem_size over the "
            f"experiences, got {n_experiences!r}; or pass options={{'mem_size': k}} (samples per experience)"
        )
    return max(1, mem_size // n_experiences)
