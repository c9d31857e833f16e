r"""Pictures of triplet geometry, training runs and collapse sweeps (matplotlib, lazily).

matplotlib is imported inside each function and figures are built with
``matplotlib.figure.Figure`` (rendered by Agg), never with ``pyplot``: no global state, no
display needed, safe in tests and on servers. Each ``plot_*`` writes a PNG and returns the
``Figure`` so that callers (and tests) can inspect it; the panel axes carry ``gid="panel"``.

* :func:`plot_gradient_fields` — the descent direction
  :math:`(-\partial\ell/\partial S_{ap}, -\partial\ell/\partial S_{an})` of several losses over
  the :math:`(S_{ap}, S_{an})` square (hnm's picture of the loss; not Xuan et al.'s figure,
  which is :func:`plot_similarity_changes`), hard region shaded.
* :func:`plot_distance_rates` — how fast one gradient step changes
  :math:`\lVert f_a - f_n\rVert` (:func:`hnm.analysis.embedding_gradients`); negative (red)
  means the negative is pulled toward the anchor: the collapse mechanism.
* :func:`plot_training_curves` — loss, ``frac_hard``, R@1 over steps from metrics rows.
* :func:`plot_phase_diagram` — a sweep table as a heat map, collapsed cells hatched.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from hnm import analysis

PANEL_GID = "panel"
DEFAULT_CURVE_KEYS = ("loss", "frac_hard", "recall@1")
_HARD_COLOUR = "#d62728"
_REGION_COLOUR = "#2ca02c"
_PULL_COLOUR, _PUSH_COLOUR = "#b2182b", "#2166ac"   # the two ends of ``RdBu``


class LossPanel(NamedTuple):
    """One loss to draw, with what a reader needs to interpret it.

    ``region(sim_ap, sim_an) -> bool array``: where the miner paired with this loss can
    produce triplets (e.g. the semi-hard band); arrows elsewhere are greyed out. ``hlines``:
    ``((S_an value, label), ...)`` thresholds to draw (e.g. SCT's hard threshold).
    """
    loss_fn: Callable[[Any, Any], Any]
    region: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    region_label: str = "triplets the miner can produce"
    hlines: tuple[tuple[float, str], ...] = ()


def _as_panel(value: Any, name: str) -> LossPanel:
    if isinstance(value, LossPanel):
        return value
    if callable(value):
        return LossPanel(value)
    raise TypeError(f"`loss_fns[{name!r}]` must be a callable or a LossPanel; "
                    f"got {type(value).__name__}.")


def _check_loss_fns(loss_fns: Any) -> dict[str, LossPanel]:
    if not isinstance(loss_fns, Mapping) or not loss_fns:
        raise ValueError("`loss_fns` must be a non-empty dict {title: loss_fn or LossPanel}; "
                         f"got {loss_fns!r}.")
    return {str(k): _as_panel(v, k) for k, v in loss_fns.items()}


def _check_grid(grid: Any) -> None:
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 3:
        raise ValueError(f"`grid` must be an int >= 3 (points per axis); got {grid!r}.")


def _check_path(path: Any) -> str:
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"`path` must name a .png file; got {path!r}.")
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    return path


def standard_loss_panels(margin: float = 0.2, temperature: float = 0.1,
                         hard_weight: float = 1.0, hard_threshold: float = 0.8
                         ) -> dict[str, LossPanel]:
    """The four losses of Xuan et al.'s comparison, as :func:`plot_gradient_fields` input.

    ``ephn``: soft triplet (official EPHN form) on easy-positive/hard-negative triplets;
    ``batch_hard``: hinge on the hardest triplets; ``semihard``: hinge, but the semi-hard miner
    only yields :math:`S_{ap} - m < S_{an} < S_{ap}` (shaded band; its fallback, the farthest
    negative, has zero hinge gradient); ``sct``: Selectively Contrastive Triplet loss.
    Imports ``hnm.losses`` when called.
    """
    from hnm import losses  # pylint: disable=import-outside-toplevel
    semihard_band = lambda s_ap, s_an: (s_an < s_ap) & (s_an > s_ap - margin)
    return {
        f"ephn: soft triplet, T={temperature:g}": LossPanel(
            functools.partial(losses.soft_triplet_loss, temperature=temperature)),
        f"batch_hard: hinge, m={margin:g}": LossPanel(
            functools.partial(losses.triplet_margin_loss, margin=margin)),
        f"semihard: hinge, m={margin:g}": LossPanel(
            functools.partial(losses.triplet_margin_loss, margin=margin),
            region=semihard_band,
            region_label="semi-hard band (what the miner yields)"),
        f"sct: T={temperature:g}, λ={hard_weight:g}": LossPanel(
            functools.partial(losses.sct_loss, temperature=temperature,
                              hard_weight=hard_weight, hard_threshold=hard_threshold),
            hlines=((hard_threshold, f"SCT hard threshold S_an = {hard_threshold:g}"),)),
    }


def _square_axes(ax, title: str) -> None:
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("S_ap  (anchor–positive cosine)")
    ax.set_ylabel("S_an  (anchor–negative cosine)", labelpad=1)
    ax.set_title(title, fontsize=10)
    ax.set_gid(PANEL_GID)


def _shade_hard(ax) -> None:
    """Light red over S_an > S_ap, with the diagonal drawn."""
    ax.fill([-1, 1, -1], [-1, 1, 1], color=_HARD_COLOUR, alpha=0.10, lw=0,
            label="hard triplets: S_an > S_ap", zorder=0)
    ax.plot([-1, 1], [-1, 1], color=_HARD_COLOUR, lw=1, ls="--", zorder=1)


def _arrow_cmap():
    """viridis without its pale yellow end, so every arrow shows on white and on pink."""
    from matplotlib import colormaps, colors  # pylint: disable=import-outside-toplevel
    return colors.ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.8, 256)))


def _figure(ncols: int, nrows: int, panel_w: float, panel_h: float, extra_h: float):
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    fig = Figure(figsize=(panel_w * ncols, panel_h * nrows + extra_h))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _figure_legend(fig, axes, ncol: int) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=ncol,
                   frameon=False, fontsize=9)


def plot_gradient_fields(loss_fns: Mapping[str, Any], path: str | os.PathLike, grid: int = 17,
                         *, dpi: int = 100, panel_size: float = 4.2):
    r"""Side-by-side descent fields :math:`(-\partial\ell/\partial S_{ap},
    -\partial\ell/\partial S_{an})` of several losses over :math:`[-1, 1]^2`.

    Arrows show the direction in which one gradient step moves a triplet in the
    :math:`(S_{ap}, S_{an})` plane (normalised length); their colour is the gradient norm
    (each panel has its own colour bar, since a soft loss at T = 0.1 is ten times steeper
    than a hinge). Dots mark zero gradient. The hard region :math:`S_{an} > S_{ap}` is shaded
    red; a ``LossPanel.region`` is shaded green and arrows outside it are greyed out.

    Args:
      loss_fns: ``{title: loss_fn or LossPanel}``; e.g. :func:`standard_loss_panels`.
      path: output ``.png`` path (parent directories are created).
      grid: arrows per axis.
      dpi: resolution; the PNG is ``panel_size * len(loss_fns) * dpi`` pixels wide.
      panel_size: inches per panel.

    Returns:
      The saved ``matplotlib.figure.Figure``.

    Raises:
      ValueError: empty ``loss_fns``, a bad ``grid`` or a non-PNG ``path``.
      TypeError: a value of ``loss_fns`` that is not callable.

    References:
      Xuan et al., Hard negative examples are hard, but useful, ECCV 2020, §3 (the loss on
      the two similarities; this field is hnm's, their figure is
      :func:`plot_similarity_changes`).
    """
    panels = _check_loss_fns(loss_fns)
    _check_grid(grid)
    path = _check_path(path)
    s = np.linspace(-1.0, 1.0, grid, dtype=np.float32)
    s_ap, s_an = np.meshgrid(s, s)  # x: S_ap, y: S_an
    fig, axes = _figure(len(panels), 1, panel_size * 1.1, panel_size, 1.0)
    axes = list(axes[0])
    for ax, (title, panel) in zip(axes, panels.items()):
        g = analysis.loss_gradient_field(panel.loss_fn, s_ap, s_an)
        u, v = -np.asarray(g.grad_sim_ap), -np.asarray(g.grad_sim_an)
        mag = np.hypot(u, v)
        moving = mag > 1e-6
        scale = np.where(moving, mag, 1.0)
        u, v = u / scale, v / scale
        _square_axes(ax, title)
        _shade_hard(ax)
        shown = moving.copy()
        if panel.region is not None:
            inside = np.asarray(panel.region(s_ap, s_an), bool)
            fine = np.linspace(-1, 1, 201)
            fx, fy = np.meshgrid(fine, fine)
            ax.contourf(fx, fy, np.asarray(panel.region(fx, fy), float), levels=[0.5, 1.5],
                        colors=[_REGION_COLOUR], alpha=0.25, zorder=0)
            ax.fill([], [], color=_REGION_COLOUR, alpha=0.25, label=panel.region_label)
            out = moving & ~inside
            ax.quiver(s_ap[out], s_an[out], u[out], v[out], color="0.75", angles="xy",
                      pivot="mid", scale=grid * 1.15, width=0.004,
                      label="never produced by this miner")
            shown &= inside
        q = ax.quiver(s_ap[shown], s_an[shown], u[shown], v[shown], mag[shown],
                      cmap=_arrow_cmap(), angles="xy", pivot="mid", scale=grid * 1.15,
                      width=0.005, clim=(0.0, max(float(mag.max()), 1e-6)))
        ax.plot(s_ap[~moving], s_an[~moving], ".", color="0.4", ms=2.5,
                label="zero gradient")
        for y, label in panel.hlines:
            ax.axhline(y, color="k", ls=":", lw=1.2, label=label)
        cbar = fig.colorbar(q, ax=ax, fraction=0.046, pad=0.03)
        cbar.set_label("|∇ℓ| (gradient norm)", fontsize=8)
    fig.suptitle("Where gradient descent moves a triplet: arrows = (−∂ℓ/∂S_ap, −∂ℓ/∂S_an)\n"
                 "arrow length normalised, colour = gradient norm", fontsize=12)
    _figure_legend(fig, axes, ncol=3)
    fig.subplots_adjust(left=0.04, right=0.97, bottom=0.22, top=0.84, wspace=0.45)
    fig.savefig(path, dpi=dpi)
    return fig


def plot_distance_rates(loss_fns: Mapping[str, Any], path: str | os.PathLike, grid: int = 81,
                        *, dim: int = 3, dpi: int = 100, panel_size: float = 4.2):
    r"""Rate of change of :math:`\lVert f_a - f_n\rVert` under one gradient step, per loss.

    For every :math:`(S_{ap}, S_{an})` the triplet is placed on the unit sphere
    (:func:`hnm.analysis.triplet_on_sphere`: coplanar, the negative on the positive's side)
    and :func:`hnm.analysis.embedding_gradients` gives
    :math:`\rho_{an} = d\lVert f_a - f_n\rVert / d\eta`. Blue: the negative is pushed away.
    Red: it is pulled toward the anchor, which is how hardest-negative training collapses
    (Xuan et al. 2020, §3). The colour scale is symmetric-logarithmic per panel, so the sign
    stays visible where the gradient is small; the black contour is :math:`\rho_{an} = 0`.

    Args:
      loss_fns: ``{title: loss_fn or LossPanel}``; a ``region`` is outlined in green.
      path: output ``.png`` path.
      grid: cells per axis.
      dim: embedding dimension of the constructed triplet (the rates do not depend on it).
      dpi, panel_size: as :func:`plot_gradient_fields`.

    Returns:
      The saved ``matplotlib.figure.Figure``.

    Raises:
      ValueError, TypeError: as :func:`plot_gradient_fields`.
    """
    from matplotlib import colors  # pylint: disable=import-outside-toplevel
    panels = _check_loss_fns(loss_fns)
    _check_grid(grid)
    path = _check_path(path)
    # Cell centres strictly inside the square: rates are 0 (d = 0) on the edges.
    edges = np.linspace(-1.0, 1.0, grid + 1)
    s = ((edges[:-1] + edges[1:]) / 2).astype(np.float32)
    s_ap, s_an = np.meshgrid(s, s)
    fig, axes = _figure(len(panels), 1, panel_size * 1.1, panel_size, 1.0)
    axes = list(axes[0])
    for ax, (title, panel) in zip(axes, panels.items()):
        rate = np.asarray(analysis.embedding_gradients(panel.loss_fn, s_ap, s_an, dim).rate_an)
        vmax = max(float(np.abs(rate).max()), 1e-6)
        norm = colors.SymLogNorm(linthresh=vmax * 1e-2, vmin=-vmax, vmax=vmax, base=10)
        _square_axes(ax, title)
        mesh = ax.pcolormesh(edges, edges, rate, cmap="RdBu", norm=norm, shading="flat")
        if rate.min() < 0 < rate.max():
            # Only true sign changes: cells where the loss is inactive (rate exactly 0) are
            # masked, or the contour would trace the edge of every flat region.
            ax.contour(s_ap, s_an, np.ma.masked_where(rate == 0.0, rate), levels=[0.0],
                       colors="k", linewidths=1.0)
        ax.plot([], [], color="k", lw=1.0, label="ρ_an = 0")
        ax.plot([-1, 1], [-1, 1], color="k", lw=1, ls="--", label="S_an = S_ap (hard above)")
        ax.fill([], [], color=_PULL_COLOUR, label="ρ_an < 0: negative pulled toward anchor")
        ax.fill([], [], color=_PUSH_COLOUR, label="ρ_an > 0: negative pushed away")
        ax.fill([], [], facecolor="#f7f7f7", edgecolor="0.6",
                label="≈ 0: loss inactive or negligible")
        if panel.region is not None:
            fine = np.linspace(-1, 1, 201)
            fx, fy = np.meshgrid(fine, fine)
            ax.contour(fx, fy, np.asarray(panel.region(fx, fy), float), levels=[0.5],
                       colors=[_REGION_COLOUR], linewidths=2.0)
            ax.plot([], [], color=_REGION_COLOUR, lw=2.0, label=panel.region_label)
        for y, label in panel.hlines:
            ax.axhline(y, color="k", ls=":", lw=1.2, label=label)
        ticks = [-vmax, -vmax / 10, 0.0, vmax / 10, vmax]
        cbar = fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.03, ticks=ticks)
        cbar.ax.set_yticklabels([f"{t:.2g}" for t in ticks], fontsize=8)
        cbar.set_label("ρ_an = d‖f_a − f_n‖ / dη", fontsize=8)
    fig.suptitle("Does one gradient step push the negative away (blue) or pull it toward the "
                 "anchor (red)?\nunit-sphere triplet, negative on the positive's side; "
                 "symmetric-log colour scale", fontsize=12)
    _figure_legend(fig, axes, ncol=3)
    fig.subplots_adjust(left=0.04, right=0.95, bottom=0.22, top=0.84, wspace=0.5)
    fig.savefig(path, dpi=dpi)
    return fig


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a ``metrics.jsonl`` (one JSON object per line; blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and math.isfinite(x)


def plot_training_curves(metrics_rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                         keys: Sequence[str] = DEFAULT_CURVE_KEYS, *, step_key: str = "step",
                         title: str | None = None, dpi: int = 100, panel_size: float = 3.6):
    """One panel per metric against the training step (e.g. loss, ``frac_hard``, R@1).

    Rows without a key (an eval metric logged only every few steps) are skipped for that
    key; points are joined in step order and marked, so sparse evaluations stay visible. A
    key that no row holds gets an empty panel saying so.

    Args:
      metrics_rows: dicts as written to ``metrics.jsonl`` (see :func:`read_metrics_jsonl`).
      path: output ``.png`` path.
      keys: metric names, one panel each (hnm's evaluation logs R@1 as ``recall@1``).
      step_key: the x-axis key every row must hold.
      title: figure title.
      dpi, panel_size: resolution and inches per panel.

    Returns:
      The saved ``matplotlib.figure.Figure``.

    Raises:
      ValueError: no rows, no keys, or a row without ``step_key``.
    """
    if not metrics_rows:
        raise ValueError("`metrics_rows` is empty; nothing to plot.")
    keys = list(keys)
    if not keys:
        raise ValueError("`keys` is empty; name at least one metric.")
    for i, row in enumerate(metrics_rows):
        if step_key not in row:
            raise ValueError(f"row {i} of `metrics_rows` has no `step_key`={step_key!r}; "
                             f"its keys are {sorted(row)}.")
    path = _check_path(path)
    fig, axes = _figure(len(keys), 1, panel_size * 1.25, panel_size, 0.5)
    for ax, key in zip(axes[0], keys):
        pts = sorted((float(r[step_key]), float(r[key])) for r in metrics_rows
                     if _finite_number(r.get(key)))
        ax.set_gid(PANEL_GID)
        ax.set_title(key)
        ax.set_xlabel(step_key)
        ax.grid(alpha=0.3)
        if not pts:
            ax.text(0.5, 0.5, f"{key!r} not logged", transform=ax.transAxes, ha="center",
                    va="center", color="0.4")
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) <= 30 else None, ms=3, lw=1.2)
        if key == "frac_hard" or key.startswith("recall@"):
            ax.set_ylim(-0.02, 1.02)  # fractions: a fixed scale makes runs comparable
    fig.suptitle(title or "Training curves", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return fig


def _tick_label(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def phase_grid(table: Sequence[Mapping[str, Any]], x: str, y: str, value: str,
               collapsed_key: str = "collapsed"):
    """Arranges sweep rows into ``(xs, ys, values [len(ys), len(xs)], collapsed, counts)``.

    Several rows for one (x, y) cell (seeds) are averaged; ``collapsed`` is then the fraction
    of them that collapsed. Missing cells hold NaN and count 0.

    Raises:
      ValueError: empty ``table`` or a row lacking ``x``, ``y`` or ``value``.
    """
    if not table:
        raise ValueError("`table` is empty; nothing to plot.")
    for i, row in enumerate(table):
        missing = [k for k in (x, y, value) if k not in row]
        if missing:
            raise ValueError(f"row {i} of `table` lacks {missing}; its keys are {sorted(row)}.")
    xs = sorted({row[x] for row in table})
    ys = sorted({row[y] for row in table})
    total = np.zeros((len(ys), len(xs)))
    coll = np.zeros((len(ys), len(xs)))
    count = np.zeros((len(ys), len(xs)), int)
    for row in table:
        i, j = ys.index(row[y]), xs.index(row[x])
        total[i, j] += float(row[value])
        coll[i, j] += float(bool(row.get(collapsed_key, False)))
        count[i, j] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        collapsed = np.where(count > 0, coll / np.maximum(count, 1), np.nan)
    return xs, ys, values, collapsed, count


def plot_phase_diagram(table: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                       x: str = "embedding_dim", y: str = "classes_per_batch",
                       value: str = "r@1", collapsed_key: str = "collapsed", *,
                       title: str | None = None, dpi: int = 100):
    """Heat map of a sweep (e.g. R@1 over embedding dimension x classes per batch).

    Cells are evenly spaced and labelled with the swept values; each shows its value (and
    ``n=`` when several seeds were averaged). A cell is hatched and labelled "collapsed" when
    at least half of its runs have a true ``collapsed_key`` (see
    :func:`hnm.analysis.is_collapsed`); grey cells were not run.

    Args:
      table: one dict per run, holding ``x``, ``y``, ``value`` and optionally
        ``collapsed_key``.
      path: output ``.png`` path.
      x, y: the swept keys (columns, rows).
      value: the key shown as colour.
      collapsed_key: the boolean key that marks a collapsed run.
      title, dpi: figure title and resolution.

    Returns:
      The saved ``matplotlib.figure.Figure``; the heat map is ``fig.axes[0].images[0]`` and
      each collapsed cell is a patch with ``gid="collapsed"``.

    Raises:
      ValueError: as :func:`phase_grid`.
    """
    from matplotlib.patches import Patch, Rectangle  # pylint: disable=import-outside-toplevel
    xs, ys, values, collapsed, count = phase_grid(table, x, y, value, collapsed_key)
    path = _check_path(path)
    fig, axes = _figure(1, 1, max(4.0, 0.9 * len(xs) + 2.5), max(3.0, 0.6 * len(ys) + 1.2),
                        0.6)
    ax = axes[0, 0]
    ax.set_gid(PANEL_GID)
    ax.set_facecolor("0.85")  # NaN (not run) cells show the background
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(values), origin="lower", cmap="viridis",
                   vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-9, aspect="auto")
    ax.set_xticks(range(len(xs)), [_tick_label(v) for v in xs])
    ax.set_yticks(range(len(ys)), [_tick_label(v) for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    mid = (vmin + vmax) / 2
    for i in range(len(ys)):
        for j in range(len(xs)):
            if count[i, j] == 0:
                ax.text(j, i, "not run", ha="center", va="center", fontsize=7, color="0.3")
                continue
            is_coll = collapsed[i, j] >= 0.5
            if is_coll:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xx",
                                       edgecolor="#d62728", lw=1.5, gid="collapsed"))
            text = f"{values[i, j]:.3g}" + ("\ncollapsed" if is_coll else "")
            if count[i, j] > 1:
                text += f"\nn={count[i, j]}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if values[i, j] < mid else "black", fontweight="bold")
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label(value)
    ax.legend(handles=[Patch(fill=False, hatch="xx", edgecolor="#d62728",
                             label="collapsed run" if collapsed_key == "collapsed" else
                             f"collapsed ({collapsed_key})")],
              loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False, fontsize=9)
    ax.set_title(title or f"{value} over {x} × {y}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return fig


# --------------------------------------------------------------------------------------------
# Pictures of a trained embedding (hnm.inference): maps, worst queries, per-class recall,
# training curves with baselines.
# --------------------------------------------------------------------------------------------

WRONG_COLOUR = "#d62728"   # frame of a retrieved image of another class
RIGHT_COLOUR = "#2ca02c"   # frame of a retrieved image of the query's class
QUERY_COLOUR = "#1f77b4"
BASELINE_STYLES = {"untrained": ("#7f7f7f", ":"), "raw_pixels": ("#ff7f0e", "--")}


def class_colours(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, rgba [num_classes, 4])``: one colour per class (tab20, then hsv cycles)."""
    from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
    classes = np.unique(np.asarray(labels))
    n = len(classes)
    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "hsv"]
    positions = np.arange(n) if n <= 20 else np.linspace(0.0, 1.0, n, endpoint=False)
    return classes, cmap(positions)


def plot_embedding_map(embeddings: Any, labels: Any, path: str | os.PathLike, *,
                       tsne_max_points: int = 2000, seed: int = 0, dpi: int = 100,
                       title: str | None = None):
    """Two panels: PCA and t-SNE (scikit-learn) of ``embeddings``, points coloured by class.

    Rows are L2-normalised first (the cosine geometry of the retrieval metrics). t-SNE runs on
    a seeded random subset of at most ``tsne_max_points`` rows (it is quadratic-ish); PCA on
    all rows. Each panel holds one scatter per class (``label`` = the class id), so the class
    colours can be read back from the figure.
    """
    from sklearn.decomposition import PCA  # pylint: disable=import-outside-toplevel
    from sklearn.manifold import TSNE  # pylint: disable=import-outside-toplevel

    x = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(labels) or len(x) < 3:
        raise ValueError(f"`embeddings` must be [N >= 3, D] with one label per row; got "
                         f"{x.shape} and {labels.shape} labels.")
    path = _check_path(path)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    classes, colours = class_colours(labels)
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.permutation(len(x))[:tsne_max_points])
    maps = [("PCA", np.arange(len(x)), PCA(n_components=2, random_state=seed).fit_transform(x))]
    perplexity = float(min(30.0, max(2.0, (len(sub) - 1) / 3.0)))
    maps.append((f"t-SNE ({len(sub)} points)", sub,
                 TSNE(n_components=2, perplexity=perplexity, init="pca",
                      random_state=seed).fit_transform(x[sub])))
    fig, axes = _figure(2, 1, 5.0, 4.6, 0.6)
    for ax, (name, rows, xy) in zip(axes[0], maps):
        ax.set_gid(PANEL_GID)
        ax.set_title(name)
        for c, colour in zip(classes, colours):
            pick = labels[rows] == c
            ax.scatter(xy[pick, 0], xy[pick, 1], s=6, color=colour, label=str(c),
                       linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        axes[0][1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
                          markerscale=2, frameon=False, title="class")
    fig.suptitle(title or f"Evaluation embeddings: {len(x)} points, {len(classes)} classes")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return fig


def worst_query_order(labels: Any, neighbours: Any, scores: Any | None = None) -> np.ndarray:
    """Queries ordered worst first: fewest same-class entries in their top-k, then (ties) the
    highest-scoring wrong first neighbour, i.e. the most confidently wrong."""
    labels, neighbours = np.asarray(labels), np.asarray(neighbours)
    correct = (labels[np.maximum(neighbours, 0)] == labels[:, None]) & (neighbours >= 0)
    hits = correct.sum(axis=1)
    top = np.zeros(len(labels)) if scores is None else np.asarray(scores, np.float64)[:, 0]
    return np.lexsort((-top, hits))


def plot_worst_queries(images: Any, labels: Any, neighbours: Any, scores: Any | None,
                       path: str | os.PathLike, *, num_queries: int = 8, dpi: int = 100):
    """A grid: one row per worst query (:func:`worst_query_order`), the query image then its
    top-k retrieved images; retrieved images of another class are framed in red, those of
    the query's class in green, the query in blue.

    Args:
      images: uint8 [N, H, W] or [N, H, W, C] (C in 1, 3), the images the model saw.
      labels: [N] class labels.
      neighbours: [N, k] gallery indices of each query's top-k (as :func:`hnm.search.knn`).
      scores: [N, k] similarities or None.
      path: output ``.png``.
      num_queries: rows (at most N).

    Returns:
      The ``Figure``; its axes carry ``gid`` ``"query"``, ``"right"`` or ``"wrong"``.
    """
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    labels, neighbours = np.asarray(labels), np.asarray(neighbours)
    if neighbours.ndim != 2 or len(neighbours) != len(labels) or len(images) != len(labels):
        raise ValueError(f"`images`, `labels` and `neighbours` [N, k] must have one row per "
                         f"query; got {images.shape}, {labels.shape}, {neighbours.shape}.")
    path = _check_path(path)
    order = worst_query_order(labels, neighbours, scores)[:num_queries]
    k = neighbours.shape[1]
    fig, axes = _figure(k + 1, len(order), 1.25, 1.35, 0.5)
    cmap = "gray" if images.ndim == 3 else None
    for row, q in zip(axes, order):
        entries = [(q, "query", f"query {q}\nclass {labels[q]}")]
        for j, g in enumerate(neighbours[q]):
            if g < 0:
                entries.append((None, "wrong", "(none)"))
                continue
            kind = "right" if labels[g] == labels[q] else "wrong"
            score = "" if scores is None else f" {float(np.asarray(scores)[q, j]):.2f}"
            entries.append((g, kind, f"#{j + 1} class {labels[g]}{score}"))
        for ax, (idx, kind, text) in zip(row, entries):
            ax.set_gid(kind)
            if idx is not None:
                ax.imshow(images[idx], cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            colour = {"query": QUERY_COLOUR, "right": RIGHT_COLOUR, "wrong": WRONG_COLOUR}[kind]
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3.0 if kind != "right" else 1.5)
            ax.set_title(text, fontsize=6, color=colour if kind == "wrong" else "black")
    fig.suptitle(f"The {len(order)} worst queries and their top-{k} (red: another class)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return fig


def per_class_recall(labels: Any, hit: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, Recall@1 per class)``: the mean of ``hit`` [N] bool over each class."""
    labels, hit = np.asarray(labels), np.asarray(hit, np.float64)
    classes, inverse = np.unique(labels, return_inverse=True)
    sums = np.bincount(inverse, weights=hit, minlength=len(classes))
    return classes, sums / np.bincount(inverse, minlength=len(classes))


def plot_per_class_recall(labels: Any, hit: Any, path: str | os.PathLike, *, bins: int = 20,
                          dpi: int = 100):
    """Histogram of per-class Recall@1 (``hit[i]``: query i's first neighbour shares its
    class) over [0, 1], with the overall (per-query) and per-class means marked."""
    classes, recall = per_class_recall(labels, hit)
    path = _check_path(path)
    fig, axes = _figure(1, 1, 5.5, 3.6, 0.0)
    ax = axes[0][0]
    ax.set_gid(PANEL_GID)
    ax.hist(recall, bins=np.linspace(0.0, 1.0, bins + 1), color=QUERY_COLOUR, alpha=0.85,
            edgecolor="white")
    overall = float(np.mean(np.asarray(hit, np.float64)))
    ax.axvline(overall, color="black", ls="--", label=f"R@1 over queries {overall:.3f}")
    ax.axvline(float(recall.mean()), color=WRONG_COLOUR, ls=":",
               label=f"mean over classes {recall.mean():.3f}")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("Recall@1 of the class")
    ax.set_ylabel("classes")
    ax.set_title(f"Per-class Recall@1 ({len(classes)} classes)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return fig


def plot_training_curves_with_baselines(metrics_rows: Sequence[Mapping[str, Any]],
                                        path: str | os.PathLike, keys: Sequence[str],
                                        baselines: Mapping[str, Mapping[str, float]] | None
                                        = None, **kwargs):
    """:func:`plot_training_curves`, plus each baseline's value of a panel's metric as a
    horizontal line (``eval/recall@1`` panel: ``baselines[name]["recall@1"]``), and fraction
    panels (``recall@K``, ``map@...``, ``r_precision``, ``frac_hard``) on a fixed [0, 1]
    axis, so a one-point change looks like one point."""
    fig = plot_training_curves(metrics_rows, path, keys=keys, **kwargs)
    panels = [ax for ax in fig.axes if ax.get_gid() == PANEL_GID]
    for ax, key in zip(panels, keys):
        name = key.split("/")[-1]
        drew = False
        for base, values in (baselines or {}).items():
            if _finite_number(values.get(name)):
                colour, style = BASELINE_STYLES.get(base, ("#9467bd", "-."))
                ax.axhline(float(values[name]), color=colour, ls=style, lw=1.2,
                           label=f"{base.replace('_', ' ')} {float(values[name]):.3f}")
                drew = True
        if name.startswith(("recall@", "map@", "precision@")) or name in (
                "r_precision", "frac_hard", "nmi", "ami"):
            ax.set_ylim(-0.02, 1.02)
        if drew:
            ax.legend(fontsize=7, loc="lower right")
    fig.savefig(_check_path(path), dpi=kwargs.get("dpi", 100))
    return fig


def plot_similarity_changes(loss_fns: Mapping[str, Any], path: str | os.PathLike, *,
                            grid: int = 20, learning_rate: float = 0.1,
                            projections: Sequence[float] = (0.0, 1.0),
                            entanglement: float = 0.5, forms: Mapping[str, str] | None = None,
                            dpi: int = 110, panel_size: float = 3.4):
    r"""The official notebook's figure: :math:`\Delta S_{ap}` and :math:`\Delta S_{an}` after one
    SGD step (:func:`hnm.analysis.one_step_similarity_change`), one row per loss and two
    columns (:math:`\Delta S_{ap}` as horizontal arrows, :math:`\Delta S_{an}` as vertical
    ones) per ``projection``, on the notebook's grid over :math:`[0, 1]^2`. Hard cells
    (:math:`S_{an} > S_{ap}`) lie above the diagonal (shaded); hard cells whose negative is
    pulled in (:math:`\Delta S_{an} > 0`) are ringed in red, and each :math:`\Delta S_{an}`
    panel's title gives their share (:func:`hnm.analysis.hard_pull_share`).

    Args:
      loss_fns: ``{row title: loss_fn}`` (elementwise ``loss_fn(sim_ap, sim_an)``).
      path: the .png to write.
      grid: N, cells per axis (the notebook uses 20: ``linspace(0, 1, N)``).
      learning_rate, entanglement: as :func:`hnm.analysis.one_step_similarity_change`.
      projections: the ``projection`` of each column pair.
      forms: optional ``{row title: form}`` (default ``"cosine"`` for every row).

    Returns:
      ``(figure, shares)`` with ``shares[title][projection]`` the hard-pull share.
    """
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    panels = _check_loss_fns(loss_fns)
    _check_grid(grid)
    path = _check_path(path)
    forms = dict(forms or {})
    s = np.linspace(0.0, 1.0, grid).astype(np.float32)
    s_ap, s_an = np.meshgrid(s, s)
    hard = s_an > s_ap
    ncols = 2 * len(projections)
    fig, axes = _figure(ncols, len(panels), panel_size, panel_size, 1.6)
    shares: dict[str, dict[float, float]] = {}
    for r, (title, panel) in enumerate(panels.items()):
        shares[title] = {}
        for c, proj in enumerate(projections):
            d = analysis.one_step_similarity_change(
                panel.loss_fn, jnp.asarray(s_ap), jnp.asarray(s_an),
                learning_rate=learning_rate, projection=float(proj),
                entanglement=entanglement, form=forms.get(title, "cosine"))
            d_ap, d_an = np.asarray(d.delta_ap), np.asarray(d.delta_an)
            share = float(analysis.hard_pull_share(d_an, s_ap, s_an))
            shares[title][float(proj)] = share
            scale = max(float(np.abs(np.concatenate([d_ap.ravel(), d_an.ravel()])).max()),
                        1e-9) / (0.8 / grid)
            for k, (u, v, name) in enumerate(((d_ap, 0 * d_ap, "ΔS_ap"),
                                              (0 * d_an, d_an, "ΔS_an"))):
                ax = axes[r][2 * c + k]
                ax.fill([0, 1, 0], [0, 1, 1], color=_HARD_COLOUR, alpha=0.08, lw=0)
                ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
                ax.quiver(s_ap, s_an, u, v, np.abs(u + v), cmap="viridis", angles="xy",
                          scale_units="xy", scale=scale, width=0.006)
                if k == 1:
                    pull = hard & (d_an > analysis.HARD_PULL_ATOL)  # as hard_pull_share
                    ax.scatter(s_ap[pull], s_an[pull], s=14, facecolors="none",
                               edgecolors=_HARD_COLOUR, linewidths=0.8)
                ax.set_xlim(-0.03, 1.03)
                ax.set_ylim(-0.03, 1.03)
                ax.set_aspect("equal")
                ax.set_gid(PANEL_GID)
                ax.tick_params(labelsize=7)
                label = f"{name}, projection {proj:g}"
                if k == 1:
                    label += f"\nhard & pulled in: {100 * share:.0f} %"
                ax.set_title(f"{title}\n{label}" if c == 0 and k == 0 else label, fontsize=8)
                if r == len(panels) - 1:
                    ax.set_xlabel("S_ap", fontsize=8)
                if c == 0 and k == 0:
                    ax.set_ylabel("S_an", fontsize=8)
    fig.suptitle(f"One SGD step on (f_a, f_p, f_n), re-normalised (lr = {learning_rate:g}, "
                 f"entanglement p = {entanglement:g}): the official notebook's simulation\n"
                 "shaded: hard (S_an > S_ap); red rings: hard cells whose negative is pulled "
                 f"toward the anchor (ΔS_an > {analysis.HARD_PULL_ATOL:g})", fontsize=11)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.04, top=1 - 1.5 / (
        panel_size * len(panels) + 1.6), wspace=0.25, hspace=0.5)
    fig.savefig(path, dpi=dpi)
    return fig, shares


def plot_collapse_phase_diagram(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                                steps: int | None = None, seeds: int | None = None,
                                dpi: int = 100):
    """The step-matched collapse sweep: one heat map per objective, P x K rows by d columns.

    Colour: the collapse fraction over seeds (``collapse_fraction``, relative test). Each
    cell prints R@1 and the d_iso bracket ``[diso_lower, diso_upper]``. Cells where
    :func:`hnm.analysis.collapse_boundary` predicts collapse (``predicted``) get a thick
    dashed black frame (patch ``gid="predicted"``): the predicted boundary.

    Args:
      rows: dicts with ``objective``, ``classes_per_batch``, ``samples_per_class``,
        ``embedding_dim``, ``collapse_fraction``, ``r@1``, ``diso_lower``, ``diso_upper``,
        ``predicted``.
      path: output .png.
      steps, seeds: for the title.

    Returns:
      The saved Figure.

    Raises:
      ValueError: empty ``rows`` or a row missing a key.
    """
    from matplotlib.patches import Patch, Rectangle  # pylint: disable=import-outside-toplevel
    needed = ("objective", "classes_per_batch", "samples_per_class", "embedding_dim",
              "collapse_fraction", "r@1", "diso_lower", "diso_upper", "predicted")
    if not rows:
        raise ValueError("`rows` is empty; nothing to plot.")
    for r in rows:
        missing = [k for k in needed if k not in r]
        if missing:
            raise ValueError(f"a row of `rows` lacks {missing}: {dict(r)!r}")
    path = _check_path(path)
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    dims = sorted({r["embedding_dim"] for r in rows})
    pk = sorted({(r["samples_per_class"], r["classes_per_batch"]) for r in rows})
    pk = [(p, k) for k, p in pk]
    fig, axes = _figure(len(objectives), 1, 0.95 * len(dims) + 1.8, 0.62 * len(pk) + 1.6,
                        0.9)
    for ax, obj in zip(axes[0], objectives):
        grid = np.full((len(pk), len(dims)), np.nan)
        ax.set_gid(PANEL_GID)
        ax.set_facecolor("0.85")
        cells = {(r["classes_per_batch"], r["samples_per_class"], r["embedding_dim"]): r
                 for r in rows if r["objective"] == obj}
        for (i, (p, k)), (j, d) in ((a, b) for a in enumerate(pk) for b in enumerate(dims)):
            r = cells.get((p, k, d))
            if r is None:
                continue
            grid[i, j] = r["collapse_fraction"]
            if r.get("spread_collapse_fraction", 0.0) > r["collapse_fraction"]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                       ec="0.45", lw=0, gid="spread_only"))
            ax.text(j, i + 0.17, f"{r['r@1']:.2f}", ha="center", va="center", fontsize=8)
            ax.text(j, i - 0.2, f"[{r['diso_lower']:.2f},{r['diso_upper']:.2f}]",
                    ha="center", va="center", fontsize=6)
            if r["predicted"]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2.2,
                                       ls="--", ec="k", gid="predicted"))
        im = ax.imshow(np.ma.masked_invalid(grid), origin="lower", cmap="Reds", vmin=0,
                       vmax=1, aspect="auto", alpha=0.8)
        ax.set_xticks(range(len(dims)), [str(d) for d in dims])
        ax.set_yticks(range(len(pk)), [f"{p}" + ("" if k == 2 else f" (K={k})")
                                       for p, k in pk])
        ax.set_xlabel("embedding dimension d")
        ax.set_ylabel("classes per batch P (K = 2)")
        ax.set_title(obj, fontsize=11)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).set_label(
            "collapse fraction over seeds", fontsize=8)
    extra = f"{steps} optimiser steps in every cell" if steps else "step-matched"
    extra += f", {seeds} seeds" if seeds else ""
    fig.suptitle("Collapse (relative test) per cell; text: test R@1 and the d_iso bracket "
                 f"[lower, upper] at the end\n({extra}; dashed frame: collapse predicted by "
                 "the sphere-capacity boundary, margin 0.2)", fontsize=10)
    fig.legend([Patch(fill=False, ls="--", lw=2.2, ec="k"),
                Patch(fill=False, hatch="///", ec="0.45")],
               ["predicted collapse (P > capacity of S^(d-1) at margin 0.2)",
                "more seeds collapsed by spread alone (loss not at its collapse value)"],
               loc="lower center", frameon=False, fontsize=9, ncol=2)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.2, top=0.8, wspace=0.35)
    fig.savefig(path, dpi=dpi)
    return fig


def plot_diso_curves(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
                     path: str | os.PathLike, *, dpi: int = 100):
    """d_iso bounds and the max-form hard-negative hinge over training, one panel per run.

    Args:
      runs: ``[(title, metrics rows), ...]``; rows hold ``step``, ``diag/diso_lower``,
        ``diag/diso_upper`` and ``diag/separation_violation_max``.
      path: output .png.

    Returns:
      The saved Figure.

    Raises:
      ValueError: no runs, or a run without rows.
    """
    if not runs:
        raise ValueError("`runs` is empty; nothing to plot.")
    path = _check_path(path)
    fig, axes = _figure(len(runs), 1, 4.2, 3.2, 0.8)
    for ax, (title, rows) in zip(axes[0], runs):
        if not rows:
            raise ValueError(f"run {title!r} has no rows.")
        step = [r["step"] for r in rows]
        ax.fill_between(step, [r["diag/diso_lower"] for r in rows],
                        [r["diag/diso_upper"] for r in rows], color="#9ecae1", alpha=0.6,
                        label="d_iso bracket [lower, upper]")
        ax.plot(step, [r["diag/diso_upper"] for r in rows], color="#3182bd", lw=1)
        ax.plot(step, [r["diag/diso_lower"] for r in rows], color="#3182bd", lw=1)
        ax.plot(step, [r["diag/separation_violation_max"] for r in rows], color="k", lw=1.2,
                label="max-form hard-negative hinge v")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.set_gid(PANEL_GID)
    _figure_legend(fig, axes[0], ncol=2)
    fig.suptitle("Training batch: d_iso bounds vs the max-form hinge (margin 0.2)",
                 fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.25, top=0.82, wspace=0.3)
    fig.savefig(path, dpi=dpi)
    return fig
