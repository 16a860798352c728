"""Prompts, tokenizers and the <image> splice of LLaVA-style models (cli -> lmm -> prompt).

    tok = Tokenizer.from_pretrained("ConvLLaVA-sft-1536")       # tokenizer.model or tokenizer.json
    text = build_prompt("vicuna_v1", "What is the total?", n_images=1)
    ids = tokenizer_image_token(text, tok)                      # -200 where an image's rows go

Tokenization goes through `sentencepiece` (tokenizer.model: Vicuna / Llama-2, which LLaVA loads
as the slow LlamaTokenizer, use_fast=False) or `tokenizers` (tokenizer.json: Llama-3), never by
hand. The ids equal LLaVA's `mm_utils.tokenizer_image_token` (specs/convllava.md 3.3): the prompt
is split on "<image>", every chunk is tokenized with the special tokens the tokenizer adds (BOS),
the first chunk's BOS is kept once and the other chunks' BOS dropped, and IMAGE_TOKEN_INDEX
(-200) is put between the chunks. The model later replaces each -200 by that image's visual rows
(576 for ConvLLaVA-1536), in raster order.

Conversation templates (LLaVA `conversation.py`; specs/convllava.md 3.3, slime.md 4), one turn:
  vicuna_v1: "<system> USER: <image>\\n{question} ASSISTANT:"   (SeparatorStyle.TWO, sep " ",
             sep2 "</s>"; the tokenizer adds BOS)
  llama3:    "<|start_header_id|>user<|end_header_id|>\\n\\n<image>\\n{question}<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\\n\\n"   (no system prompt; BOS added
             by the tokenizer)
  raw:       the text as given (the caller writes the whole prompt, <image> markers included).
The <image> marker goes in front of the question, followed by a newline, as LLaVA's
preprocess_multimodal / eval scripts put it, unless the question already holds markers.
"""
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["IMAGE_TOKEN_INDEX", "IMAGE_MARKER", "TEMPLATES", "Tokenizer", "build_prompt",
           "tokenizer_image_token", "template_for_config"]

log = logging.getLogger(__name__)

IMAGE_TOKEN_INDEX = -200          # llava/constants.py
IMAGE_MARKER = "<image>"          # DEFAULT_IMAGE_TOKEN

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# name -> (builder of the one-turn prompt, extra stop strings the template's turn end implies)
TEMPLATES = ("vicuna_v1", "llama3", "raw")


def build_prompt(template: str, question: str, n_images: int = 1) -> str:
    """One user turn (with `n_images` <image> markers in front unless the question holds markers)
    and the open assistant turn, as LLaVA's conversation templates write them."""
    if template not in TEMPLATES:
        raise ValueError(f"build_prompt: argument 'template' must be one of {list(TEMPLATES)}, "
                         f"got {template!r}")
    if not isinstance(question, str):
        raise TypeError(f"build_prompt: argument 'question' must be a str, got "
                        f"{type(question).__name__}")
    if template == "raw":
        return question
    if IMAGE_MARKER not in question and n_images > 0:
        question = (IMAGE_MARKER + "\n") * n_images + question
    if template == "vicuna_v1":
        # SeparatorStyle.TWO: system + sep, then "ROLE: msg" + seps[i % 2], and "ROLE:" when open
        return f"{VICUNA_SYSTEM} USER: {question} ASSISTANT:"
    return (f"<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
            f"<|start_header_id|>assistant<|end_header_id|>\n\n")


def template_for_config(config: dict, tokenizer: "Tokenizer") -> str:
    """The template of a checkpoint: an explicit `conv_template` / `version` field of config.json
    when it names one of ours, else llama3 when the vocabulary has <|eot_id|>, else vicuna_v1
    (ConvLLaVA, LLaVA-1.5 and SliME-7B/13B are trained with --version v1)."""
    for field in ("conv_template", "conv_mode", "version"):
        v = config.get(field)
        if isinstance(v, str):
            v = {"v1": "vicuna_v1", "llava_v1": "vicuna_v1", "llama_3": "llama3"}.get(v, v)
            if v in TEMPLATES:
                return v
    if tokenizer.token_to_id("<|eot_id|>") is not None:
        return "llama3"
    return "vicuna_v1"


def _token_content(v) -> Optional[str]:
    if v is None:
        return None
    if isinstance(v, dict):
        return v.get("content")
    return str(v)


