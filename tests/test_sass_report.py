"""hires_lmm.bench.sass: the static SASS report (parsers on synthetic cuobjdump text, occupancy
arithmetic, launch configurations) and, on a CUDA build, the report of the built extension."""
import json

import pytest

import hires_lmm
from hires_lmm.bench import sass

RES_USAGE = """
Fatbin elf code:
================
arch = sm_80
identifier = /x/csrc/cuda/flash_attn.cu

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN5hires9attention16flash_fwd_kernelI13__nv_bfloat16Li128EEEvNS0_11FlashParamsE:
  REG:241 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z3fooPf:
  REG:40 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# A loop (0x0030 .. 0x00a0, closed by the backward BRA) with 2 HMMA, 1 LDSM, a 128-bit cp.async,
# one spill store; a second, smaller loop without MMAs; straight-line code around them.
SASS = """
Fatbin elf code:
================
arch = sm_80

	code for sm_80
		Function : _Z3fooPf
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;  /* 0x0 */
        /*0010*/                   LDG.E.128 R4, [R2.64] ;  /* 0x0 */
        /*0020*/                   LDG.E.U16 R8, [R2.64] ;  /* 0x0 */
        /*0030*/                   LDSM.16.M88.4 R12, [R20] ;  /* 0x0 */
        /*0040*/                   HMMA.16816.F32.BF16 R24, R12, R16, R24 ;  /* 0x0 */
        /*0050*/                   HMMA.16816.F32.BF16 R28, R12, R18, R28 ;  /* 0x0 */
        /*0060*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], [R22.64], P6 ;  /* 0x0 */
        /*0070*/                   STL [R1+0x10], R124 ;  /* 0x0 */
        /*0080*/                   MUFU.EX2 R5, R5 ;  /* 0x0 */
        /*0090*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;  /* 0x0 */
        /*00a0*/               @P0 BRA 0x30 ;  /* 0x0 */
        /*00b0*/                   FFMA R1, R2, R3, R4 ;  /* 0x0 */
        /*00c0*/                   FADD R1, R2, R3 ;  /* 0x0 */
        /*00d0*/              @!P1 BRA 0xb0 ;  /* 0x0 */
        /*00e0*/                   STG.E.128 [R2.64], R4 ;  /* 0x0 */
        /*00f0*/                   STG.E.U16 [R2.64], R4 ;  /* 0x0 */
        /*0100*/                   EXIT ;  /* 0x0 */
        /*0110*/                   BRA 0x110;  /* 0x0 */
