"""Inline SVG trend charts: one small chart per test with more than one numeric value.

Plain SVG built from numbers only (no text from the record reaches the markup except through
the template's escaping of the title), so the page needs no script and prints as drawn. Each
point carries ``data-date`` and ``data-value`` so a test can read the chart back and compare it
with the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from html import escape

from aggregator.package.pages.fmt import fmt_date, to_datetime
from aggregator.package.pages.labs import Series

WIDTH, HEIGHT = 320, 120
LEFT, RIGHT, TOP, BOTTOM = 52, 10, 8, 22


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    date: str
    value: str
    flag: str


def _scale(lo: float, hi: float, a: float, b: float, v: float) -> float:
    return a if hi == lo else a + (v - lo) * (b - a) / (hi - lo)


def _tick(v: float) -> str:
    """An axis label short enough for the margin: whole numbers from 1000 up, else 4 significant digits."""
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _f(v: float) -> str:
    return f"{v:.1f}"


def trend_svg(series: Series) -> str | None:
    """The chart of a series with at least two dated numeric values, or None."""
    vals = series.charted
    if len(vals) < 2:
        return None
    times = [to_datetime(v.when) for v in vals]
    pts = [(t, v) for t, v in zip(times, vals, strict=True) if t is not None]
    if len(pts) < 2:
        return None
    t0, t1 = pts[0][0], pts[-1][0]
    span = (t1 - t0).total_seconds()
    numbers = [v.number for _, v in pts if v.number is not None]
    lo = min([*numbers, *(x for x in (series.low,) if x is not None)])
    hi = max([*numbers, *(x for x in (series.high,) if x is not None)])
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad
    x0, x1, ytop, ybot = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM

    def px(t: datetime) -> float:
        return _scale(0, span, x0, x1, (t - t0).total_seconds()) if span else (x0 + x1) / 2

    def py(v: float) -> float:
        return _scale(lo, hi, ybot, ytop, v)

    points = [Point(px(t), py(float(v.number or 0)), v.when, v.text, v.flag) for t, v in pts]
    name = escape(f"Trend of {series.title}: {len(points)} values from {fmt_date(pts[0][1].when)} "
                  f"to {fmt_date(pts[-1][1].when)}", quote=True)
    out = [f'<svg class="trend" role="img" aria-label="{name}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
           f'height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg"><title>{name}</title>']
    if series.low is not None or series.high is not None:
        band_hi = py(series.high) if series.high is not None else ytop
        band_lo = py(series.low) if series.low is not None else ybot
        out.append(f'<rect class="ref-band" x="{x0}" y="{_f(band_hi)}" width="{x1 - x0}" '
                   f'height="{_f(max(band_lo - band_hi, 0.5))}"/>')
    out.append(f'<line class="axis" x1="{x0}" y1="{ybot}" x2="{x1}" y2="{ybot}"/>'
               f'<line class="axis" x1="{x0}" y1="{ytop}" x2="{x0}" y2="{ybot}"/>')
    for v in (lo + pad, hi - pad):
        out.append(f'<text class="tick" x="{x0 - 4}" y="{_f(py(v) + 3)}" text-anchor="end">'
                   f'{_tick(v)}</text>')
    first, last = escape(fmt_date(pts[0][1].when)), escape(fmt_date(pts[-1][1].when))
    out.append(f'<text class="tick" x="{x0}" y="{HEIGHT - 6}" text-anchor="start">{first}</text>')
    out.append(f'<text class="tick" x="{x1}" y="{HEIGHT - 6}" text-anchor="end">{last}</text>')
    out.append('<polyline class="line" points="' + " ".join(f"{_f(p.x)},{_f(p.y)}" for p in points) + '"/>')
    for p in points:
        # the date and value text come from the record: escaped, since the SVG is inserted as markup
        attrs = f'data-date="{escape(p.date, quote=True)}" data-value="{escape(p.value, quote=True)}"'
        label = escape(f"{fmt_date(p.date, with_time=True)}: {p.value}")
        if p.flag:
            label += f" ({p.flag})"
            # an abnormal point is a larger square, not only another colour
            out.append(f'<rect class="pt abnormal" x="{_f(p.x - 4)}" y="{_f(p.y - 4)}" width="8" height="8" '
                       f'{attrs} data-flag="{p.flag}"><title>{label}</title></rect>')
        else:
            out.append(f'<circle class="pt" cx="{_f(p.x)}" cy="{_f(p.y)}" r="3" {attrs}><title>{label}</title>'
                       "</circle>")
    out.append("</svg>")
    return "".join(out)
