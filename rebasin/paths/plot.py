"""Plots of loss / accuracy along paths between two models (matplotlib imported lazily)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._errors import RebasinError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .linear import PathResult

__all__ = ["plot_paths"]

_METRICS = ("loss", "accuracy")


_MARKERS = ("o", "s", "^", "D", "v")


def plot_paths(
    results: Mapping[str, PathResult] | Mapping[str, Mapping[str, PathResult]],
    *,
    metric: str = "loss",
    split: str | None = None,
    title: str | None = None,
    ax: Any = None,
) -> Figure:
    """Plot one line per method of ``metric`` against the interpolation coordinate ``t``.

    Parameters
    ----------
    results
        ``{label: PathResult}``, or ``{split: {label: PathResult}}`` (e.g. ``"train"`` and
        ``"test"``) together with ``split=`` to choose one, or ``split="all"`` to draw every
        split (solid for the first, dashed for the others). Past the colour cycle (10 labels by
        default) the marker changes, so every label stays distinguishable.
    metric
        ``"loss"`` or ``"accuracy"``.
    ax
        An existing matplotlib axes to draw into; otherwise a new figure is created.

    Returns
    -------
    matplotlib.figure.Figure
        Save it with ``fig.savefig("paths.png", dpi=150)``.

    Examples
    --------
    >>> fig = plot_paths({"naive": naive_result, "weight matching": wm_result})  # doctest: +SKIP
    """
    if metric not in _METRICS:
        raise RebasinError(f"unknown metric {metric!r}; choose one of {_METRICS}")
    import matplotlib.pyplot as plt  # a dependency of the package; imported here so `import rebasin` stays light

    nested = bool(results) and all(isinstance(v, Mapping) for v in results.values())
    if nested:
        splits = list(results) if split in (None, "all") else [split]
        if split not in (None, "all") and split not in results:
            raise RebasinError(f"unknown split {split!r}; available: {list(results)}")
        groups = [(s, results[s]) for s in splits]
    else:
        groups = [(split, results)]  # type: ignore[list-item]  # a single group is wrapped into the (name, results) list form here

    if ax is None:
        fig, ax = plt.subplots(figsize=(6.0, 4.0), constrained_layout=True)
    else:
        fig = ax.figure
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", [None])
    labels: list[str] = []
    for gi, (split_name, group) in enumerate(groups):
        for label, res in group.items():  # type: ignore[union-attr]  # groups holds (name, mapping of results) pairs after the normalisation above
            values = getattr(res, metric)
            if values is None:
                raise RebasinError(f"path result {label!r} has no {metric} values")
            if label not in labels:
                labels.append(label)
            k = labels.index(label)
            color = colors[k % len(colors)]
            marker = _MARKERS[(k // len(colors)) % len(_MARKERS)]  # past the colour cycle, change the marker
            name = label if len(groups) == 1 else f"{label} ({split_name})"
            ax.plot(
                list(res.t),
                [100.0 * v for v in values] if metric == "accuracy" else list(values),
                label=name,
                color=color,
                linestyle="-" if gi == 0 else "--",
                marker=marker,
                markersize=2.5 if marker == "o" else 4.0,
            )
    ax.set_xlabel("t  (0 = model A, 1 = model B)")
    ax.set_ylabel("accuracy (%)" if metric == "accuracy" else "loss")
    ax.set_xlim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return fig
