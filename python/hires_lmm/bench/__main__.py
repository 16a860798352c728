"""python -m hires_lmm.bench [--device cuda|cpu] [--quick] [--only deepstack,attention] [--json PATH] [--plot PATH]
(also: hires-lmm bench ...)

Times every op and model stage against its PyTorch references side by side, in one process, and
prints one line per (case, reference): ours and the reference as median [p20-p80] over n timed calls,
speedup (median / median), GB/s or TFLOP/s, max error."""
import argparse
import datetime
import importlib
import json
import os
import platform
import sys
from typing import Dict, List, Optional

import torch

import hires_lmm
from .common import Timing, time_stats, time_us

# Benchmark families, in run order: name -> module exposing `cases(device, quick) -> list[Case]`.
# Adding a family is one line here. A family whose module is absent from this install is skipped
# (and is an error when asked for by --only).
FAMILIES: Dict[str, str] = {
    "deepstack": "hires_lmm.bench.bench_deepstack",
    "convnext": "hires_lmm.bench.bench_convnext",
    "convnext_tower": "hires_lmm.bench.bench_convnext_tower",
    "attention": "hires_lmm.bench.bench_attention",
    "select": "hires_lmm.bench.bench_select",
    "models": "hires_lmm.bench.bench_models",
    "e2e": "hires_lmm.bench.bench_e2e",
}


def _load_family(name: str):
    """The family's module, or None when it is not part of this install."""
    try:
        return importlib.import_module(FAMILIES[name])
    except ModuleNotFoundError as e:
        if e.name == FAMILIES[name]:
            return None
        raise


def copy_bandwidth_gbps(device):
    """Measured device-to-device copy bandwidth (bytes read + written per second): the roofline
    that memory-bound kernels are quoted against."""
    if device != "cuda":
        return None
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = time_us(lambda: b.copy_(a), device, warmup=3, iters=10)
    del a, b
    return 2 * n / (us * 1e-6) / 1e9


def _spread(t: Timing) -> str:
    return f"{t.p50:.1f} [{t.p20:.1f}-{t.p80:.1f}]"


