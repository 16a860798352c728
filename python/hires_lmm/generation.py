"""Generation over a static KV cache: packed prefill, batched decode, sampling, stopping,
streaming text (cli -> lmm -> generation -> models).

    cfg = GenerationConfig.from_pretrained(ckpt_dir).updated(max_new_tokens=64, temperature=0.0)
    for event in generate_stream(llm, [embeds_a, embeds_b], cfg, tokenizer): ...
    results = generate(llm, [embeds_a, embeds_b], cfg, tokenizer)   # [Result(token_ids, text, ...)]

Exact batching: the B requests' prompt embeddings (S_b, hidden) are PACKED into one (sum S_b,
hidden) prefill (ops.flash_attn_varlen_func; positions 0..S_b-1 per sequence), their K/V written
to a static cache (B, S_max, Hkv, D); every decode step appends one token per sequence at its own
cache length (flash_attn_with_kvcache). No padding token ever enters a sequence's attention, so a
request's tokens do not depend on what it was batched with.

Sampling: temperature 0 (or do_sample False) is greedy (argmax; ties -> lowest id). Otherwise
logits / temperature, then top-k, then top-p (the smallest set of most likely tokens whose
probability reaches top_p; the most likely token always stays), then one draw per sequence from
its own torch.Generator seeded with `seed` (so a request draws the same tokens alone or batched).
Defaults come from generation_config.json (HF semantics: do_sample, temperature, top_p, top_k,
max_new_tokens, eos_token_id int or list); an explicit temperature decides do_sample
(temperature > 0), as LLaVA's scripts do. max_new_tokens defaults to 512 (VLMEvalKit's setting
for ConvLLaVA) when the file has none.

Stopping: a sequence ends at its first EOS id (not part of the text), at the first stop string
(the text is cut before it), or after max_new_tokens.

Streaming: text is detokenised incrementally by decoding the whole generated prefix and emitting
only the stable new suffix: nothing while the text ends in an incomplete UTF-8 sequence (U+FFFD),
nothing past the last whitespace (a word may still grow: SentencePiece pieces attach to the left;
CJK ideographs, written without spaces, are emitted as they come),
nothing that may be the start of a stop string; the rest is flushed when the sequence ends.

CUDA: one host synchronisation per decode step (reading the sampled tokens to decide stopping);
the decode step (embedding -> layers -> logits, K/V appended in place, lengths advanced) is
captured once in a CUDA graph over the static cache and replayed (cuda_graph=True by default; on a
capture failure it logs a warning and runs eagerly).
"""
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .models.llama import StaticKVCache

__all__ = ["GenerationConfig", "Result", "generate", "generate_stream", "sample_next",
           "IncrementalDetokenizer", "pack_deepstack"]

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0                      # 0: off
    top_p: float = 1.0                  # 1.0: off
    seed: Optional[int] = None
    eos_token_ids: Tuple[int, ...] = ()
    stop: Tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"generate: argument 'max_new_tokens' must be an int >= 1, got "
                             f"{self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"generate: argument 'temperature' must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generate: argument 'top_p' must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"generate: argument 'top_k' must be >= 0 (0: off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_pretrained(cls, path, eos_token_id: Optional[int] = None) -> "GenerationConfig":
        """From generation_config.json when present (HF field names), plus the tokenizer's EOS."""
        f = Path(os.fspath(path)) / "generation_config.json"
        d = {}
        if f.exists():
            with open(f) as fh:
                d = json.load(fh)
        eos = d.get("eos_token_id", eos_token_id)
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if eos_token_id is not None and eos_token_id not in eos:
            eos.append(eos_token_id)
        kw = dict(eos_token_ids=tuple(int(e) for e in eos),
                  do_sample=bool(d.get("do_sample", False)),
                  temperature=float(d.get("temperature", 1.0)),
                  top_k=int(d.get("top_k", 0) or 0), top_p=float(d.get("top_p", 1.0) or 1.0))
        if d.get("max_new_tokens"):
            kw["max_new_tokens"] = int(d["max_new_tokens"])
        return cls(**kw)

    def updated(self, max_new_tokens=None, temperature=None, top_p=None, top_k=None, seed=None,
                do_sample=None, stop=None, eos_token_ids=None) -> "GenerationConfig":
        """A copy with the given (non-None) fields; an explicit temperature also sets
        do_sample = temperature > 0 unless do_sample is given."""
        kw = {}
        if max_new_tokens is not None:
            kw["max_new_tokens"] = max_new_tokens
        if temperature is not None:
            kw["temperature"] = float(temperature)
            kw["do_sample"] = float(temperature) > 0
        if do_sample is not None:
            kw["do_sample"] = bool(do_sample)
        if top_p is not None:
            kw["top_p"] = float(top_p)
        if top_k is not None:
            kw["top_k"] = int(top_k)
        if seed is not None:
            kw["seed"] = int(seed)
        if stop is not None:
            kw["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        if eos_token_ids is not None:
            kw["eos_token_ids"] = tuple(eos_token_ids)
        return dataclasses.replace(self, **kw)


def sample_next(logits: torch.Tensor, cfg: GenerationConfig,
                generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,) int64 on the logits' device (no host sync)."""
    if cfg.greedy:
        return logits.argmax(-1)
    x = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= cfg.top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    probs = torch.softmax(x, dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1)[:, 0]
    return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g)[:, 0]
                      for b, g in enumerate(generators)])


