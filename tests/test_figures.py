"""The figures a reader sees: paper names and readable metric names, integer ticks where the axis counts
evaluations or NFE, legends that explain every line and do not cover the curves, nothing clipped or hidden."""
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import dode  # noqa: E402
from dode.experiments.plots import (FLOOR_LABEL, distance_to_teacher, lambdas_per_step, quality_vs_nfe, sample_grid,  # noqa: E402
                        sample_grid_figure, short_number)

PAPER = [dode.get_solver(s).paper for s in dode.SOLVERS]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def texts(fig) -> list[str]:
    """Every piece of text drawn in a figure (titles, labels, tick labels, legend entries, annotations)."""
    fig.canvas.draw()
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]


def tick_labels(ax, axis="x") -> list[str]:
    ax.figure.canvas.draw()
    return [t.get_text() for t in (ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()) if t.get_text()]


def legend_labels(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


def no_raw_names(fig):
    raw = [s for s in dode.SOLVERS if s != dode.get_solver(s).paper.lower()]  # ddim, deis, unipc read the same
    words = " ".join(texts(fig))
    assert not [s for s in raw if s in words.split() or f"{s}," in words], words
    assert "fd_pixel" not in words and "rmse_exact" not in words and "rmse_teacher" not in words, words


def toy_distances():
    rows = [{"solver": s, "variant": v, "evaluation": i, "rmse_teacher": 10.0 ** (-3 + i / 2) * (2 if v == "base" else 1)}
            for s in dode.SOLVERS for v in ("base", "dode") for i in range(1, 6)]
    return pd.DataFrame(rows)


def test_distance_to_teacher_integer_ticks_paper_names_and_a_legend_beside_the_curves():
    fig, ax = plt.subplots(figsize=(7, 4))
    distance_to_teacher(toy_distances(), ax=ax)
    assert tick_labels(ax) == ["1", "2", "3", "4", "5"]  # no 1.5, 2.5, ...
    labels = legend_labels(ax.get_legend())
    assert labels[:len(PAPER)] == PAPER  # all eight solvers, as in the paper (PLMS, iPNDM, DPM-Solver++, EDM)
    assert "base solver (lambda = 0)" in labels and "D-ODE" in labels  # the line styles are explained
    legend_box, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend_box.x0 >= axes_box.x1  # right of the axes: it cannot cover a curve
    no_raw_names(fig)
    # eight solvers stay apart: no two share both colour and marker
    styles = {(tuple(np.round(matplotlib.colors.to_rgba(h.get_color()), 3)), h.get_marker())
              for h in ax.get_legend().legend_handles[:len(PAPER)]}
    assert len(styles) == len(PAPER)


def test_lambdas_integer_ticks_nothing_clipped_and_the_zero_line_explained():
    schedulers = {s: SimpleNamespace(nfe=5, lambdas=[0.0, 1.2, -9.0, 0.4, 70.0 if s == "heun" else -4.0])
                  for s in dode.SOLVERS}
    fig, ax = plt.subplots(figsize=(7, 4))
    lambdas_per_step(schedulers, ax=ax)
    assert tick_labels(ax) == ["1", "2", "3", "4", "5"]
    # every marker lies inside the axes with room to spare in the drawn (symlog) scale: Heun's 70 is not cut
    scale = ax.yaxis.get_transform()
    low, high = scale.transform([[ax.get_ylim()[0]], [ax.get_ylim()[1]]])[:, 0]
    top = scale.transform([[70.0]])[0, 0]
    bottom = scale.transform([[-9.0]])[0, 0]
    assert high - top > 0.03 * (high - low) and bottom - low > 0.03 * (high - low)
    labels = legend_labels(ax.get_legend())
    assert labels[:len(PAPER)] == PAPER and any("lambda = 0" in label for label in labels)
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    no_raw_names(fig)


def toy_results(solvers=dode.SOLVERS):
    rows = []
    for s in solvers:
        for nfe in (3, 5, 10):
            for variant, scale in (("base", 4.0), ("best-base", 2.0), ("dode", 1.0), ("dode-auto", 0.8)):
                rows.append({"solver": s, "variant": variant, "nfe": nfe, "fd_pixel": scale / nfe + 0.1,
                             "rmse_exact": scale / nfe / 10})
    return pd.DataFrame(rows)


def test_quality_vs_nfe_readable_names_and_the_floor_in_the_legend():
    fig = quality_vs_nfe(toy_results(), "fd_pixel", floor=0.097)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == PAPER
    assert fig.get_supylabel() == "pixel FD" and not any(ax.get_ylabel() for ax in panels)  # one label, no collisions
    for ax in panels:
        assert tick_labels(ax) in ([], ["3", "5", "10"])  # the NFEs drawn, no fractional ticks
        assert not any("10^" in label for label in tick_labels(ax, "y"))  # short plain numbers: 0.1, 1, 10
    assert tick_labels(panels[0], "y")  # but labelled
    legend_box = fig.legends[0].get_window_extent()
    assert all(legend_box.y1 <= ax.get_window_extent().y0 for ax in panels)  # below the panels, over none of them
    labels = legend_labels(fig.legends[0])
    assert FLOOR_LABEL in labels and "finite samples" in FLOOR_LABEL  # the dotted line says what it is
    assert labels[:4] == ["base, paper's spacing", "base, best spacing", "D-ODE, paper's spacing",
                          "D-ODE auto (spacing picked on validation seeds)"]
    no_raw_names(fig)
    rmse = quality_vs_nfe(toy_results(["ddim", "dpm_solver_pp_2m"]), "rmse_exact")
    assert rmse.get_supylabel() == "RMSE to the exact ODE" and not any("floor" in t for t in texts(rmse))
    assert quality_vs_nfe(toy_results(["ddim"]), "rmse_exact", exact=False).get_supylabel() == \
        "RMSE to the reference solution"


def test_sample_grids_fill_their_figure_without_white_gaps():
    """Two rows of two grids of 12 8x8 images: the images cover most of the figure (they covered about half)."""
    fig, axes = sample_grid_figure(2, 2, 12, 6, (1, 8, 8))
    for ax in axes.flat:
        sample_grid(torch.zeros(12, 1, 8, 8), ncol=6, ax=ax, title="DDIM, 3 NFE")
    fig.canvas.draw()
    width, height = fig.get_size_inches() * fig.dpi
    covered = sum(ax.get_window_extent().width * ax.get_window_extent().height for ax in axes.flat)
    assert covered / (width * height) > 0.75
    for ax in axes.flat:  # no title runs into the grid above it
        title = ax.title.get_window_extent()
        above = [other.get_window_extent() for other in axes.flat
                 if other.get_window_extent().y0 > ax.get_window_extent().y1 - 1]
        assert all(box.y0 >= title.y1 - 1 for box in above)


def test_short_numbers_never_print_a_small_value_as_zero():
    assert [short_number(v) for v in (0.28, 1.513, -0.94, 0.0049, 2.6e-05, 0.0)] == \
        ["0.28", "1.51", "-0.94", "0.0049", "2.6e-05", "0.00"]
