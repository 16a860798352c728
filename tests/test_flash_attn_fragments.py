"""Lane-level model of the sm_80 attention kernel's fragment plumbing (kernels/attention/flash_fwd.cuh).

No GPU runs here, so this checks the kernel's index formulas (copied by hand from flash_fwd.cuh:
the XOR swizzle, the ldmatrix lane addresses for Q, K and V(.trans), the P -> A-fragment repack)
against a numpy model of the PTX semantics of ldmatrix.m8n8.x4 and mma.m16n8k16 (the layouts of
the PTX ISA: A a0..a3 = (g, 2t) (g+8, 2t) (g, 2t+8) (g+8, 2t+8); B b0, b1 = (2t, g) (2t+8, g);
C = (g, 2t) (g+8, 2t); ldmatrix thread L gets row L/4, columns 2(L%4).. of each 8x8 matrix).
It also checks that every ldmatrix phase is free of shared-memory bank conflicts. Keep the
formulas here in sync with the kernel."""
import numpy as np
import pytest

CH, SW = 8, 8  # FlashFwdTile::kChunk, kSwizzleRows


def _model(D, BN, BM, rng):
    # Lane-level simulation of the sm80 kernel's fragment plumbing (swizzle, ldmatrix(.trans), mma.m16n8k16).

    def swz(r, c):  # element offset, c multiple of 8
        return r * D + (((c // CH) ^ (r % SW)) * CH)

    def store_tile(tile):  # cp.async: chunk (r, col) -> smem[swz(r,col) : +8]
        sm = np.full(tile.shape[0] * D, np.nan)
        for r in range(tile.shape[0]):
            for c in range(0, D, CH):
                sm[swz(r, c):swz(r, c) + CH] = tile[r, c:c + CH]
        return sm

    def ldmatrix_x4(sm, addrs, trans=False):
        # addrs[lane] = start of a row of 8; matrix i rows from lanes 8i..8i+7
        regs = np.zeros((32, 4, 2))
        for i in range(4):
            M = np.stack([sm[addrs[8 * i + j]: addrs[8 * i + j] + 8] for j in range(8)])
            if trans: M = M.T
            for L in range(32):
                regs[L, i] = M[L // 4, 2 * (L % 4): 2 * (L % 4) + 2]
        return regs

    def mma(c, a, b0, b1):
        # c: (32,4), a: (32,4,2), b0/b1: (32,2)
        A = np.zeros((16, 16)); B = np.zeros((16, 8))
        for L in range(32):
            g, t = L // 4, L % 4
            A[g, 2*t:2*t+2] = a[L, 0]; A[g+8, 2*t:2*t+2] = a[L, 1]
            A[g, 2*t+8:2*t+10] = a[L, 2]; A[g+8, 2*t+8:2*t+10] = a[L, 3]
            B[2*t:2*t+2, g] = b0[L]; B[2*t+8:2*t+10, g] = b1[L]
        Dm = A @ B
        out = c.copy()
        for L in range(32):
            g, t = L // 4, L % 4
            out[L, 0:2] += Dm[g, 2*t:2*t+2]; out[L, 2:4] += Dm[g+8, 2*t:2*t+2]
        return out

    Q = rng.standard_normal((BM, D)); K = rng.standard_normal((BN, D)); V = rng.standard_normal((BN, D))
    sQ, sK, sV = store_tile(Q), store_tile(K), store_tile(V)
    for warp in range(BM // 16):
        s = np.zeros((BN // 8, 32, 4))
        for kk in range(D // 16):
            qf = ldmatrix_x4(sQ, [swz(warp * 16 + L % 16, kk * 16 + (L // 16) * 8) for L in range(32)])
            for nn in range(BN // 16):
                r = ldmatrix_x4(sK, [swz(nn * 16 + L % 8 + ((L // 8) >> 1) * 8, kk * 16 + ((L // 8) & 1) * 8) for L in range(32)])
                s[2*nn] = mma(s[2*nn], qf, r[:, 0], r[:, 1])
                s[2*nn+1] = mma(s[2*nn+1], qf, r[:, 2], r[:, 3])
        Sref = Q[warp*16:warp*16+16] @ K.T
        P = np.tanh(Sref)  # any elementwise function stands in for the softmax
        for nt in range(BN // 8):
            for L in range(32):
                g, t = L // 4, L % 4
                assert np.allclose(s[nt, L, 0:2], Sref[g, nt*8+2*t:nt*8+2*t+2])
                assert np.allclose(s[nt, L, 2:4], Sref[g+8, nt*8+2*t:nt*8+2*t+2])
        s = np.tanh(s)
        acc = np.zeros((D // 8, 32, 4))
        for kk in range(BN // 16):
            a = np.stack([s[2*kk][:, 0:2], s[2*kk][:, 2:4], s[2*kk+1][:, 0:2], s[2*kk+1][:, 2:4]], axis=1)
            for dd in range(D // 16):
                r = ldmatrix_x4(sV, [swz(kk * 16 + L % 8 + ((L // 8) & 1) * 8, dd * 16 + ((L // 8) >> 1) * 8) for L in range(32)], trans=True)
                acc[2*dd] = mma(acc[2*dd], a, r[:, 0], r[:, 1])
                acc[2*dd+1] = mma(acc[2*dd+1], a, r[:, 2], r[:, 3])
        Oref = P @ V
        for dt in range(D // 8):
            for L in range(32):
                g, t = L // 4, L % 4
                assert np.allclose(acc[dt, L, 0:2], Oref[g, dt*8+2*t:dt*8+2*t+2])
                assert np.allclose(acc[dt, L, 2:4], Oref[g+8, dt*8+2*t:dt*8+2*t+2])
    def conflicts(addrs):
        bad = 0
        for i in range(4):
            groups = {((a * 2) % 128) // 16 for a in addrs[8*i:8*i+8]}
            bad += len(groups) != 8
        return bad
    k = sum(conflicts([swz(nn*16 + L%8 + ((L//8)>>1)*8, kk*16 + ((L//8)&1)*8) for L in range(32)]) for kk in range(D//16) for nn in range(BN//16))
    v = sum(conflicts([swz(kk*16 + L%8 + ((L//8)&1)*8, dd*16 + ((L//8)>>1)*8) for L in range(32)]) for kk in range(BN//16) for dd in range(D//16))
    q = sum(conflicts([swz(w*16 + L%16, kk*16 + (L//16)*8) for L in range(32)]) for kk in range(D//16) for w in range(BM//16))
    assert (k, v, q) == (0, 0, 0), f"bank-conflicted ldmatrix phases: K {k}, V {v}, Q {q}"


@pytest.mark.parametrize("D", [64, 128])
def test_sm80_fragment_plumbing(D):
    _model(D, 64, 64, np.random.default_rng(D))


# ---- block range and mask logic of flash_fwd.cuh (causal / sliding window / split-KV) ---------------
# Copied by hand from kernels/attention/flash_params.h (flash_key_range) and flash_fwd_kernel's
# steps 1 and 5; the CPU twin walks its own copy of the block range, so this is what covers the
# CUDA kernel's need_mask shortcut and the first_key / last_key clamps. Keep in sync.
BM = BN = 64


def _key_range(row, Sq, Sk, causal, left, right):
    diag = Sk - Sq
    right = 0 if causal else right
    lo = row + diag - left if left >= 0 else 0
    hi = row + diag + right if right >= 0 else Sk - 1
    return max(lo, 0), min(hi, Sk - 1)


def _kernel_visits(Sq, Sk, causal, left, right, splits):
    """{(row, key)} the kernel lets into its softmax (unmasked), over every block and split."""
    seen = set()
    m_blocks = (Sq + BM - 1) // BM
    for mb in range(m_blocks):
        m0 = mb * BM
        rows_q = min(BM, Sq - m0)
        lo_first, hi_first = _key_range(m0, Sq, Sk, causal, left, right)
        lo_last, hi_last = _key_range(m0 + rows_q - 1, Sq, Sk, causal, left, right)
        nb_lo = lo_first // BN
        nb_hi = hi_last // BN + 1 if hi_last >= lo_first else nb_lo
        split_blocks = ((Sk + BN - 1) // BN + splits - 1) // splits
        for split in range(splits):
            nb_begin = max(nb_lo, split * split_blocks) if splits > 1 else nb_lo
            nb_end = min(nb_hi, (split + 1) * split_blocks) if splits > 1 else nb_hi
            for nb in range(nb_begin, nb_end):
                n0 = nb * BN
                need_mask = lo_last > n0 or hi_first < n0 + BN - 1
                for row in range(m0, m0 + rows_q):
                    lo, hi = _key_range(row, Sq, Sk, causal, left, right)
                    first_key = max(0, min(BN, lo - n0))
                    last_key = max(-1, min(BN, hi - n0))
                    for col in range(BN):
                        if need_mask and (col < first_key or col > last_key):
                            continue
                        assert n0 + col < Sk, "an unmasked key past Sk"
                        assert (row, n0 + col) not in seen, "a key visited twice"
                        seen.add((row, n0 + col))
    return seen


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("Sq,Sk", [(1, 300), (70, 70), (130, 77), (77, 200), (200, 65)])
def test_sm80_block_range_and_mask(Sq, Sk, splits):
    rng = np.random.default_rng(Sq * Sk + splits)
    windows = [(-1, -1), (0, 0), (5, -1), (-1, 3), (64, 0), (100, 130)] + \
        [tuple(int(x) for x in rng.integers(-1, 150, 2)) for _ in range(4)]
    for causal in (False, True):
        for left, right in windows:
            want = {(i, j) for i in range(Sq) for j in range(Sk)
                    if (left < 0 or j >= i + Sk - Sq - left)
                    and ((0 if causal else right) < 0 or j <= i + Sk - Sq + (0 if causal else right))}
            assert _kernel_visits(Sq, Sk, causal, left, right, splits) == want, (causal, left, right)
