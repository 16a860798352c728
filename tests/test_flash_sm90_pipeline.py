"""A discrete-event model of the sm_90a attention kernel's pipeline (kernels/attention/flash_fwd_sm90.cuh),
which has never run on a GPU: the producer thread, the 8 consumer warps (2 warpgroups x 4), the
mbarriers with their phases and transaction bytes, the named barriers of the ping-pong, the TMA
loads landing at random times and the asynchronous wgmma groups completing at random times.
Every actor runs the kernel's sequence of operations, written out below op for op (keep in sync
with the kernel). A random scheduler interleaves them, many times, for block counts 0..9.

It asserts what nobody can observe on this machine:
- no deadlock (some actor or async event can always make progress until all have finished);
- a warp issues a GEMM on a stage only when the block it expects has landed there, and TMA
  overwrites a stage only when no incomplete GEMM reads it and both warpgroups have consumed
  the previous block in it (no overwrite before read);
- registers an asynchronous wgmma writes (S, O) or reads (packed P) are not touched before the
  wgmma_wait that covers it;
- every mbarrier arrival and named-barrier arrival lands in the phase its author means (no
  pile-up of arrivals into a phase that is still open), and no named barrier is left with an open
  phase at the end;
- the output computed from the tiles read out of the modelled shared memory, with the kernel's
  softmax (scale folded into the exponent FFMA, O rescaled one block late), matches the fp64
  reference: the numerics of the new order.
"""
import math
import random

import numpy as np
import pytest

BM, BN, WG_ROWS, STAGES = 128, 128, 64, 2
SCHED_BAR, EPI_BAR = 3, 1
LOG2E = 1.4426950408889634


def n_blocks_of(mb, Sq, Sk, causal):
    """flash_fwd_sm90_kernel: K/V blocks visited by query block mb."""
    m0 = mb * BM
    diag = Sk - Sq
    n_end = max(0, min(Sk, m0 + BM + diag)) if causal else Sk
    return (n_end + BN - 1) // BN


class Deadlock(AssertionError):
    pass


class MBarrier:
    """mbarrier: expected arrival count, pending arrivals and tx bytes of the current phase."""

    def __init__(self, name, count):
        self.name, self.count, self.pending, self.tx, self.phase = name, count, count, 0, 0

    def arrive(self, intended_phase, tx=0):
        assert self.phase == intended_phase, f"{self.name}: arrival meant for phase {intended_phase} in phase {self.phase}"
        self.tx += tx
        self.pending -= 1
        assert self.pending >= 0
        self._maybe_complete()

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        assert self.tx >= 0, f"{self.name}: more bytes than expected"
        self._maybe_complete()

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def try_wait(self, parity):
        """try_wait.parity: true once the phase with this parity has completed (the current
        phase's parity differs)."""
        return (self.phase & 1) != parity


class NamedBarrier:
    def __init__(self, bid, nthreads):
        self.id, self.n, self.count, self.gen = bid, nthreads, 0, 0

    def arrive(self, intended_gen):
        assert self.gen == intended_gen, f"bar {self.id}: arrival meant for phase {intended_gen} in phase {self.gen}"
        self.count += 32
        assert self.count <= self.n
        if self.count == self.n:
            self.count = 0
            self.gen += 1


