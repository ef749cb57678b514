"""plot_paths: one line per label, every label distinguishable, splits, errors."""

from __future__ import annotations

import pytest

from rebasin import PathResult, RebasinError
from rebasin.paths import plot_paths

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt


def result(scale: float) -> PathResult:
    return PathResult(t=(0.0, 0.5, 1.0), loss=(0.1, scale, 0.2), accuracy=(0.9, 1.0 - scale / 10, 0.95))


def test_one_line_per_label_with_accuracy_in_percent():
    fig = plot_paths({"naive": result(2.0), "aligned": result(0.3)}, metric="accuracy", title="t")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["naive", "aligned"]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([90.0, 80.0, 95.0])
    assert ax.get_title() == "t"
    plt.close(fig)


def test_labels_past_the_colour_cycle_stay_distinguishable():
    results = {f"method {i}": result(0.1 * i) for i in range(13)}
    fig = plot_paths(results)
    styles = [(line.get_color(), line.get_marker()) for line in fig.axes[0].lines]
    assert len(styles) == 13 and len(set(styles)) == 13
    plt.close(fig)


def test_splits_are_drawn_solid_then_dashed_and_inputs_untouched():
    results = {"train": {"a": result(1.0)}, "test": {"a": result(1.5)}}
    before = {k: dict(v) for k, v in results.items()}
    fig = plot_paths(results, split="all")
    lines = fig.axes[0].lines
    assert [line.get_label() for line in lines] == ["a (train)", "a (test)"]
    assert [line.get_linestyle() for line in lines] == ["-", "--"]
    assert lines[0].get_color() == lines[1].get_color()
    assert results == before
    plt.close(fig)
    fig = plot_paths(results, split="test")
    assert [line.get_label() for line in fig.axes[0].lines] == ["a"]
    plt.close(fig)


def test_draws_into_a_given_axes():
    fig, ax = plt.subplots()
    assert plot_paths({"a": result(1.0)}, ax=ax) is fig
    plt.close(fig)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metric": "error"}, "unknown metric"),
        ({"split": "valid", "results": {"train": {"a": result(1.0)}}}, "unknown split"),
        ({"metric": "accuracy", "results": {"a": PathResult(t=(0.0, 1.0), loss=(0.1, 0.2))}}, "no accuracy"),
    ],
)
def test_bad_input(kwargs, match):
    results = kwargs.pop("results", {"a": result(1.0)})
    with pytest.raises(RebasinError, match=match):
        plot_paths(results, **kwargs)
    plt.close("all")
