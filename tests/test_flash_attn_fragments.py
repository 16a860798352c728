"""Lane-level model of the sm_80 attention kernel's fragment plumbing (kernels/attention/flash_fwd.cuh).

No GPU runs here, so this checks the kernel's index formulas (copied by hand from flash_fwd.cuh:
the XOR swizzle, the ldmatrix lane addresses for Q, K and V(.trans), the P -> A-fragment repack)
against a numpy model of the PTX semantics of ldmatrix.m8n8.x4 and mma.m16n8k16 (the layouts of
the PTX ISA: A a0..a3 = (g, 2t) (g+8, 2t) (g, 2t+8) (g+8, 2t+8); B b0, b1 = (2t, g) (2t+8, g);
C = (g, 2t) (g+8, 2t); ldmatrix thread L gets row L/4, columns 2(L%4).. of each 8x8 matrix).
It also checks that every ldmatrix phase is free of shared-memory bank conflicts, counts the
ldmatrix.x4 and MMA instructions a warp issues per K/V block (the ratio the 128-row tile exists
for), the epilogue's staging of o in the warp's own rows of sQ, the block range / mask logic per
tile, and the barrier placement of the K/V pipeline. Keep the formulas here in sync with the
kernel (flash_fwd_kernel<T, D, MT>: 4 warps, warp w owns rows 16 MT w .. 16 MT (w + 1) - 1, m tile mt
of it rows 16 MT w + 16 mt + (g, g + 8))."""
import numpy as np
import pytest

CH, SW = 8, 8  # FlashFwdTile::kChunk, kSwizzleRows


WARPS = 4


