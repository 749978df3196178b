#!/usr/bin/env python3
"""Draw the benchmarks' JSON lines as SVG, with nothing but the standard library.

    tests/bench/plot.py bars   IN.json OUT.svg BENCH METRIC[,METRIC...] [TITLE]
    tests/bench/plot.py series IN.json OUT.svg BENCH METRIC[,METRIC...] [TITLE]

IN.json holds the lines a bench script printed ({"bench","impl","metric",
"value","unit"}, one object per line; other lines are skipped). `bars`: one
panel per metric, one bar per implementation (the median when a run repeated
it, the runs as dots). `series`: one panel per metric, one line per
implementation over the lines' "t" field (seconds). Starling is drawn in
blue, BIRD in grey, anything else in further colours.
"""
import json
import math
import statistics
import sys
from html import escape

COLOURS = {"starling": "#1f77b4", "bird": "#7f7f7f"}
OTHERS = ["#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
PANEL_W, PANEL_H, PAD, TOP = 300, 220, 60, 50


def load(path, bench):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                o = json.loads(line)
            except json.JSONDecodeError:
                continue
            if o.get("bench") == bench and o.get("impl") != "loadgen":
                rows.append(o)
    if not rows:
        sys.exit(f"plot.py: no lines of bench {bench!r} in {path}")
    return rows


def colour(impl, seen):
    if impl not in COLOURS:
        COLOURS[impl] = OTHERS[len(seen) % len(OTHERS)]
        seen.add(impl)
    return COLOURS[impl]


def nice_max(v):
    """A round axis maximum at or above v, and how many gridlines divide it evenly."""
    if v <= 0:
        return 1, 4
    mag = 10 ** math.floor(math.log10(v))
    for m, n in ((1, 4), (2, 4), (3, 3), (4, 4), (5, 5), (6, 3), (8, 4), (10, 4)):
        if m * mag >= v:
            return m * mag, n
    return 10 * mag, 4


def fmt(v):
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def axis(out, x0, y0, w, h, scale, unit):
    top, n = scale
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 - h}" stroke="#000"/>')
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0 + w}" y2="{y0}" stroke="#000"/>')
    for i in range(n + 1):
        v = top * i / n
        y = y0 - h * i / n
        out.append(f'<line x1="{x0 - 4}" y1="{y}" x2="{x0 + w}" y2="{y}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4}" text-anchor="end">{fmt(v)}</text>')
    out.append(
        f'<text x="{x0 - 52}" y="{y0 - h / 2}" transform="rotate(-90 {x0 - 52} {y0 - h / 2})" '
        f'text-anchor="middle">{escape(unit)}</text>'
    )


def bars(rows, metrics):
    out, seen = [], set()
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for p, metric in enumerate(metrics):
        vals = {i: [r["value"] for r in rows if r["impl"] == i and r["metric"] == metric] for i in impls}
        unit = next((r["unit"] for r in rows if r["metric"] == metric), "")
        scale = nice_max(max((max(v) for v in vals.values() if v), default=1))
        top = scale[0]
        x0, y0 = p * (PANEL_W + PAD) + PAD + 30, TOP + PANEL_H
        w, h = PANEL_W - 30, PANEL_H - 20
        out.append(f'<text x="{x0 + w / 2}" y="{TOP - 12}" text-anchor="middle" font-weight="bold">{escape(metric)}</text>')
        axis(out, x0, y0, w, h, scale, unit)
        bw = w / (len(impls) * 1.5 + 0.5)
        for k, impl in enumerate(impls):
            v = vals[impl]
            if not v:
                continue
            med = statistics.median(v)
            x = x0 + bw * (0.5 + 1.5 * k)
            bh = h * med / top
            out.append(f'<rect x="{x}" y="{y0 - bh}" width="{bw}" height="{bh}" fill="{colour(impl, seen)}"/>')
            out.append(f'<text x="{x + bw / 2}" y="{y0 - bh - 4}" text-anchor="middle">{fmt(med)}</text>')
            out.append(f'<text x="{x + bw / 2}" y="{y0 + 14}" text-anchor="middle">{escape(impl)}</text>')
            if len(v) > 1:
                for s in v:
                    out.append(f'<circle cx="{x + bw / 2}" cy="{y0 - h * s / top}" r="2" fill="#000"/>')
    return out, len(metrics)


def series(rows, metrics):
    out, seen = [], set()
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for p, metric in enumerate(metrics):
        pts = {i: sorted((r["t"], r["value"]) for r in rows if r["impl"] == i and r["metric"] == metric and "t" in r) for i in impls}
        unit = next((r["unit"] for r in rows if r["metric"] == metric), "")
        scale = nice_max(max((v for s in pts.values() for _, v in s), default=1))
        top = scale[0]
        tmax = max((t for s in pts.values() for t, _ in s), default=1) or 1
        x0, y0 = p * (PANEL_W + PAD) + PAD + 30, TOP + PANEL_H
        w, h = PANEL_W - 30, PANEL_H - 20
        out.append(f'<text x="{x0 + w / 2}" y="{TOP - 12}" text-anchor="middle" font-weight="bold">{escape(metric)}</text>')
        axis(out, x0, y0, w, h, scale, unit)
        out.append(f'<text x="{x0 + w}" y="{y0 + 14}" text-anchor="end">{tmax} s</text>')
        out.append(f'<text x="{x0}" y="{y0 + 14}" text-anchor="middle">0</text>')
        for k, impl in enumerate(impls):
            s = pts[impl]
            if not s:
                continue
            path = " ".join(f"{x0 + w * t / tmax:.1f},{y0 - h * v / top:.1f}" for t, v in s)
            c = colour(impl, seen)
            out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.5"/>')
            out.append(f'<text x="{x0 + 8}" y="{y0 - h + 14 * (k + 1)}" fill="{c}">{escape(impl)}</text>')
    return out, len(metrics)


def main(argv):
    if len(argv) not in (6, 7) or argv[1] not in ("bars", "series"):
        sys.exit(__doc__)
    kind, src, dst, bench, metrics = argv[1], argv[2], argv[3], argv[4], argv[5].split(",")
    title = argv[6] if len(argv) == 7 else bench
    rows = load(src, bench)
    body, panels = (bars if kind == "bars" else series)(rows, metrics)
    width = panels * (PANEL_W + PAD) + PAD
    height = TOP + PANEL_H + 50
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{PAD}" y="16" font-size="13">{escape(title)}</text>',
        *body,
        "</svg>",
    ]
    with open(dst, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main(sys.argv)
