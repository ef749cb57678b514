"""Small models and data shared by the tests (importable as ``builders``: pyproject puts tests/ on sys.path).

Every builder is deterministic: pass ``seed=`` to seed the model's initialisation, and data always comes
from its own ``torch.Generator``.
"""

from __future__ import annotations

import importlib.util
import re
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rebasin import PermutationSpec, RebasinError, RebasinWarning, permute, random_permutation, spec_from_model
from rebasin._common import state_of
from rebasin.spec.core import split_structured

#: Seconds a child process of a test (an example script, a command of the CLI or of a docs page, the
#: distributed world) may run before the test calls it hung. Only a guard against hangs, never a speed
#: check: the longest of them take about a minute on two quiet cores and several on a loaded machine (the
#: examples hit a 240 s limit there), so it is set far above both.
HANG_S = 1800


def mlp(
    in_features: int, hidden: Sequence[int], out_features: int, *, bn: bool = False, seed: int | None = None
) -> nn.Sequential:
    """``Linear -> [BatchNorm1d] -> ReLU`` per hidden width, then a final ``Linear``.

    With ``seed`` the global torch RNG is seeded first (as the tests' own factories did), otherwise the
    model draws from the current global stream.
    """
    if seed is not None:
        torch.manual_seed(seed)
    widths = [in_features, *hidden]
    layers: list[nn.Module] = []
    for i in range(len(hidden)):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if bn:
            layers.append(nn.BatchNorm1d(widths[i + 1]))
        layers.append(nn.ReLU())
    layers.append(nn.Linear(widths[-1], out_features))
    return nn.Sequential(*layers)


def batches(
    shape: tuple[int, ...],
    n: int,
    batch: int,
    *,
    seed: int = 0,
    scale: float = 1.0,
    shift: float = 0.0,
    classes: int = 3,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` Gaussian inputs of ``shape`` (times ``scale`` plus ``shift``) with uniform random class labels,
    cut into batches of ``batch``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g) * scale + shift
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


class CatGrouped(nn.Module):
    """Two convs concatenated, a 1x1 conv over the concatenation, a grouped conv, a linear head."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)
        self.norm = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.m = nn.Conv2d(6, 6, 1)
        self.g = nn.Conv2d(6, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1))
        h = torch.relu(self.g(torch.relu(self.m(h))))
        return self.head(h.mean(dim=(2, 3)))


def cat_grouped_spec(bn: bool = False) -> PermutationSpec:
    """The hand-written spec of :class:`CatGrouped`: a concatenation, a structured and grouped permutation."""
    axes = {
        "a.weight": ("P", None, None, None), "a.bias": ("P",),
        "b.weight": ("Q", None, None, None), "b.bias": ("Q",),
        "m.weight": ("R", "C", None, None), "m.bias": ("R",),
        "g.weight": ("O", "R", None, None), "g.bias": ("O",),
        "head.weight": (None, "O"), "head.bias": (None,),
    }  # fmt: skip
    if bn:
        axes.update({f"norm.{k}": ("C",) for k in ("weight", "bias", "running_mean", "running_var")})
        axes["norm.num_batches_tracked"] = ()
    return PermutationSpec(
        axes,
        concat={"C": (("P", 4), ("Q", 2))},
        structure={"R": ("G", 3), "O": ("G", 2)},
        grouped={("g.weight", 1): 2},
    )


def cat_grouped(*, bn: bool = False, seed: int | None = None) -> nn.Module:
    """A :class:`CatGrouped` (``seed``: seeds the global torch RNG first)."""
    if seed is not None:
        torch.manual_seed(seed)
    return CatGrouped(bn)


def heads_and_units_moved(spec: PermutationSpec, perms: dict[str, torch.Tensor]) -> tuple[int, int]:
    """How many structured permutations of ``perms`` move whole heads (groups), and how many move units inside one."""
    heads = units = 0
    for p, (_, d) in spec.structure.items():
        outer, inner = split_structured(perms[p], d)
        heads += int(not torch.equal(outer, torch.arange(len(outer))))
        units += int(not torch.equal(inner, torch.arange(d).expand_as(inner)))
    return heads, units


def randomize_norms_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm non-trivial running stats and every norm a random affine transform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(7)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model


def refused_then_pinned(model: nn.Module, example: Any, where: str, reason: str, pinned: Sequence[str],
                        **kwargs: Any) -> PermutationSpec:
    """A construct the tracer cannot prove safe: refused under ``strict=True``, pinned by default.

    ``where`` is a regex for how messages name the construct (module path or call, and the ``file:line`` of
    the model's source), ``reason`` a regex for why. Under ``strict=True`` the error names both (and no fx
    node name). By default exactly one pin warning lists each module path in ``pinned`` with pinned units,
    ``where`` and ``reason`` on its line; ``spec.coverage`` counts them, and the spec passes the functional
    check (``spec_from_model`` runs it). Returns the default spec.
    """
    try:
        spec_from_model(model, example, strict=True, **kwargs)
    except RebasinError as err:
        msg = str(err)
        assert re.search(f"{where}.*{reason}", msg) and "node '" not in msg, msg
    else:
        raise AssertionError("strict=True did not refuse")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        spec = spec_from_model(model, example, **kwargs)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RebasinWarning) and "pinned" in str(w.message)]
    assert len(msgs) == 1, msgs
    for module in pinned:
        assert re.search(rf"- {re.escape(module)}: \d+ unit\(s\) pinned: [^\n]*{where}[^\n]*{reason}", msgs[0]), msgs[0]
        assert spec.coverage is not None and spec.coverage.modules[module][1] > 0, spec.coverage
    return spec


def benchmark_module(name: str) -> types.ModuleType:
    """The module ``benchmarks/<name>.py`` (models the benchmarks and the tests share), loaded by path."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def planted(model: nn.Module, x: torch.Tensor, noise: float = 1e-3, seed: int = 3):
    """(spec, A, B, p): B = permute(spec, p, A) + noise."""
    spec = spec_from_model(model, x)
    sa = state_of(model)
    p = random_permutation(spec, seed=seed, sizes=spec.validate(sa))
    g = torch.Generator().manual_seed(seed)
    sb = {
        k: v + noise * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in permute(spec, p, sa).items()
    }
    return spec, sa, sb, p


def synthetic_classifier(seed: int = 0) -> nn.Module:
    """The continual tests' model: 16 features -> 24 hidden -> 4 classes (``continual.benchmarks.synthetic``'s sizes)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))


def traced_without_warnings(models: dict[str, nn.Module], example: Any) -> dict[str, tuple[nn.Module, PermutationSpec]]:
    """``{name: (model, spec)}`` traced with every :class:`RebasinWarning` an error: no unit is pinned, no weight
    is left without a rule."""
    out = {}
    for name, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", RebasinWarning)
            out[name] = (model, spec_from_model(model, example))
    return out


def tiny_llama(*, vocab: int = 50, hidden: int = 32, intermediate: int = 48, layers: int = 2,
               positions: int = 32, seed: int = 0, norm_seed: int = 1) -> nn.Module:
    """A ``transformers`` Llama from a config (4 query heads, 2 key/value heads), eval mode, weights drawn
    after ``torch.manual_seed(seed)``, RMSNorm scales drawn from ``U(0.5, 1.5)`` (generator seeded with
    ``norm_seed``) so that they must move with the stream. Needs ``transformers``."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=positions)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(norm_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return model