"""


def test_parse_res_usage():
    res = sass.parse_res_usage(RES_USAGE)
    flash = res[("sm_80", "_ZN5hires9attention16flash_fwd_kernelI13__nv_bfloat16Li128EEEvNS0_11FlashParamsE")]
    assert flash == dict(regs=241, stack=0, shared=0, local=0)
    assert res[("sm_80", "_Z3fooPf")] == dict(regs=40, stack=16, shared=1024, local=8)


def test_main_loop_mix_and_local_accesses():
    insns = sass.parse_sass(SASS)[("sm_80", "_Z3fooPf")]
    assert len(insns) == 18
    info = sass.analyse_function(insns)
    ml = info["main_loop"]
    # the MMA loop wins over the FFMA loop; the self-loop at 0x110 (a trap) holds no work
    assert (ml["start"], ml["end"], ml["instructions"]) == ("0x30", "0xa0", 8)
    assert ml["mix"] == {"barrier": 1, "cp.async128": 1, "ldsm": 1, "local": 1, "mma": 2, "mufu": 1}
    tot = info["totals"]
    assert tot["ldg128"] == 1 and tot["ldg16"] == 1 and tot["stg128"] == 1 and tot["stg16"] == 1
    assert tot["fp"] == 2 and tot["local"] == 1


def test_classify_widths():
    assert sass.classify("LDG.E.128.CONSTANT") == "ldg128"
    assert sass.classify("LDG.E.64") == "ldg64"
    assert sass.classify("LDG.E") == "ldg32"
    assert sass.classify("STG.E.U8") == "stg8"
    assert sass.classify("HGMMA.64x128x16.F32.BF16") == "mma"
    assert sass.classify("SYNCS.ARRIVE.TRANS64.RED.A1T0") == "barrier"
    assert sass.classify("LDL.64") == "local"
    assert sass.classify("IMAD") is None


def test_occupancy_arithmetic():
    # 241 registers -> 7936 per warp (units of 256), 4 warps -> 2 blocks by registers; 80 KiB of
    # shared memory + 1 KiB reserved -> 2 blocks of 164 KiB on sm_80.
    blocks, occ, limiter = sass.occupancy("sm_80", 241, 128, 81920)
    assert blocks == 2 and occ == pytest.approx(8 / 64)
    # 32 registers, 256 threads, no smem: limited by threads (8 blocks of 8 warps = 64 warps)
    assert sass.occupancy("sm_90a", 32, 256, 0) == (8, 1.0, "threads")
    # more shared memory than a block may have: nothing runs
    assert sass.occupancy("sm_80", 32, 128, 200 * 1024)[0] == 0


def test_launch_configs_follow_the_tiles():
    # flash_fwd_kernel<T, D, m16 tiles per warp>: Q (kBlockM x D) + one K and one V (64 x D) tile
    assert sass.launch_config("void hires::attention::flash_fwd_kernel<__nv_bfloat16, 64, 2>(hires::attention::FlashParams)") \
        == (128, (128 * 64 + 2 * 64 * 64) * 2, "D=64, 128x64")
    assert sass.launch_config("void hires::attention::flash_fwd_kernel<__half, 128, 1>(hires::attention::FlashParams)") \
        == (128, (64 * 128 + 2 * 64 * 128) * 2, "D=128, 64x64")
    assert sass.launch_config("void hires::attention::flash_fwd_kernel<__half, 128, 2>(hires::attention::FlashParams)") \
        == (128, (128 * 128 + 2 * 32 * 128) * 2, "D=128, 128x32")
    threads, smem, note = sass.launch_config(
        "void hires::deepstack::inject_norm_kernel<__nv_bfloat16, __nv_bfloat16, (hires::deepstack::Norm)1, 8, 4>(hires::deepstack::InjectNormParams)")
    assert threads == 128 and smem == 0   # 4096 / 8 / 4 = 128 threads per row, one row per block
    # the fused ConvNeXt MLP: FusedMlpTile<C>::kSmemBytes (kernels/convnext/fused_mlp.cuh table)
    assert sass.launch_config("void hires::convnext::fused_mlp_kernel<__nv_bfloat16, 192>"
                              "(hires::convnext::FusedMlpParams)")[:2] == (256, 152576)
    assert sass.launch_config("void hires::convnext::fused_mlp_kernel<__half, 384>"
                              "(hires::convnext::FusedMlpParams)")[:2] == (256, 147456)
    assert sass.launch_config("void unknown_kernel<int>(int)") is None


def test_report_of_the_built_extension(tmp_path, capsys):
    info = hires_lmm.build_info()
    out = tmp_path / "sass.json"
    rc = sass.main(["--summary", "--json", str(out), "--filter", "flash_fwd_kernel"])
    text = capsys.readouterr().out
    if not info["cuda"]:
        assert rc == 0 and "no CUDA kernels" in text and not out.exists()
        return
    assert sass.find_cuobjdump() is not None, "CUDA build without cuobjdump: install cuda-toolkit[cuobjdump,nvdisasm]"
    rows = json.loads(out.read_text())
    archs = {r["arch"] for r in rows}
    assert archs == set(info["cuda_archs"])
    for r in rows:
        assert r["regs"] > 0 and r["threads"] == 128
        assert r["main_loop"]["mix"].get("mma", 0) > 0, r["kernel"]   # the QK^T / PV loop


# A warp-divergence stub: BRA.DIV jumps to out-of-line code after EXIT that re-runs the shuffle
# through a subroutine and branches back; that back branch is not a loop.
DIV_STUB = """
	code for sm_80
		Function : _Z3barPf
        /*0000*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;  /* 0x0 */
        /*0010*/                   BRA.DIV ~URZ, 0x60 ;  /* 0x0 */
        /*0020*/                   FADD R2, R2, R3 ;  /* 0x0 */
        /*0030*/                   STL [R1], R2 ;  /* 0x0 */
        /*0040*/               @P0 BRA 0x20 ;  /* 0x0 */
        /*0050*/                   EXIT ;  /* 0x0 */
        /*0060*/                   CALL.REL.NOINC 0x90 ;  /* 0x0 */
        /*0070*/                   BRA 0x0 ;  /* 0x0 */
        /*0080*/                   BRA 0x80;  /* 0x0 */
        /*0090*/                   RET.REL.NODEC R20 0x0 ;  /* 0x0 */
"""


def test_divergence_stub_is_not_a_loop():
    insns = sass.parse_sass(DIV_STUB.replace("code for sm_80", "arch = sm_80\n\tcode for sm_80"))[("sm_80", "_Z3barPf")]
    loops = sass.find_loops(insns)
    assert (0x0, 0x70) not in loops          # the stub's return branch
    assert (0x20, 0x40) in loops             # the real (predicated) loop
    ml = sass.analyse_function(insns)["main_loop"]
    assert ml["start"] == "0x20" and ml["mix"]["local"] == 1


def test_dwconv_launch_configs():
    """dwconv_layernorm's tiled kernel: 256 threads, P*C fp32 conv outputs + two staged input rows
    at the width DwconvLnTiling::pick gives each tile shape (tests/test_kernel_tiling_emulation.py
    models the choice); the generic kernel keeps 128 threads."""
    k = "void hires::convnext::dwconv_layernorm_kernel<__nv_bfloat16, 8, {}, {}>(hires::convnext::DwconvLnParams, long, long)"
    assert sass.launch_config(k.format(2, 4)) == (256, (64 * 192 + 2 * 38 * 64) * 4, "C=192, tile 2x32")
    assert sass.launch_config(k.format(2, 1)) == (256, (16 * 768 + 2 * 14 * 256) * 4, "C=768, tile 2x8")
    assert sass.launch_config(k.format(1, 1))[1] == (8 * 1536 + 2 * 14 * 256) * 4
    g = sass.launch_config("void hires::convnext::dwconv_layernorm_generic_kernel<float, 4>(hires::convnext::DwconvLnParams, int, long)")
    assert g[0] == 128 and g[1] == 2 * 6144 * 4
