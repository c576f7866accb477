"""Server-rendered SVG line charts (no JavaScript, no assets): metrics across versions, loss per
step. Every label is escaped. Knows nothing about the database or HTTP."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")
WIDTH, HEIGHT, PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 480, 200, 48, 12, 24, 28

Point = tuple[float, float]


def _finite(points: Sequence[tuple[float, float | None]]) -> list[Point]:
    return [
        (float(x), float(y))
        for x, y in points
        if y is not None and isinstance(y, (int, float)) and math.isfinite(float(y))
    ]


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def line_chart(
    title: str, series: Mapping[str, Sequence[tuple[float, float | None]]], *, x_label: str = ""
) -> str:
    """An `<svg>` with one polyline (and dots) per named series; `None`/NaN values are skipped.
    A chart without any point says so instead of drawing axes."""
    clean = {name: _finite(points) for name, points in series.items()}
    everything = [point for points in clean.values() for point in points]
    parts = [
        (
            f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
            'xmlns="http://www.w3.org/2000/svg">'
        ),
        f'<text x="{PAD_LEFT}" y="15" class="chart-title">{escape(title)}</text>',
    ]
    if not everything:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no data yet</text></svg>')
        return "".join(parts)
    xs = [x for x, _ in everything]
    ys = [y for _, y in everything]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    inner_w = WIDTH - PAD_LEFT - PAD_RIGHT
    inner_h = HEIGHT - PAD_TOP - PAD_BOTTOM

    def sx(x: float) -> float:
        return PAD_LEFT + (x - x0) / (x1 - x0) * inner_w

    def sy(y: float) -> float:
        return PAD_TOP + (1 - (y - y0) / (y1 - y0)) * inner_h

    bottom = PAD_TOP + inner_h
    parts.append(
        f'<line x1="{PAD_LEFT}" y1="{bottom}" x2="{WIDTH - PAD_RIGHT}" y2="{bottom}" class="axis"/>'
        f'<line x1="{PAD_LEFT}" y1="{PAD_TOP}" x2="{PAD_LEFT}" y2="{bottom}" class="axis"/>'
        f'<text x="{PAD_LEFT - 4}" y="{PAD_TOP + 4}" text-anchor="end">{_fmt(y1)}</text>'
        f'<text x="{PAD_LEFT - 4}" y="{bottom}" text-anchor="end">{_fmt(y0)}</text>'
        f'<text x="{PAD_LEFT}" y="{HEIGHT - 8}">{_fmt(x0)}</text>'
        f'<text x="{WIDTH - PAD_RIGHT}" y="{HEIGHT - 8}" text-anchor="end">{_fmt(x1)}</text>'
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" text-anchor="middle">{escape(x_label)}</text>'
    )
    for index, (name, points) in enumerate(clean.items()):
        colour = PALETTE[index % len(PALETTE)]
        if points:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}">'
                f"<title>{escape(name)}</title></polyline>"
            )
            if len(points) <= 50:
                parts.extend(
                    f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in points
                )
        parts.append(
            f'<text x="{WIDTH - PAD_RIGHT - 4}" y="{15 + 13 * index}" text-anchor="end" fill="{colour}">'
            f"{escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
