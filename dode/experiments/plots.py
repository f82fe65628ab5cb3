"""Figures: sample grids, quality against NFE, lambdas, distance to the teacher, trajectories in 2-D.

Solvers are labelled with their names in the paper (``dode.get_solver(name).paper``: DPM-Solver++, EDM, ...),
metrics with readable names (``METRIC_LABELS``), and every solver keeps one colour and marker in every figure
(``solver_style``), so that eight solvers stay apart."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter, MaxNLocator
from sklearn.decomposition import PCA

from ..core.solvers import SOLVERS, SPACINGS, get_solver
from .variants import VARIANTS

#: readable names of the result columns
METRIC_LABELS = {
    "fd_pixel": "pixel FD",
    "fd_digits": "FD-digits",
    "fd_inception": "FID",
    "rmse_exact": "RMSE to the exact ODE",
    "rmse_teacher": "RMSE to the teacher",
}
#: what the floor line of a Frechet distance is: the exact ODE solution's own distance to the reference data,
#: which is not 0 because both are finite samples
FLOOR_LABEL = "floor: exact ODE's own FD (finite samples)"
_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "h", "<", ">")


def metric_label(metric: str, exact: bool = True) -> str:
    """"pixel FD", "FD-digits", "RMSE to the exact ODE" (``exact=False``: "RMSE to the reference solution", for
    models judged against a fine solver's samples); an unknown column comes back as it is."""
    if metric == "rmse_exact" and not exact:
        return "RMSE to the reference solution"
    return METRIC_LABELS.get(metric, metric)


def short_number(value: float) -> str:
    """A cell annotation that never hides a small value: two decimals from 0.1 up ("0.28", "-0.94"), two
    significant digits below ("0.0049"), "" for a missing one."""
    if pd.isna(value):
        return ""
    return f"{value:.2f}" if abs(value) >= 0.095 or value == 0 else f"{value:.2g}"


def solver_label(name: str) -> str:
    """The solver's name in the paper ("DPM-Solver++" for ``dpm_solver_pp_2m``); any other label as it is."""
    return get_solver(name).paper if name in SOLVERS else name


def solver_style(name: str) -> dict:
    """One colour and marker per solver, the same in every figure (``SOLVERS`` order)."""
    i = list(SOLVERS).index(name) if name in SOLVERS else len(SOLVERS) + sum(map(ord, name)) % 3
    return {"color": plt.get_cmap("tab10")(i % 10), "marker": _MARKERS[i % len(_MARKERS)]}


def integer_ticks(ax, values=None, axis: str = "x"):
    """Ticks at integers only: at ``values`` when given (the NFEs or evaluations drawn), else wherever fits."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    if values is not None:
        ticks = sorted({int(v) for v in values})
        (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks, [str(t) for t in ticks])
        target.set_minor_locator(plt.NullLocator())
    else:
        target.set_major_locator(MaxNLocator(integer=True))
    return ax


def _plain_number(x: float) -> str:
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:g}"
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


class _PlainLogFormatter(LogFormatter):
    """matplotlib's choice of which log ticks get a label, written as plain numbers ("0.2", "10", "1e6")."""

    def __call__(self, x, pos=None):
        return _plain_number(x) if super().__call__(x, pos) else ""


def plain_log_labels(ax, axis: str = "y"):
    """Short log-axis tick labels ("0.2" instead of 2x10^-1), minor ones too where the range is narrow."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(_PlainLogFormatter())
    target.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    return ax


def _solver_order(names) -> list:
    names = list(dict.fromkeys(names))
    return [s for s in SOLVERS if s in names] + [s for s in names if s not in SOLVERS]


def _outside_legend(ax, handles, **kwargs):
    """A legend right of the axes, where it cannot cover a curve."""
    return ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                     fontsize=8, frameon=False, **kwargs)


def sample_grid(samples: torch.Tensor, ncol: int = 8, ax=None, title: str | None = None):
    """Images (N, C, H, W) in [-1, 1] tiled into one picture (grey for one channel)."""
    x = samples.detach().float().clamp(-1, 1).add(1).div(2).cpu()
    n, c, h, w = x.shape
    nrow = -(-n // ncol)
    canvas = torch.ones(c, nrow * (h + 1) - 1, ncol * (w + 1) - 1)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[:, r * (h + 1): r * (h + 1) + h, q * (w + 1): q * (w + 1) + w] = x[i]
    ax = ax or plt.gca()
    image = canvas[0] if c == 1 else canvas.permute(1, 2, 0)
    ax.imshow(image.numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


_VARIANT_COLORS = {v: f"C{i}" for i, v in enumerate(VARIANTS)}  # one colour per row kind in every figure


def sample_grid_figure(nrows: int, ncols: int, num: int, ncol: int, image_shape, width: float = 8.0,
                       title: float = 0.22, gap: float = 0.15):
    """A figure of ``nrows x ncols`` panels for ``sample_grid`` pictures of ``num`` images of ``image_shape``
    (C, H, W) in ``ncol`` columns, each panel exactly the picture's shape (plus ``title`` inches for its title),
    so that no white gaps open between the rows; returns ``(fig, axes)`` (axes 2-D)."""
    h, w = image_shape[-2:]
    rows = -(-num // ncol)
    aspect = (rows * (h + 1) - 1) / (ncol * (w + 1) - 1)
    panel = (width - gap * (ncols - 1)) / ncols
    height = nrows * (panel * aspect + title) + gap * (nrows - 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - title / height,
                        wspace=gap / panel, hspace=(title + gap) / (panel * aspect))
    return fig, axes


def quality_vs_nfe(results: pd.DataFrame, metric: str = "fd_pixel", floor: float | None = None, col_wrap: int = 4,
                   floor_label: str = FLOOR_LABEL, exact: bool = True, variants=None):
    """One panel per solver (titled with its name in the paper): ``metric`` against NFE on a log scale, base rows
    dashed, D-ODE rows solid, one legend below the panels; ``floor`` (when given and above 0) as a dotted grey
    line, explained in the legend by ``floor_label``; ``variants``: the row kinds drawn (default: all present).
    Returns the figure (constrained layout: give it a title with ``fig.suptitle(text)`` and no ``y``)."""
    solvers = _solver_order(results["solver"])
    if variants is not None:
        results = results[results["variant"].isin(variants)]
    variants = [v for v in VARIANTS if v in set(results["variant"])]
    variants += [v for v in dict.fromkeys(results["variant"]) if v not in variants]
    ncols = min(col_wrap, len(solvers))
    nrows = -(-len(solvers) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.7 * ncols, 2.3 * nrows), squeeze=False, sharex=True,
                             layout="constrained")
    nfes = sorted({int(n) for n in results["nfe"]})
    colors = {v: _VARIANT_COLORS.get(v, f"C{len(VARIANTS) + i}") for i, v in enumerate(variants)}
    handles = {}
    # wider lines first, so that a line drawn over an equal one still shows at its edges
    widths = {v: max(2.2 - 0.25 * i, 1.2) for i, v in enumerate(variants)}
    for ax, solver in zip(axes.flat, solvers):
        rows = results[results["solver"] == solver]
        for variant in variants:
            line = rows[rows["variant"] == variant].sort_values("nfe")
            if line.empty:
                continue
            known = VARIANTS.get(variant)
            handles[variant], = ax.plot(line["nfe"], line[metric], color=colors[variant],
                                        marker=known.marker if known else "o", ms=4, lw=widths[variant],
                                        label=known.legend if known else variant,
                                        ls="-" if known is None or known.dode else "--")
        if floor is not None and floor > 0:
            handles["floor"] = ax.axhline(floor, color="grey", lw=1, ls=":", label=floor_label)
        ax.set_yscale("log")
        plain_log_labels(ax)
        ax.set_title(solver_label(solver), fontsize=10)
        integer_ticks(ax, nfes)
    for ax in axes.flat[len(solvers):]:
        ax.set_visible(False)
    fig.supylabel(metric_label(metric, exact), fontsize=10)
    for j in range(ncols):  # the lowest visible panel of every column carries the NFE axis
        column = [ax for ax in axes[:, j] if ax.get_visible()]
        column[-1].set_xlabel("NFE")
        column[-1].xaxis.set_tick_params(labelbottom=True)
    order = [v for v in (*variants, "floor") if v in handles]
    fig.legend(handles=[handles[v] for v in order], loc="outside lower center", ncol=min(len(order), 3), fontsize=8,
               frameon=False)
    return fig


def spacing_heatmap(sweep: pd.DataFrame, metric: str = "fd_pixel", title: str = ""):
    """Every solver x spacing (rows) x NFE (columns), base and D-ODE side by side, coloured by ``metric`` on a log
    scale and annotated; the spacing ``auto`` chose for each solver and NFE is boxed in the D-ODE panel."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    order = [(s, p) for s in SOLVERS for p in SPACINGS if ((sweep.solver == s) & (sweep.spacing == p)).any()]
    nfes = sorted(sweep["nfe"].unique())
    values = sweep[metric].replace([float("inf")], float("nan"))
    norm = LogNorm(vmin=max(values[values > 0].min(), 1e-6), vmax=values.max())
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 3.2 + 1.6 * len(nfes)), 0.28 * len(order) + 1.6), sharey=True)
    for ax, variant in zip(axes, ("base", "dode")):
        cells = sweep[sweep.variant == variant].pivot_table(index=["solver", "spacing"], columns="nfe", values=metric)
        cells = cells.reindex(index=pd.MultiIndex.from_tuples(order), columns=nfes)
        sns.heatmap(cells, ax=ax, norm=norm, cmap="viridis_r", annot=True, fmt=".2g", annot_kws={"fontsize": 6},
                    cbar=variant == "dode", cbar_kws={"label": metric_label(metric)})
        ax.set_yticks([i + 0.5 for i in range(len(order))], [f"{solver_label(s)} / {p}" for s, p in order],
                      fontsize=7)
        ax.set(title="base (lambda = 0)" if variant == "base" else "D-ODE greedy (red box: auto's choice)",
               xlabel="NFE", ylabel="")
        ax.title.set_fontsize(9)
        if variant == "dode" and "chosen" in sweep:
            chosen = sweep[(sweep.variant == "dode") & sweep.chosen.astype(bool)]
            for _, row in chosen.iterrows():
                ax.add_patch(Rectangle((nfes.index(row.nfe), order.index((row.solver, row.spacing))), 1, 1,
                                       fill=False, edgecolor="red", lw=1.5))
    fig.suptitle(title, y=1.0)
    fig.tight_layout()
    return fig


