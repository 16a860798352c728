"""DeepStack-L, DeepStack-L-HD and DeepStack-V end to end (hires_lmm.load -> logits / generate /
chat) on small random checkpoints in the released layout (config.json "model_type":
"deepstack_llama", sharded safetensors + index with model.mm_projector.* (and model.image_newline
for HD), a SentencePiece Vicuna tokenizer, the CLIP tower in its own folder as
mm_vision_tower names it), against a pipeline composed here from Hugging Face pieces:
CLIPImageProcessor on the views of DS-MMU's process_anyres_image, CLIPVisionModel
hidden_states[-2][:, 1:], Linear / GELU / Linear, the stacks built with the spec's loops
(specs/deepstack.md 1.2), LLaVA's splice, LlamaForCausalLM(inputs_embeds=...) with forward
pre-hooks adding stack k at the image's rows before decoder layer start + k * interval (1.3)."""
import json
import os

import pytest
import torch

import hires_lmm
from lmm_test_utils import (SYSTEM, _train_tokenizer, _write_safetensors_shards,
                            _write_tokenizer_files)

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
from PIL import Image  # noqa: E402

PATCH = 56                      # tiny CLIP: 56 px views, 14 px patches -> 4 x 4 = 16 rows a view
P = PATCH // 14
H, D_CLIP, LAYERS = 64, 32, 6


def _llm_cfg(vocab):
    return dict(vocab_size=vocab, hidden_size=H, intermediate_size=96, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rms_norm_eps=1e-5)


def _config(vocab, **extra):
    d = {"architectures": ["DeepstackLlamaForCausalLM"], "model_type": "deepstack_llama",
         **_llm_cfg(vocab), "rope_theta": 10000.0, "hidden_act": "silu",
         "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1,
         "eos_token_id": 2, "pad_token_id": 0,
         "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
         "mm_hidden_size": D_CLIP, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
         "mm_patch_merge_type": "flat", "image_aspect_ratio": "deepstack", "num_crops": 4,
         "tokenizer_model_max_length": 1500, "tokenizer_padding_side": "right",
         "use_mm_proj": True}
    d.update(extra)
    return d


# ---- the reference, from the spec and HF pieces -------------------------------------------------
def _select_best(size, cands):
    W, Hh = size
    best, be, bw = None, 0, float("inf")
    for cw, ch in cands:
        s = min(cw / W, ch / Hh)
        eff = min(int(W * s) * int(Hh * s), W * Hh)
        waste = cw * ch - eff
        if eff > be or (eff == be and waste < bw):
            best, be, bw = (cw, ch), eff, waste
    return best


def _divide(im, p):
    w, h = im.size
    return [im.crop((x, y, x + p, y + p)) for y in range(0, h, p) for x in range(0, w, p)]


