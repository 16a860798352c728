"""Numpy model of the fragment index logic of kernels/attention/flash_bwd.cuh (the sm_80 attention
backward, which cannot run on this machine): shared-memory swizzle, ldmatrix (.x4, .trans), the
mma.sync m16n8k16 fragment layouts, the kSubM slicing, the C->A fragment reuse of P^T / dS^T, the
dS^T round trip through shared memory and the dQ atomics, per warp and per lane, exactly as the
kernel indexes them. fp32 throughout (no rounding to T): the check is that every element lands
where the formula says, against a direct numpy backward of one K/V block. The formulas are copied
by hand from the kernel; keep them in sync."""
import math

import numpy as np
import pytest

BM = BN = 64
LANES = np.arange(32)
G, T = LANES // 4, LANES % 4
E2 = np.arange(2)


def bswz(row, col, krow):
    row, col = np.asarray(row), np.asarray(col)
    return row * krow + (((col >> 3) ^ (row & 7)) << 3)


def ldsm(tile, addrs, trans=False):
    """ldmatrix.x4: lane l gives the address of row l % 8 of matrix l // 8; returns regs (4, 32, 2)."""
    rows = tile[np.asarray(addrs)[:, None] + np.arange(8)]  # (32, 8)
    mats = rows.reshape(4, 8, 8)
    if trans:
        return np.stack([mats[i][2 * T[:, None] + E2, G[:, None]] for i in range(4)])
    return np.stack([mats[i][G[:, None], 2 * T[:, None] + E2] for i in range(4)])


def mma(c, a, b0, b1):
    """c (32, 4) += A (16x16 from a (4, 32, 2)) @ B (16x8 from b0, b1 (32, 2))."""
    A = np.zeros((16, 16))
    A[G[:, None], 2 * T[:, None] + E2] = a[0]
    A[G[:, None] + 8, 2 * T[:, None] + E2] = a[1]
    A[G[:, None], 2 * T[:, None] + 8 + E2] = a[2]
    A[G[:, None] + 8, 2 * T[:, None] + 8 + E2] = a[3]
    B = np.zeros((16, 8))
    B[2 * T[:, None] + E2, G[:, None]] = b0
    B[2 * T[:, None] + 8 + E2, G[:, None]] = b1
    C = np.zeros((16, 8))
    C[G[:, None], 2 * T[:, None] + E2] = c[:, 0:2]
    C[G[:, None] + 8, 2 * T[:, None] + E2] = c[:, 2:4]
    C += A @ B
    c[:, 0:2] = C[G[:, None], 2 * T[:, None] + E2]
    c[:, 2:4] = C[G[:, None] + 8, 2 * T[:, None] + E2]


def store_tile(rows, krow):
    """A (<=64, krow) block into a swizzled 64 x krow tile (zero-filled tail), as load64."""
    tile = np.zeros(64 * krow)
    for r in range(64):
        for col in range(0, krow, 8):
            o = int(bswz(r, col, krow))
            tile[o:o + 8] = rows[r, col:col + 8] if r < rows.shape[0] else 0.0
    return tile


def key_range(row, Sq, Sk, causal, left, right):
    diag = Sk - Sq
    right = 0 if causal else right
    lo = row + diag - left if left >= 0 else 0
    hi = row + diag + right if right >= 0 else Sk - 1
    return max(lo, 0), min(hi, Sk - 1)