def lambdas_per_step(schedulers: dict, ax=None):
    """The fitted lambda of every model evaluation, one line per solver (``{solver name or label:
    DODEScheduler}``; solver names are shown as in the paper), on a symmetric log scale (linear within +-1),
    the legend right of the axes."""
    ax = ax or plt.gca()
    handles = []
    schedulers = {label: schedulers[label] for label in _solver_order(schedulers)}  # the paper's order
    for label, scheduler in schedulers.items():
        style = solver_style(label) if label in SOLVERS else {}
        line, = ax.plot(range(1, scheduler.nfe + 1), scheduler.lambdas, ms=5, lw=1.4, label=solver_label(label),
                        **{"marker": "o", **style})
        handles.append(line)
    handles.append(ax.axhline(0, color="grey", lw=0.8, label="lambda = 0: the base solver"))
    ax.set(xlabel="model evaluation i", ylabel="lambda_i (symlog: linear within +-1)")
    ax.set_yscale("symlog", linthresh=1)
    values = np.array([v for scheduler in schedulers.values() for v in scheduler.lambdas], dtype=float)
    if values.size:  # headroom in the drawn (symlog) scale, so that no marker is cut at the edge
        scale = ax.yaxis.get_transform()
        low, high = scale.transform([[min(values.min(), 0.0)], [max(values.max(), 0.0)]])[:, 0]
        pad = 0.08 * max(high - low, 1.0)
        ax.set_ylim(*scale.inverted().transform([[low - pad], [high + pad]])[:, 0])
    nfes = [n for scheduler in schedulers.values() for n in range(1, scheduler.nfe + 1)]
    integer_ticks(ax, nfes)
    ax.set_xlim(min(nfes, default=1) - 0.3, max(nfes, default=1) + 0.3)
    _outside_legend(ax, handles)
    return ax


