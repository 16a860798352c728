"""Static performance report of the compiled CUDA kernels: the evidence of speed we can produce
without a GPU.

    python -m hires_lmm.bench.sass                    # table of every kernel instantiation x arch
    python -m hires_lmm.bench.sass --summary          # one row per kernel and arch (README table)
    python -m hires_lmm.bench.sass --json out.json    # the full report as JSON
    python -m hires_lmm.bench.sass --check            # exit 1 on local-memory traffic in a main loop

Read from the built extension (hires_lmm._C) with `cuobjdump -res-usage` and `cuobjdump -sass`:
- registers, stack and local bytes, static shared memory per kernel and arch;
- blocks per SM and occupancy (resident warps / 64) at the launch configuration the launcher
  uses (LAUNCH below: block size and dynamic shared memory, at the model shapes of
  /work/shared/specs/performance.md where they depend on the shape);
- the instruction mix of the main loop: the backward branch (`BRA` to a lower address) whose
  body holds the most tensor-core instructions (HMMA, HGMMA), else the most arithmetic and memory
  instructions; counts are static per iteration (a nested loop's body is counted once).
  Columns: tensor-core MMAs, LDSM, LDS, STS, global loads by width (LDG and cp.async LDGSTS),
  global stores by width, MUFU, barriers (BAR, and SYNCS mbarrier ops on sm_90), and LDL/STL.

LDL/STL are local-memory accesses: register spills, or a local array indexed at run time; both
cost global-memory bandwidth, so `--check` treats any of them inside a main loop as a failure.
Without a CUDA build (or without cuobjdump) the command says so and exits 0.

cuobjdump (and the nvdisasm that `cuobjdump -sass` runs) come with the CUDA toolkit (pip:
`cuda-toolkit[cuobjdump,nvdisasm]`, which setup.sh installs); cuobjdump is looked up next to
the nvcc the build used, in $CUDA_HOME/bin, in site-packages/nvidia/cu*/bin, then on PATH.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = ["KernelReport", "find_cuobjdump", "parse_res_usage", "parse_sass", "analyse_function",
           "occupancy", "launch_config", "report", "main"]

# ---- device limits used for occupancy (CUDA C Programming Guide, compute capability tables) ----
ARCH_LIMITS = {
    # regs per SM, max threads per SM, max blocks per SM, shared memory per SM usable by blocks
    # (bytes), per-block opt-in maximum, reserved shared memory per block
    "sm_80": dict(regs=65536, threads=2048, blocks=32, smem=167936, smem_block=166912, reserved=1024),
    "sm_90a": dict(regs=65536, threads=2048, blocks=32, smem=233472, smem_block=232448, reserved=1024),
    "sm_90": dict(regs=65536, threads=2048, blocks=32, smem=233472, smem_block=232448, reserved=1024),
}
_REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256


def occupancy(arch: str, regs: int, threads: int, smem_bytes: int) -> Tuple[int, float, str]:
    """-> (blocks per SM, resident warps / max warps, limiting resource)."""
    lim = ARCH_LIMITS.get(arch)
    if lim is None or threads <= 0:
        return 0, 0.0, "unknown"
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
    by = {
        "threads": lim["threads"] // (warps * 32),
        "registers": lim["regs"] // (regs_per_warp * warps),
        "blocks": lim["blocks"],
        "shared memory": (lim["smem"] // (smem_bytes + lim["reserved"])) if smem_bytes > 0 else lim["blocks"],
    }
    if smem_bytes > lim["smem_block"]:
        by["shared memory"] = 0
    limiter = min(by, key=lambda k: by[k])
    blocks = by[limiter]
    return blocks, blocks * warps / (lim["threads"] // 32), limiter


# ---- launch configurations (what csrc/cuda/*.cu launches; keep in sync with the launchers) ----
def _pow2_at_least(v: int) -> int:
    p = 1
    while p < v:
        p <<= 1
    return p


def _tmpl_ints(name: str) -> List[int]:
    return [int(x) for x in re.findall(r"(?<![\w])(-?\d+)(?=[,>])", name)]


def launch_config(name: str) -> Optional[Tuple[int, int, str]]:
    """Demangled kernel name -> (threads per block, dynamic shared memory bytes, shape note), or
    None when the launch is not described here."""
    if "flash_fwd_sm90_kernel" in name:                       # csrc/cuda/flash_attn_sm90.cu
        d = _tmpl_ints(name)[-1]
        panels = d // 64
        smem = 1024 + panels * 128 * 128 + 2 * 2 * panels * 128 * 128 + 8 * (1 + 4 * 2)  # + full/empty x K/V
        return 384, smem, f"D={d}"
    if "flash_bwd_kernel" in name:                            # csrc/cuda/flash_attn_bwd.cu
        d = _tmpl_ints(name)[-1]
        return 128, (4 * 64 * d + 64 * 64) * 2 + 4 * 64 * 4, f"D={d}"
    if "flash_bwd_dot_do_o_kernel" in name:
        return 128, 0, ""
    if "flash_bwd_convert_dq_kernel" in name:
        return 256, 0, ""
    if "flash_fwd_kernel" in name:                            # csrc/cuda/flash_attn.cu
        # flash_fwd_kernel<T, D, MT>: 4 warps x MT m16 tiles -> kBlockM = 64 MT rows (MT = 2: the
        # 128-row prefill tile, kBlockN = flash_fwd_large_block_n(D) = 64 at D <= 64, 32 above;
        # MT = 1: split-KV / decode, kBlockN = 64); shared memory Q + one K + one V buffer
        # (flash_fwd.cuh, flash_params.h flash_fwd_tile)
        d, mt = _tmpl_ints(name)[-2:]
        bm, bn = 64 * mt, 64 if mt == 1 or d <= 64 else 32
        return 128, (bm * d + 2 * bn * d) * 2, f"D={d}, {bm}x{bn}"
    if "flash_combine_kernel" in name:
        return 4 * 32, 0, ""
    if "dwconv_layernorm_kernel" in name:                     # csrc/cuda/dwconv_layernorm.cu
        # tiled kernel <T, VEC, RH, S>: RH x 8S output tile, 256 threads; the ConvLLaVA-1536 width
        # that DwconvLnTiling::pick gives each shape; P*C fp32 conv outputs + 2 staged input rows
        rh, s = _tmpl_ints(name)[-2:]
        c = {(2, 4): 192, (2, 2): 384, (2, 1): 768, (1, 1): 1536}.get((rh, s), 192)
        tw, cc = 8 * s, 256 // s
        return 256, (rh * tw * c + 2 * (tw + 6) * cc) * 4, f"C={c}, tile {rh}x{tw}"
    if "dwconv_layernorm_generic_kernel" in name:             # C past the tiled kernel's smem
        c = 6144                                              # taken on sm_80 above C = 4320
        p = min(64, 12288 // c)
        return 128, p * c * 4, f"C={c}, P={p}"
    if "fused_mlp_kernel" in name:                            # csrc/cuda/fused_mlp.cu
        c = _tmpl_ints(name)[-1]                              # FusedMlpTile<C>
        bm, bh = (128 if c <= 192 else 64), (64 if c <= 256 else 32)
        ldx, ldh = c + 8, bh + 8
        smem = 2 * (bm * ldx + 3 * max(bh * ldx, c * ldh) + bm * ldh)
        return 256, smem, f"C={c}, BM={bm}, BH={bh}, 3 stages"
    if "inject_norm_kernel" in name:                          # csrc/cuda/deepstack.cu
        ints = _tmpl_ints(name)
        vec, maxv = ints[-2], ints[-1]
        dim = 4096                                            # Llama-7B hidden size
        tpr = max(32, _pow2_at_least(math.ceil(dim / vec / maxv)))
        rpb = max(1, 128 // tpr)
        return tpr * rpb, 0, f"hidden={dim}"
    if "score_select_kernel" in name:                         # csrc/cuda/similarity_select.cu
        d, n = 4096, 1008
        pow2 = max(64, _pow2_at_least(n))
        return 16 * 32, max(d * 4, pow2 * 8) + pow2 * 4, f"D={d}, N={n}"
    if "norm_bwd_rows_kernel" in name or "norm_bwd_reduce_kernel" in name:  # csrc/cuda/norm_bwd.cu
        return 256, 0, ""
    if "dwconv_bwd_" in name:                                 # csrc/cuda/dwconv_bwd.cu
        return 128, 0, ""
    if "text_weight_kernel" in name or "text_dir_kernel" in name or "gather_tokens_kernel" in name:
        return 8 * 32, 0, ""
    m = re.search(r"GemmShape<(\d+), (\d+), (\d+)>, cutlass::gemm::GemmShape<(\d+), (\d+), (\d+)>", name)
    if "cutlass::Kernel2" in name and m:                      # csrc/cuda/convnext_block.cu (sm_80)
        bm, bn, bk, wm, wn, _ = map(int, m.groups())
        st = re.search(r"GemmIdentityThreadblockSwizzle<\d+>, (\d+),", name)
        stages = int(st.group(1)) if st else 4
        return (bm // wm) * (bn // wn) * 32, stages * (bm * bk + bk * bn) * 2, f"{stages} stages, mainloop smem"
    if "KernelTmaWarpSpecializedCooperative" in name:         # csrc/cuda/convnext_block_sm90.cu
        # (c++filt cannot demangle these names: read the stage count from the mangled form; the
        # CTA tile is kernels/convnext/pointwise_gemm_sm90.cuh's 128 x 128 x 64, 16-bit operands)
        st = re.search(r"MainloopSm90TmaGmmaWarpSpecialized(?:<|ILi)(\d+)", name)
        stages = int(st.group(1)) if st else 0
        return 384, stages * (128 * 64 + 128 * 64) * 2, f"{stages} stages, mainloop smem (+ epilogue)"
    return None


# ---- parsing cuobjdump output -----------------------------------------------------------------
def find_cuobjdump() -> Optional[str]:
    cands = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(Path(os.environ[env]) / "bin" / "cuobjdump")
    for p in map(Path, sys.path):
        nv = p / "nvidia"
        if nv.is_dir():
            cands += sorted(nv.glob("cu*/bin/cuobjdump"))
            cands += sorted(nv.glob("cuda_cuobjdump/bin/cuobjdump"))
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("cuobjdump")


def _demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_res_usage(text: str) -> Dict[Tuple[str, str], Dict[str, int]]:
    """`cuobjdump -res-usage` -> {(arch, mangled name): {regs, stack, shared, local}}."""
    out, arch, fn = {}, None, None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("arch = "):
            arch = s.split("=", 1)[1].strip()
        elif s.startswith("Function ") and s.endswith(":"):
            fn = s[len("Function "):-1].strip()
        elif fn is not None and (m := _RES.search(s)):
            out[(arch, fn)] = dict(regs=int(m[1]), stack=int(m[2]), shared=int(m[3]), local=int(m[4]))
            fn = None
    return out


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)\s*([^;]*);")


def parse_sass(text: str, keep=None) -> Dict[Tuple[str, str], List[Tuple[int, str, str]]]:
    """`cuobjdump -sass` -> {(arch, mangled name): [(address, opcode with modifiers, operands)]};
    with `keep` (a set of mangled names) only those functions are parsed."""
    out, arch, cur = {}, None, None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("arch = "):
            arch = s.split("=", 1)[1].strip()
        elif s.startswith("Function : "):
            name = s[len("Function : "):].strip()
            cur = out.setdefault((arch, name), []) if keep is None or name in keep else None
        elif cur is not None and (m := _INSN.search(line)):
            # a predicated instruction's operands start with its guard ("@P0 ..."): the loop
            # finder needs to tell conditional from unconditional branches
            pred = (m[2] or "").strip()
            cur.append((int(m[1], 16), m[3], (pred + " " if pred else "") + m[4].strip()))
    return out


def _width(op: str) -> int:
    mods = op.split(".")[1:]
    for w in ("128", "64"):
        if w in mods:
            return int(w)
    if any(m in ("U16", "S16") for m in mods):
        return 16
    if any(m in ("U8", "S8") for m in mods):
        return 8
    return 32


def classify(op: str) -> Optional[str]:
    base = op.split(".")[0]
    if base in ("HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA"):
        return "mma"
    if base in ("LDSM",):
        return "ldsm"
    if base in ("LDS",):
        return "lds"
    if base in ("STS", "STSM"):
        return "sts"
    if base == "LDG":
        return f"ldg{_width(op)}"
    if base == "LDGSTS":
        return f"cp.async{_width(op)}"
    if base in ("UTMALDG", "UBLKCP", "UTMAPF"):
        return "tma"
    if base in ("STG", "RED", "ATOMG"):
        return f"stg{_width(op)}" if base == "STG" else "atomic"
    if base == "MUFU":
        return "mufu"
    if base in ("BAR", "SYNCS"):
        return "barrier"
    if base in ("LDL", "STL"):
        return "local"
    if base in ("FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2", "DFMA", "DADD", "DMUL"):
        return "fp"
    return None


_BRA_TARGET = re.compile(r"^(?:`?\(?)?(0x[0-9a-f]+)")


def find_loops(insns: List[Tuple[int, str, str]]) -> List[Tuple[int, int]]:
    """Backward branches -> [(loop head address, branch address)].

    Not loops: the branch that ends a warp-divergence stub. `BRA.DIV ..., stub` jumps, when the
    warp is not converged, to out-of-line code after the function body that re-runs a warp
    collective (shfl) through a subroutine and then branches back unconditionally; that back
    branch spans the whole tail of the function without being a loop. Nor is the return of any
    other out-of-line stub placed after the function's last EXIT (the mbarrier try-wait retry
    loops of sm_90 kernels: `SYNCS.PHASECHK ...; @!P BRA retry; BRA back-into-the-body`): an
    unconditional branch from past the last EXIT to before it."""
    index = {addr: i for i, (addr, _, _) in enumerate(insns)}
    stub_returns = set()
    exits = [addr for addr, op, _ in insns if op.split(".")[0] == "EXIT"]
    if exits:
        last_exit = max(exits)
        for addr, op, args in insns:
            if addr > last_exit and op.split(".")[0] == "BRA" and not args.startswith("@") \
                    and (m := _BRA_TARGET.match(args.strip())) and int(m[1], 16) < last_exit:
                stub_returns.add(addr)
    for addr, op, args in insns:
        if op.startswith("BRA.DIV") and (m := re.search(r"(0x[0-9a-f]+)", args)):
            i = index.get(int(m[1], 16))
            while i is not None and i < len(insns):
                a, o, rest = insns[i]
                if o.split(".")[0] in ("BRA", "EXIT", "RET") and not rest.startswith("@"):
                    if o.split(".")[0] == "BRA":
                        stub_returns.add(a)
                    break
                i += 1
    loops = []
    for addr, op, args in insns:
        if addr in stub_returns:
            continue
        target = args.split(" ", 1)[1] if args.startswith("@") else args
        if op.split(".")[0] in ("BRA", "JMP") and (m := _BRA_TARGET.match(target.strip())):
            tgt = int(m[1], 16)
            if tgt <= addr:
                loops.append((tgt, addr))
    return loops


def analyse_function(insns: List[Tuple[int, str, str]]) -> Dict:
    """Instruction totals and the main loop's mix of one function's SASS."""
    total = Counter(c for _, op, _ in insns if (c := classify(op)))
    best, best_key = None, None
    for head, tail in find_loops(insns):
        body = [op for a, op, _ in insns if head <= a <= tail]
        mix = Counter(c for op in body if (c := classify(op)))
        work = sum(v for k, v in mix.items() if k not in ("local",))
        key = (mix["mma"], work, -len(body))
        if best_key is None or key > best_key:
            best, best_key = (head, tail, len(body), mix), key
    main = None
    if best is not None:
        head, tail, n, mix = best
        main = dict(start=f"0x{head:x}", end=f"0x{tail:x}", instructions=n, mix=dict(sorted(mix.items())))
    return dict(instructions=len(insns), totals=dict(sorted(total.items())), main_loop=main)


@dataclasses.dataclass
class KernelReport:
    arch: str
    kernel: str           # demangled, template arguments kept
    short: str            # namespace::name without template arguments
    regs: int
    stack: int
    local: int
    static_smem: int
    threads: Optional[int]
    dynamic_smem: Optional[int]
    launch_note: str
    blocks_per_sm: Optional[int]
    occupancy: Optional[float]
    limiter: str
    instructions: int
    local_accesses: int
    main_loop: Optional[Dict]

    @property
    def main_loop_local(self) -> int:
        return (self.main_loop or {}).get("mix", {}).get("local", 0)


def _short(demangled: str) -> str:
    if demangled.startswith("_Z"):  # left mangled by c++filt
        if "GemmUniversal" in demangled and "Sm90" in demangled:
            return "cutlass::device_kernel<GemmUniversal> (sm_90 TMA warp-specialized)"
        return demangled
    s = re.sub(r"^void ", "", demangled)
    depth, out = 0, []
    for ch in s:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return re.sub(r"\(.*", "", "".join(out)).strip()


def report(so_path: str, cuobjdump: str, name_filter: str = "") -> List[KernelReport]:
    """Every kernel instantiation x arch of the extension at `so_path` whose demangled name
    contains `name_filter`."""
    res = parse_res_usage(subprocess.run([cuobjdump, "-res-usage", so_path], capture_output=True,
                                         text=True, check=True).stdout)
    names = _demangle(sorted({fn for _, fn in res}))
    keep = {fn for fn in names if name_filter in names[fn]}
    sass = parse_sass(subprocess.run([cuobjdump, "-sass", so_path], capture_output=True, text=True,
                                     check=True).stdout, keep)
    out = []
    for (arch, fn), r in sorted(res.items(), key=lambda kv: (kv[0][0], names.get(kv[0][1], ""))):
        if fn not in keep:
            continue
        dem = names.get(fn, fn)
        info = analyse_function(sass.get((arch, fn), []))
        lc = launch_config(dem)
        threads, dyn, note = lc if lc else (None, None, "launch not described")
        if threads:
            blocks, occ, limiter = occupancy(arch, r["regs"], threads, (dyn or 0) + r["shared"])
        else:
            blocks, occ, limiter = None, None, ""
        out.append(KernelReport(arch=arch, kernel=dem, short=_short(dem), regs=r["regs"],
                                stack=r["stack"], local=r["local"], static_smem=r["shared"],
                                threads=threads, dynamic_smem=dyn, launch_note=note,
                                blocks_per_sm=blocks, occupancy=occ, limiter=limiter,
                                instructions=info["instructions"],
                                local_accesses=info["totals"].get("local", 0),
                                main_loop=info["main_loop"]))
    return out


# ---- output -----------------------------------------------------------------------------------
_MIX_COLS = ("mma", "ldsm", "lds", "sts", "ldg", "cp.async", "tma", "stg", "mufu", "barrier", "local")


def _mix_cells(mix: Dict[str, int]) -> List[str]:
    cells = []
    for col in _MIX_COLS:
        if col in ("ldg", "cp.async", "stg"):
            keys = [k for k in mix if k.startswith(col) and k[len(col):].isdigit()]
            parts = [f"{mix[k]}x{k[len(col):]}" for k in sorted(keys, key=lambda k: -int(k[len(col):]))]
            cells.append(" ".join(parts) or "0")
        else:
            cells.append(str(mix.get(col, 0)))
    return cells


_HEADER = ["kernel", "arch", "regs", "local B", "smem B", "threads", "blocks/SM", "occupancy",
           "loop insns", "MMA", "LDSM", "LDS", "STS", "LDG (count x bits)", "cp.async", "TMA",
           "STG (count x bits)", "MUFU", "barriers", "LDL/STL"]


def _row(r: KernelReport, name: str) -> List[str]:
    smem = r.static_smem + (r.dynamic_smem or 0)
    ml = r.main_loop or {"instructions": 0, "mix": {}}
    occ = f"{r.occupancy:.0%} ({r.limiter})" if r.occupancy is not None else "n/a"
    return [name, r.arch, str(r.regs), str(r.local + r.stack), str(smem), str(r.threads or "n/a"),
            str(r.blocks_per_sm if r.blocks_per_sm is not None else "n/a"), occ,
            str(ml["instructions"])] + _mix_cells(ml["mix"])


def summarise(reports: List[KernelReport]) -> List[Tuple[str, KernelReport, int, Tuple[int, int]]]:
    """One representative per (kernel, arch): the bf16 instantiation with the most tensor-core
    work, then the most of it per ldmatrix, then the widest loads; -> [(kernel, report, instantiations, (min regs, max regs))]."""
    groups: Dict[Tuple[str, str], List[KernelReport]] = {}
    for r in reports:
        groups.setdefault((r.short, r.arch), []).append(r)

    def score(r):
        mix = (r.main_loop or {}).get("mix", {})
        bf16 = "bfloat16" in r.kernel
        mma = mix.get("mma", 0)
        widest = max([int(m[1]) for k in mix if (m := re.fullmatch(r"(?:ldg|cp\.async)(\d+)", k))],
                     default=0)
        # most MMAs, then the most MMAs per ldmatrix (the prefill tile over the decode one), then
        # the widest global loads (the vector path over the scalar fallback)
        return (bf16, mma, mma / max(mix.get("ldsm", 0), 1), widest,
                mix.get("ldg128", 0) + mix.get("cp.async128", 0), -r.local_accesses)

    out = []
    for (short, arch), rs in sorted(groups.items()):
        rep = max(rs, key=score)
        out.append((short, rep, len(rs), (min(r.regs for r in rs), max(r.regs for r in rs))))
    return out


def markdown(reports: List[KernelReport], summary: bool) -> str:
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    if summary:
        for short, rep, n, (lo, hi) in summarise(reports):
            name = f"`{short.split('::')[-1]}` ({n} inst.; regs {lo}-{hi})" if n > 1 else f"`{short.split('::')[-1]}`"
            if rep.launch_note:
                name += f" @ {rep.launch_note}"
            lines.append("| " + " | ".join(_row(rep, name)) + " |")
    else:
        for r in reports:
            lines.append("| " + " | ".join(_row(r, f"`{r.kernel}`")) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hires_lmm.bench.sass", description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", help="the extension to read (default: the installed hires_lmm._C)")
    ap.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    ap.add_argument("--summary", action="store_true", help="one row per kernel and arch")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this text")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a kernel's main loop holds local-memory accesses (spills)")
    args = ap.parse_args(argv)
    so = args.so
    if so is None:
        import hires_lmm
        if not hires_lmm.build_info().get("cuda"):
            print("hires_lmm.bench.sass: this build of hires_lmm has no CUDA kernels (CPU-only): nothing to report")
            return 0
        so = hires_lmm._C.__file__
    tool = find_cuobjdump()
    if tool is None:
        print("hires_lmm.bench.sass: cuobjdump not found (pip install 'cuda-toolkit[cuobjdump,nvdisasm]' or "
              "set CUDA_HOME): nothing to report")
        return 2 if args.check else 0
    try:
        reports = report(so, tool, args.filter)
    except subprocess.CalledProcessError as e:
        # e.g. "Could not find executable file 'nvdisasm'": cuobjdump -sass needs nvdisasm beside it
        msg = (e.stderr or "").strip().splitlines()
        print(f"hires_lmm.bench.sass: {' '.join(map(str, e.cmd[:2]))} failed: {msg[-1] if msg else e} "
              "(pip install 'cuda-toolkit[cuobjdump,nvdisasm]' of the build's CUDA version)")
        return 2 if args.check else 0
    print(markdown(reports, args.summary))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in reports], indent=1))
    bad = [r for r in reports if r.main_loop_local]
    if bad:
        print(f"\n{len(bad)} kernel instantiation(s) access local memory (spills or local arrays) "
              "inside their main loop:")
        for r in bad:
            print(f"  {r.arch} {r.kernel}: {r.main_loop_local} LDL/STL in the loop at "
                  f"{r.main_loop['start']}-{r.main_loop['end']}")
    if args.check and bad:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