def emulate_block(q, k, v, do, lse, dsum, n0, scale, causal, left, right, softcap, D):
    """One thread block (one K/V block of one kv head; q/do/lse/dsum of one query head): returns
    (dk, dv) of its keys and the dq_accum it adds (Sq, D)."""
    Sq, Sk = q.shape[0], k.shape[0]
    keys = min(BN, Sk - n0)
    sK, sV = store_tile(k[n0:n0 + keys], D), store_tile(v[n0:n0 + keys], D)
    ksub = 16 if D >= 128 else 32
    dk = [np.zeros((D // 8, 32, 4)) for _ in range(4)]
    dv = [np.zeros((D // 8, 32, 4)) for _ in range(4)]
    dq = np.zeros((Sq, D))
    mi = LANES // 8
    for m0 in range(0, Sq, BM):
        rows = min(BM, Sq - m0)
        f = key_range(m0, Sq, Sk, causal, left, right)
        l_ = key_range(m0 + rows - 1, Sq, Sk, causal, left, right)
        if l_[1] < n0 or f[0] > n0 + keys - 1:
            continue
        sQ, sdO = store_tile(q[m0:m0 + rows], D), store_tile(do[m0:m0 + rows], D)
        sLse, sDs = np.zeros(BM), np.zeros(BM)
        sLo, sHi = np.ones(BM, int), np.zeros(BM, int)
        for r in range(rows):
            lo, hi = key_range(m0 + r, Sq, Sk, causal, left, right)
            sLo[r] = max(0, min(BN, lo - n0))
            sHi[r] = max(-1, min(keys - 1, hi - n0))
            if lse[m0 + r] == -np.inf:
                sHi[r] = sLo[r] - 1
            sLse[r] = 0.0 if lse[m0 + r] == -np.inf else lse[m0 + r]
            sDs[r] = dsum[m0 + r]
        sdS = np.zeros(BN * BM)
        for warp in range(4):
            kw = warp * 16
            for mo in range(0, BM, ksub):
                st = np.zeros((ksub // 8, 32, 4))
                dpt = np.zeros((ksub // 8, 32, 4))
                for kk in range(D // 16):
                    ka = ldsm(sK, bswz(kw + LANES % 16, kk * 16 + (LANES // 16) * 8, D))
                    va = ldsm(sV, bswz(kw + LANES % 16, kk * 16 + (LANES // 16) * 8, D))
                    for nn in range(ksub // 16):
                        a = bswz(mo + nn * 16 + LANES % 8 + (mi >> 1) * 8, kk * 16 + (mi & 1) * 8, D)
                        r = ldsm(sQ, a)
                        mma(st[2 * nn], ka, r[0], r[1])
                        mma(st[2 * nn + 1], ka, r[2], r[3])
                        r = ldsm(sdO, a)
                        mma(dpt[2 * nn], va, r[0], r[1])
                        mma(dpt[2 * nn + 1], va, r[2], r[3])
                for nt in range(ksub // 8):
                    for e in range(4):
                        key = kw + G + 8 * (e >> 1)
                        row = mo + nt * 8 + 2 * T + (e & 1)
                        x = st[nt][:, e]
                        if softcap:
                            c = np.tanh(x * scale / softcap)
                            x = c * softcap
                        else:
                            x = x * scale
                        vis = (key >= sLo[row]) & (key <= sHi[row])
                        pr = np.where(vis, np.exp(x - sLse[row]), 0.0)
                        ds = pr * (dpt[nt][:, e] - sDs[row])
                        if softcap:
                            ds = ds * (1 - c * c)
                        st[nt][:, e] = pr
                        dpt[nt][:, e] = np.where(vis, ds * scale, 0.0)
                for kk in range(ksub // 16):
                    pa = np.stack([st[2 * kk][:, 0:2], st[2 * kk][:, 2:4], st[2 * kk + 1][:, 0:2], st[2 * kk + 1][:, 2:4]])
                    sa = np.stack([dpt[2 * kk][:, 0:2], dpt[2 * kk][:, 2:4], dpt[2 * kk + 1][:, 0:2],
                                   dpt[2 * kk + 1][:, 2:4]])
                    c0 = mo + kk * 16
                    for reg, (dr, dc) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
                        o = bswz(kw + G + dr, c0 + dc, BM) + 2 * T
                        sdS[o[:, None] + E2] = sa[reg]
                    for dd in range(D // 16):
                        a = bswz(c0 + LANES % 8 + (mi & 1) * 8, dd * 16 + (mi >> 1) * 8, D)
                        r = ldsm(sdO, a, trans=True)
                        mma(dv[warp][2 * dd], pa, r[0], r[1])
                        mma(dv[warp][2 * dd + 1], pa, r[2], r[3])
                        r = ldsm(sQ, a, trans=True)
                        mma(dk[warp][2 * dd], sa, r[0], r[1])
                        mma(dk[warp][2 * dd + 1], sa, r[2], r[3])
        # __syncthreads; dQ rows 16 warp.. += dS K
        for warp in range(4):
            qr = warp * 16
            for dd in range(D // 16):
                acc = [np.zeros((32, 4)), np.zeros((32, 4))]
                for kk in range(BN // 16):
                    a = ldsm(sdS, bswz(kk * 16 + LANES % 8 + (mi >> 1) * 8, qr + (mi & 1) * 8, BM), trans=True)
                    r = ldsm(sK, bswz(kk * 16 + LANES % 8 + (mi & 1) * 8, dd * 16 + (mi >> 1) * 8, D), trans=True)
                    mma(acc[0], a, r[0], r[1])
                    mma(acc[1], a, r[2], r[3])
                for half in range(2):
                    for lane in range(32):
                        row = qr + G[lane] + 8 * half
                        if row >= rows:
                            continue
                        col = dd * 16 + 2 * T[lane]
                        dq[m0 + row, col:col + 2] += acc[0][lane, 2 * half:2 * half + 2]
                        dq[m0 + row, col + 8:col + 10] += acc[1][lane, 2 * half:2 * half + 2]
    out_k, out_v = np.zeros((keys, D)), np.zeros((keys, D))
    for warp in range(4):
        for half in range(2):
            for lane in range(32):
                key = warp * 16 + G[lane] + 8 * half
                if key >= keys:
                    continue
                for dt in range(D // 8):
                    col = dt * 8 + 2 * T[lane]
                    out_k[key, col:col + 2] = dk[warp][dt][lane, 2 * half:2 * half + 2]
                    out_v[key, col:col + 2] = dv[warp][dt][lane, 2 * half:2 * half + 2]
    return out_k, out_v, dq


def direct(q, k, v, do, n0, scale, causal, left, right, softcap):
    """The backward restricted to keys n0 .. n0 + 63: (dk, dv of those keys, their dq share),
    plus lse and D computed from the full forward."""
    Sq, Sk = q.shape[0], k.shape[0]
    x = q @ k.T
    if softcap:
        c = np.tanh(x * scale / softcap)
        s = c * softcap
    else:
        s = x * scale
    vis = np.zeros((Sq, Sk), bool)
    for i in range(Sq):
        lo, hi = key_range(i, Sq, Sk, causal, left, right)
        vis[i, lo:hi + 1] = lo <= hi
    sm = np.where(vis, s, -np.inf)
    mx = sm.max(1, keepdims=True)
    has = np.isfinite(mx)
    e = np.where(vis, np.exp(sm - np.where(has, mx, 0)), 0.0)
    lsum = e.sum(1, keepdims=True)
    lse = np.where(has, np.log(np.where(has, lsum, 1)) + np.where(has, mx, 0), -np.inf)[:, 0]
    p = np.where(has, e / np.where(has, lsum, 1), 0.0)
    o = p @ v
    dsum = (do * o).sum(1)
    dp = do @ v.T
    ds = p * (dp - dsum[:, None])
    if softcap:
        ds = ds * (1 - c * c)
    ds *= scale
    sl = slice(n0, min(n0 + BN, Sk))
    return ds[:, sl].T @ q, p[:, sl].T @ do, ds[:, sl] @ k[sl], lse, dsum


# (Sq, Sk, D, causal, (left, right), softcap)
CASES = [
    (100, 80, 64, True, (-1, -1), 0.0),    # two Q blocks (tail), K tail block, causal
    (70, 130, 128, False, (40, 10), 0.0),  # D=128 (kSubM 16), window on both sides
    (90, 70, 64, False, (-1, -1), 3.0),    # softcap, Sq > Sk
    (40, 100, 128, True, (-1, -1), 2.0),   # causal + softcap at D=128
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-d{c[2]}-c{int(c[3])}-w{c[4][0]}_{c[4][1]}-cap{c[5]}")
def test_flash_bwd_kernel_fragment_model(case):
    Sq, Sk, D, causal, (left, right), softcap = case
    rng = np.random.default_rng(Sq + Sk + D)
    q, k, v, do = (rng.standard_normal(s) for s in ((Sq, D), (Sk, D), (Sk, D), (Sq, D)))
    scale = 1.0 / math.sqrt(D)
    for n0 in range(0, Sk, BN):
        dk_ref, dv_ref, dq_ref, lse, dsum = direct(q, k, v, do, n0, scale, causal, left, right, softcap)
        dk, dv, dq = emulate_block(q, k, v, do, lse, dsum, n0, scale, causal, left, right, softcap, D)
        np.testing.assert_allclose(dk, dk_ref, atol=1e-9, rtol=1e-7)
        np.testing.assert_allclose(dv, dv_ref, atol=1e-9, rtol=1e-7)
        np.testing.assert_allclose(dq, dq_ref, atol=1e-9, rtol=1e-7)
