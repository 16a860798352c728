"""Numpy models of the index logic of CUDA kernels that cannot run on this machine.

1. dwconv_layernorm, tiled kernel (kernels/convnext/dwconv_layernorm.cuh dwconv_layernorm_kernel,
   launcher csrc/cuda/dwconv_layernorm.cu, shapes DwconvLnTiling in dwconv_layernorm.h): the tile
   choice from C and the device's shared memory, the grid, the channel chunks, the staged-row
   loads (thread q -> column j, pack cp), the double-buffered ring (which buffer each step reads
   and writes), the per-thread strips and the conv / LayerNorm offsets. The model computes the
   conv through exactly that partition and checks it against a direct depthwise conv, that every
   shared-memory access is inside the bytes the launch gives, that no step writes the buffer it
   reads, and that every output pixel is produced exactly once. The CPU twin
   (csrc/cpu/dwconv_layernorm.cpp, HIRES_LMM_CPU_TWIN=1) runs the same decomposition on real data.
2. dwconv_layernorm, generic kernel (C past the tiled kernel's shared memory, and the scalar path:
   C % (16 / sizeof(T)) != 0 or misaligned views): the launcher's
   pixel segment P and grid, step-1 work items (run of kRun pixels x pack of VEC channels, the
   kRun + 6 input window, the shared-memory offsets) and step-2 output offsets; this covers
   P < kRun, several segments per row and the segment tails.
3. inject_norm (kernels/deepstack/inject_norm.cuh + csrc/cuda/deepstack.cu): the launcher's block
   shape (threads per row, rows per block) against the kernel's limits (__launch_bounds__,
   the shared scratch array) and element coverage, for every dim the binding accepts.

The formulas are copied by hand from the sources; keep them in sync."""
import numpy as np
import pytest

# ---- dwconv_layernorm, generic kernel ------------------------------------------------------------------------
K, PAD = 7, 3
K_RUN, K_MAX_PIXELS, K_SMEM_FLOATS, K_THREADS = 4, 64, 12288, 128


def ceil_div(a, b):
    return (a + b - 1) // b


