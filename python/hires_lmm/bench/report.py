"""python -m hires_lmm.bench.report RESULT.json [--pytest PYTEST.txt] > RESULT.md"""
import argparse
import json


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--pytest", default=None)
    a = p.parse_args(argv)
    r = json.load(open(a.json))
    dirty = "+dirty" if r.get("dirty") else ""
    print(f"# hires_lmm benchmark: {r['gpu']}, commit {r['commit']}{dirty}, {r['date']}\n")
    print(f"torch {r['torch']}, CUDA {r['cuda']}, build {', '.join(r['hires_lmm'].get('cuda_archs') or []) or 'CPU-only'}; "
          + (f"measured device copy bandwidth {r['copy_bandwidth_gbps']:.0f} GB/s" if r.get("copy_bandwidth_gbps") else ""))
    if a.pytest:
        lines = [ln for ln in open(a.pytest).read().splitlines() if ln.strip()]
        print(f"\nGPU tests (`pytest -m gpu`): `{lines[-1] if lines else 'no output'}`")
    print("\nTimes in us: median [p20-p80] over n timed calls (n = ours/reference) after warm-up; "
          "speedup = reference median / our median [reference p20 / our p80 - reference p80 / our p20].")
    print("\n| op | case | dtype | ours us | reference | ref us | n | speedup | GB/s | % copy bw | TFLOP/s | max err | ok |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for x in r["records"]:
        f = lambda k, fmt: (fmt.format(x[k]) if x.get(k) is not None else "")
        spread = lambda k, p20, p80, fmt: (f"{f(k, fmt)} [{f(p20, fmt)}-{f(p80, fmt)}]" if x.get(p20) is not None
                                           else f(k, fmt))
        n = "/".join(str(x[k]) for k in ("ours_runs", "reference_runs") if x.get(k) is not None)
        print(f"| {x['op']} | {x['case']} | {x['dtype']} | {spread('ours_us', 'ours_p20_us', 'ours_p80_us', '{:.1f}')} | "
              f"{x.get('reference') or ''} | {spread('reference_us', 'reference_p20_us', 'reference_p80_us', '{:.1f}')} | "
              f"{n} | {spread('speedup', 'speedup_p20', 'speedup_p80', '{:.2f}x')} | {f('gbps','{:.0f}')} | "
              f"{f('pct_of_copy_bw','{:.0f}%')} | {f('tflops','{:.1f}')} | {f('max_err','{:.2e}')} | "
              f"{'' if x.get('ok') is None else ('ok' if x['ok'] else 'FAIL')} |")


if __name__ == "__main__":
    main()