def distance_to_teacher(distances: pd.DataFrame, ax=None):
    """Per-step RMSE to the teacher (columns solver, variant, evaluation, rmse_teacher): one colour and marker
    per solver, base dashed, D-ODE solid; the legend right of the axes says both."""
    ax = ax or plt.gca()
    solvers = _solver_order(distances["solver"])
    for solver in solvers:
        style = solver_style(solver)
        for variant, rows in distances[distances["solver"] == solver].groupby("variant"):
            rows = rows.sort_values("evaluation")
            ax.plot(rows["evaluation"], rows["rmse_teacher"], ms=4, lw=1.3, color=style["color"],
                    marker=style["marker"], ls="--" if variant == "base" else "-",
                    alpha=0.75 if variant == "base" else 1.0)
    handles = [Line2D([], [], ls="-", ms=4, label=solver_label(s), **solver_style(s)) for s in solvers]
    handles += [Line2D([], [], color="none", label=" "),
                Line2D([], [], color="black", ls="--", label="base solver (lambda = 0)"),
                Line2D([], [], color="black", ls="-", label="D-ODE")]
    ax.set(yscale="log", xlabel="model evaluation (the state after it)", ylabel="RMSE to the teacher")
    integer_ticks(ax, distances["evaluation"])
    _outside_legend(ax, handles)
    return ax


def trajectories_2d(trajectories: dict, num_paths: int = 6, ax=None):
    """Whole trajectories ``{label: Trajectory}`` projected on the 2 principal axes of the first one's states; a
    dot per state, a star at each final sample."""
    ax = ax or plt.gca()
    first = next(iter(trajectories.values()))
    states = first.states[:, :num_paths].flatten(2).reshape(-1, first.states[0, 0].numel()).numpy()
    pca = PCA(n_components=2).fit(states)
    colors = sns.color_palette(n_colors=len(trajectories))
    for color, (label, traj) in zip(colors, trajectories.items()):
        for j in range(min(num_paths, traj.states.shape[1])):
            xy = pca.transform(traj.states[:, j].flatten(1).numpy())
            ax.plot(xy[:, 0], xy[:, 1], marker="o", ms=2.5, lw=1, color=color, label=label if j == 0 else None)
            ax.plot(*xy[-1], marker="*", ms=8, color=color)
    ax.set(xlabel="PC 1", ylabel="PC 2")
    handles = ax.get_legend_handles_labels()[0]
    handles.append(Line2D([], [], color="black", marker="*", ms=8, ls="none", label="final sample"))
    ax.legend(handles=handles, fontsize=8)
    return ax