def bf16_round(x):
    """float32 -> bf16 (round to nearest even) -> float32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def round_t(x, dtype):
    return x.astype(np.float16).astype(np.float32) if dtype == "fp16" else bf16_round(x)


def exp2_ffma(s, c, neg_m):
    """exp2(fma(s, c, -m)) in fp32: the product and sum in fp64 (exact product of two fp32), one
    rounding to fp32, as the FFMA."""
    arg = (s.astype(np.float64) * np.float64(c) + np.float64(neg_m)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.exp2(arg.astype(np.float64)).astype(np.float32)


class CTA:
    """One thread block: (query block mb, one head). q (Sq, D), k/v (Sk, D) already rounded to T."""

    def __init__(self, q, k, v, mb, causal, scale, dtype, rng, variant=None):
        self.variant = variant  # a deliberately broken protocol (test_model_catches_broken_protocols)
        self.q, self.k, self.v, self.mb, self.causal, self.dtype, self.rng = q, k, v, mb, causal, dtype, rng
        self.Sq, self.Sk, self.D = q.shape[0], k.shape[0], q.shape[1]
        self.scale_log2 = np.float32(np.float32(scale) * np.float32(LOG2E))
        self.n = n_blocks_of(mb, self.Sq, self.Sk, causal)
        self.m0 = mb * BM
        self.bar_q = MBarrier("bar_q", 1)
        self.full_k = [MBarrier(f"full_k{s}", 1) for s in range(STAGES)]
        self.full_v = [MBarrier(f"full_v{s}", 1) for s in range(STAGES)]
        self.empty_k = [MBarrier(f"empty_k{s}", 8) for s in range(STAGES)]
        self.empty_v = [MBarrier(f"empty_v{s}", 8) for s in range(STAGES)]
        self.named = {SCHED_BAR + w: NamedBarrier(SCHED_BAR + w, 256) for w in range(2)}
        self.named.update({EPI_BAR + w: NamedBarrier(EPI_BAR + w, 128) for w in range(2)})
        self.named_uses = {}  # (bar id, warp) -> participations so far
        # shared memory: stage -> (block, data) or None; Q tile
        self.smem = {("K", s): None for s in range(STAGES)}
        self.smem.update({("V", s): None for s in range(STAGES)})
        self.sq = None
        self.consumed = {}  # (tensor, block) -> warpgroups whose GEMM on it completed
        self.tma = []  # pending loads: (tensor, stage, block, barrier)
        self.groups = {0: [], 1: []}  # per warpgroup: commit groups in order
        self.warp_state = {}
        self.out = np.zeros((BM, self.D), np.float32)
        self.lse = np.zeros(BM, np.float32)

    # ---- async engines ------------------------------------------------------------------------
    def tile(self, src, block):
        rows = src[block * BN: (block + 1) * BN]
        t = np.zeros((BN, self.D), np.float32)  # TMA zero-fills rows past the end
        t[: rows.shape[0]] = rows
        return t

    def land_tma(self, i):
        tensor, stage, block, bar = self.tma.pop(i)
        if tensor == "Q":
            rows = self.q[self.m0: self.m0 + BM]
            self.sq = np.zeros((BM, self.D), np.float32)
            self.sq[: rows.shape[0]] = rows
            bar.complete_tx(1)
            return
        for w in (0, 1):  # no incomplete GEMM of either warpgroup reads this stage
            for g in self.groups[w]:
                assert (tensor, stage) not in g["reads"], f"TMA overwrites {tensor} stage {stage} under a GEMM"
        old = self.smem[(tensor, stage)]
        if old is not None:
            assert self.consumed.get((tensor, old[0]), set()) == {0, 1}, \
                f"{tensor}{old[0]} overwritten before both warpgroups consumed it"
        src = self.k if tensor == "K" else self.v
        self.smem[(tensor, stage)] = (block, self.tile(src, block))
        bar.complete_tx(1)

    def complete_group(self, w):
        g = self.groups[w].pop(0)
        assert g["issued"] == {0, 1, 2, 3}
        for (tensor, stage), block in g["reads"].items():
            got = self.smem[(tensor, stage)]
            assert got is not None and got[0] == block, f"{tensor} stage {stage} holds {got and got[0]}, GEMM wants {block}"
            data = got[1]
            for warp in range(4):
                st = self.warp_state[(w, warp)]
                if tensor == "K":
                    rows = self.sq[w * WG_ROWS + 16 * warp: w * WG_ROWS + 16 * warp + 16]
                    st["sc"] = (rows.astype(np.float64) @ data.T.astype(np.float64)).astype(np.float32)
                    st["busy_sc"] = False
                else:
                    st["acc"] = (st["acc"].astype(np.float64) +
                                 st["pa"].astype(np.float64) @ data.astype(np.float64)).astype(np.float32)
                    st["busy_acc"] = st["busy_pa"] = False
            self.consumed.setdefault((tensor, block), set()).add(w)

    # ---- the roles, op for op as in the kernel ----------------------------------------------
    def producer(self):
        S = STAGES
        yield ("run", lambda: (self.bar_q.arrive(0, tx=1), self.tma.append(("Q", 0, 0, self.bar_q))))

        def load(tensor, j):
            full = (self.full_k if tensor == "K" else self.full_v)[j % S]
            empty = (self.empty_k if tensor == "K" else self.empty_v)[j % S]
            yield ("wait", lambda: empty.try_wait(((j // S) & 1) ^ 1))
            yield ("run", lambda: (full.arrive(j // S, tx=1), self.tma.append((tensor, j % S, j, full))))

        if self.n > 0:
            yield from load("K", 0)
        for j in range(self.n):
            if j + 1 < self.n:
                yield from load("K", j + 1)
            yield from load("V", j)

    def consumer(self, w, warp):
        S, n = STAGES, self.n
        st = {"acc": np.zeros((16, self.D), np.float32), "sc": np.zeros((16, BN), np.float32),
              "pa": None, "m": np.full(16, -np.inf, np.float32), "l": np.zeros(16, np.float32),
              "alpha": np.zeros(16, np.float32), "busy_sc": False, "busy_acc": False, "busy_pa": False}
        self.warp_state[(w, warp)] = st
        me = (w, warp)

        def named(bid, sync):
            k = self.named_uses.get((bid, me), 0)
            self.named_uses[(bid, me)] = k + 1
            bar = self.named[bid]
            yield ("run", lambda: bar.arrive(k))
            if sync:
                yield ("wait", lambda: bar.gen > k)

        def sched_sync():
            yield from named(SCHED_BAR + w, True)

        def sched_arrive():
            yield from named(SCHED_BAR + 1 - w, False)

        def issue(tensor, stage, block):
            def op():
                got = self.smem[(tensor, stage)]
                assert got is not None and got[0] == block, f"warp {me} issues on {tensor}{block} before it landed"
                if tensor == "K":
                    assert not st["busy_sc"]
                    st["busy_sc"] = True
                else:
                    assert not st["busy_acc"] and not st["busy_pa"]
                    st["busy_acc"] = st["busy_pa"] = True
                gs = self.groups[w]
                # this warp's k-th commit joins the warpgroup's k-th group
                k = st.setdefault("commits", 0)
                st["commits"] = k + 1
                base = self.group_base.setdefault(w, 0)
                idx = k - base
                while len(gs) <= idx:
                    gs.append({"issued": set(), "reads": {}, "seq": base + len(gs)})
                g = gs[idx]
                assert g["reads"].get((tensor, stage), block) == block
                g["reads"][(tensor, stage)] = block
                g["issued"].add(warp)
            yield ("run", op)

        def wgmma_wait(N):
            def done():
                committed = st.get("commits", 0)
                pending = [g for g in self.groups[w] if g["seq"] < committed]
                return len(pending) <= N
            yield ("wait", done)

        def mbar_arrive(bar, phase):  # lane 0 of every warp
            yield ("run", lambda: bar.arrive(phase))

        def softmax(i):
            def op():
                assert not st["busy_sc"], f"warp {me}: softmax reads S before its wgmma completed"
                n0 = i * BN
                need_mask = (n0 + BN > self.Sk) or (self.causal and n0 + BN - 1 > self.m0 + self.Sk - self.Sq)
                rows = self.m0 + w * WG_ROWS + 16 * warp + np.arange(16)
                last_abs = np.minimum(rows + self.Sk - self.Sq, self.Sk - 1) if self.causal else np.full(16, self.Sk - 1)
                last_key = np.clip(last_abs - n0, -1, BN)
                x = st["sc"].copy()
                if need_mask:
                    x[np.arange(BN)[None, :] > last_key[:, None]] = -np.inf
                mx = x.max(axis=1)
                with np.errstate(invalid="ignore"):
                    m_new = np.fmax(st["m"], (mx * self.scale_log2).astype(np.float32))
                m_use = np.where(m_new == -np.inf, np.float32(0), m_new).astype(np.float32)
                with np.errstate(invalid="ignore"):
                    alpha = np.exp2((st["m"] - m_use).astype(np.float64)).astype(np.float32)
                pe = np.stack([exp2_ffma(x[r], self.scale_log2, -m_use[r]) for r in range(16)])
                st["alpha"], st["m"] = alpha, m_new
                st["l"] = (st["l"] * alpha + pe.sum(axis=1, dtype=np.float32)).astype(np.float32)
                st["sc"] = pe
            yield ("run", op)

        def pack_p():
            def op():
                assert not st["busy_pa"], f"warp {me}: P overwritten under the P.V reading it"
                st["pa"] = round_t(st["sc"], self.dtype)
            yield ("run", op)

        def rescale_o():
            def op():
                assert not st["busy_acc"], f"warp {me}: O rescaled under a P.V"
                st["acc"] = (st["acc"] * st["alpha"][:, None]).astype(np.float32)
            yield ("run", op)

        def wait_mbar(bar, parity):
            yield ("wait", lambda: bar.try_wait(parity))

        bad = self.variant
        yield from wait_mbar(self.bar_q, 0)
        if n > 0:
            if w == 1 and bad != "no_first_turn":
                yield from sched_arrive()
            yield from wait_mbar(self.full_k[0], 0)
            yield from sched_sync()
            yield from issue("K", 0, 0)
            if not (w == 1 and n == 1) or bad == "arrive_after_last":
                yield from sched_arrive()
            yield from wgmma_wait(0)
            yield from mbar_arrive(self.empty_k[0], 0)
            yield from softmax(0)
            yield from pack_p()
            for i in range(1, n):
                s, sp = i % S, (i - 1) % S
                yield from wait_mbar(self.full_k[s], (i // S) & 1)
                yield from sched_sync()
                yield from issue("K", s, i)
                if bad == "release_k_at_issue":
                    yield from mbar_arrive(self.empty_k[s], i // S)
                yield from rescale_o()
                yield from wait_mbar(self.full_v[sp], ((i - 1) // S) & 1)
                yield from issue("V", sp, i - 1)
                if not (w == 1 and i == n - 1) or bad == "arrive_after_last":
                    yield from sched_arrive()
                if bad == "softmax_before_wait":
                    yield from softmax(i)
                yield from wgmma_wait(1)
                if bad != "release_k_at_issue":
                    yield from mbar_arrive(self.empty_k[s], i // S)
                if bad != "softmax_before_wait":
                    yield from softmax(i)
                if bad == "release_v_before_wait":
                    yield from mbar_arrive(self.empty_v[sp], (i - 1) // S)
                if bad == "pack_before_wait":  # what ptxas made of the loop without the anchor
                    yield from pack_p()
                yield from wgmma_wait(0)
                if bad != "release_v_before_wait":
                    yield from mbar_arrive(self.empty_v[sp], (i - 1) // S)
                if bad != "pack_before_wait":
                    yield from pack_p()
            last = n - 1
            yield from rescale_o()
            yield from wait_mbar(self.full_v[last % S], (last // S) & 1)
            yield from issue("V", last % S, last)
            yield from wgmma_wait(0)
            yield from mbar_arrive(self.empty_v[last % S], last // S)
        yield from named(EPI_BAR + w, True)

        def epilogue():
            assert not st["busy_acc"]
            r0 = w * WG_ROWS + 16 * warp
            for r in range(16):
                row = self.m0 + r0 + r
                if row >= self.Sq:
                    continue
                m, l = st["m"][r], st["l"][r]
                last = min(row + self.Sk - self.Sq, self.Sk - 1) if self.causal else self.Sk - 1
                has_keys = last >= 0
                if l > 0:  # flash_finish_row
                    inv, lse = 1.0 / l, (m + math.log2(l)) * math.log(2)
                elif l == 0:
                    inv, lse = (math.nan if has_keys else 0.0), -math.inf
                else:
                    inv, lse = math.nan, math.nan
                self.out[r0 + r] = st["acc"][r] * inv if l > 0 else inv
                self.lse[r0 + r] = lse
        yield ("run", epilogue)

    # ---- scheduler ----------------------------------------------------------------------------
    def run(self):
        self.group_base = {}
        self.p_event = self.rng.choice([0.02, 0.1, 0.3, 0.7])
        actors = {"producer": self.producer()}
        for w in (0, 1):
            for warp in range(4):
                actors[(w, warp)] = self.consumer(w, warp)
        current = {name: next(gen) for name, gen in actors.items()}
        steps = 0
        while current or self.tma or any(self.groups[w] for w in (0, 1)):
            steps += 1
            assert steps < 200000
            ready = [("actor", name) for name, op in current.items() if op[0] == "run" or op[1]()]
            events = [("tma", i) for i in range(len(self.tma))]
            for w in (0, 1):
                if self.groups[w] and self.groups[w][0]["issued"] == {0, 1, 2, 3}:
                    events.append(("mma", w))
            if not ready and not events:
                raise Deadlock(f"deadlock: waiting {sorted(map(str, current))}, n={self.n}")
            # slow or fast memory and tensor cores: async events get a schedule-dependent share
            choices = events if events and (not ready or self.rng.random() < self.p_event) else ready
            kind, what = choices[self.rng.randrange(len(choices))]
            if kind == "tma":
                self.land_tma(what)
            elif kind == "mma":
                seq = self.groups[what][0]["seq"]
                self.complete_group(what)
                self.group_base[what] = seq + 1
            else:
                op = current[what]
                if op[0] == "run":
                    op[1]()
                try:
                    current[what] = next(actors[what])
                except StopIteration:
                    del current[what]
        for bar in self.named.values():
            assert bar.count == 0, f"named barrier {bar.id} left with {bar.count} arrivals"
        return self.out, self.lse


def reference(q, k, v, causal, scale):
    Sq, Sk = q.shape[0], k.shape[0]
    s = (q.astype(np.float64) @ k.T.astype(np.float64)) * scale
    if causal:
        mask = np.arange(Sk)[None, :] > (np.arange(Sq)[:, None] + Sk - Sq)
        s[mask] = -np.inf
    m = s.max(axis=1, keepdims=True)
    ok = np.isfinite(m[:, 0])
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    l = p.sum(axis=1, keepdims=True)
    o = np.where(ok[:, None], (p @ v.astype(np.float64)) / np.where(l > 0, l, 1), 0.0)
    with np.errstate(divide="ignore"):
        lse = np.where(ok, (m[:, 0] + np.log(np.where(l[:, 0] > 0, l[:, 0], 1))), -np.inf)
    return o, lse


def run_attention(Sq, Sk, causal, dtype, seed, D=64, scale=None):
    rng = np.random.default_rng(seed)
    q, k, v = (round_t(rng.standard_normal((n, D)).astype(np.float32), dtype) for n in (Sq, Sk, Sk))
    scale = D ** -0.5 if scale is None else scale
    out = np.zeros((Sq, D), np.float32)
    lse = np.zeros(Sq, np.float32)
    visits = []
    for mb in range((Sq + BM - 1) // BM):
        cta = CTA(q, k, v, mb, causal, scale, dtype, random.Random(seed * 1000 + mb))
        o, l = cta.run()
        rows = min(BM, Sq - mb * BM)
        out[mb * BM: mb * BM + rows] = o[:rows]
        lse[mb * BM: mb * BM + rows] = l[:rows]
        visits.append(cta.n)
    return q, k, v, out, lse, visits


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (77, 129), (130, 300), (200, 1100), (300, 45), (128, 1024)])
def test_pipeline_protocol_and_numerics(Sq, Sk, causal, dtype):
    """Random interleavings of the producer, the 8 consumer warps, TMA landings and wgmma
    completions: no deadlock or hazard (asserted inside), and the output matches fp64."""
    q, k, v, out, lse, visits = run_attention(Sq, Sk, causal, dtype, seed=Sq * 7 + Sk + causal)
    ref, ref_lse = reference(q, k, v, causal, q.shape[1] ** -0.5)
    tol = 4e-3 if dtype == "fp16" else 2e-2  # P rounded to T for the P.V product
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=1e-4, rtol=1e-5)
    assert (lse[~fin] == -np.inf).all() and (out[~fin] == 0).all()
    if causal and Sq > Sk:
        assert 0 in visits  # a query block above the diagonal: no main loop at all


@pytest.mark.parametrize("n_target", range(0, 10))
def test_every_block_count_many_interleavings(n_target):
    """Block counts 0..9 (ring wrap-arounds with odd and even counts), 6 schedules each."""
    # n = 0: a causal query block above the diagonal (Sq > Sk), whose rows see no key
    Sq, Sk, causal = (64, n_target * BN - 5, False) if n_target > 0 else (300, 5, True)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        q, k, v = (round_t(rng.standard_normal((n, 64)).astype(np.float32), "bf16") for n in (Sq, Sk, Sk))
        cta = CTA(q, k, v, 0, causal, 0.125, "bf16", random.Random(seed + 100 * n_target))
        assert cta.n == n_target
        out, _ = cta.run()
        if n_target > 0:
            ref, _ = reference(q, k, v, False, 0.125)
            np.testing.assert_allclose(out[:Sq], ref, atol=2e-2, rtol=2e-2)
        else:
            assert (out == 0).all()


@pytest.mark.parametrize("variant,match", [
    ("arrive_after_last", "left with"),           # warpgroup 1 does not skip its last arrive
    ("no_first_turn", "deadlock"),                # warpgroup 1 never hands warpgroup 0 the first turn
    ("release_k_at_issue", "overwrite|holds|before"),  # K stage freed before S_j completed
    ("release_v_before_wait", "overwrite|holds|before"),  # V stage freed before P.V completed
    ("softmax_before_wait", "softmax reads S"),    # wait<1> missing
    ("pack_before_wait", "P overwritten"),         # wait<0> after the pack of P_j
])
def test_model_catches_broken_protocols(variant, match):
    """The model can fail: each deliberately broken variant of the kernel's protocol is caught in
    at least one of a few schedules."""
    rng = np.random.default_rng(0)
    q, k, v = (round_t(rng.standard_normal((n, 64)).astype(np.float32), "bf16") for n in (64, 900, 900))
    caught = []
    for seed in range(12):
        cta = CTA(q, k, v, 0, False, 0.125, "bf16", random.Random(seed), variant=variant)
        try:
            cta.run()
        except AssertionError as e:
            caught.append(str(e))
    assert caught, f"variant {variant} was not caught"
    import re
    assert any(re.search(match, c) for c in caught), caught[:3]


def test_scale_fold_max_and_exponent():
    """The fold's claims in fp32: for c > 0 the running max c * max(s) equals max(c * s) bit for
    bit (rounding is monotonic), and exp2(fma(s, c, -m)) differs from the sm_80 kernel's
    exp2(round(s c) - m) only by the one rounding the FFMA saves (relative 2^-22 here)."""
    rng = np.random.default_rng(5)
    for c in (np.float32(0.125 * LOG2E), np.float32(0.0883883 * LOG2E), np.float32(3.7e-3), np.float32(41.0)):
        s = (rng.standard_normal((200, 128)) * 30).astype(np.float32)
        np.testing.assert_array_equal((s.max(axis=1) * c).astype(np.float32), (s * c).astype(np.float32).max(axis=1))
        m = (s * c).astype(np.float32).max(axis=1)
        folded = np.stack([exp2_ffma(s[r], c, -m[r]) for r in range(200)])
        two_step = np.exp2((((s * c).astype(np.float32) - m[:, None]).astype(np.float32)).astype(np.float64))
        # at most exp2(half an ulp of m): the max element's exponent is fma's rounding residual
        assert (folded <= np.exp2(np.spacing(np.abs(m)).astype(np.float64))[:, None] * (1 + 2 ** -22)).all()
        np.testing.assert_allclose(folded, two_step, rtol=2 ** -22 * max(1.0, float(np.abs(s * c).max())), atol=1e-30)