def ref_views(image, num_crops=4, hd=False, square=False):
    """DS-MMU process_anyres_image (num_crops, no grid_pinpoints) with CLIPImageProcessor."""
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": PATCH},
                                           crop_size={"height": PATCH, "width": PATCH})
    cands = [(i * PATCH, j * PATCH) for i in range(1, num_crops + 1)
             for j in range(1, num_crops // i + 1) if not i == j == 1]
    best = _select_best(image.size, cands)
    if square:
        s = int(num_crops ** 0.5)
        best = (s * PATCH, s * PATCH)
    grid = (best[0] // PATCH, best[1] // PATCH)
    views = [image.resize((PATCH, PATCH))] + _divide(image.resize(best), PATCH)
    if hd:
        up = int(num_crops ** 0.5)
        big = _divide(image.resize([x * up for x in best]), PATCH)
        idx = torch.arange(up * up * grid[0] * grid[1]).view(grid[1], up, grid[0], up)
        big = [big[i] for i in idx.permute(0, 2, 1, 3).flatten().tolist()]
        views += _divide(image.resize((PATCH * up, PATCH * up)), PATCH) + big
    px = torch.stack([proc(v, return_tensors="pt")["pixel_values"][0] for v in views])
    return px, grid


def ref_grids(feat, grid, newline):
    """DS-ARCH process_image_grids."""
    base, x = feat[0], feat[1:]
    gw, gh = grid
    x = x.view(gh, gw, P, P, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    x = torch.cat([x, newline[:, None, None].expand(*x.shape[:-1], 1)], dim=-1)
    return torch.cat([base, x.flatten(1, 2).transpose(0, 1)], dim=0)


class Ref:
    def __init__(self, clip, proj, llm, sp, newline=None):
        self.clip, self.proj, self.llm, self.sp, self.newline = clip, proj, llm, sp, newline

    def prompt_ids(self, q, n_images=1):
        prompt = f"{SYSTEM} USER: " + "<image>\n" * n_images + f"{q} ASSISTANT:"
        chunks = [[1] + self.sp.encode(c) for c in prompt.split("<image>")]
        ids = [1]
        for i, c in enumerate(chunks):
            if i:
                ids.append(-200)
            ids.extend(c[1:])
        return ids

    @torch.no_grad()
    def encode(self, image, num_crops=4, hd=False):
        px, (gw, gh) = ref_views(image, num_crops, hd)
        px = px.to(next(self.clip.parameters()).dtype)
        f = self.proj(self.clip(px, output_hidden_states=True).hidden_states[-2][:, 1:])
        if not hd:
            M = f[1:].view(gh, gw, P, P, -1).permute(0, 2, 1, 3, 4).flatten(0, 1).flatten(1, 2)
            st = [M[i::gh, j::gw] for i in range(gh) for j in range(gw)]
            st = torch.stack(st).flatten(1, 2)
            st = torch.cat([st, st.new_zeros(num_crops - len(st), *st.shape[1:])])
            return f[0], st
        n = gw * gh + 1
        up = int(num_crops ** 0.5)
        glob = ref_grids(f[:n], (gw, gh), self.newline)
        loc = f[n:].view(n, up, up, P, P, -1).permute(0, 1, 3, 2, 4, 5).flatten(1, 2).flatten(2, 3)
        loc = loc.reshape(-1, P, up, P, up, loc.shape[-1]).permute(2, 4, 0, 1, 3, 5).flatten(0, 1).flatten(2, 3)
        return glob, torch.stack([ref_grids(x, (gw, gh), self.newline) for x in loc])

    @torch.no_grad()
    def embeds(self, images, q, start=1, interval=1, hd=False):
        """-> (inputs_embeds (1, S, H), {layer: (positions, stack rows)})."""
        ids = self.prompt_ids(q, len(images))
        emb = self.llm.get_input_embeddings()
        parts, text, adds, at, k = [], [], {}, 0, 0
        for t in ids + [None]:
            if t is None or t == -200:
                if text:
                    parts.append(emb(torch.tensor(text)))
                    at += len(text)
                    text = []
                if t is not None:
                    rows, st = self.encode(images[k], hd=hd)
                    k += 1
                    parts.append(rows)
                    for lv in range(st.shape[0]):
                        layer = start + lv * interval
                        if layer < LAYERS:
                            adds.setdefault(layer, []).append((at, st[lv]))
                    at += rows.shape[0]
            else:
                text.append(t)
        return torch.cat(parts)[None], adds

    def _hooks(self, adds, state):
        hs = []
        for layer, items in adds.items():
            def pre(mod, args, kwargs, items=items):
                if not state["on"]:
                    return None
                x = args[0] if args else kwargs["hidden_states"]
                x = x.clone()
                for at, rows in items:
                    x[0, at:at + rows.shape[0]] += rows
                if args:
                    return (x,) + tuple(args[1:]), kwargs
                kwargs["hidden_states"] = x
                return args, kwargs
            hs.append(self.llm.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True))
        return hs

    @torch.no_grad()
    def logits(self, images, q, **kw):
        e, adds = self.embeds(images, q, **kw)
        hs = self._hooks(adds, {"on": True})
        try:
            return self.llm(inputs_embeds=e).logits[0]
        finally:
            for h in hs:
                h.remove()

    @torch.no_grad()
    def greedy(self, images, q, n, **kw):
        from lmm_test_utils import _CACHE_KW
        e, adds = self.embeds(images, q, **kw)
        state = {"on": True}
        hs = self._hooks(adds, state)
        try:
            out = self.llm(inputs_embeds=e, use_cache=True)
            state["on"] = False                       # decode steps inject nothing
            past, toks = out.past_key_values, []
            for _ in range(n):
                t = int(out.logits[0, -1].argmax())
                toks.append(t)
                out = self.llm(input_ids=torch.tensor([[t]]), use_cache=True, **{_CACHE_KW: past})
                past = out.past_key_values
            return toks
        finally:
            for h in hs:
                h.remove()


def _rand_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepstack")
    tokdir = str(root / "tok")
    _train_tokenizer(tokdir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tokdir, "tokenizer.model"))
    vocab = sp.get_piece_size()
    clip = _rand_(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=D_CLIP, intermediate_size=48, num_hidden_layers=6, num_attention_heads=2,
        image_size=PATCH, patch_size=14)), 1).eval()
    tower = root / "clip-vit-tiny"
    clip.save_pretrained(str(tower), safe_serialization=True)
    torch.manual_seed(2)
    proj = torch.nn.Sequential(torch.nn.Linear(D_CLIP, H), torch.nn.GELU(), torch.nn.Linear(H, H)).eval()
    llm = _rand_(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_llm_cfg(vocab), attn_implementation="eager")), 3).eval()
    newline = torch.randn(H, generator=torch.Generator().manual_seed(4)) * 0.5
    sd = {**llm.state_dict(), **{f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}}
    dirs = {}
    for name, extra, keys in (
            ("deepstack-l", {}, {}),
            ("deepstack-l-hd", {"is_anyres_deepstack": True, "deepstack_start_id": 0,
                                "deepstack_interval": 2}, {"model.image_newline": newline}),
            ("deepstack-v", {"deepstack_args_for_ablation": "deepstack_vit+lsvit_start_layer_1"}, {})):
        d = root / name
        d.mkdir()
        _write_safetensors_shards(str(d), {**sd, **keys})
        with open(d / "config.json", "w") as fh:
            json.dump(_config(vocab, **extra), fh)
        with open(os.path.join(tokdir, "tokenizer.model"), "rb") as src, open(d / "tokenizer.model", "wb") as dst:
            dst.write(src.read())
        _write_tokenizer_files(str(d))
        dirs[name] = str(d)
    g = torch.Generator().manual_seed(5)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
              for w, h in ((150, 90), (64, 64), (97, 200))]
    return Ref(clip, proj, llm, sp, newline), dirs, str(tower), images


