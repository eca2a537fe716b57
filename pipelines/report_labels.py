"""Readable class labels on report.html's figures: class names as tick labels that fit the axis (10-100
classes without overlap), names beside the points of a scatter placed where they overlap neither each
other nor the axes' edge, and a log axis whose number labels do not collide.

Sizes are measured, not guessed: `label_points` lays the figure out first (its layout engine), then
places each label with the Agg renderer's text extents and leaves a label out rather than overlap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

MAX_FONT, MIN_FONT = 8.0, 5.0  # points: tick labels stay in this range
LINE = 1.25  # a text line's height over its font size (what one label needs across the axis)


def class_ticks(ax: Any, names: Sequence[str], axis: str = "x", length_in: float | None = None) -> int:
    """Class names as the ticks of `axis` at 0..n-1, sized to fit: the font shrinks from MAX_FONT to
    MIN_FONT with the room per class (x labels are vertical, so one needs a line's height of room);
    below that only every m-th name is written. `length_in`: the axis length in inches (default: the
    axes' current share of the figure). Returns m (1: every name)."""
    n = len(names)
    if n == 0:
        return 1
    fig = ax.get_figure()
    if length_in is None:
        pos = ax.get_position()
        length_in = (pos.width * fig.get_figwidth()) if axis == "x" else (pos.height * fig.get_figheight())
    room = 0.9 * 72.0 * length_in / n  # points per class along the axis (0.9: the layout may shrink it)
    size = min(MAX_FONT, room / LINE)
    step = 1
    if size < MIN_FONT:
        size, step = MIN_FONT, math.ceil(MIN_FONT * LINE / room)
    ticks = list(range(0, n, step))
    labels = [str(names[i]) for i in ticks]
    if axis == "x":
        ax.set_xticks(ticks, labels, rotation=90, fontsize=size)
        ax.xaxis.set_minor_locator(FixedLocator([]))
    else:
        ax.set_yticks(ticks, labels, fontsize=size)
        ax.yaxis.set_minor_locator(FixedLocator([]))
    return step


def plain_log_axis(ax: Any, low: float, high: float) -> None:
    """A log x axis over [low, high] with plain numbers (5, 10, 20, not 10^1): every minor tick is
    labelled when the axis spans at most 1.5 decades, else only 1, 2 and 5 times a power of ten, so
    the labels never run into each other."""
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    decades = math.log10(max(high, 1e-9) / max(low, 1e-9))
    if decades <= 1.5:
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        return
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10))))
    ax.xaxis.set_minor_formatter(NullFormatter())


# offsets (points) tried for a point's label, nearest first: above, below, then further out
_OFFSETS = [(0, 5), (0, -11), (6, 2), (-6, 2), (0, 14), (0, -20), (8, -6), (-8, -6), (0, 23), (0, -29)]


def label_points(
    fig: Figure, ax: Any, points: Sequence[tuple[float, float, str]], fontsize: float = 7
) -> int:
    """Write each (x, y, name) next to its point in data coordinates, at the first offset where the
    label overlaps no label already placed, no text already on the axes and not its legend, and stays
    inside the axes; a label with no such place is left out. The figure's layout is fixed first (so
    positions do not move after placement) and its layout engine then turned off. Returns how many
    labels were placed."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)
        fig.set_layout_engine("none")
    renderer = canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    taken = [t.get_window_extent(renderer) for t in ax.texts if t.get_text()]
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer))
    placed = 0
    for x, y, name in points:
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        for dx, dy in _OFFSETS:
            text = ax.annotate(
                name,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=fontsize,
                ha="center" if dx == 0 else ("left" if dx > 0 else "right"),
                va="bottom" if dy >= 0 else "top",
                color="#333",
                annotation_clip=True,
            )
            extent = text.get_window_extent(renderer)
            inside = (
                extent.x0 >= box.x0 and extent.x1 <= box.x1 and extent.y0 >= box.y0 and extent.y1 <= box.y1
            )
            if inside and not any(extent.overlaps(other) for other in taken):
                taken.append(extent)
                placed += 1
                break
            text.remove()
    return placed


def overlapping(texts: Sequence[Any], renderer: Any) -> list[tuple[str, str]]:
    """The pairs of visible, non-empty texts whose drawn extents overlap (what the tests check)."""
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text()]

    def overlap(a: Any, b: Any) -> bool:  # by more than half a pixel both ways (touching is fine)
        return min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5

    pairs = [
        (a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1 :] if overlap(box_a, box_b)
    ]
    return pairs
