"""Speedup chart of a benchmark run, drawn with matplotlib (optional: pip install 'hires_lmm[plot]').

One row per (op, case, dtype), grouped by op; one bar per reference, one colour per reference; the
speedup axis is logarithmic and centred on 1x (bars start at 1x: right = we are faster); error bars
span speedup_p20..speedup_p80 (the reference's p20 over our p80 to its p80 over our p20).

    python -m hires_lmm.bench.plot RESULT.json OUT.png
"""
import argparse
import json
import math
from typing import Any, Dict, List, Sequence


def _matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("hires_lmm.bench.plot: drawing the chart needs matplotlib: pip install matplotlib "
                           "(or pip install 'hires_lmm[plot]')") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_speedups(records: Sequence[Dict[str, Any]], path: str, title: str = "speedups") -> None:
    """Draw the records that have a speedup into a PNG (or any format matplotlib infers from path)."""
    plt = _matplotlib()
    rows: List[tuple] = []            # (op, case, dtype) in first-seen order, grouped by op
    refs: List[str] = []
    by_op: Dict[str, List[tuple]] = {}
    for r in records:
        if not r.get("speedup"):
            continue
        key = (r["op"], r["case"], r["dtype"])
        if key not in by_op.setdefault(r["op"], []):
            by_op[r["op"]].append(key)
        if r["reference"] not in refs:
            refs.append(r["reference"])
    for keys in by_op.values():
        rows.extend(keys)
    cmap = plt.get_cmap("tab10")
    colour = {ref: cmap(i % 10) for i, ref in enumerate(refs)}
    index = {k: i for i, k in enumerate(rows)}
    refs_of: Dict[tuple, List[str]] = {}
    for r in records:
        if r.get("speedup"):
            refs_of.setdefault((r["op"], r["case"], r["dtype"]), []).append(r["reference"])
    n_bars = sum(len(v) for v in refs_of.values())
    height = max(2.5, 1.2 + 0.3 * n_bars + 0.15 * len(rows))
    fig, ax = plt.subplots(figsize=(10, height))
    extent = 1.0
    labelled = set()
    for r in records:
        if not r.get("speedup"):
            continue
        key = (r["op"], r["case"], r["dtype"])
        present = refs_of[key]
        bar_h = 0.8 / len(present)
        y = index[key] + (present.index(r["reference"]) - (len(present) - 1) / 2) * bar_h
        s = float(r["speedup"])
        s20 = min(float(r.get("speedup_p20") or s), s)
        s80 = max(float(r.get("speedup_p80") or s), s)
        ref = r["reference"]
        ax.barh([y], [abs(s - 1.0) or 1e-3], left=[min(1.0, s)], height=bar_h * 0.85, color=colour[ref],
                label=None if ref in labelled else ref, xerr=[[s - s20], [s80 - s]],
                error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "black"})
        labelled.add(ref)
        ax.annotate(f"{s:.2f}x", (s80 if s >= 1 else s20, y), xytext=(4 if s >= 1 else -4, 0),
                    textcoords="offset points", ha="left" if s >= 1 else "right", va="center", fontsize=7)
        extent = max(extent, abs(math.log10(s80)), abs(math.log10(s20)))
    ax.set_xscale("log")
    lim = 10 ** (max(extent, math.log10(2.0)) * 1.3)
    ax.set_xlim(1 / lim, lim)
    from matplotlib.ticker import FuncFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{op}  {case}  {dt}" for op, case, dt in rows], fontsize=8)
    ax.invert_yaxis()
    # separate the op groups
    seen = 0
    for keys in list(by_op.values())[:-1]:
        seen += len(keys)
        ax.axhline(seen - 0.5, color="grey", linewidth=0.5, linestyle="--")
    ax.set_xlabel("speedup = reference time / hires_lmm time (log scale; > 1x: hires_lmm faster)")
    ax.set_title(title)
    ax.grid(axis="x", which="major", linewidth=0.4, alpha=0.6)
    if refs:
        ax.legend(title="reference", fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hires_lmm.bench.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="a benchmark JSON (python -m hires_lmm.bench --json ...)")
    p.add_argument("out", help="the chart to write, e.g. speedups.png")
    a = p.parse_args(argv)
    with open(a.json) as f:
        r = json.load(f)
    plot_speedups(r["records"], a.out, title=f"hires_lmm speedups on {r.get('gpu', '?')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
