"""The ``hires-lmm`` command (also ``python -m hires_lmm``).

    hires-lmm info [--json]            build metadata, devices and whether the build covers them, kernels
    hires-lmm bench [bench options]    the benchmark (python -m hires_lmm.bench); `hires-lmm bench -h`
    hires-lmm convert SRC DST          PyTorch .bin checkpoints -> safetensors (python -m hires_lmm.convert)
    hires-lmm generate ...             text from a whole model (hires_lmm.lmm.cli_generate)
"""
import argparse
import importlib
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

import hires_lmm

COMMANDS = {
    "info": "print build metadata (version, torch/CUDA built against, arches, commit), devices and kernels",
    "bench": "benchmark every op against its PyTorch references (options: hires-lmm bench -h)",
    "convert": "convert PyTorch .bin checkpoints to safetensors (options: hires-lmm convert -h)",
    "generate": "generate text from a whole model (options: hires-lmm generate -h)",
}
GENERATE_MODULE = "hires_lmm.lmm.cli_generate"


def arch_coverage_error(capability: Sequence[int], cuda_archs: Sequence[str]) -> Optional[str]:
    """None when a device of ``capability`` (major, minor) can run this build's kernels given its
    compiled ``cuda_archs`` (``sm_XY`` SASS, ``compute_XY`` PTX), else the error text the first CUDA
    call on such a device raises (the same C++ function decides both)."""
    msg = hires_lmm._C._arch_coverage_error(int(capability[0]), int(capability[1]), ",".join(cuda_archs))
    return msg or None


def devices(info: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The CUDA devices torch sees, each with its capability and whether this build covers it."""
    out = []
    if not torch.cuda.is_available():
        return out
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        err = arch_coverage_error(cap, (info.get("cuda_archs") or []) + (info.get("ptx_archs") or [])) \
            if info.get("cuda") else \
            "CPU-only build: no CUDA kernels (the ops run on CPU tensors only)"
        out.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{cap[0]}.{cap[1]}",
                    "covered": err is None, "problem": err})
    return out


def info_main(argv: Optional[Sequence[str]] = None) -> int:
    """``hires-lmm info``: what this build is and what it can run here."""
    p = argparse.ArgumentParser(prog="hires-lmm info", description=COMMANDS["info"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    info = hires_lmm.build_info()
    devs = devices(info)
    if args.json:
        print(json.dumps({"build": info, "running_torch": torch.__version__, "running_cuda": torch.version.cuda,
                          "devices": devs}, indent=1))
        return 0
    dirty = {True: " (with uncommitted changes)", False: "", None: " (dirty: unknown)"}[info.get("dirty")]
    print(f"hires_lmm {info['version']}")
    print(f"  built from commit  {info.get('commit', 'unknown')}{dirty}, at {info.get('built_at') or 'unknown time'}")
    print(f"  built against      torch {info['torch']}"
          + (f" (CUDA {info['torch_cuda']})" if info.get("torch_cuda") else " (no CUDA)"))
    print(f"  running with       torch {torch.__version__}"
          + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (no CUDA)"))
    if info.get("cuda"):
        print(f"  CUDA kernels       nvcc {info['cuda']}, TORCH_CUDA_ARCH_LIST={info.get('arch_list') or '?'}")
        print(f"  compiled arches    {', '.join(info.get('cuda_archs') or [])} (machine code)"
              + (f"; PTX {', '.join(info['ptx_archs'])} (JIT-compiled by the driver for newer GPUs)"
                 if info.get("ptx_archs") else "; no PTX"))
        print(f"  Hopper kernels     {'yes (sm_90a)' if info.get('sm90a_kernels') else 'no'}")
    else:
        print("  CUDA kernels       none (CPU-only build)")
    print("devices:")
    print(f"  cpu                {torch.get_num_threads()} threads")
    if not devs:
        print("  cuda               none visible")
    for d in devs:
        state = "covered by this build" if d["covered"] else f"NOT covered: {d['problem']}"
        print(f"  cuda:{d['index']:<14} {d['name']}, capability {d['capability']}: {state}")
    print("kernels (op: devices):")
    width = max((len(k) for k in info["kernels"]), default=0)
    for op, devs_ in sorted(info["kernels"].items()):
        print(f"  {op:<{width}}  {', '.join(devs_)}")
    return 0


def generate_main(argv: Sequence[str]) -> int:
    """``hires-lmm generate``: forwards to hires_lmm.lmm.cli_generate (add_arguments, run)."""
    try:
        mod = importlib.import_module(GENERATE_MODULE)
    except ModuleNotFoundError as e:
        if e.name in (GENERATE_MODULE, "hires_lmm.lmm"):
            print(f"hires-lmm generate: not available in this install ({GENERATE_MODULE} is missing)",
                  file=sys.stderr)
            return 2
        raise
    p = argparse.ArgumentParser(prog="hires-lmm generate", description=COMMANDS["generate"])
    mod.add_arguments(p)
    return int(mod.run(p.parse_args(list(argv))) or 0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hires-lmm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"hires_lmm {hires_lmm.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``hires-lmm`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        p = _parser()
        if not argv:
            p.print_help()
            return 2
        p.parse_args(argv)  # -h / --version / an unknown command: argparse prints and exits
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        return info_main(rest)
    if cmd == "bench":
        from .bench.__main__ import main as bench_main
        return bench_main(rest, prog="hires-lmm bench")
    if cmd == "convert":
        from .convert import main as convert_main
        return int(convert_main(rest) or 0)
    return generate_main(rest)


if __name__ == "__main__":
    sys.exit(main())
