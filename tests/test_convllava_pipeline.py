"""ConvLLaVA end to end (hires_lmm.load -> chat / generate / CLI) on small random checkpoints
written in the released layouts, against a pipeline composed here from Hugging Face pieces:
ConvNextModel (5 stages) -> Linear / GELU / Linear -> LlamaForCausalLM(inputs_embeds=...), with
LLaVA's tokenizer_image_token and splice written from specs/convllava.md 3.3.

Layouts: (A) pytorch_model-0000N-of-00002.bin + pytorch_model.bin.index.json with the tower inside
the shards (model.vision_tower.vision_tower.*), as ConvLLaVA-sft-* is published; (B) sharded
safetensors + model.safetensors.index.json without the tower, which comes from its own folder
(config.json + preprocessor_config.json + pytorch_model.bin, as ConvLLaVA-ConvNeXt-* is published).
The tokenizer is a tiny SentencePiece model trained here (Llama ids: unk 0, bos 1, eos 2)."""
import contextlib
import io
import json
import os

import pytest
import torch

import hires_lmm
from convnext_hf_utils import hf_tokens, make_hf
from lmm_test_utils import (MAX_LEN, SYSTEM, TEXT, _CACHE_KW, _train_tokenizer,  # noqa: F401
                            _write_bin_shards, _write_safetensors_shards, _write_tokenizer_files)

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
from PIL import Image  # noqa: E402

from hires_lmm.lmm import cli_generate  # noqa: E402
from hires_lmm.prompt import Tokenizer, tokenizer_image_token  # noqa: E402

HIDDEN, DEPTHS = [8, 16, 24, 32, 40], [1, 1, 1, 1, 1]
RES = 128                         # 5-stage stride 64 -> 2 x 2 = 4 visual rows per image
ROWS = (RES // 64) ** 2



# ---- fixtures: tokenizer, reference pieces, checkpoints ----------------------------------------
def _llava_config(vocab, tower_name="ConvLLaVA/ConvLLaVA-ConvNeXt-1536", extra=None):
    d = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
         "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
         "mm_vision_tower": tower_name, "mm_projector_type": "mlp2x_gelu",
         "mm_hidden_size": HIDDEN[-1], "mm_vision_select_layer": -1,
         "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
         "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
         "image_aspect_ratio": "pad", "tokenizer_model_max_length": MAX_LEN,
         "tokenizer_padding_side": "right", "use_mm_proj": True}
    d.update(extra or {})
    return d


