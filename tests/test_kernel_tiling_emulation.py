"""Numpy models of the index logic of two CUDA kernels that cannot run on this machine.

1. dwconv_layernorm (kernels/convnext/dwconv_layernorm.cuh + csrc/cuda/dwconv_layernorm.cu): the
   launcher's choice of the pixel segment P and the grid, and the kernel's step-1 work items
   (run of kRun pixels x pack of VEC channels, the kRun + 6 input window, the shared-memory
   offsets) and step-2 output offsets. The model computes the conv through exactly that
   partition and checks it against a direct depthwise conv, that every shared-memory access is
   inside the P * C floats the launch gives, and that every output pixel is produced exactly once.
   The CPU twin does not use segments, so this is what covers P < kRun (C > 3072), several
   segments per row and the segment tails.
2. inject_norm (kernels/deepstack/inject_norm.cuh + csrc/cuda/deepstack.cu): the launcher's block
   shape (threads per row, rows per block) against the kernel's limits (__launch_bounds__,
   the shared scratch array) and element coverage, for every dim the binding accepts.

The formulas are copied by hand from the sources; keep them in sync."""
import numpy as np
import pytest

# ---- dwconv_layernorm ------------------------------------------------------------------------
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
