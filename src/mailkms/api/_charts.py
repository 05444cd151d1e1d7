"""Bar charts as inline SVG, drawn at the server: no script, no chart library, no CDN. Each bar has a
<title> (its bucket and count) for a pointer and a screen reader; the chart has a role and a name."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

from mailkms.services import Series

WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM, PAD_TOP = 760, 200, 44, 22, 10


@dataclass(frozen=True)
class Chart:
    """The chart's title (for a visible caption) and its SVG markup."""

    title: str
    svg: Markup


def bar_chart(chart_id: str, title: str, series: Series, *, label: str, every: int, color: str = "#0b57d0") -> Chart:
    """`label` names one bucket for the titles ("week of", "day"); an axis tick every `every` buckets."""
    n = len(series.counts)
    top = max(max(series.counts, default=0), 1)
    plot_w, plot_h = WIDTH - PAD_LEFT - 8, HEIGHT - PAD_BOTTOM - PAD_TOP
    step = plot_w / max(n, 1)
    parts = [
        f'<svg class="chart" id="{escape(chart_id)}" role="img" aria-labelledby="{escape(chart_id)}-t" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{escape(chart_id)}-t">{escape(title)}: {series.total} in all, at most {top} in one</title>',
        f'<line x1="{PAD_LEFT}" y1="{PAD_TOP + plot_h}" x2="{WIDTH - 8}" y2="{PAD_TOP + plot_h}" stroke="#57606a"/>',
        f'<text x="{PAD_LEFT - 6}" y="{PAD_TOP + 10}" text-anchor="end" font-size="11" fill="#1b1f24">{top}</text>',
        f'<text x="{PAD_LEFT - 6}" y="{PAD_TOP + plot_h}" text-anchor="end" font-size="11" fill="#1b1f24">0</text>',
    ]
    for i, (start, count) in enumerate(zip(series.starts, series.counts, strict=True)):
        h = plot_h * count / top
        x = PAD_LEFT + i * step
        parts.append(
            f'<rect class="bar" x="{x + 1:.1f}" y="{PAD_TOP + plot_h - h:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="{color}" data-count="{count}"><title>{escape(label)} {_day(start)}: {count}</title></rect>'
        )
        if i % every == 0 and i + every // 2 < n:  # no tick label cut at the right edge
            parts.append(
                f'<text x="{x + 1:.1f}" y="{HEIGHT - 6}" font-size="10" fill="#57606a">{start:%Y-%m-%d}</text>'
            )
    parts.append("</svg>")
    return Chart(title, Markup("".join(parts)))  # noqa: S704 - every value above is escaped or a number


def _day(when: dt.datetime) -> str:
    return f"{when:%Y-%m-%d}"