class Ref:
    """The composed Hugging Face pipeline (fp32)."""

    def __init__(self, tower, proj, llm, sp):
        self.tower, self.proj, self.llm, self.sp = tower, proj, llm, sp

    def prompt_ids(self, question):
        # LLaVA mm_utils.tokenizer_image_token over the slow (sentencepiece) Llama tokenizer
        prompt = f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"
        chunks = [[1] + self.sp.encode(c) for c in prompt.split("<image>")]
        ids, offset = [chunks[0][0]], 1
        sep = [-200] * (offset + 1)
        seq = [x for sub in zip(chunks, [sep] * len(chunks)) for x in sub][:-1]
        for x in seq:
            ids.extend(x[offset:])
        return ids

    @torch.no_grad()
    def embeds(self, image, question):
        pixels = hires_lmm.models.convllava_preprocess(image, RES)
        rows = self.proj(hf_tokens(self.tower, pixels))[0]
        ids = self.prompt_ids(question)
        at = ids.index(-200)
        emb = self.llm.get_input_embeddings()
        parts = [emb(torch.tensor(ids[:at])), rows, emb(torch.tensor(ids[at + 1:]))]
        return torch.cat(parts, 0)[None], ids

    @torch.no_grad()
    def greedy(self, image, question, n):
        e, _ = self.embeds(image, question)
        out = self.llm(inputs_embeds=e, use_cache=True)
        past, toks = out.past_key_values, []
        for _ in range(n):
            t = int(out.logits[0, -1].argmax())
            toks.append(t)
            out = self.llm(input_ids=torch.tensor([[t]]), use_cache=True, **{_CACHE_KW: past})
            past = out.past_key_values
        return toks


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(Ref, layout A dir, layout B dir, tower dir, images)."""
    root = tmp_path_factory.mktemp("convllava")
    tokdir = str(root / "tok")
    _train_tokenizer(tokdir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tokdir, "tokenizer.model"))
    vocab = sp.get_piece_size()

    tower = make_hf(HIDDEN, DEPTHS, seed=1)
    torch.manual_seed(2)
    proj = torch.nn.Sequential(torch.nn.Linear(HIDDEN[-1], 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 64)).eval()
    llm_cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")
    llm = transformers.LlamaForCausalLM(llm_cfg).eval()
    with torch.no_grad():
        for n, p in llm.named_parameters():     # larger weights: confident, distinct tokens
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    llm_sd = {k: v for k, v in llm.state_dict().items()}
    proj_sd = {f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}
    tower_sd = tower.state_dict()

    # (A) released sft layout: .bin shards + index, tower inside
    a = root / "ConvLLaVA-sft-128"
    a.mkdir()
    _write_bin_shards(str(a), {**llm_sd, **proj_sd,
                               **{f"model.vision_tower.vision_tower.{k}": v for k, v in tower_sd.items()}})
    with open(a / "config.json", "w") as fh:
        json.dump(_llava_config(vocab, extra={"mm_vision_resolution": RES}), fh)
    # (B) safetensors shards + index, tower in its own folder
    b = root / "ConvLLaVA-sft-128-st"
    b.mkdir()
    _write_safetensors_shards(str(b), {**llm_sd, **proj_sd})
    with open(b / "config.json", "w") as fh:
        json.dump(_llava_config(vocab), fh)
    t = root / "ConvLLaVA-ConvNeXt-128"
    t.mkdir()
    tower.config.image_size = RES
    tower.config.to_json_file(str(t / "config.json"))
    torch.save(tower_sd, t / "pytorch_model.bin")
    with open(t / "preprocessor_config.json", "w") as fh:
        json.dump({"crop_size": {"height": RES, "width": RES}, "size": {"shortest_edge": RES},
                   "do_center_crop": True, "resample": 3,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]}, fh)
    for d in (a, b):
        for f in ("tokenizer.model",):
            with open(os.path.join(tokdir, f), "rb") as src, open(d / f, "wb") as dst:
                dst.write(src.read())
        _write_tokenizer_files(str(d))

    g = torch.Generator().manual_seed(3)
    images = []
    for w, h in ((150, 90), (64, 64), (97, 200)):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        images.append(Image.fromarray(arr))
    return Ref(tower, proj, llm, sp), str(a), str(b), str(t), images


@pytest.fixture(scope="module")
def model_a(world):
    return hires_lmm.load(world[1])


# ---- loading --------------------------------------------------------------------------------
def test_family_tower_and_template(world, model_a):
    _, a, b, t, _ = world
    assert type(model_a).__name__ == "ConvLLaVA"
    assert model_a.conv_template == "vicuna_v1"
    assert model_a.config.image_size == RES
    mb = hires_lmm.load(b, vision_tower=t)
    assert mb.config.image_size == RES                   # from preprocessor_config.json
    for (n1, p1), (n2, p2) in zip(model_a.state_dict().items(), mb.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_generation_defaults_from_file(model_a):
    g = model_a.generation_config
    assert g.do_sample and g.temperature == 0.9 and g.top_p == 0.6 and g.eos_token_ids == (2,)


def test_bf16_load(world):
    m = hires_lmm.load(world[1], dtype=torch.bfloat16)
    assert m.llm.embed_tokens.weight.dtype == torch.bfloat16
    assert m.vision_tower.dtype == torch.bfloat16
    assert m.mm_projector[0].weight.dtype == torch.bfloat16
    out = m.generate([world[4][0]], ["What is it?"], max_new_tokens=3, temperature=0)
    assert len(out[0]["token_ids"]) <= 3
    # logits within bf16's tolerance: the error against the fp32 HF pipeline is at most twice
    # that of the same HF pipeline run in bf16 (the flash-attn convention), plus a small floor
    import copy
    ref = world[0]
    q, im = "What is the total amount?", world[4][0]
    e32, _ = ref.embeds(im, q)
    with torch.no_grad():
        want = ref.llm(inputs_embeds=e32).logits[0]
        r16 = Ref(copy.deepcopy(ref.tower).bfloat16(), copy.deepcopy(ref.proj).bfloat16(),
                  copy.deepcopy(ref.llm).bfloat16(), ref.sp)
        pixels = hires_lmm.models.convllava_preprocess(im, RES).bfloat16()
        rows = r16.proj(hf_tokens(r16.tower, pixels))[0]
        ids = ref.prompt_ids(q)
        at = ids.index(-200)
        emb = r16.llm.get_input_embeddings()
        e16 = torch.cat([emb(torch.tensor(ids[:at])), rows, emb(torch.tensor(ids[at + 1:]))])[None]
        hf16 = r16.llm(inputs_embeds=e16).logits[0].float()
    got = m.logits([im], [q])[0].float()
    scale = want.abs().max().item()
    err_ours, err_hf = (got - want).abs().max().item(), (hf16 - want).abs().max().item()
    assert err_ours <= 2 * err_hf + 1e-2 * scale, (err_ours, err_hf, scale)


# ---- tokens ---------------------------------------------------------------------------------
def test_prompt_ids_equal_llava(world, model_a):
    ref = world[0]
    for q in ("What is the total amount?", "Describe the chart.\nBe brief.", "  x "):
        ids = model_a.prompt_ids(q, 1)
        assert ids == ref.prompt_ids(q)
        assert ids[0] == 1 and ids.count(1) == 1 and ids.count(-200) == 1


def test_tokenizer_image_token_markers_and_special_tokens(world):
    tok = Tokenizer.from_pretrained(world[1])
    ids = tokenizer_image_token("<image>\nA<image>B", tok)
    assert ids[:2] == [1, -200] and ids.count(-200) == 2 and ids.count(1) == 1
    # a special token's text inside a prompt becomes its id (HF added-token splitting)
    assert 2 in tok.encode("cat</s>dog")
    assert tok.decode(tok.encode("The cat is black.")) == "The cat is black."


# ---- numerics against the composed HF pipeline -----------------------------------------------
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_logits_match_hf(world, model_a, backend):
    ref, *_, images = world
    q = "What is the total amount?"
    e, _ = ref.embeds(images[0], q)
    with torch.no_grad():
        want = ref.llm(inputs_embeds=e).logits[0]
    with hires_lmm.use_backend(backend):
        got = model_a.logits([images[0]], [q])[0]
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_greedy_16_steps_match_hf(world, model_a):
    ref, *_, images = world
    q = "Describe the chart."
    want = ref.greedy(images[2], q, 16)
    out = model_a.generate([images[2]], [q], max_new_tokens=16, temperature=0)[0]
    got = out["token_ids"]
    assert got == want[:len(got)]
    assert len(got) == 16 or (out["finish_reason"] == "eos" and want[len(got)] == 2)
    assert out["prompt_ids"] == ref.prompt_ids(q)
    assert out["text"] == ref.sp.decode(got)


def test_reference_backend_runs_the_same_pipeline(world, model_a):
    images = world[4]
    kw = dict(max_new_tokens=8, temperature=0)
    a = model_a.generate([images[0]], ["What colour is the cat?"], **kw)
    with hires_lmm.use_backend("reference"):
        b = model_a.generate([images[0]], ["What colour is the cat?"], **kw)
    assert a == b


# ---- batching ---------------------------------------------------------------------------------
def test_batch_equals_each_alone(world, model_a):
    images = world[4]
    qs = ["Hi?", "What is the total amount on the invoice? Answer with one number please.",
          "Describe the chart."]
    kw = dict(max_new_tokens=10, temperature=0)
    batch = model_a.generate(images, qs, **kw)
    alone = [model_a.generate([im], [q], **kw)[0] for im, q in zip(images, qs)]
    assert len({len(r["prompt_ids"]) for r in batch}) == 3       # three different lengths
    assert [r["token_ids"] for r in batch] == [r["token_ids"] for r in alone]
    assert batch == alone


def test_sampling_seeded_and_batch_independent(world, model_a):
    images = world[4]
    kw = dict(max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    one = model_a.generate([images[1]], ["Describe the chart."], **kw)
    again = model_a.generate([images[1]], ["Describe the chart."], **kw)
    both = model_a.generate([images[0], images[1]], ["Hi?", "Describe the chart."], **kw)
    assert one == again and both[1] == one[0]


def test_stream_pieces_join_to_text(world, model_a):
    images = world[4]
    kw = dict(max_new_tokens=12, temperature=0)
    pieces = list(model_a.chat(images[0], "Describe the chart.", stream=True, **kw))
    assert "".join(pieces) == model_a.chat(images[0], "Describe the chart.", **kw)


def test_incremental_detokenizer_never_breaks_a_character_or_word(world):
    from hires_lmm.generation import IncrementalDetokenizer
    tok = Tokenizer.from_pretrained(world[1])
    text = "The café sells 日本 tea, ünïcode 🐈 and more."
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())                  # byte pieces: characters span tokens
    d = IncrementalDetokenizer(tok)
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    emitted = [p for p in pieces[:-1] if p]
    assert emitted and all(p[-1].isspace() or p[-1] in "日本" for p in emitted)  # whole words
    assert any(p[-1] == "本" for p in emitted)      # CJK goes out without waiting for a space
    # a stop string is never emitted, even in part, and cuts the text
    d = IncrementalDetokenizer(tok, stop=["ünï"])
    pieces = []
    for i in ids:
        pieces.append(d.add(i))
        if d.stopped:
            break
    assert d.stopped and "".join(pieces) == "The café sells 日本 tea, "


def test_stop_string_cuts_text(world, model_a):
    images = world[4]
    full = model_a.generate([images[0]], ["Describe the chart."], max_new_tokens=12,
                            temperature=0)[0]
    text = full["text"]
    if len(text.strip()) < 3:
        pytest.skip("the random model answered with less than 3 characters")
    stop = text.strip()[1:3]
    cut = model_a.generate([images[0]], ["Describe the chart."], max_new_tokens=12,
                           temperature=0, stop=[stop])[0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[:text.find(stop)]


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_json_prints_what_the_api_returns(world, model_a, tmp_path):
    _, a, b, t, images = world
    paths = []
    for i, im in enumerate(images[:2]):
        paths.append(str(tmp_path / f"im{i}.png"))
        im.save(paths[-1])
    qs = ["What is the total amount?", "Describe the chart."]
    argv = ["--model", b, "--vision-tower", t, "--device", "cpu", "--max-new-tokens", "5",
            "--temperature", "0", "--json"]
    for p, q in zip(paths, qs):
        argv += ["--image", p, "--prompt", q]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_generate.main(argv) == 0
    got = [json.loads(line) for line in buf.getvalue().splitlines()]
    want = model_a.generate([Image.open(p) for p in paths], qs, max_new_tokens=5, temperature=0)
    assert got == want
    assert all({"text", "token_ids", "prompt_ids"} <= set(r) for r in got)


def test_cli_stream_prints_the_answer(world, model_a, tmp_path):
    path = str(tmp_path / "im.png")
    world[4][0].save(path)
    argv = ["--model", world[1], "--device", "cpu", "--max-new-tokens", "6", "--temperature", "0",
            "--stream", "--image", path, "--prompt", "Describe the chart."]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_generate.main(argv) == 0
    want = model_a.chat(Image.open(path), "Describe the chart.", max_new_tokens=6, temperature=0)
    assert buf.getvalue() == want + "\n"


def test_cli_error_exit_code(world, tmp_path, capsys):
    argv = ["--model", world[1], "--prompt", "hi", "--image", str(tmp_path / "missing.png"),
            "--device", "cpu"]
    assert cli_generate.main(argv) == 1
    assert "cannot be opened as an image" in capsys.readouterr().err


# ---- bad input: one clear error each ---------------------------------------------------------
def test_unknown_family(tmp_path):
    d = tmp_path / "clip-llava"
    d.mkdir()
    with open(d / "config.json", "w") as fh:
        json.dump({"model_type": "llava", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
                   "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1024, "hidden_size": 64}, fh)
    with pytest.raises(ValueError, match=r"no supported family.*clip-vit.*supported: ConvLLaVA"):
        hires_lmm.load(str(d))


def test_missing_tower(world):
    with pytest.raises(ValueError, match=r"mm_vision_tower is 'ConvLLaVA/ConvLLaVA-ConvNeXt-1536'"
                                         r".*vision_tower="):
        hires_lmm.load(world[2])


def test_tower_folder_that_does_not_exist(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="argument 'vision_tower' does not exist"):
        hires_lmm.load(world[2], vision_tower=str(tmp_path / "nope"))


def test_bad_images(world, model_a, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=r"'images\[0\]' cannot be opened as an image"):
        model_a.generate([str(broken)], ["What?"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"'images\[1\]' cannot be opened as an image"):
        model_a.generate([world[4][0], str(tmp_path / "missing.jpg")], ["a", "b"], max_new_tokens=2)
    png = io.BytesIO()
    world[4][0].save(png, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    with pytest.raises(ValueError, match="cannot be opened as an image"):
        model_a.generate([str(truncated)], ["What?"], max_new_tokens=2)


def test_marker_count_mismatch(world, model_a):
    im = world[4][0]
    with pytest.raises(ValueError, match=r"2 <image> marker\(s\) but 1 image"):
        model_a.generate([im], ["<image> and <image>: compare"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"1 <image> marker\(s\) but 2 image"):
        model_a.generate([[im, im]], ["<image> what?"], max_new_tokens=2)
    with pytest.raises(ValueError, match="'images' has 1 entries but 'prompts' has 2"):
        model_a.generate([im], ["a", "b"], max_new_tokens=2)


def test_empty_prompt(world, model_a):
    with pytest.raises(ValueError, match="empty prompt"):
        model_a.generate([world[4][0]], ["  "], max_new_tokens=2)


def test_long_prompt(world, model_a, caplog):
    im = world[4][0]
    q = "Describe the chart in detail. " * 16
    n = len(model_a.prompt_ids(q, 1)) - 1 + ROWS
    assert n > MAX_LEN
    with pytest.raises(ValueError, match=f"{n} tokens .* over the limit of {MAX_LEN}"):
        model_a.generate([im], [q], max_new_tokens=2, long_prompt="error")
    # the default cuts the spliced sequence to tokenizer_model_max_length, as LLaVA does
    logits = model_a.logits([im], [q])[0]
    assert logits.shape[0] == MAX_LEN
    assert "cut to the first" in caplog.text


def test_bad_device(world):
    with pytest.raises(ValueError, match="argument 'device'"):
        hires_lmm.load(world[1], device="cuda:7")
    with pytest.raises(ValueError, match="argument 'device'"):
        hires_lmm.load(world[1], device="banana")


def test_bad_dtype(world):
    with pytest.raises(ValueError, match="argument 'dtype'"):
        hires_lmm.load(world[1], dtype="int8")
    with pytest.raises(ValueError, match="argument 'dtype'"):
        hires_lmm.load(world[1], dtype=torch.int32)


def test_bad_generation_options(world, model_a):
    with pytest.raises(ValueError, match="top_p"):
        model_a.generate([world[4][0]], ["a"], top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model_a.generate([world[4][0]], ["a"], max_new_tokens=0)


# ---- CUDA: graph-captured decode equals eager decode ----------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_cuda_graph_decode_equals_eager(world):
    m = hires_lmm.load(world[1], device="cuda")
    images = world[4]
    qs = ["Hi?", "What is the total amount on the invoice?", "Describe the chart."]
    kw = dict(max_new_tokens=12, temperature=0)
    eager = m.generate(images, qs, cuda_graph=False, **kw)
    graph = m.generate(images, qs, cuda_graph=True, **kw)
    assert [r["token_ids"] for r in graph] == [r["token_ids"] for r in eager]
    cpu = hires_lmm.load(world[1]).generate(images, qs, **kw)
    assert [r["token_ids"][:4] for r in graph] == [r["token_ids"][:4] for r in cpu]


# ---- tokenizer.json (tokenizers) and the llama3 template ------------------------------------------
def test_tokenizers_backend_and_llama3_template(tmp_path):
    tk = pytest.importorskip("tokenizers")
    from hires_lmm.prompt import build_prompt, template_for_config
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    t = tk.Tokenizer(tk.models.BPE(unk_token=None, byte_fallback=False))
    t.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = tk.decoders.ByteLevel()
    t.train_from_iterator(TEXT, tk.trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    bos = t.token_to_id("<|begin_of_text|>")
    t.post_processor = tk.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    t.save(str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "tokenizer_config.json", "w") as fh:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, fh)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.backend == "tokenizers" and tok.bos_token_id == bos
    assert template_for_config({}, tok) == "llama3"
    assert template_for_config({"version": "v1"}, tok) == "vicuna_v1"
    prompt = build_prompt("llama3", "What is the total?", 1)
    assert prompt == ("<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is the total?"
                      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tokenizer_image_token(prompt, tok)
    # LLaVA's algorithm over HF-style encodes (each chunk with its BOS, kept once)
    chunks = [t.encode(c).ids for c in prompt.split("<image>")]
    want = [bos] + chunks[0][1:] + [-200] + chunks[1][1:]
    assert ids == want
    assert ids.count(bos) == 1 and t.token_to_id("<|eot_id|>") in ids
    assert tok.decode(t.encode("The cat is black.").ids) == "The cat is black."


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_failed_load_leaves_nothing_on_the_gpu(world, tmp_path):
    """A checkpoint whose projector is mis-shaped fails after the tower went to the GPU: the
    tower must be freed again."""
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(world[2], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 97                     # every MLP weight is now mis-shaped
    (bad / "config.json").write_text(json.dumps(cfg))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with pytest.raises(ValueError, match="mis-shaped"):
        hires_lmm.load(str(bad), vision_tower=world[3], device="cuda")
    import gc
    gc.collect()
    assert torch.cuda.memory_allocated() == before


def test_bench_e2e_cases_run_and_agree_with_hf():
    """The e2e benchmark family (python -m hires_lmm.bench --only e2e) on its CPU config: every
    case runs, its references run, and ours agrees with the HF-composed pipeline."""
    from hires_lmm.bench import bench_e2e
    cs = bench_e2e.cases("cpu", True)
    assert {c.op for c in cs} == {"e2e_preprocess", "e2e_tower", "e2e_ttft", "e2e_decode",
                                  "e2e_deepstack_claim"}
    assert {c.case.split("B=")[1].split()[0] for c in cs if c.op == "e2e_decode"} == {"1", "8"}
    # issue 11: DeepStack-L, -L-HD and SliME-7B shapes, and DeepStack's claim (no error: two models)
    assert {c.case.split()[0] for c in cs if c.op == "e2e_ttft"} >= {"deepstack-l", "deepstack-l-hd",
                                                                     "slime-7b"}
    for c in cs:
        c.ours()
        for ref in c.references.values():
            ref()
        if c.op == "e2e_deepstack_claim":
            assert c.max_err is None and set(c.references) == {"llava_5x576"}
            continue
        err = c.max_err()
        assert err <= c.tol, (c.op, c.case, err)
