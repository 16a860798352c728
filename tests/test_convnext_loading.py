"""ConvNeXtTower.from_pretrained: every key naming (HF, timm, open_clip, original) with and
without prefixes, config.json or config inferred from shapes, sharded safetensors, .bin through
the converter, and one error listing missing / unexpected / mis-shaped keys."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import hires_lmm
from hires_lmm.convert import main as convert_main
from hires_lmm.models import ConvNeXtConfig, ConvNeXtTower

from convnext_hf_utils import hf_tokens, make_hf, rel_err, to_naming, transformers


@pytest.fixture(scope="module")
def hf():
    return make_hf()


@pytest.fixture(scope="module")
def expected(hf):
    """The tower built from the HF state dict: the parameters every naming must reproduce."""
    return ConvNeXtTower.from_state_dict(hf.state_dict()).state_dict()


def _same_params(tower, expected):
    got = tower.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


NAMINGS = [("hf", ""), ("hf", "convnext."), ("hf", "model.vision_tower.vision_tower."),
           ("timm", ""), ("timm", "convnext."), ("timm", "model.vision_tower.vision_tower."),
           ("open_clip", "visual.trunk."),
           ("original", ""), ("original", "convnext."),
           ("original", "model.vision_tower.vision_tower.")]


@pytest.mark.parametrize("naming,prefix", NAMINGS)
def test_every_naming_single_file(hf, expected, tmp_path, naming, prefix):
    hires_lmm.set_backend("reference")
    path = tmp_path / "ckpt.safetensors"
    save_file(to_naming(hf.state_dict(), naming, prefix), str(path))
    tower = ConvNeXtTower.from_pretrained(path)           # config inferred from the shapes
    cfg = tower.config
    assert cfg.hidden_sizes == tuple(hf.config.hidden_sizes) and cfg.depths == tuple(hf.config.depths)
    assert cfg.num_stages == 5 and cfg.layer_scale and cfg.patch_size == 4 and cfg.num_channels == 3
    assert all(p.device.type == "cpu" for p in tower.parameters())
    _same_params(tower, expected)
    x = torch.randn(1, 3, 211, 150)
    with torch.no_grad():
        assert rel_err(tower(x), hf_tokens(hf, x)) < 1e-4


def test_hf_save_pretrained_folder(hf, expected, tmp_path):
    """An HF folder: config.json + model.safetensors as transformers writes them."""
    hf.save_pretrained(tmp_path)
    tower = ConvNeXtTower.from_pretrained(tmp_path)
    assert tower.config == ConvNeXtConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    _same_params(tower, expected)


def test_hf_classification_folder_prefix_convnext(tmp_path):
    """ConvNextForImageClassification writes `convnext.` keys and a `classifier` head."""
    hires_lmm.set_backend("reference")
    clf = make_hf(cls=transformers.ConvNextForImageClassification, seed=5)
    clf.save_pretrained(tmp_path)
    assert any(k.startswith("convnext.") for k in load_file(str(tmp_path / "model.safetensors")))
    tower = ConvNeXtTower.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 97, 65)
    with torch.no_grad():
        assert rel_err(tower(x), hf_tokens(clf.convnext, x)) < 1e-4


def test_sharded_folder(hf, expected, tmp_path):
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    _same_params(ConvNeXtTower.from_pretrained(tmp_path), expected)


def test_sharded_llava_style_without_convnext_config(hf, expected, tmp_path):
    """A LLaVA folder: config.json is not a ConvNeXt config -> inferred from the tower keys;
    the LLM keys are never read."""
    sd = to_naming(hf.state_dict(), "hf", "model.vision_tower.vision_tower.")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "mm_hidden_size": 40}))
    _same_params(ConvNeXtTower.from_pretrained(tmp_path), expected)


def test_dtype_and_device_arguments(hf, tmp_path):
    save_file(hf.state_dict(), str(tmp_path / "m.safetensors"))
    tower = ConvNeXtTower.from_pretrained(tmp_path / "m.safetensors", dtype=torch.bfloat16,
                                          device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in tower.parameters())
    bf = {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
    save_file(bf, str(tmp_path / "bf.safetensors"))
    assert ConvNeXtTower.from_pretrained(tmp_path / "bf.safetensors").dtype == torch.bfloat16


def test_layer_scale_absent_inferred(tmp_path):
    hf = make_hf(hidden=[8, 12], depths=[2, 1], layer_scale=0.0, seed=4)
    save_file(to_naming(hf.state_dict(), "timm"), str(tmp_path / "t.safetensors"))
    tower = ConvNeXtTower.from_pretrained(tmp_path / "t.safetensors")
    assert tower.config.depths == (2, 1) and not tower.config.layer_scale


def test_missing_unexpected_misshaped_one_error(hf, tmp_path):
    sd = to_naming(hf.state_dict(), "hf")
    del sd["encoder.stages.2.layers.1.pwconv1.bias"]                      # missing
    sd["encoder.stages.3.layers.0.dwconv.weight"] = torch.randn(32, 1, 5, 5)  # mis-shaped
    sd["encoder.stages.1.layers.0.grn.gamma"] = torch.randn(16)          # unexpected (ConvNeXt V2)
    hf.save_pretrained(tmp_path)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        ConvNeXtTower.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "stages.2.blocks.1.fc1_bias" in msg and "missing" in msg
    assert "encoder.stages.3.layers.0.dwconv.weight" in msg and "(32, 1, 5, 5)" in msg
    assert "encoder.stages.1.layers.0.grn.gamma" in msg and "unexpected" in msg


def test_config_json_disagrees_with_tensors(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["depths"] = [1, 1, 3, 1, 1]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing[\s\S]*stages\.2\.blocks\.2\."):
        ConvNeXtTower.from_pretrained(tmp_path)


def test_stage_beyond_config_is_unexpected(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(num_stages=4, hidden_sizes=cfg["hidden_sizes"][:4], depths=cfg["depths"][:4])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unexpected[\s\S]*encoder\.stages\.4\."):
        ConvNeXtTower.from_pretrained(tmp_path)


def test_no_stem_and_two_towers(hf, tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="no ConvNeXt stem"):
        ConvNeXtTower.from_pretrained(tmp_path / "a.safetensors")
    two = {**to_naming(hf.state_dict(), "hf", "a."), **to_naming(hf.state_dict(), "hf", "b.")}
    save_file(two, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="prefix"):
        ConvNeXtTower.from_pretrained(tmp_path / "two.safetensors")
    tower = ConvNeXtTower.from_pretrained(tmp_path / "two.safetensors", prefix="b.")
    assert tower.config.depths == tuple(hf.config.depths)
    llava = to_naming(hf.state_dict(), "timm", "model.vision_tower.vision_tower.")
    save_file(llava, str(tmp_path / "llava.safetensors"))
    tower = ConvNeXtTower.from_pretrained(tmp_path / "llava.safetensors", prefix="model.")
    assert tower.config.depths == tuple(hf.config.depths)


def test_bin_folder_and_converter_round_trip(hf, expected, tmp_path):
    """ConvLLaVA publishes pytorch_model.bin: loadable directly (weights_only) and convertible."""
    src = tmp_path / "bin"
    src.mkdir()
    sd = to_naming(hf.state_dict(), "hf")
    sd["pooler.tied"] = sd["layernorm.weight"]                    # shared storage (ignored key)
    torch.save(sd, src / "pytorch_model.bin")
    (src / "config.json").write_text(hf.config.to_json_string())
    _same_params(ConvNeXtTower.from_pretrained(src), expected)

    dst = tmp_path / "st"
    assert convert_main([str(src), str(dst)]) == 0
    assert (dst / "model.safetensors").exists() and (dst / "config.json").exists()
    back = load_file(str(dst / "model.safetensors"))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    _same_params(ConvNeXtTower.from_pretrained(dst), expected)

    # single file, FB-style {"model": state_dict} wrapper
    torch.save({"model": to_naming(hf.state_dict(), "original"), "epoch": 3}, tmp_path / "fb.pth")
    assert convert_main([str(tmp_path / "fb.pth"), str(tmp_path / "fb.safetensors")]) == 0
    _same_params(ConvNeXtTower.from_pretrained(tmp_path / "fb.safetensors"), expected)


def test_converter_sharded_bin(hf, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    sd = to_naming(hf.state_dict(), "hf", "model.vision_tower.vision_tower.")
    keys = sorted(sd)
    parts = {"pytorch_model-00001-of-00002.bin": keys[:50], "pytorch_model-00002-of-00002.bin": keys[50:]}
    for name, ks in parts.items():
        torch.save({k: sd[k].to(torch.bfloat16) for k in ks}, src / name)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in parts.items() for k in ks}}))
    assert convert_main([str(src), str(dst)]) == 0
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors",
                                                 "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in sd.values())
    assert not (dst / "pytorch_model.bin.index.json").exists()
    tower = ConvNeXtTower.from_pretrained(dst)
    assert tower.dtype == torch.bfloat16
    for k, v in ConvNeXtTower.from_state_dict(hf.state_dict()).state_dict().items():
        assert torch.equal(tower.state_dict()[k], v.to(torch.bfloat16)), k
