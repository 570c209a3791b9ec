"""Loss curves and sharpness curves as inline SVG: several runs overlaid, redrawn from scratch on every update.

Gradio's own LinePlot (6.31) keeps the colour domain of its first drawing and only swaps the data later,
so a chart first drawn before any run had logged a step (or while its tab was hidden) shows axes and
no lines. An SVG string in a gr.HTML has no such state.
"""

from __future__ import annotations

import html
import math

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
# An A/B pair trains with identical seeds, so its curves often lie on top of each other: every curve after the
# first is dashed and thinner, so the one below still shows through its gaps.
DASHES = ["", "8 5", "2 4", "12 4 2 4"]
WIDTHS = [3.0, 2.0, 2.0, 2.0]


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 0.5:
        if t >= lo - step * 1e-9:
            ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.001:
        return f"{v:.2g}"
    return f"{v:.4g}"


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style exponential moving average, debiased at the start."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def _style(i: int) -> tuple[str, str, float]:
    """(colour, dash pattern, line width) of the i-th curve."""
    return COLOURS[i % len(COLOURS)], DASHES[i % len(DASHES)], WIDTHS[i % len(WIDTHS)]


def loss_svg(series: list[tuple[str, list[tuple[int, float]]]], width: int = 640, height: int = 300,
             title: str = "loss", font_px: float = 13) -> str:
    """An SVG line chart of (step, loss) per labelled run. Raw values thin, smoothed bold once a run has
    more than 20 points; one legend line per run. Empty input gives a placeholder.

    The SVG scales to its container's width, text too: `width` should be about the width it is shown at,
    so that `font_px` is what the eye gets (the page's minimum is 11 px)."""
    series = [(label, [(int(s), float(v)) for s, v in pts if math.isfinite(float(v))]) for label, pts in series]
    series = [(label, pts) for label, pts in series if pts]
    if not series:
        return (f"<div class='fl-loss' data-lines='0' style='color:#888;padding:12px'>{html.escape(title)}: "
                f"no steps logged yet</div>")
    line_h = font_px + 6
    left, right, top, bottom = 4 * font_px + 8, 12, 8 + line_h * len(series), 2 * font_px + 10
    w, h = width - left - right, height - top - bottom
    xs = [s for _, pts in series for s, _ in pts]
    ys = [v for _, pts in series for _, v in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 0.05
    y0, y1 = y0 - pad, y1 + pad

    def px(s):
        return left + (s - x0) / (x1 - x0) * w

    def py(v):
        return top + (1 - (v - y0) / (y1 - y0)) * h

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' width='100%' "
             f"style='max-width:{width * 1.6:.0f}px;font:{font_px:g}px sans-serif' role='img' "
             f"aria-label='{html.escape(title)}'>",
             f"<rect x='{left}' y='{top}' width='{w}' height='{h}' fill='none' stroke='#ccc'/>"]
    for t in _nice_ticks(y0, y1):
        if y0 <= t <= y1:
            y = py(t)
            parts.append(f"<line x1='{left}' x2='{left + w}' y1='{y:.1f}' y2='{y:.1f}' stroke='#eee'/>"
                         f"<text x='{left - 4}' y='{y + 4:.1f}' text-anchor='end' fill='#666'>{_fmt(t)}</text>")
    for t in _nice_ticks(x0, x1, 6):
        if x0 <= t <= x1 and float(t).is_integer():
            x = px(t)
            parts.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{top}' y2='{top + h}' stroke='#f3f3f3'/>"
                         f"<text x='{x:.1f}' y='{top + h + font_px + 3:.0f}' text-anchor='middle' fill='#666'>"
                         f"{int(t)}</text>")
    parts.append(f"<text x='{left + w / 2:.0f}' y='{height - 4}' text-anchor='middle' fill='#444'>step</text>"
                 f"<text x='{font_px:g}' y='{top + h / 2:.0f}' text-anchor='middle' fill='#444' "
                 f"transform='rotate(-90 {font_px:g} {top + h / 2:.0f})'>{html.escape(title)}</text>")
    for i, (label, pts) in enumerate(series):
        colour, dash, stroke = _style(i)
        dashed = f" stroke-dasharray='{dash}'" if dash else ""
        pts = sorted(pts)
        raw = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in pts)
        if len(pts) > 20:
            parts.append(f"<polyline class='raw' points='{raw}' fill='none' stroke='{colour}' stroke-opacity='0.3' "
                         f"stroke-width='1'/>")
            sm = smooth([v for _, v in pts], 0.8)
            line = " ".join(f"{px(s):.1f},{py(v):.1f}" for (s, _), v in zip(pts, sm))
        else:
            line = raw
        parts.append(f"<polyline class='run' data-run='{html.escape(label)}' points='{line}' fill='none' "
                     f"stroke='{colour}' stroke-width='{stroke:g}'{dashed}><title>{html.escape(label)}</title>"
                     f"</polyline>")
        if len(pts) == 1:
            s, v = pts[0]
            parts.append(f"<circle cx='{px(s):.1f}' cy='{py(v):.1f}' r='3' fill='{colour}'/>")
        lx, ly = left, 4 + line_h * (i + 1) - 4
        last = pts[-1][1]
        parts.append(f"<line class='key' x1='{lx:.0f}' x2='{lx + 28:.0f}' y1='{ly - font_px / 3:.1f}' "
                     f"y2='{ly - font_px / 3:.1f}' stroke='{colour}' stroke-width='3'{dashed}/>"
                     f"<text x='{lx + 34:.0f}' y='{ly:.0f}' fill='#333'>{html.escape(label)} · last {_fmt(last)}</text>")
    parts.append("</svg>")
    return f"<div class='fl-loss' data-lines='{len(series)}'>{''.join(parts)}</div>"


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten inside [lo, hi] (with 2 and 5 between them when the range is under two decades)."""
    marks = (1, 2, 5) if math.log10(hi / lo) < 2 else (1,)
    return [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in marks
            if lo * (1 - 1e-9) <= m * 10.0 ** e <= hi * (1 + 1e-9)]


def sharpness_svg(series: list[tuple[str, list[tuple[float, float, float | None]]]], width: int = 640,
                  height: int = 300) -> str:
    """Sharpness curves: mean loss increase against the noise radius rho (log axis), ± one standard error as a
    bar. The increase axis is logarithmic when every point is > 0 (the curve spans decades; a flatter run is
    lower by a factor, a constant gap on a log axis), else linear with its zero line: weights away from a
    minimum can get better under noise, and a negative increase must be shown, not dropped."""
    kept = [(label, [(float(r), float(m), s) for r, m, s in pts if r > 0 and math.isfinite(m)])
            for label, pts in series]
    kept = [(label, pts) for label, pts in kept if pts]
    if not kept:
        return ("<div class='fl-sharp' data-lines='0' style='color:#888;padding:12px'>sharpness: no evaluated "
                "run selected (press <b>Evaluate</b>)</div>")
    left, right, top, bottom = 64, 12, 16 + 18 * ((len(kept) + 1) // 2), 34
    w, h = width - left - right, height - top - bottom
    rs = [r for _, pts in kept for r, _, _ in pts]
    log_y = all(m > 0 for _, pts in kept for _, m, _ in pts)
    x0, x1 = min(rs) / 1.2, max(rs) * 1.2
    if log_y:
        ms = [m for _, pts in kept for _, m, _ in pts] + [m + s for _, pts in kept for _, m, s in pts if s]
        y0, y1 = min(ms) / 1.5, max(ms) * 1.5
    else:
        ms = [0.0] + [m + k * (s or 0) for _, pts in kept for _, m, s in pts for k in (-1, 1)]
        pad = (max(ms) - min(ms)) * 0.05 or 1e-12
        y0, y1 = min(ms) - pad, max(ms) + pad

    def px(r):
        return left + math.log(r / x0) / math.log(x1 / x0) * w

    def py(v):
        if log_y:
            return top + (1 - math.log(max(v, y0) / y0) / math.log(y1 / y0)) * h
        return top + (1 - (v - y0) / (y1 - y0)) * h

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' width='100%' "
             f"style='max-width:{width * 1.6:.0f}px;font:11px sans-serif' role='img' aria-label='sharpness'>",
             f"<rect x='{left}' y='{top}' width='{w}' height='{h}' fill='none' stroke='#ccc'/>"]
    for t in (_log_ticks(y0, y1) if log_y else [t for t in _nice_ticks(y0, y1) if y0 <= t <= y1]):
        stroke = "#999" if t == 0 else "#eee"
        parts.append(f"<line x1='{left}' x2='{left + w}' y1='{py(t):.1f}' y2='{py(t):.1f}' stroke='{stroke}'/>"
                     f"<text x='{left - 4}' y='{py(t) + 4:.1f}' text-anchor='end' fill='#666'>{_fmt(t)}</text>")
    for t in sorted(set(rs)):
        parts.append(f"<text x='{px(t):.1f}' y='{top + h + 14}' text-anchor='middle' fill='#666'>{_fmt(t)}</text>")
    scale = "log" if log_y else "linear"
    parts.append(f"<text x='{left + w / 2:.0f}' y='{height - 4}' text-anchor='middle' fill='#444'>noise radius ρ"
                 f"</text><text x='12' y='{top + h / 2:.0f}' text-anchor='middle' fill='#444' "
                 f"transform='rotate(-90 12 {top + h / 2:.0f})'>loss increase ({scale})</text>")
    for i, (label, pts) in enumerate(kept):
        colour = COLOURS[i % len(COLOURS)]
        line = " ".join(f"{px(r):.1f},{py(m):.1f}" for r, m, _ in pts)
        parts.append(f"<polyline class='run' data-run='{html.escape(label)}' points='{line}' fill='none' "
                     f"stroke='{colour}' stroke-width='2'><title>{html.escape(label)}</title></polyline>")
        for r, m, s in pts:
            parts.append(f"<circle cx='{px(r):.1f}' cy='{py(m):.1f}' r='3' fill='{colour}'/>")
            if s:
                parts.append(f"<line x1='{px(r):.1f}' x2='{px(r):.1f}' y1='{py(m - s):.1f}' y2='{py(m + s):.1f}' "
                             f"stroke='{colour}' stroke-width='1'/>")
        lx, ly = left + (i % 2) * (w / 2), 12 + 18 * (i // 2)
        parts.append(f"<line x1='{lx:.0f}' x2='{lx + 18:.0f}' y1='{ly - 4}' y2='{ly - 4}' stroke='{colour}' "
                     f"stroke-width='3'/><text x='{lx + 24:.0f}' y='{ly}' fill='#333'>{html.escape(label)}</text>")
    parts.append("</svg>")
    return f"<div class='fl-sharp' data-lines='{len(kept)}' data-scale='{scale}'>{''.join(parts)}</div>"
