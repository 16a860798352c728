"""Speedup bar chart drawn with pillow (no plotting library needed)."""
from PIL import Image, ImageDraw


def plot_speedups(records, path, title="speedups"):
    rows = [r for r in records if r.get("speedup")]
    bar_h, gap, left, right, top = 18, 6, 460, 60, 40
    width = 1100
    height = top + len(rows) * (bar_h + gap) + 40
    img = Image.new("RGB", (width, max(height, 120)), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title + "  (bar: reference time / our time; line: 1x)", fill="black")
    smax = max([r["speedup"] for r in rows] + [1.0])
    scale = (width - left - right) / smax
    x1 = left + scale * 1.0
    for n, r in enumerate(rows):
        y = top + n * (bar_h + gap)
        label = f"{r['op']} {r['case']} {r['dtype']} vs {r['reference']}"
        d.text((10, y + 3), label[:72], fill="black")
        color = (46, 125, 50) if r["speedup"] >= 1 else (198, 40, 40)
        d.rectangle([left, y, left + scale * r["speedup"], y + bar_h], fill=color)
        d.text((left + scale * r["speedup"] + 4, y + 3), f"{r['speedup']:.2f}x", fill="black")
    d.line([x1, top - 5, x1, height - 30], fill="black", width=1)
    img.save(path)