def _model(D, BN, MT, rng):
    BM = WARPS * 16 * MT
    WR = 16 * MT  # kWarpRows
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
    # the kernel's per-lane ldmatrix offsets (slice 0) and its XOR / add of immediates per slice
    mi = [L // 8 for L in range(32)]
    k_lane = [swz(L % 8 + (mi[L] >> 1) * 8, (mi[L] & 1) * 8) for L in range(32)]
    v_lane = [swz(L % 8 + (mi[L] & 1) * 8, (mi[L] >> 1) * 8) for L in range(32)]
    for L in range(32):
        for kk in range(D // 16):
            for nn in range(BN // 16):  # K: swz(nn*16 + L%8 + (mi>>1)*8, kk*16 + (mi&1)*8)
                assert (k_lane[L] ^ (kk * 16)) + nn * 16 * D == \
                    swz(nn * 16 + L % 8 + (mi[L] >> 1) * 8, kk * 16 + (mi[L] & 1) * 8)
        for kk in range(BN // 16):
            for dd in range(D // 16):  # V: swz(kk*16 + L%8 + (mi&1)*8, dd*16 + (mi>>1)*8)
                assert (v_lane[L] ^ (dd * 16)) + kk * 16 * D == \
                    swz(kk * 16 + L % 8 + (mi[L] & 1) * 8, dd * 16 + (mi[L] >> 1) * 8)
    for warp in range(WARPS):
        wrow = warp * WR
        q_lane = [swz(wrow + L % 16, (L // 16) * 8) for L in range(32)]
        for L in range(32):
            for kk in range(D // 16):
                for mt in range(MT):
                    assert (q_lane[L] ^ (kk * 16)) + mt * 16 * D == swz(wrow + mt * 16 + L % 16, kk * 16 + (L // 16) * 8)
        ldsm = mmas = 0
        s = np.zeros((MT, BN // 8, 32, 4))
        for kk in range(D // 16):
            qf = [ldmatrix_x4(sQ, [(q_lane[L] ^ (kk * 16)) + mt * 16 * D for L in range(32)]) for mt in range(MT)]
            ldsm += MT
            for nn in range(BN // 16):
                r = ldmatrix_x4(sK, [(k_lane[L] ^ (kk * 16)) + nn * 16 * D for L in range(32)])
                ldsm += 1
                for mt in range(MT):  # one K B-fragment feeds every m tile of the warp
                    s[mt, 2*nn] = mma(s[mt, 2*nn], qf[mt], r[:, 0], r[:, 1])
                    s[mt, 2*nn+1] = mma(s[mt, 2*nn+1], qf[mt], r[:, 2], r[:, 3])
                    mmas += 2
        Sref = Q[wrow:wrow + WR] @ K.T
        P = np.tanh(Sref)  # any elementwise function stands in for the softmax
        for mt in range(MT):
            for nt in range(BN // 8):
                for L in range(32):
                    g, t = L // 4, L % 4
                    assert np.allclose(s[mt, nt, L, 0:2], Sref[mt*16+g, nt*8+2*t:nt*8+2*t+2])
                    assert np.allclose(s[mt, nt, L, 2:4], Sref[mt*16+g+8, nt*8+2*t:nt*8+2*t+2])
        s = np.tanh(s)
        acc = np.zeros((MT, D // 8, 32, 4))
        for kk in range(BN // 16):
            a = [np.stack([s[mt, 2*kk][:, 0:2], s[mt, 2*kk][:, 2:4], s[mt, 2*kk+1][:, 0:2], s[mt, 2*kk+1][:, 2:4]], axis=1)
                 for mt in range(MT)]
            for dd in range(D // 16):
                r = ldmatrix_x4(sV, [(v_lane[L] ^ (dd * 16)) + kk * 16 * D for L in range(32)], trans=True)
                ldsm += 1
                for mt in range(MT):  # one V B-fragment feeds every m tile of the warp
                    acc[mt, 2*dd] = mma(acc[mt, 2*dd], a[mt], r[:, 0], r[:, 1])
                    acc[mt, 2*dd+1] = mma(acc[mt, 2*dd+1], a[mt], r[:, 2], r[:, 3])
                    mmas += 2
        Oref = P @ V
        for mt in range(MT):
            for dt in range(D // 8):
                for L in range(32):
                    g, t = L // 4, L % 4
                    assert np.allclose(acc[mt, dt, L, 0:2], Oref[mt*16+g, dt*8+2*t:dt*8+2*t+2])
                    assert np.allclose(acc[mt, dt, L, 2:4], Oref[mt*16+g+8, dt*8+2*t:dt*8+2*t+2])
        # per K/V block and warp: (MT + BN/16) x D/16 + BN/16 x D/16 ldmatrix.x4, MT BN D / 64 MMAs
        assert ldsm == (MT + BN // 16) * (D // 16) + (BN // 16) * (D // 16)
        assert mmas == MT * BN * D // 64
        # 8. epilogue: lane (g, t) of m tile mt stages o of rows wrow + 16 mt + g (+8), columns
        # dt * 8 + 2t (+1) at swz(row, dt * 8) + 2t of sQ; lanes then copy chunk c = lane + 32 i
        # (row wrow + c // (D/8), column (c % (D/8)) * 8): every staged element is inside the
        # warp's own rows and every chunk of them leaves exactly once.
        staged = np.full(BM * D, np.nan)
        for mt in range(MT):
            for L in range(32):
                g, t = L // 4, L % 4
                for half in range(2):
                    rloc = wrow + mt * 16 + g + half * 8
                    for dt in range(D // 8):
                        off = swz(rloc, dt * 8) + 2 * t
                        assert wrow * D <= off < (wrow + WR) * D
                        staged[off:off + 2] = acc[mt, dt, L, 2 * half:2 * half + 2]
        out = np.full((WR, D), np.nan)
        n_chunks = WR * (D // CH)
        assert n_chunks % 32 == 0
        for i in range(n_chunks // 32):
            for L in range(32):
                c = L + 32 * i
                rloc, col = wrow + c // (D // CH), (c % (D // CH)) * CH
                assert np.isnan(out[rloc - wrow, col]), "a chunk stored twice"
                out[rloc - wrow, col:col + CH] = staged[swz(rloc, col):swz(rloc, col) + CH]
        np.testing.assert_allclose(out, Oref)
        res = (ldsm, mmas)
    def conflicts(addrs):
        bad = 0
        for i in range(4):
            groups = {((a * 2) % 128) // 16 for a in addrs[8*i:8*i+8]}
            bad += len(groups) != 8
        return bad
    k = sum(conflicts([swz(nn*16 + L%8 + ((L//8)>>1)*8, kk*16 + ((L//8)&1)*8) for L in range(32)]) for kk in range(D//16) for nn in range(BN//16))
    v = sum(conflicts([swz(kk*16 + L%8 + ((L//8)&1)*8, dd*16 + ((L//8)>>1)*8) for L in range(32)]) for kk in range(BN//16) for dd in range(D//16))
    q = sum(conflicts([swz(r0 + L%16, kk*16 + (L//16)*8) for L in range(32)]) for kk in range(D//16) for r0 in range(0, BM, 16))
    assert (k, v, q) == (0, 0, 0), f"bank-conflicted ldmatrix phases: K {k}, V {v}, Q {q}"
    return res


@pytest.mark.parametrize("D,MT", [(64, 1), (128, 1), (64, 2), (128, 2)])  # the instantiated kernels
def test_sm80_fragment_plumbing(D, MT):
    BN = _tile(1000, D, 1)[1] if MT == 2 else 64
    ldsm, mmas = _model(D, BN, MT, np.random.default_rng(D + MT))
    # MMAs per ldmatrix.x4 per K/V block: 64-row tile 64/36 (D = 64), 128/72 (D = 128); the
    # 128-row tile (every K/V fragment feeds two m16 tiles) 128/40 = 3.2 (D = 64, 64 keys),
    # 128/48 = 2.7 (D = 128, 32 keys)
    want = {(64, 1): 64 / 36, (128, 1): 128 / 72, (64, 2): 128 / 40, (128, 2): 128 / 48}
    assert mmas / ldsm == pytest.approx(want[(D, MT)])


def test_load_tile_addressing():
    """load_tile: thread tid copies chunk tid % (D/8) of rows r0 + i * kRowsPerPass to dst0 +
    i * kRowsPerPass * D (= swz of that row: kRowsPerPass is a multiple of 8), zero-filling rows
    with i * kRowsPerPass >= valid - r0; every (row, chunk) of the tile exactly once."""
    threads = WARPS * 32
    for D in (64, 128):
        def swz(r, c):
            return r * D + (((c // CH) ^ (r % SW)) * CH)
        cpr = D // CH
        rpp = threads // cpr
        assert threads % cpr == 0 and rpp % SW == 0
        for rows in (64, 128):
            for valid in (0, 1, 7, 8, 9, rows - 1, rows):
                seen = {}
                for tid in range(threads):
                    r0, col = tid // cpr, (tid % cpr) * CH
                    rem = valid - r0
                    for i in range(rows // rpp):
                        r = r0 + i * rpp
                        assert swz(r0, col) + i * rpp * D == swz(r, col)
                        assert (i * rpp < rem) == (r < valid)
                        assert (r, col) not in seen
                        seen[(r, col)] = i * rpp < rem
                assert len(seen) == rows * cpr


# ---- block range and mask logic of flash_fwd.cuh (causal / sliding window / split-KV) ---------------
# Copied by hand from kernels/attention/flash_params.h (flash_key_range, flash_split_range,
# flash_fwd_tile) and flash_fwd_kernel's steps 1 and 6 (the per-thread lo_c / hi_c clamps, the
# 32-bit need_mask, first_key / last_key); the CPU twin walks its own copy of the block range,
# so this is what covers the CUDA kernel's mask shortcuts. Keep in sync.


def _key_range(row, Sq, Sk, causal, left, right):
    diag = Sk - Sq
    right = 0 if causal else right
    lo = row + diag - left if left >= 0 else 0
    hi = row + diag + right if right >= 0 else Sk - 1
    return max(lo, 0), min(hi, Sk - 1)


def _split_range(nb_lo, nb_hi, split, splits):
    n = nb_hi - nb_lo if nb_hi > nb_lo else 0
    per = (n + splits - 1) // splits
    begin = nb_lo + split * per
    return begin, min(begin + per, nb_hi)


def _tile(Sq, D, splits):  # flash_fwd_tile: (kBlockM, kBlockN, m16 tiles per warp)
    if splits > 1 or Sq <= 64:
        return 64, 64, 1
    return 128, 64 if D <= 64 else 32, 2  # flash_fwd_large_block_n


def _kernel_visits(Sq, Sk, causal, left, right, splits, D):
    """{(row, key)} the kernel lets into its softmax (unmasked), over every block and split."""
    BM, BN, MT = _tile(Sq, D, splits)
    off_max = 16 * (MT - 1) + 8
    seen = set()
    m_blocks = (Sq + BM - 1) // BM
    for mb in range(m_blocks):
        m0 = mb * BM
        rows_q = min(BM, Sq - m0)
        lo_first, hi_first = _key_range(m0, Sq, Sk, causal, left, right)
        lo_last, hi_last = _key_range(m0 + rows_q - 1, Sq, Sk, causal, left, right)
        nb_lo = lo_first // BN
        nb_hi = hi_last // BN + 1 if hi_last >= lo_first else nb_lo
        lo_max, hi_min = lo_last, max(hi_first, -1)
        for split in range(splits):
            nb_begin, nb_end = _split_range(nb_lo, nb_hi, split, splits) if splits > 1 else (nb_lo, nb_hi)
            for nb in range(nb_begin, nb_end):
                n0 = nb * BN
                assert n0 < Sk, "a block without keys"
                need_mask = lo_max > n0 or hi_min < n0 + BN - 1
                tail = min(BN, Sk - 1 - n0)
                for warp in range(WARPS):
                    for g in range(8):
                        rbase = m0 + warp * 16 * MT + g
                        rr = 0 if causal else right
                        lo_u = rbase + Sk - Sq - left if left >= 0 else -off_max - 8
                        hi_u = rbase + Sk - Sq + rr if rr >= 0 else Sk - 1
                        lo_c, hi_c = max(lo_u, -off_max - 8), max(min(hi_u, Sk - 1), -off_max - 8)
                        assert -2**31 <= lo_c < 2**31 and -2**31 <= hi_c < 2**31
                        for mt in range(MT):
                            for half in range(2):
                                off = 16 * mt + 8 * half
                                row = rbase + off
                                if row >= m0 + rows_q:
                                    continue  # a tail row: computed, never stored
                                first_key = max(0, min(BN, lo_c + off - n0))
                                last_key = max(-1, min(tail, hi_c + off - n0))
                                for t in range(4):
                                    for nt in range(BN // 8):
                                        for e in range(2):
                                            col = nt * 8 + 2 * t + e
                                            if need_mask and (col < first_key or col > last_key):
                                                continue
                                            assert n0 + col < Sk, "an unmasked key past Sk"
                                            assert (row, n0 + col) not in seen, "a key visited twice"
                                            seen.add((row, n0 + col))
    return seen


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("Sq,Sk", [(1, 300), (77, 200), (200, 65), (129, 64)])
def test_sm80_block_range_and_mask(Sq, Sk, splits, D):
    rng = np.random.default_rng(Sq * Sk + splits)
    windows = [(-1, -1), (0, 0), (5, -1), (-1, 3), (64, 0), (100, 130), (0, 400), (400, 0)] + \
        [tuple(int(x) for x in rng.integers(-1, 150, 2)) for _ in range(3)]
    for causal in (False, True):
        for left, right in windows:
            want = {(i, j) for i in range(Sq) for j in range(Sk)
                    if (left < 0 or j >= i + Sk - Sq - left)
                    and ((0 if causal else right) < 0 or j <= i + Sk - Sq + (0 if causal else right))}
            assert _kernel_visits(Sq, Sk, causal, left, right, splits, D) == want, (causal, left, right)


def _pipeline_events(nb_begin, nb_end):
    """flash_fwd_kernel's shared-memory traffic in program order (every thread runs the same
    sequence; barriers are block-wide): ('cp', buffer, block) issue of a cp.async group,
    ('wait',) cp.async.wait_group 0, ('bar',) __syncthreads, ('rd', buffer, block) ldmatrix."""
    ev = [("cp", "Q", 0)]
    if nb_begin < nb_end:
        ev.append(("cp", "K", nb_begin))
    for nb in range(nb_begin, nb_end):
        ev += [("wait",), ("bar",), ("cp", "V", nb), ("rd", "Q", 0), ("rd", "K", nb), ("wait",), ("bar",)]
        if nb + 1 < nb_end:
            ev.append(("cp", "K", nb + 1))
        ev.append(("rd", "V", nb))
    ev += [("wait",), ("bar",), ("wr", "Q", "o")]  # the epilogue stages o in the warp's Q rows
    return ev


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_sm80_pipeline_barriers(n):
    """Every ldmatrix reads the block it wants, landed (a wait and then a barrier after the
    issue, so every thread's copies are visible) and not being overwritten: no copy into that
    buffer is issued between the read and the barrier that closes the read's epoch (a thread
    that is ahead may only issue after a barrier every thread reaches after its reads)."""
    ev = _pipeline_events(3, 3 + n)
    epoch, waited = 0, True
    landed = {}     # buffer -> (block, epoch from which every thread sees it)
    pending = []    # (buffer, block, issue epoch) not yet waited
    last_read = {}  # buffer -> epoch of the latest read
    for e in ev:
        if e[0] == "cp":
            _, buf, blk = e
            # a copy issued in epoch `epoch` may land while other threads still run that epoch:
            # no thread may read `buf` in it
            assert last_read.get(buf, -1) < epoch, f"copy into {buf} races a read in epoch {epoch}"
            pending.append((buf, blk, epoch))
        elif e[0] == "wait":
            for buf, blk, _ in pending:
                landed[buf] = (blk, epoch + 1)  # visible to all after the next barrier
            pending = []
        elif e[0] == "bar":
            epoch += 1
        elif e[0] in ("rd", "wr"):
            _, buf, blk = e
            if e[0] == "rd":
                assert buf in landed and landed[buf][0] == blk and landed[buf][1] <= epoch, (e, landed.get(buf))
                assert all(p[0] != buf for p in pending), f"read of {buf} with a copy into it in flight"
            else:
                assert not pending and landed["Q"][1] <= epoch, "o staged over a Q copy in flight"
            last_read[buf] = epoch
    assert not pending
