"""Helpers shared by the whole-model tests (test_convllava_pipeline.py, test_deepstack_slime_pipeline.py):
a tiny SentencePiece tokenizer trained here (Llama ids: unk 0, bos 1, eos 2) with its
tokenizer_config / special_tokens_map / generation_config files, a Llama-3-style tokenizer.json
built with `tokenizers`, and writers of the released shard layouts."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
MAX_LEN = 200                     # tokenizer_model_max_length of the test checkpoints

TEXT = ["A chat between a curious user and an artificial intelligence assistant.",
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        "USER: What is the total amount on the invoice? ASSISTANT: The total is 42 dollars.",
        "Describe the chart. It shows sales growing every year, faster in the last quarter.",
        "What colour is the cat? The cat is black and white, sitting on a red sofa."] * 4


def _train_tokenizer(d):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "corpus.txt"), "w") as fh:
        fh.write("\n".join(TEXT) + "\n")
    spm.SentencePieceTrainer.train(
        input=os.path.join(d, "corpus.txt"), model_prefix=os.path.join(d, "tokenizer"),
        vocab_size=320, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2)
    os.remove(os.path.join(d, "tokenizer.vocab"))
    os.remove(os.path.join(d, "corpus.txt"))


def _write_tokenizer_files(d):
    with open(os.path.join(d, "tokenizer_config.json"), "w") as fh:
        json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                   "model_max_length": MAX_LEN, "tokenizer_class": "LlamaTokenizer",
                   "padding_side": "right", "legacy": False}, fh)
    with open(os.path.join(d, "special_tokens_map.json"), "w") as fh:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "pad_token": "<unk>"}, fh)
    with open(os.path.join(d, "generation_config.json"), "w") as fh:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                   "do_sample": True, "temperature": 0.9, "top_p": 0.6, "max_length": 4096}, fh)


def _write_bin_shards(d, sd):
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k].clone() for k in part}, os.path.join(d, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, fh)


def _write_safetensors_shards(d, sd):
    from safetensors.torch import save_file
    keys = sorted(sd)
    third = len(keys) // 3 + 1
    weight_map = {}
    for i in range(3):
        part = keys[i * third:(i + 1) * third]
        name = f"model-0000{i + 1}-of-00003.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, os.path.join(d, name),
                  metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, fh)


_CACHE_KW = ("cache" if "cache" in __import__("inspect").signature(
    transformers.LlamaForCausalLM.forward).parameters else "past_key_values")




LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]


def build_llama3_tokenizer(d, vocab_size=400):
    """A Llama-3-style tokenizer.json (byte-level BPE, the special tokens, BOS added by the
    post-processor) + tokenizer_config.json; returns the `tokenizers.Tokenizer`."""
    tk = pytest.importorskip("tokenizers")
    t = tk.Tokenizer(tk.models.BPE(unk_token=None, byte_fallback=False))
    t.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = tk.decoders.ByteLevel()
    t.train_from_iterator(TEXT, tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS, show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    bos = t.token_to_id("<|begin_of_text|>")
    t.post_processor = tk.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    os.makedirs(d, exist_ok=True)
    t.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as fh:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                   "model_max_length": MAX_LEN}, fh)
    return t