class Tokenizer:
    """A checkpoint's tokenizer: sentencepiece (tokenizer.model, preferred as LLaVA loads the
    slow tokenizer) or tokenizers (tokenizer.json). Special tokens from tokenizer_config.json and
    special_tokens_map.json."""

    def __init__(self, backend: str, impl, bos_token: Optional[str], eos_token: Optional[str],
                 add_bos: bool, add_eos: bool, special: Dict[str, int], path: str):
        self.backend, self._impl, self.path = backend, impl, path
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos, self.add_eos = add_bos, add_eos
        self._special = special                       # text -> id of every special token
        self.bos_token_id = special.get(bos_token) if bos_token else None
        self.eos_token_id = special.get(eos_token) if eos_token else None
        self.all_special_ids = set(special.values())

    # -- loading --
    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        p = Path(os.fspath(path))
        cfg = _read_json(p / "tokenizer_config.json")
        smap = _read_json(p / "special_tokens_map.json")
        names = {}
        for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
            names[k] = _token_content(smap.get(k, cfg.get(k)))
        added = {int(i): _token_content(t) for i, t in (cfg.get("added_tokens_decoder") or {}).items()}
        if (p / "tokenizer.model").exists():
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor(model_file=str(p / "tokenizer.model"))
            backend, impl = "sentencepiece", sp
            special = {}
            for sid in (sp.bos_id(), sp.eos_id(), sp.unk_id()):
                if sid >= 0:
                    special[sp.id_to_piece(sid)] = sid
            for n in names.values():
                if n is not None:
                    i = sp.piece_to_id(n)
                    if i != sp.unk_id() or n == sp.id_to_piece(sp.unk_id()):
                        special[n] = i
            for i, t in added.items():
                if t is not None and i < sp.get_piece_size() and sp.id_to_piece(i) == t:
                    special[t] = i
            bos = names["bos_token"] or (sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None)
            eos = names["eos_token"] or (sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None)
            add_bos = bool(cfg.get("add_bos_token", True))
        elif (p / "tokenizer.json").exists():
            from tokenizers import Tokenizer as _HFTok
            tk = _HFTok.from_file(str(p / "tokenizer.json"))
            backend, impl = "tokenizers", tk
            special = {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}
            for i, t in added.items():
                if t is not None:
                    special.setdefault(t, i)
            bos, eos = names["bos_token"], names["eos_token"]
            # Llama-3's tokenizer.json adds BOS in its post-processor; Llama-2 style configs say
            # add_bos_token. Whether encode(add_special_tokens=True) adds BOS is read, not guessed.
            add_bos = bool(cfg.get("add_bos_token", False))
        else:
            raise FileNotFoundError(f"Tokenizer.from_pretrained: argument 'path' ({p}) has neither "
                                    f"tokenizer.model (sentencepiece) nor tokenizer.json (tokenizers)")
        return cls(backend, impl, bos, eos, add_bos, bool(cfg.get("add_eos_token", False)), special,
                   str(p))

    # -- encode / decode --
    def token_to_id(self, token: str) -> Optional[int]:
        if token in self._special:
            return self._special[token]
        if self.backend == "sentencepiece":
            i = self._impl.piece_to_id(token)
            return None if i == self._impl.unk_id() and token != self._impl.id_to_piece(i) else i
        return self._impl.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return (self._impl.get_piece_size() if self.backend == "sentencepiece"
                else self._impl.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of `text`, with BOS (and EOS when the config says so) like HF's
        `tokenizer(text).input_ids`. Special-token strings inside the text (e.g. "</s>" of an
        earlier turn) become their ids, as HF's added-token splitting does."""
        if self.backend == "tokenizers":
            ids = self._impl.encode(text, add_special_tokens=add_special_tokens).ids
            if add_special_tokens and self.add_bos and self.bos_token_id is not None and \
                    (not ids or ids[0] != self.bos_token_id):
                ids = [self.bos_token_id] + ids
            return list(ids)
        ids: List[int] = []
        for piece, sid in self._split_special(text):
            if sid is not None:
                ids.append(sid)
            elif piece:
                ids.extend(self._impl.encode(piece))
        if add_special_tokens:
            if self.add_bos and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self.add_eos and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def _split_special(self, text: str):
        """[(piece, None) | (special text, id)] in order."""
        out, i, start = [], 0, 0
        specials = sorted(self._special, key=len, reverse=True)
        while i < len(text):
            hit = next((s for s in specials if s and text.startswith(s, i)), None)
            if hit is None:
                i += 1
                continue
            out.append((text[start:i], None))
            out.append((hit, self._special[hit]))
            i += len(hit)
            start = i
        out.append((text[start:], None))
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        if self.backend == "sentencepiece":
            return self._impl.decode(ids)
        return self._impl.decode(ids, skip_special_tokens=skip_special_tokens)


def tokenizer_image_token(prompt: str, tokenizer: Tokenizer,
                          image_token_index: int = IMAGE_TOKEN_INDEX) -> List[int]:
    """LLaVA's mm_utils.tokenizer_image_token: split on <image>, tokenize every chunk (with BOS),
    keep one leading BOS, and put `image_token_index` between the chunks."""
    chunks = [tokenizer.encode(c) for c in prompt.split(IMAGE_MARKER)]
    ids: List[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    sep = [image_token_index] * (offset + 1)
    for i, c in enumerate(chunks):
        if i > 0:
            ids.extend(sep[offset:])
        ids.extend(c[offset:])
    return ids


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path) as fh:
        return json.load(fh)
