"""python -m hires_lmm.bench [--device cuda|cpu] [--quick] [--only deepstack,attention] [--json PATH] [--plot PATH]

Times every op and model stage against its PyTorch references side by side, in one process, and
prints one line per (case, reference): ours, reference, speedup, GB/s or TFLOP/s, max error."""
import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys

import torch

import hires_lmm
from .common import time_us

FAMILIES = ["deepstack", "convnext", "convnext_tower", "attention", "select", "models", "e2e"]


def _commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "rev-parse", "--short=12", "HEAD"], cwd=here,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return os.environ.get("HIRES_LMM_COMMIT", "unknown")


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


def run(args):
    device = args.device
    quick = args.quick if args.quick is not None else device == "cpu"
    only = set(args.only.split(",")) if args.only else None
    records = []
    peak = copy_bandwidth_gbps(device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.machine()}, {os.cpu_count()} threads)"
    print(f"# hires_lmm {hires_lmm.__version__} | torch {torch.__version__} | {gpu} | quick={quick}"
          + (f" | measured copy bandwidth {peak:.0f} GB/s" if peak else ""))
    header = f"{'op':<28} {'case':<30} {'dtype':<9} {'ours us':>10} {'reference':<16} {'ref us':>10} {'speedup':>8} {'GB/s|TF/s':>10} {'max err':>9} ok"
    print(header)
    print("-" * len(header))
    for fam in FAMILIES:
        if only and fam not in only:
            continue
        try:
            mod = importlib.import_module(f"hires_lmm.bench.bench_{fam}")
        except ModuleNotFoundError as e:
            if e.name == f"hires_lmm.bench.bench_{fam}":
                continue
            raise
        for case in mod.cases(device, quick):
            ours_us = time_us(case.ours, device, iters=args.iters)
            err = float(case.max_err()) if case.max_err is not None else None
            ok = (err is not None and case.tol is not None and err <= case.tol) if err is not None else None
            rate = {}
            if case.bytes:
                rate["gbps"] = case.bytes / (ours_us * 1e-6) / 1e9
                if peak:
                    rate["pct_of_copy_bw"] = 100.0 * rate["gbps"] / peak
            if case.flops:
                rate["tflops"] = case.flops / (ours_us * 1e-6) / 1e12
            rate_s = (f"{rate['gbps']:.0f}" if "gbps" in rate else
                      f"{rate['tflops']:.1f}" if "tflops" in rate else "-")
            dt = str(case.dtype).replace("torch.", "")
            for ref_name, ref_fn in case.references.items():
                try:
                    ref_us = time_us(ref_fn, device, iters=args.iters)
                except Exception as e:  # a reference backend missing on this machine
                    print(f"{case.op:<28} {case.case:<30} {dt:<9} {'':>10} {ref_name:<16} unavailable: {type(e).__name__}: {str(e)[:60]}")
                    continue
                rec = {"op": case.op, "case": case.case, "dtype": dt, "device": device,
                       "ours_us": round(ours_us, 3), "reference": ref_name,
                       "reference_us": round(ref_us, 3), "speedup": round(ref_us / ours_us, 3),
                       "max_err": err, "ok": ok}
                rec.update({k: round(v, 2) for k, v in rate.items()})
                records.append(rec)
                print(f"{case.op:<28} {case.case:<30} {dt:<9} {ours_us:>10.1f} {ref_name:<16} {ref_us:>10.1f} "
                      f"{ref_us / ours_us:>7.2f}x {rate_s:>10} {err if err is not None else float('nan'):>9.2e} "
                      f"{'ok' if ok else ('-' if ok is None else 'FAIL')}")
            if not case.references:
                records.append({"op": case.op, "case": case.case, "dtype": dt, "device": device,
                                "ours_us": round(ours_us, 3), "reference": None, "reference_us": None,
                                "speedup": None, "max_err": err, "ok": ok,
                                **{k: round(v, 2) for k, v in rate.items()}})
            del case
            if device == "cuda":
                torch.cuda.empty_cache()
    result = {"gpu": gpu, "commit": _commit(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "hires_lmm": hires_lmm.build_info(), "copy_bandwidth_gbps": peak, "quick": quick,
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


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m hires_lmm.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cuda", "cpu"])
    q = p.add_mutually_exclusive_group()
    q.add_argument("--quick", dest="quick", action="store_true", default=None,
                   help="small shapes (default on CPU)")
    q.add_argument("--full", dest="quick", action="store_false", help="model shapes (default on CUDA)")
    p.add_argument("--only", default=None, help=f"comma-separated families of {FAMILIES}")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", default=None, help="write the records as JSON")
    p.add_argument("--plot", default=None, help="draw speedups as a PNG chart")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