@pytest.fixture(scope="module")
def model_l(world):
    return hires_lmm.load(world[1]["deepstack-l"], vision_tower=world[2])


@pytest.fixture(scope="module")
def model_hd(world):
    return hires_lmm.load(world[1]["deepstack-l-hd"], vision_tower=world[2])


def _close(got, want, tol=1e-4):
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), err


# ---- loading and the schedule ------------------------------------------------------------------
def test_family_and_schedule(world, model_l, model_hd):
    assert type(model_l).__name__ == "DeepStackVL" and model_l.conv_template == "vicuna_v1"
    assert model_l.deepstack_layers == [1, 2, 3, 4]               # start 1, interval 1 (1.3)
    assert model_hd.deepstack_layers == [0, 2, 4]                 # start 0, interval 2; 6 >= L
    assert model_hd.image_newline is not None


def test_missing_tower(world):
    with pytest.raises(ValueError, match=r"mm_vision_tower is 'openai/clip-vit-large-patch14-336'"
                                         r".*vision_tower="):
        hires_lmm.load(world[1]["deepstack-l"])


@pytest.mark.parametrize("size", [(150, 90), (64, 64), (97, 200), (400, 60), (60, 300), (2000, 1000)])
def test_best_grid(size):
    from hires_lmm.lmm.deepstack_vl import best_grid
    for patch in (PATCH, 336):
        cands = [(i * patch, j * patch) for i in range(1, 5) for j in range(1, 4 // i + 1)
                 if not i == j == 1]
        b = _select_best(size, cands)
        assert best_grid(*size, 4, patch) == (b[0] // patch, b[1] // patch)
    assert best_grid(400, 60, 4, PATCH) == (4, 1) and best_grid(60, 300, 4, PATCH) == (1, 4)


# ---- numerics against the composed HF pipeline ---------------------------------------------------
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_logits_match_hf(world, model_l, backend):
    ref, _, _, images = world
    q = "What is the total amount?"
    want = ref.logits([images[0]], q)
    with hires_lmm.use_backend(backend):
        got = model_l.logits([images[0]], [q])[0]
    _close(got, want)
    # the stacks matter: without them the logits are clearly different
    e, _ = ref.embeds([images[0]], q)
    with torch.no_grad():
        plain = ref.llm(inputs_embeds=e).logits[0]
    assert (plain - want).abs().max() > 1e-2


def test_bf16_logits_within_tolerance(world):
    """bf16: the error against the fp32 HF pipeline is at most twice that of the same HF pipeline
    run in bf16 (the flash-attn convention), plus a small floor."""
    import copy
    ref, dirs, tower, images = world
    m = hires_lmm.load(dirs["deepstack-l"], vision_tower=tower, dtype="bf16")
    q = "What is the total amount?"
    want = ref.logits([images[0]], q)
    r16 = Ref(copy.deepcopy(ref.clip).bfloat16(), copy.deepcopy(ref.proj).bfloat16(),
              copy.deepcopy(ref.llm).bfloat16(), ref.sp)
    hf16 = r16.logits([images[0]], q).float()
    got = m.logits([images[0]], [q])[0].float()
    scale = want.abs().max().item()
    err_ours, err_hf = (got - want).abs().max().item(), (hf16 - want).abs().max().item()
    assert err_ours <= 2 * err_hf + 1e-2 * scale, (err_ours, err_hf, scale)


def test_two_images_rows_at_their_true_positions(world, model_l):
    """The second image is not first in its sample: its stacks go to its own rows (1.4)."""
    ref, _, _, images = world
    q = "Compare the two pictures."
    want = ref.logits([images[2], images[1]], q)
    got = model_l.logits([[images[2], images[1]]], [q])[0]
    _close(got, want)


def test_hd_logits_match_hf(world, model_hd):
    ref, _, _, images = world
    q = "Describe the chart."
    for im in (images[0], images[2]):
        want = ref.logits([im], q, start=0, interval=2, hd=True)
        got = model_hd.logits([im], [q])[0]
        _close(got, want)
    # an HD image's rows: base view + rows * P * (cols * P + 1) (a newline column); 150x90 -> 2x2
    got = model_hd.logits([images[0]], [q])[0]
    assert got.shape[0] == len(ref.prompt_ids(q)) - 1 + P * P + 2 * P * (2 * P + 1)


def test_deepstack_v_matches_tower_path(world):
    """DeepStack-V: no LLM stacks; the global rows come from ClipVisionTower.forward_deepstack_v
    with the 2x2 crops (its own tests compare it with HF); here the whole model is checked
    against that tower path + projector + HF Llama."""
    ref, dirs, tower, images = world
    m = hires_lmm.load(dirs["deepstack-v"], vision_tower=tower)
    assert m.deepstack_layers is None and m.config.vit_start_layer == 1
    q = "What is it?"
    px, _ = ref_views(images[0], square=True)
    with torch.no_grad():
        rows = ref.proj(m.vision_tower.forward_deepstack_v(px[:1], px[1:], grid=(2, 2),
                                                           deepstack_start=1))[0]
        ids = ref.prompt_ids(q)
        at = ids.index(-200)
        emb = ref.llm.get_input_embeddings()
        e = torch.cat([emb(torch.tensor(ids[:at])), rows, emb(torch.tensor(ids[at + 1:]))])[None]
        want = ref.llm(inputs_embeds=e).logits[0]
    _close(m.logits([images[0]], [q])[0], want)


def test_greedy_16_steps_match_hf(world, model_l):
    ref, _, _, images = world
    q = "Describe the chart."
    want = ref.greedy([images[2]], q, 16)
    out = model_l.generate([images[2]], [q], max_new_tokens=16, temperature=0)[0]
    got = out["token_ids"]
    assert got == want[:len(got)]
    assert len(got) == 16 or (out["finish_reason"] == "eos" and want[len(got)] == 2)


def test_hd_greedy_16_steps_match_hf(world, model_hd):
    ref, _, _, images = world
    q = "What colour is the cat?"
    want = ref.greedy([images[1]], q, 16, start=0, interval=2, hd=True)
    out = model_hd.generate([images[1]], [q], max_new_tokens=16, temperature=0)[0]
    got = out["token_ids"]
    assert got == want[:len(got)]
    assert len(got) == 16 or (out["finish_reason"] == "eos" and want[len(got)] == 2)


# ---- batching: exact, text-only requests mixed in ------------------------------------------------
@pytest.mark.parametrize("which", ["l", "hd"])
def test_batch_equals_each_alone(world, model_l, model_hd, which):
    m = model_l if which == "l" else model_hd
    images = world[3]
    reqs = [(images[0], "Hi?"), (None, "What is the total amount on the invoice? One number."),
            ([images[2], images[1]], "Compare them."), (images[1], "Describe the chart.")]
    if which == "hd":                     # long HD sequences: fewer requests and steps on CPU
        reqs = [reqs[1], reqs[3]]
    kw = dict(max_new_tokens=8 if which == "l" else 4, temperature=0)
    batch = m.generate([r[0] for r in reqs], [r[1] for r in reqs], **kw)
    alone = [m.generate([im], [q], **kw)[0] for im, q in reqs]
    assert batch == alone
    if which == "hd":
        return
    # and the prefill logits of every request equal its own
    lb = m.logits([r[0] for r in reqs], [r[1] for r in reqs])
    for (im, q), got in zip(reqs, lb):
        assert torch.equal(got, m.logits([im], [q])[0])


def test_stream_and_chat(world, model_l):
    images = world[3]
    kw = dict(max_new_tokens=10, temperature=0)
    pieces = list(model_l.chat(images[0], "Describe the chart.", stream=True, **kw))
    assert "".join(pieces) == model_l.chat(images[0], "Describe the chart.", **kw)


def test_cli_json(world, model_l, tmp_path):
    import contextlib
    import io
    from hires_lmm.lmm import cli_generate
    _, dirs, tower, images = world
    path = str(tmp_path / "im.png")
    images[0].save(path)
    argv = ["--model", dirs["deepstack-l"], "--vision-tower", tower, "--device", "cpu",
            "--max-new-tokens", "5", "--temperature", "0", "--json", "--image", path,
            "--prompt", "Describe the chart."]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_generate.main(argv) == 0
    got = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert got == model_l.generate([Image.open(path)], ["Describe the chart."], max_new_tokens=5,
                                   temperature=0)


def test_truncated_sequence_clamps_the_stack(world, model_l, caplog):
    """A prompt cut inside the image's rows (tokenizer_model_max_length): only the rows that
    remain get their stack rows (5.14), and the result equals the reference with the same cut."""
    ref, _, _, images = world
    q = "Describe."
    ids = ref.prompt_ids(q)
    at = ids.index(-200)
    m = model_l
    limit = at + 7
    object.__setattr__(m, "max_prompt_len", limit)
    try:
        got = m.logits([images[0]], [q])[0]
    finally:
        m.max_prompt_len = m.config.tokenizer_model_max_length
    e, adds = ref.embeds([images[0]], q)
    e = e[:, :limit]
    adds = {l: [(a, r[: limit - a]) for a, r in v] for l, v in adds.items()}
    hs = ref._hooks(adds, {"on": True})
    try:
        with torch.no_grad():
            want = ref.llm(inputs_embeds=e).logits[0]
    finally:
        for h in hs:
            h.remove()
    _close(got, want)


@pytest.mark.parametrize("field,value", [("deepstack_sampling", "1d"),
                                         ("deepstack_args_for_ablation", "dummy_local"),
                                         ("mm_projector_type", "linear")])
def test_unsupported_config_is_one_clear_error(world, tmp_path, field, value):
    import shutil
    d = tmp_path / "ds"
    shutil.copytree(world[1]["deepstack-l"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"field '{field}'.*{value}"):
        hires_lmm.load(str(d), vision_tower=world[2])