class IncrementalDetokenizer:
    """Text of a growing token list, emitted only in stable pieces (see the module docstring)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: List[int] = []
        self.emitted = 0          # characters of the text already handed out
        self.text = ""
        self.stopped = False
        # Decoding works on a window (vLLM's offsets): ids[prefix:read] decoded to a known text,
        # ids[prefix:] decoded now; the difference is the new text. So a step costs O(window),
        # not O(generated), and both decodes start at the same token (the same leading space).
        self._prefix, self._read = 0, 0
        self._committed = ""      # text of ids[:read]
        self._prefix_text = ""    # text of ids[prefix:read]

    def add(self, token_id: int) -> str:
        """Append one id; returns the newly stable text ('' when nothing is stable yet). Sets
        `stopped` when a stop string appears (the text is cut before it)."""
        self.ids.append(int(token_id))
        window = self.tok.decode(self.ids[self._prefix:])
        new = window[len(self._prefix_text):] if window.startswith(self._prefix_text) else None
        if new is None:                                       # the window changed: decode all
            self._committed = self.tok.decode(self.ids)
            self._prefix, self._read, self._prefix_text = 0, len(self.ids), self._committed
            before, self.text = len(self.text), self._committed
        elif new and not new.endswith("\ufffd"):             # a clean step: commit it
            self._committed += new
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self.tok.decode(self.ids[self._prefix:self._read])
            before, self.text = len(self.text), self._committed
        else:                                                 # incomplete bytes: pending
            before, self.text = len(self.text), self._committed + new
        longest = max((len(s) for s in self.stop), default=0)
        for s in self.stop:
            at = self.text.find(s, max(0, min(before, len(self._committed)) - longest))
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped:
            return self.flush()
        stable = len(self.text)
        if self.text.endswith("\ufffd"):                     # incomplete UTF-8 bytes
            stable = self.text.rstrip("\ufffd").__len__()
        if not (stable and _is_cjk(self.text[stable - 1])):  # CJK has no spaces: emit as is
            cut = max(self.text.rfind(" ", 0, stable), self.text.rfind("\n", 0, stable))
            stable = cut + 1 if cut >= 0 else 0               # up to the last whitespace
        for s in self.stop:                                   # a stop string may be starting
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    stable = min(stable, len(self.text) - n)
                    break
        if stable <= self.emitted:
            return ""
        piece = self.text[self.emitted:stable]
        self.emitted = stable
        return piece

    def flush(self) -> str:
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece


def _is_cjk(ch: str) -> bool:
    """CJK ideographs (the ranges HF's TextStreamer uses): words are not separated by spaces."""
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


@dataclasses.dataclass
class Result:
    token_ids: List[int]            # generated ids (EOS excluded)
    text: str
    finish_reason: str              # "eos", "stop" or "length"


class _DecodeStep:
    """llm.forward_decode over the static cache, then cache.seqlens += 1; optionally one CUDA
    graph (captured at the first call)."""

    def __init__(self, llm, cache: StaticKVCache, use_graph: bool):
        self.llm, self.cache = llm, cache
        self.graph = None
        self.use_graph = use_graph
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=cache.seqlens.device)
        self.logits = None

    def _eager(self):
        logits = self.llm.forward_decode(self.tokens, self.cache)
        self.cache.seqlens.add_(1)
        return logits

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        if not self.use_graph:
            return self._eager()
        if self.graph is None:
            try:
                self._capture()
            except Exception as e:  # capture is an optimisation: never a reason to fail
                log.warning("generate: CUDA graph capture of the decode step failed (%s: %s); "
                            "running the decode steps eagerly", type(e).__name__, e)
                self.use_graph, self.graph = False, None
                return self._eager()
        self.graph.replay()
        return self.logits

    def _capture(self):
        saved = self.cache.seqlens.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):       # warm-up (allocator, lazy init) off the graph
            self._eager()
        torch.cuda.current_stream().wait_stream(s)
        self.cache.seqlens.copy_(saved)  # the warm-up's K/V rows are rewritten by the real step
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.logits = self._eager()
        self.graph = g


