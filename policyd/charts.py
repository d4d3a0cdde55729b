"""Charts as inline SVG, drawn on the server: no script, no asset from anywhere else, readable on a phone.

Values are integers (nanos, tokens, counts); bar heights are integer divisions of them, so a chart
never rounds money through a float. Each bar carries a <title> with its exact figure.
"""

from __future__ import annotations

from html import escape
from typing import Callable

WIDTH = 720
HEIGHT = 220
AXIS = 28  # room for the labels under the bars
PALETTE = ("#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#64748b")


def stacked_bars(buckets: list[str], series: dict[str, list[int]], label: Callable[[int], str],
                 title: str) -> str:
    """One bar per bucket, stacked by series (name -> one value per bucket), with a legend."""
    if not buckets or not series:
        return f'<p class="empty">No data for {escape(title.lower())} in this window.</p>'
    totals = [sum(values[i] for values in series.values()) for i in range(len(buckets))]
    top = max(max(totals), 1)
    plot = HEIGHT - AXIS
    slot = WIDTH // len(buckets)
    bar = max(slot - 4, 2)
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">']
    for i, bucket in enumerate(buckets):
        x = i * slot + 2
        y = plot
        for n, (name, values) in enumerate(series.items()):
            value = values[i]
            if value <= 0:
                continue
            height = max(value * plot // top, 1)
            y -= height
            parts.append(f'<rect x="{x}" y="{y}" width="{bar}" height="{height}" fill="{PALETTE[n % len(PALETTE)]}">'
                         f'<title>{escape(bucket)} · {escape(name)}: {escape(label(value))}</title></rect>')
        if len(buckets) <= 12 or i % max(len(buckets) // 8, 1) == 0:
            parts.append(f'<text x="{x}" y="{HEIGHT - 8}" class="tick">{escape(_short(bucket))}</text>')
    parts.append("</svg>")
    legend = "".join(f'<li><svg class="swatch" viewBox="0 0 10 10"><rect width="10" height="10" '
                     f'fill="{PALETTE[n % len(PALETTE)]}"/></svg>{escape(name or "(none)")}</li>'
                     for n, name in enumerate(series))
    return "".join(parts) + f'<ul class="legend">{legend}</ul>'


def line(points: list[tuple[str, int]], label: Callable[[int], str], title: str) -> str:
    """A step line of values over labelled points (a balance over time)."""
    if not points:
        return f'<p class="empty">No data for {escape(title.lower())}.</p>'
    values = [v for _, v in points]
    low, high = min(min(values), 0), max(max(values), 1)
    span = max(high - low, 1)
    plot = HEIGHT - AXIS
    step = WIDTH // max(len(points), 1)
    coords = [(i * step + step // 2, plot - (v - low) * (plot - 4) // span) for i, v in enumerate(values)]
    path = " ".join(f"{'M' if i == 0 else 'L'}{x},{y}" for i, (x, y) in enumerate(coords))
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
             f'<path d="{path}" fill="none" stroke="{PALETTE[0]}" stroke-width="2"/>']
    for (x, y), (name, value) in zip(coords, points):
        parts.append(f'<circle cx="{x}" cy="{y}" r="3" fill="{PALETTE[0]}"><title>{escape(name)}: '
                     f'{escape(label(value))}</title></circle>')
    every = max(len(points) // 8, 1)
    for i, (name, _) in enumerate(points):
        if i % every == 0:
            parts.append(f'<text x="{i * step + 2}" y="{HEIGHT - 8}" class="tick">{escape(_short(name))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _short(bucket: str) -> str:
    """'2026-11-23T14:00Z' -> '14:00'; '2026-11-23' -> '11-23'."""
    if "T" in bucket:
        return bucket.split("T", 1)[1].rstrip("Z")
    return bucket[5:] if len(bucket) == 10 else bucket