def dw_launch_geometry(B, H, W, C):
    """csrc/cuda/dwconv_layernorm.cu launch<T, VEC>()."""
    P = min(K_MAX_PIXELS, K_SMEM_FLOATS // C)
    assert P >= 1, "the binding limits C to kSmemFloats"
    if P >= K_RUN:
        P = P // K_RUN * K_RUN
    P = min(P, ceil_div(W, K_RUN) * K_RUN)
    segs = ceil_div(W, P)
    return P, segs, B * H * segs


def dw_emulate(x, w_t, bias, VEC):
    """Runs the kernel's index arithmetic block by block; returns the conv outputs (B,H,W,C) as
    placed at their step-2 output offsets, and how many times each output pixel was written."""
    B, H, W, C = x.shape
    P, segs, blocks = dw_launch_geometry(B, H, W, C)
    assert P * C * 4 <= 48 * 1024, "dynamic shared memory above the no-opt-in limit"
    assert blocks <= 0x7FFFFFFF
    xf = x.reshape(-1)
    sx_b, sx_h, sx_w = H * W * C, W * C, C
    out = np.zeros(B * H * W * C)
    writes = np.zeros(B * H * W, dtype=np.int64)
    npack = C // VEC
    for bid in range(blocks):
        row, seg = bid // segs, bid % segs
        b, h = row // H, row % H
        w0 = seg * P
        npix = min(P, W - w0)
        assert npix >= 1
        runs = ceil_div(npix, K_RUN)
        conv = np.full(P * C, np.nan)  # the block's dynamic shared memory
        # step 1, all work items of the block at once over the channel packs
        for run in range(runs):
            pw0 = run * K_RUN
            wf = w0 + pw0
            cs = (np.arange(npack) * VEC)[:, None] + np.arange(VEC)[None, :]  # (npack, VEC)
            acc = np.zeros((K_RUN, npack, VEC))
            for kh in range(K):
                ih = h + kh - PAD
                if ih < 0 or ih >= H:
                    continue
                base = b * sx_b + ih * sx_h
                xin = np.zeros((K_RUN + K - 1, npack, VEC))
                for j in range(K_RUN + K - 1):
                    iw = wf + j - PAD
                    if 0 <= iw < W:
                        xin[j] = xf[base + iw * sx_w + cs]
                for kw in range(K):
                    wv = w_t[(kh * K + kw) * C + cs]
                    for r in range(K_RUN):
                        acc[r] += wv * xin[r + kw]
            if bias is not None:
                acc += bias[cs][None]
            for r in range(K_RUN):
                if pw0 + r >= npix:
                    break
                off = (pw0 + r) * C + cs
                assert off.min() >= 0 and off.max() < P * C
                conv[off] = acc[r]
        # step 2: warps over the block's pixels
        for pw in range(npix):
            y = conv[pw * C:(pw + 1) * C]
            assert not np.isnan(y).any(), "step 2 reads a conv output step 1 did not store"
            o = ((b * H + h) * W + w0 + pw) * C
            out[o:o + C] = y
            writes[(b * H + h) * W + w0 + pw] += 1
    return out.reshape(B, H, W, C), writes


def dw_direct(x, w_t, bias):
    B, H, W, C = x.shape
    xp = np.zeros((B, H + 2 * PAD, W + 2 * PAD, C))
    xp[:, PAD:PAD + H, PAD:PAD + W] = x
    y = np.zeros_like(x)
    for kh in range(K):
        for kw in range(K):
            y += w_t[(kh * K + kw) * C:(kh * K + kw + 1) * C] * xp[:, kh:kh + H, kw:kw + W]
    return y if bias is None else y + bias


@pytest.mark.parametrize("B,H,W,C,VEC", [
    (1, 1, 1, 8, 8), (2, 3, 13, 24, 8), (1, 2, 70, 8, 8),    # P = 64: one segment, two (tail 6)
    (1, 2, 65, 12, 4), (1, 1, 5, 40, 1),                      # fp32 packs, scalar path
    (1, 2, 9, 1536, 8), (1, 2, 11, 2048, 8),                  # P = 8; P = 6 rounded to 4
    (1, 3, 5, 3072, 8), (1, 2, 7, 4096, 8), (1, 1, 5, 6144, 8),  # P = 4, 3, 2 (P < kRun)
    (1, 2, 3, 12288, 8), (1, 1, 4, 12287, 1),                 # P = 1
])
def test_dwconv_partition_matches_direct_conv(B, H, W, C, VEC):
    rng = np.random.default_rng(C * 1000 + W)
    x = rng.standard_normal((B, H, W, C))
    w_t = rng.standard_normal(K * K * C)
    bias = rng.standard_normal(C)
    got, writes = dw_emulate(x, w_t, bias, VEC)
    assert (writes == 1).all(), "every output pixel exactly once"
    np.testing.assert_allclose(got, dw_direct(x, w_t, bias), rtol=1e-12, atol=1e-12)


def test_dwconv_geometry_all_widths():
    """Shared memory, whole runs and grid for every C the binding accepts and a range of W."""
    for C in range(1, K_SMEM_FLOATS + 1):
        for W in (1, 3, 4, 5, 63, 64, 65, 200):
            P, segs, _ = dw_launch_geometry(1, 1, W, C)
            assert 1 <= P <= K_MAX_PIXELS and P * C <= K_SMEM_FLOATS
            assert (segs - 1) * P < W <= segs * P  # segments tile the row, none empty
            if P >= K_RUN:
                assert P % K_RUN == 0  # a run never straddles two blocks


# ---- dwconv_layernorm, tiled kernel --------------------------------------------------------------
T_THREADS, T_RW, T_BUDGET = 256, 8, 80 * 1024
T_SHAPES = [(2, 4), (2, 2), (2, 1), (1, 1)]  # (RH, S), DwconvLnTiling::kShapes
SM80_MAX_SMEM, SM90_MAX_SMEM = 166912, 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin


def t_smem(rh, s, C):
    tw, cc = s * T_RW, T_THREADS // s
    return (rh * tw * C + 2 * (tw + K - 1) * cc) * 4


def t_pick(C, max_smem):
    """DwconvLnTiling::pick: index into T_SHAPES, or -1 for the generic kernel."""
    for i, (rh, s) in enumerate(T_SHAPES):
        if t_smem(rh, s, C) <= T_BUDGET:
            return i
    return len(T_SHAPES) - 1 if t_smem(*T_SHAPES[-1], C) <= max_smem else -1


def t_emulate(x, w_t, bias, VEC, rh, s):
    """Runs dwconv_layernorm_kernel<T, VEC, rh, s>'s index arithmetic block by block (all threads
    of a step at once); returns the conv outputs placed at their LayerNorm offsets and the number
    of times each output pixel was normalized."""
    B, H, W, C = x.shape
    TW, CC = s * T_RW, T_THREADS // s
    P, in_rows, in_w = rh * TW, rh + K - 1, TW + K - 1
    packs_per_col = CC // VEC
    row_packs = in_w * packs_per_col
    n_loads = ceil_div(row_packs, T_THREADS)
    tiles_h, tiles_w = ceil_div(H, rh), ceil_div(W, TW)
    blocks = B * tiles_h * tiles_w
    assert blocks <= 0x7FFFFFFF
    smem_floats = t_smem(rh, s, C) // 4
    xf = x.reshape(-1)
    sx_b, sx_h, sx_w = H * W * C, W * C, C
    out = np.zeros(B * H * W * C)
    writes = np.zeros(B * H * W, dtype=np.int64)
    tid = np.arange(T_THREADS)
    cc_t, strip_t = tid % CC, tid // CC            # thread -> (channel in chunk, strip)
    nchunks = ceil_div(C, CC)
    for bid in range(blocks):
        tx, ty, b = bid % tiles_w, (bid // tiles_w) % tiles_h, bid // tiles_w // tiles_h
        h0, w0 = ty * rh, tx * TW
        smem = np.full(smem_floats, np.nan)
        ring0 = P * C                              # ring after conv[P][C]

        def stage(buf, ih, c0, ccv):               # dwln_stage_load + dwln_stage_store
            row_ok = 0 <= ih < H
            lo = ring0 + buf * in_w * CC
            for l in range(n_loads):
                q = tid + l * T_THREADS
                q = q[q < row_packs]
                j, cp = q // packs_per_col, q % packs_per_col
                iw = w0 - PAD + j
                dst = lo + j[:, None] * CC + cp[:, None] * VEC + np.arange(VEC)[None, :]
                assert dst.min() >= lo and dst.max() < lo + in_w * CC <= smem_floats
                ok = row_ok & (cp * VEC < ccv) & (iw >= 0) & (iw < W)
                src = b * sx_b + ih * sx_h + iw[:, None] * sx_w + c0 + cp[:, None] * VEC + np.arange(VEC)[None, :]
                smem[dst] = np.where(ok[:, None], xf[np.where(ok[:, None], src, 0)], 0.0)
            return lo, lo + in_w * CC                  # range written

        stage(0, h0 - PAD, 0, min(CC, C))
        buf = 0
        for k in range(nchunks):
            c0 = k * CC
            ccv = min(CC, C - c0)
            active = cc_t < ccv
            c = c0 + cc_t
            wr = np.where(active[:, None], w_t[(np.arange(49)[None, :] * C + np.minimum(c, C - 1)[:, None])], 0.0)
            acc = np.zeros((T_THREADS, rh, T_RW))
            for i in range(in_rows):
                last = i + 1 == in_rows
                has_next = not last or k + 1 < nchunks
                ih = h0 - PAD + i
                read_lo = ring0 + buf * in_w * CC
                if 0 <= ih < H:
                    ws = w0 + strip_t * T_RW
                    src = read_lo + strip_t * T_RW * CC + cc_t                   # per thread
                    offs = src[:, None] + np.arange(T_RW + K - 1)[None, :] * CC  # xr[j]
                    assert offs[active].min() >= read_lo and offs[active].max() < read_lo + in_w * CC
                    xr = smem[np.where(active[:, None], offs, ring0)]
                    for r in range(rh):
                        kh = i - r
                        if not 0 <= kh < K:
                            continue
                        for kw in range(K):
                            for rw in range(T_RW):
                                iw = ws - PAD + rw + kw
                                ok = active & (iw >= 0) & (iw < W)               # padding skipped
                                acc[ok, r, rw] += wr[ok, kh * K + kw] * xr[ok, rw + kw]
                if has_next:
                    nc0 = c0 + CC if last else c0
                    lo, hi = stage(buf ^ 1, h0 - PAD + (0 if last else i + 1), nc0, min(CC, C - nc0))
                    assert hi <= read_lo or lo >= read_lo + in_w * CC, "a step writes the buffer it reads"
                buf ^= 1
            for t in np.nonzero(active)[0]:
                for r in range(rh):
                    for rw in range(T_RW):
                        off = (r * TW + strip_t[t] * T_RW + rw) * C + c[t]
                        assert 0 <= off < P * C
                        smem[off] = acc[t, r, rw] + (bias[c[t]] if bias is not None else 0.0)
        for pix in range(P):                       # warps over the tile's pixels
            h, w = h0 + pix // TW, w0 + pix % TW
            if h >= H or w >= W:
                continue
            y = smem[pix * C:(pix + 1) * C]
            assert not np.isnan(y).any(), "the LayerNorm reads a conv output no thread stored"
            o = ((b * H + h) * W + w) * C
            out[o:o + C] = y
            writes[(b * H + h) * W + w] += 1
    return out.reshape(B, H, W, C), writes


@pytest.mark.parametrize("B,H,W,C,VEC,shape", [
    (2, 3, 37, 24, 8, 0),      # 2x32 tiles: W tail 5, H tail 1, C < chunk, batch 2
    (1, 5, 33, 200, 8, 0),     # C = 200: chunks 64,64,64,8 (tail chunk), W = 33 (tail 1)
    (1, 2, 7, 12, 4, 0),       # fp32 packs, W < halo (every strip on both borders)
    (1, 3, 9, 20, 1, 0),       # scalar path (C % 8 != 0)
    (2, 3, 19, 384, 8, 1),     # 2x16 tiles, 3 chunks of 128
    (1, 4, 11, 136, 8, 1),     # 2x16 tiles forced: tail chunk of 8
    (1, 3, 10, 768, 8, 2),     # 2x8 tiles, 3 chunks of 256
    (1, 3, 9, 264, 8, 3),      # 1x8 tiles with a tail chunk of 8
])
def test_dwconv_tiled_partition_matches_direct_conv(B, H, W, C, VEC, shape):
    rh, s = T_SHAPES[shape]
    rng = np.random.default_rng(C * 1000 + W)
    x = rng.standard_normal((B, H, W, C))
    w_t = rng.standard_normal(K * K * C)
    bias = rng.standard_normal(C)
    got, writes = t_emulate(x, w_t, bias, VEC, rh, s)
    assert (writes == 1).all(), "every output pixel exactly once"
    np.testing.assert_allclose(got, dw_direct(x, w_t, bias), rtol=1e-12, atol=1e-12)


def test_dwconv_tiled_choice_every_width():
    """Model widths take the intended shapes; every C the binding accepts gets a launchable shape
    (or the generic kernel), within the device's opt-in shared memory; 16-byte alignment of the
    ring; per-thread staged loads stay few (registers)."""
    assert [t_pick(C, SM90_MAX_SMEM) for C in (192, 384, 768, 1536, 3072)] == [0, 1, 2, 3, 3]
    assert t_smem(2, 4, 192) == 68608 and t_smem(1, 1, 3072) == 126976
    for max_smem in (SM80_MAX_SMEM, SM90_MAX_SMEM):
        widest = max(C for C in range(1, K_SMEM_FLOATS + 1) if t_pick(C, max_smem) >= 0)
        assert widest == {SM80_MAX_SMEM: 4320, SM90_MAX_SMEM: 6368}[max_smem]
        for C in range(1, K_SMEM_FLOATS + 1):
            i = t_pick(C, max_smem)
            if i < 0:
                assert C > widest
                continue
            rh, s = T_SHAPES[i]
            assert t_smem(rh, s, C) <= (T_BUDGET if i < len(T_SHAPES) - 1 else max_smem)
            if i > 0:  # a wider tile would not have fit the budget
                assert t_smem(*T_SHAPES[i - 1], C) > T_BUDGET
    for rh, s in T_SHAPES:
        tw, cc = s * T_RW, T_THREADS // s
        assert (rh * tw) % 4 == 0 and ((tw + K - 1) * cc) % 4 == 0  # ring float4-aligned
        for vec in (1, 4, 8):
            loads = ceil_div((tw + K - 1) * (cc // vec), T_THREADS)
            assert loads * vec <= 16  # prefetch registers per thread: 8 (16-bit) .. 16 (scalar)


# ---- inject_norm -----------------------------------------------------------------------------
WARP, MAX_TPR, ELEMS, MIN_TPB = 32, 512, 32, 128
MAX_WARPS_PER_ROW, MAX_ROWS_PER_BLOCK = MAX_TPR // WARP, MIN_TPB // WARP
MAX_DIM = 16384  # csrc/deepstack.cpp kMaxDim


def pow2_at_least(v):
    p = 1
    while p < v:
        p <<= 1
    return p


@pytest.mark.parametrize("VEC", [1, 4, 8])
def test_inject_norm_block_shape_every_dim(VEC):
    MAXV = ELEMS // VEC
    assert MAX_DIM == MAX_TPR * ELEMS  # binding limit == kernel capacity (max_dim())
    for dim in range(VEC, MAX_DIM + 1, VEC):
        nvec = dim // VEC
        tpr = max(WARP, pow2_at_least(ceil_div(nvec, MAXV)))
        assert tpr <= MAX_TPR, dim  # the launcher would refuse a dim the binding accepts
        rpb = max(1, MIN_TPB // tpr)
        assert tpr % WARP == 0, "a row is whole warps (warp_sum over one row only)"
        assert tpr * rpb <= MAX_TPR, "block above __launch_bounds__"
        assert rpb <= MAX_ROWS_PER_BLOCK and tpr // WARP <= MAX_WARPS_PER_ROW, "scratch bounds"
        assert MAXV * tpr >= nvec, "packs c = i * blockDim.x + threadIdx.x cover the row"
