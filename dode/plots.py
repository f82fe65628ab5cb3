"""Figures: sample grids, quality against NFE, lambdas, distance to the teacher, trajectories in 2-D."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch
from sklearn.decomposition import PCA

from .solvers import SOLVERS, SPACINGS
from .tables import VARIANT_LABELS, VARIANTS

VARIANT_STYLE = {"base": (4, 2), "dode": ""}  # base dashed, D-ODE solid


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


def quality_vs_nfe(results: pd.DataFrame, metric: str = "fd_pixel", floor: float | None = None, col_wrap: int = 4):
    """One panel per solver: ``metric`` against NFE, base dashed, D-ODE (and its refinements) solid, the floor as
    a grey line."""
    names = {v: ("D-ODE" if v.startswith("dode") else "base") + VARIANT_LABELS[v] for v in VARIANTS}
    data = results.copy()
    data["variant"] = data["variant"].map(names)
    order = [s for s in SOLVERS if s in set(data["solver"])]
    hues = [v for v in names.values() if v in set(data["variant"])]
    grid = sns.relplot(data=data, x="nfe", y=metric, col="solver", col_order=order, hue="variant", style="variant",
                       hue_order=hues, style_order=hues, dashes={v: (4, 2) if v.startswith("base") else "" for v in hues},
                       markers=True, kind="line", col_wrap=col_wrap,
                       height=2.4, aspect=1.1, facet_kws={"sharey": False})
    for ax in grid.axes.flat:
        if floor is not None:
            ax.axhline(floor, color="grey", lw=1, ls=":", label="floor")
        ax.set_yscale("log")
        ax.set_xticks(sorted(set(data["nfe"])))
    grid.set_titles("{col_name}")
    return grid


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
                    cbar=variant == "dode", cbar_kws={"label": metric})
        ax.set_yticks([i + 0.5 for i in range(len(order))], [f"{s} / {p}" for s, p in order], fontsize=7)
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
    """The fitted lambda of every model evaluation, one line per solver (``{label: DODEScheduler}``)."""
    ax = ax or plt.gca()
    for label, scheduler in schedulers.items():
        ax.plot(range(1, scheduler.nfe + 1), scheduler.lambdas, marker="o", label=label)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="model evaluation i", ylabel="lambda_i")
    ax.set_yscale("symlog", linthresh=1)
    ax.legend(fontsize=7, ncol=2)
    return ax


def distance_to_teacher(distances: pd.DataFrame, ax=None):
    """Per-step RMSE to the teacher (columns solver, variant, evaluation, rmse_teacher), base dashed."""
    ax = ax or plt.gca()
    sns.lineplot(data=distances, x="evaluation", y="rmse_teacher", hue="solver", style="variant",
                 dashes=VARIANT_STYLE, markers=True, ax=ax)
    ax.set(yscale="log", xlabel="model evaluation", ylabel="RMSE to the teacher")
    return ax


def trajectories_2d(trajectories: dict, num_paths: int = 6, ax=None):
    """Whole trajectories ``{label: Trajectory}`` projected on the 2 principal axes of the first one's states."""
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
    ax.legend(fontsize=8)
    return ax