def pack_deepstack(deepstack, lens: Sequence[int], device):
    """DeepStack-L inputs of B requests -> the packed prefill's (visual_index, levels) or
    (None, None). deepstack: one entry per request, None (no stacks: text only) or (positions
    (Nv_b,) int64 of the request's visual rows in its own sequence, levels (n_levels, Nv_b,
    hidden)); every request with stacks has the same n_levels. Rows follow the packed token
    order (request b's rows at offset sum(lens[:b]))."""
    if deepstack is None or all(d is None for d in deepstack):
        return None, None
    n_levels = {int(d[1].shape[0]) for d in deepstack if d is not None}
    if len(n_levels) != 1:
        raise ValueError(f"generate: every request's DeepStack stacks must have the same number "
                         f"of levels, got {sorted(n_levels)}")
    offsets = [0]
    for n in lens[:-1]:
        offsets.append(offsets[-1] + int(n))
    idx, lv = [], []
    for d, off in zip(deepstack, offsets):
        if d is None:
            continue
        idx.append(d[0].to(device=device, dtype=torch.long) + off)
        lv.append(d[1].to(device))
    levels = torch.cat(lv, dim=1)
    return torch.cat(idx), list(levels.unbind(0))


@torch.inference_mode()
def generate_stream(llm, embeds: Sequence[torch.Tensor], cfg: GenerationConfig, tokenizer,
                    cuda_graph: bool = True, deepstack=None, deepstack_layers=None
                    ) -> Iterator[Tuple[int, str, Optional[Result]]]:
    """Yields (request index, new stable text, None) while generating and (index, last text,
    Result) once per request when it ends. embeds: one (S_b, hidden) tensor per request, on the
    llm's device and dtype. deepstack / deepstack_layers: DeepStack-L stacks of each request
    (pack_deepstack) injected by the prefill only (decode steps inject nothing)."""
    B = len(embeds)
    if B == 0:
        return
    dev = embeds[0].device
    lens = [int(e.shape[0]) for e in embeds]
    if min(lens) < 1:
        raise ValueError("generate: every prompt needs at least one token, got lengths "
                         f"{lens}")
    max_len = max(lens) + cfg.max_new_tokens
    cache = StaticKVCache(llm.config, B, max_len, embeds[0].dtype, dev)
    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(dev)
    index, levels = pack_deepstack(deepstack, lens, dev)
    logits = llm.forward_packed(torch.cat(list(embeds), 0), cu, max(lens), cache,
                                visual_index=index, deepstack_visual_embeds=levels,
                                deepstack_layers=deepstack_layers if levels else None)
    gens = None
    if not cfg.greedy and cfg.seed is not None:
        gens = [torch.Generator(device=dev).manual_seed(cfg.seed) for _ in range(B)]
    step = _DecodeStep(llm, cache, cuda_graph and dev.type == "cuda")
    eos = set(cfg.eos_token_ids)
    detok = [IncrementalDetokenizer(tokenizer, cfg.stop) for _ in range(B)]
    done = [False] * B
    for t in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg, gens)
        ids = nxt.tolist()                                # the one host sync of a step
        for b in range(B):
            if done[b]:
                continue
            if ids[b] in eos:
                done[b] = True
                yield b, detok[b].flush(), Result(detok[b].ids, detok[b].text, "eos")
                continue
            piece = detok[b].add(ids[b])
            if detok[b].stopped:
                done[b] = True
                yield b, piece, Result(detok[b].ids, detok[b].text, "stop")
            elif t + 1 == cfg.max_new_tokens:
                done[b] = True
                yield b, piece + detok[b].flush(), Result(detok[b].ids, detok[b].text, "length")
            elif piece:
                yield b, piece, None
        if all(done):
            break
        logits = step(nxt)


def generate(llm, embeds: Sequence[torch.Tensor], cfg: GenerationConfig, tokenizer,
             cuda_graph: bool = True, deepstack=None, deepstack_layers=None) -> List[Result]:
    """All requests to the end; one Result per request, in order."""
    out: List[Optional[Result]] = [None] * len(embeds)
    for b, _, res in generate_stream(llm, embeds, cfg, tokenizer, cuda_graph, deepstack,
                                     deepstack_layers):
        if res is not None:
            out[b] = res
    return out
