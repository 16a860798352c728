"""HiResLMM: what every whole model (lmm/<family>.py) shares: image opening, prompts, the splice
of visual rows in place of IMAGE_TOKEN_INDEX, chat() and generate().

A family subclass provides:
  - self.llm (hires_lmm.models.Llama), self.tokenizer (hires_lmm.prompt.Tokenizer),
    self.conv_template, self.generation_config, self.max_prompt_len (tokenizer_model_max_length);
  - visual_rows(image) -> (N, hidden) for one opened PIL image (preprocess -> tower -> projector),
    or encode(image, prompt_ids) -> (rows (N, hidden), stacks (n_levels, N, hidden) or None) when
    the rows depend on the prompt (SliME's selector) or come with DeepStack-L stacks; then
    self.deepstack_layers says before which decoder layers the levels are added.
"""
import logging
from typing import Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from .. import generation as _gen
from ..prompt import IMAGE_MARKER, IMAGE_TOKEN_INDEX, build_prompt, template_for_config, tokenizer_image_token

__all__ = ["HiResLMM", "open_image", "check_device"]

log = logging.getLogger(__name__)


def check_device(device, where: str) -> torch.device:
    """torch.device(device), or one clear error when it does not exist on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{where}: argument 'device' must name a device, got {device!r} ({e})") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{where}: argument 'device' is {device!r} but no CUDA device is "
                             f"visible on this machine")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{where}: argument 'device' is {device!r} but only {n} CUDA "
                             f"device(s) exist (cuda:0..cuda:{n - 1})")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"{where}: argument 'device' must be 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def open_image(image, where: str):
    """A PIL image (decoded now, RGB) from a PIL image, a path or bytes; one clear error when it
    cannot be opened or decoded."""
    from PIL import Image
    import io
    try:
        if isinstance(image, Image.Image):
            im = image
        elif isinstance(image, (bytes, bytearray)):
            im = Image.open(io.BytesIO(image))
        elif isinstance(image, str) or hasattr(image, "__fspath__"):
            im = Image.open(image)
        else:
            raise TypeError(f"expected a PIL image, a path or bytes, got {type(image).__name__}")
        im.load()                                  # decode now: a truncated file fails here
        return im.convert("RGB")
    except Exception as e:
        raise ValueError(f"{where} cannot be opened as an image: {type(e).__name__}: {e}") from None


class HiResLMM(nn.Module):
    """Base of the whole models; `HiResLMM.from_pretrained(path, ...)` picks the family from
    config.json (hires_lmm.lmm.auto)."""

    IMAGE_TOKEN_INDEX = IMAGE_TOKEN_INDEX

    @classmethod
    def from_pretrained(cls, path, vision_tower=None, dtype=None, device=None, **kw) -> "HiResLMM":
        from .auto import from_pretrained
        return from_pretrained(path, vision_tower=vision_tower, dtype=dtype, device=device, **kw)

    deepstack_layers = None          # DeepStack-L: level k is added before decoder layer [k]

    # -- to be provided by a family --
    def visual_rows(self, image) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, image, prompt_ids: Sequence[int]):
        """One opened image of a request -> (rows (N, hidden), DeepStack-L stacks (n_levels, N,
        hidden) or None)."""
        return self.visual_rows(image), None

    @property
    def device(self) -> torch.device:
        return self.llm.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.embed_tokens.weight.dtype

    # -- prompts --
    def prompt_ids(self, question: str, n_images: int, conv_template: Optional[str] = None,
                   where: str = "generate") -> List[int]:
        """The prompt's ids with IMAGE_TOKEN_INDEX where each image's rows go."""
        if not isinstance(question, str):
            raise TypeError(f"{where}: argument 'prompts' must hold str, got {type(question).__name__}")
        if not question.strip():
            raise ValueError(f"{where}: argument 'prompts' holds an empty prompt")
        template = conv_template or self.conv_template
        markers = question.count(IMAGE_MARKER)
        if markers and markers != n_images:
            raise ValueError(f"{where}: the prompt has {markers} {IMAGE_MARKER} marker(s) but "
                             f"{n_images} image(s) were given for it; give one image per marker")
        text = build_prompt(template, question, n_images)
        if text.count(IMAGE_MARKER) != n_images:
            raise ValueError(f"{where}: the prompt has {text.count(IMAGE_MARKER)} {IMAGE_MARKER} "
                             f"marker(s) but {n_images} image(s) were given for it")
        return tokenizer_image_token(text, self.tokenizer)

    def splice(self, prompt_ids: Sequence[int], rows: Sequence[torch.Tensor],
               long_prompt: str = "truncate", where: str = "generate",
               return_positions: bool = False):
        """(S, hidden) input embeddings: text ids embedded, each IMAGE_TOKEN_INDEX replaced by the
        next image's rows (LLaVA's prepare_inputs_labels_for_multimodal). Longer than
        max_prompt_len (tokenizer_model_max_length): cut to that length keeping the head, as
        LLaVA does (long_prompt="truncate", a warning is logged) or an error ("error").
        return_positions: also the (start, length) of each image's rows in the sequence."""
        emb = self.llm.embed_tokens
        dev = self.device
        parts, text, k, at, spans = [], [], 0, 0, []
        for t in list(prompt_ids) + [None]:
            if t is None or t == IMAGE_TOKEN_INDEX:
                if text:
                    parts.append(emb(torch.tensor(text, dtype=torch.long, device=dev)))
                    at += len(text)
                    text = []
                if t is not None:
                    parts.append(rows[k].to(device=dev, dtype=self.dtype))
                    spans.append((at, int(rows[k].shape[0])))
                    at += int(rows[k].shape[0])
                    k += 1
            else:
                text.append(int(t))
        x = torch.cat(parts, 0)
        limit = self.max_prompt_len
        if limit is not None and x.shape[0] > limit:
            if long_prompt == "error":
                raise ValueError(f"{where}: the prompt is {x.shape[0]} tokens with its visual rows, "
                                 f"over the limit of {limit} (tokenizer_model_max_length)")
            log.warning("%s: the prompt is %d tokens with its visual rows; cut to the first %d "
                        "(tokenizer_model_max_length), as LLaVA does", where, x.shape[0], limit)
            x = x[:limit]
        return (x, spans) if return_positions else x

    def _deepstack_entry(self, spans, stacks, n_tokens):
        """(positions, levels) of one request's DeepStack-L rows: each image's rows at its true
        positions in the spliced sequence (specs/deepstack.md 1.4; not the un-expanded
        placeholder index of the reference code), cut where a truncated sequence ends (5.14)."""
        pos, lv = [], []
        for (start, n), st in zip(spans, stacks):
            if st is None:
                continue
            keep = max(0, min(n, n_tokens - start))
            pos.append(torch.arange(start, start + keep, dtype=torch.long))
            lv.append(st[:, :keep])
        if not pos or sum(p.numel() for p in pos) == 0:
            return None
        return torch.cat(pos), torch.cat(lv, dim=1).to(self.dtype)

    def _prepare(self, images, prompts, conv_template, long_prompt, where):
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if images is None:
            images = [[] for _ in prompts]
        elif not isinstance(images, (list, tuple)):
            images = [images]
        images = list(images)
        if len(images) != len(prompts):
            raise ValueError(f"{where}: argument 'images' has {len(images)} entries but 'prompts' "
                             f"has {len(prompts)}; give one image (or a list of images) per prompt")
        if not prompts:
            raise ValueError(f"{where}: argument 'prompts' is empty")
        per_req = [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im]
                   for im in images]
        # validate everything (prompts, markers, images) before any compute on the device
        ids = [self.prompt_ids(p, len(ims), conv_template, where) for p, ims in zip(prompts, per_req)]
        opened = [[open_image(im, f"{where}: argument 'images[{i}]'" +
                              (f"[{j}]" if len(ims) > 1 else "")) for j, im in enumerate(ims)]
                  for i, ims in enumerate(per_req)]
        embeds, deepstack = [], []
        with torch.inference_mode():
            for pid, ims in zip(ids, opened):
                enc = [self.encode(im, pid) for im in ims]
                x, spans = self.splice(pid, [r for r, _ in enc], long_prompt, where,
                                       return_positions=True)
                embeds.append(x)
                deepstack.append(self._deepstack_entry(spans, [st for _, st in enc], x.shape[0]))
        return ids, embeds, deepstack

    # -- public API --
    @torch.inference_mode()
    def logits(self, images, prompts, conv_template: Optional[str] = None,
               long_prompt: str = "truncate") -> List[torch.Tensor]:
        """Prefill logits (S_b, V) of every position of each request (for parity checks)."""
        _, embeds, deepstack = self._prepare(images, prompts, conv_template, long_prompt, "logits")
        from ..models.llama import StaticKVCache
        lens = [e.shape[0] for e in embeds]
        cache = StaticKVCache(self.llm.config, len(embeds), max(lens), self.dtype, self.device)
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).to(self.device)
        index, levels = _gen.pack_deepstack(deepstack, lens, self.device)
        out = self.llm.forward_packed(torch.cat(embeds, 0), cu, max(lens), cache, last_only=False,
                                      visual_index=index, deepstack_visual_embeds=levels,
                                      deepstack_layers=self.deepstack_layers if levels else None)
        return list(out.split(lens, 0))

    def generate(self, images, prompts, max_new_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, top_p: Optional[float] = None,
                 top_k: Optional[int] = None, seed: Optional[int] = None,
                 do_sample: Optional[bool] = None, stop=None, conv_template: Optional[str] = None,
                 long_prompt: str = "truncate", cuda_graph: bool = True) -> List[dict]:
        """Answer a batch of requests (one image, or a list of images, per prompt; prompts of any
        lengths). Returns one dict per request: text, token_ids (generated, EOS excluded),
        prompt_ids (IMAGE_TOKEN_INDEX = -200 where the image rows go), finish_reason
        ("eos" | "stop" | "length"). Defaults from generation_config.json; temperature 0 is greedy."""
        cfg, ids, embeds, deepstack = self._setup(images, prompts, dict(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, do_sample=do_sample, stop=stop), conv_template, long_prompt, "generate")
        res = _gen.generate(self.llm, embeds, cfg, self.tokenizer, cuda_graph=cuda_graph,
                            deepstack=deepstack, deepstack_layers=self.deepstack_layers)
        return [{"text": r.text, "token_ids": r.token_ids, "prompt_ids": list(p),
                 "finish_reason": r.finish_reason} for r, p in zip(res, ids)]

    def _setup(self, images, prompts, kw, conv_template, long_prompt, where):
        if long_prompt not in ("truncate", "error"):
            raise ValueError(f"{where}: argument 'long_prompt' must be 'truncate' or 'error', got "
                             f"{long_prompt!r}")
        kw = {k: v for k, v in kw.items() if v is not None}
        cfg = self.generation_config.updated(**kw)
        ids, embeds, deepstack = self._prepare(images, prompts, conv_template, long_prompt, where)
        limit = self.llm.config.max_position_embeddings
        longest = max(e.shape[0] for e in embeds)
        if longest >= limit:
            raise ValueError(f"{where}: a prompt is {longest} tokens with its visual rows; the model "
                             f"has max_position_embeddings={limit} positions")
        if longest + cfg.max_new_tokens > limit:
            if "max_new_tokens" in kw:
                raise ValueError(f"{where}: a prompt of {longest} tokens plus max_new_tokens="
                                 f"{cfg.max_new_tokens} exceeds max_position_embeddings={limit}")
            cfg = cfg.updated(max_new_tokens=max(1, limit - longest))
        return cfg, ids, embeds, deepstack

    def chat(self, image, question: str, stream: bool = False, **gen) -> Union[str, Iterator[str]]:
        """One image (or None, or a list of images) and one question -> the answer text, or with
        stream=True an iterator of text pieces (never a broken UTF-8 character or a half word).
        **gen: max_new_tokens, temperature, top_p, top_k, seed, do_sample, stop, conv_template,
        long_prompt, cuda_graph."""
        if not stream:
            return self.generate([image], [question], **gen)[0]["text"]
        conv_template = gen.pop("conv_template", None)
        long_prompt = gen.pop("long_prompt", "truncate")
        cuda_graph = gen.pop("cuda_graph", True)
        # everything is checked and the image encoded now, not at the first next()
        cfg, _, embeds, deepstack = self._setup([image], [question], gen, conv_template,
                                                long_prompt, "chat")
        return self._stream(cfg, embeds, cuda_graph, deepstack)

    def _stream(self, cfg, embeds, cuda_graph, deepstack=None):
        for _, piece, _ in _gen.generate_stream(self.llm, embeds, cfg, self.tokenizer, cuda_graph,
                                                deepstack, self.deepstack_layers):
            if piece:
                yield piece


def release_device_memory(dev: torch.device) -> None:
    """After a failed load (the caller has dropped its references): hand what the half-built
    model held on a CUDA device back to the driver."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def finish_load(model: "HiResLMM", path, config_dict: dict, tokenizer, conv_template: Optional[str]):
    """The last step of every family's from_pretrained: the tokenizer, the conversation template
    (the checkpoint's unless one is given), generation_config.json's defaults, eval mode."""
    model.tokenizer = tokenizer
    model.conv_template = conv_template or template_for_config(config_dict, tokenizer)
    model.generation_config = _gen.GenerationConfig.from_pretrained(path, tokenizer.eos_token_id)
    return model.eval()