def run(args):
    device = args.device
    quick = args.quick if args.quick is not None else device == "cpu"
    records = []
    peak = copy_bandwidth_gbps(device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.machine()}, {os.cpu_count()} threads)"
    info = hires_lmm.build_info()
    print(f"# hires_lmm {hires_lmm.__version__} (commit {info['commit'][:12]}{'+dirty' if info.get('dirty') else ''}) "
          f"| torch {torch.__version__} | {gpu} | quick={quick}"
          + (f" | measured copy bandwidth {peak:.0f} GB/s" if peak else ""))
    print("# times in us: median [p20-p80] over n timed calls after warm-up; speedup = reference median / ours median")
    header = (f"{'op':<28} {'case':<30} {'dtype':<9} {'ours us':>26} {'reference':<16} {'ref us':>26} {'n':>5} "
              f"{'speedup':>8} {'GB/s|TF/s':>10} {'max err':>9} ok")
    print(header)
    print("-" * len(header))
    for fam in args.families:
        mod = _load_family(fam)
        if mod is None:
            print(f"# {fam}: not part of this install ({FAMILIES[fam]} missing), skipped")
            continue
        for case in mod.cases(device, quick):
            ours = time_stats(case.ours, device, iters=args.iters)
            err = float(case.max_err()) if case.max_err is not None else None
            ok = (err is not None and case.tol is not None and err <= case.tol) if err is not None else None
            rate = {}
            if case.bytes:
                rate["gbps"] = case.bytes / (ours.p50 * 1e-6) / 1e9
                if peak:
                    rate["pct_of_copy_bw"] = 100.0 * rate["gbps"] / peak
            if case.flops:
                rate["tflops"] = case.flops / (ours.p50 * 1e-6) / 1e12
            rate_s = (f"{rate['gbps']:.0f}" if "gbps" in rate else
                      f"{rate['tflops']:.1f}" if "tflops" in rate else "-")
            dt = str(case.dtype).replace("torch.", "")
            base = {"op": case.op, "case": case.case, "dtype": dt, "device": device,
                    "ours_us": round(ours.p50, 3), "ours_p20_us": round(ours.p20, 3),
                    "ours_p80_us": round(ours.p80, 3), "ours_runs": ours.runs}
            for ref_name, ref_fn in case.references.items():
                try:
                    ref = time_stats(ref_fn, device, iters=args.iters)
                except Exception as e:  # a reference backend missing on this machine
                    print(f"{case.op:<28} {case.case:<30} {dt:<9} {'':>26} {ref_name:<16} unavailable: {type(e).__name__}: {str(e)[:60]}")
                    continue
                rec = dict(base)
                rec.update({"reference": ref_name, "reference_us": round(ref.p50, 3),
                            "reference_p20_us": round(ref.p20, 3), "reference_p80_us": round(ref.p80, 3),
                            "reference_runs": ref.runs, "speedup": round(ref.p50 / ours.p50, 3),
                            # the spread of the ratio: slowest-reference-over-fastest-ours corners
                            "speedup_p20": round(ref.p20 / ours.p80, 3),
                            "speedup_p80": round(ref.p80 / ours.p20, 3),
                            "max_err": err, "ok": ok})
                rec.update({k: round(v, 2) for k, v in rate.items()})
                records.append(rec)
                print(f"{case.op:<28} {case.case:<30} {dt:<9} {_spread(ours):>26} {ref_name:<16} {_spread(ref):>26} "
                      f"{min(ours.runs, ref.runs):>5} {ref.p50 / ours.p50:>7.2f}x {rate_s:>10} "
                      f"{err if err is not None else float('nan'):>9.2e} {'ok' if ok else ('-' if ok is None else 'FAIL')}")
            if not case.references:
                records.append({**base, "reference": None, "reference_us": None, "reference_p20_us": None,
                                "reference_p80_us": None, "reference_runs": None, "speedup": None,
                                "speedup_p20": None, "speedup_p80": None, "max_err": err, "ok": ok,
                                **{k: round(v, 2) for k, v in rate.items()}})
                print(f"{case.op:<28} {case.case:<30} {dt:<9} {_spread(ours):>26} {'-':<16} {'':>26} {ours.runs:>5} "
                      f"{'':>8} {rate_s:>10} {err if err is not None else float('nan'):>9.2e} "
                      f"{'ok' if ok else ('-' if ok is None else 'FAIL')}")
            del case
            if device == "cuda":
                torch.cuda.empty_cache()
    result = {"gpu": gpu, "commit": info["commit"], "dirty": info.get("dirty"),
              "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "hires_lmm": info, "copy_bandwidth_gbps": peak, "quick": quick,
              "timing": {"statistic": "median, p20, p80 of per-call times (us)", "iters": args.iters,
                         "warmup": 5, "cuda": "CUDA events, L2 flushed before each call, exactly iters calls",
                         "cpu": "perf_counter; at least max(3, iters // 5) calls, then until 50 ms, at most iters"},
              "records": records}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"# wrote {args.json}")
    if args.plot:
        from .plot import plot_speedups
        plot_speedups(records, args.plot, title=f"hires_lmm speedups on {gpu}")
        print(f"# wrote {args.plot}")
    bad = [r for r in records if r["ok"] is False]
    if bad:
        print(f"# {len(bad)} records exceed their error tolerance", file=sys.stderr)
        return 1
    return 0


def parse_only(value: Optional[str]) -> List[str]:
    """--only "a,b" -> ["a", "b"] in run order; ValueError naming the unknown and the valid names."""
    if not value:
        return list(FAMILIES)
    asked = [x.strip() for x in value.split(",") if x.strip()]
    unknown = [x for x in asked if x not in FAMILIES]
    if unknown or not asked:
        raise ValueError(f"unknown benchmark famil{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(map(repr, unknown)) or repr(value)}; valid names: {', '.join(FAMILIES)}")
    missing = [x for x in asked if _load_family(x) is None]
    if missing:
        raise ValueError(f"benchmark famil{'y' if len(missing) == 1 else 'ies'} {', '.join(map(repr, missing))} "
                         f"not part of this install ({', '.join(FAMILIES[x] for x in missing)} missing)")
    return [x for x in FAMILIES if x in asked]


def main(argv=None, prog: str = "python -m hires_lmm.bench") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cuda", "cpu"])
    q = p.add_mutually_exclusive_group()
    q.add_argument("--quick", dest="quick", action="store_true", default=None,
                   help="small shapes (default on CPU)")
    q.add_argument("--full", dest="quick", action="store_false", help="model shapes (default on CUDA)")
    p.add_argument("--only", default=None, help=f"comma-separated families of: {', '.join(FAMILIES)}")
    p.add_argument("--iters", type=int, default=30,
                   help="timed calls per measurement (CUDA: exactly; CPU: at most, see the README)")
    p.add_argument("--json", default=None, help="write the records as JSON")
    p.add_argument("--plot", default=None, help="draw speedups as a PNG chart (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        args.families = parse_only(args.only)
    except ValueError as e:
        p.error(f"--only: {e}")
    if args.iters < 1:
        p.error(f"--iters: must be >= 1, got {args.iters}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install matplotlib (or pip install 'hires_lmm[plot]')")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
