"""Checkpoint loading shared by the Llama and CLIP models: config.json, then the tensors through
hires_lmm.checkpoint (safetensors single file or
sharded with model.safetensors.index.json, memory-mapped), PyTorch .bin as a fallback
(torch.load(weights_only=True)), and one strict load with an explicit key map.

load_into(module, ckpt_dir, key_map, ...) maps every checkpoint key through `key_map(key)`:
  -> our parameter name, or None for keys the model deliberately ignores (e.g. CLIP's text tower).
Then it compares names and shapes with the module (built on the meta device) and raises ONE error
listing the missing, unexpected and mis-shaped keys; otherwise it loads with assign=True."""
import json
import os
from typing import Callable, Dict, Optional

import torch
from torch import nn

from ..checkpoint import open_checkpoint

__all__ = ["read_config", "checkpoint_keys", "load_into", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped keys."""


def read_config(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_pretrained: argument 'dir' has no config.json: {ckpt_dir!r}")
    with open(path) as f:
        return json.load(f)


def _iter_tensors(ckpt_dir: str, wanted: Optional[Callable[[str, tuple], bool]] = None,
                  device="cpu"):
    """Yield (key, shape, tensor) over the checkpoint (hires_lmm.checkpoint.open_checkpoint:
    sharded or single safetensors, memory-mapped; .bin pickles as a fallback); a tensor is read
    only when wanted(key, shape), else it is None."""
    reader = open_checkpoint(ckpt_dir)
    for key in list(reader.keys()):
        shape = tuple(reader.shape(key))
        yield key, shape, (reader.get(key, device=device)
                           if wanted is None or wanted(key, shape) else None)


def checkpoint_keys(ckpt_dir: str):
    """All tensor names in the checkpoint (reads headers only for safetensors)."""
    return [k for k, _, _ in _iter_tensors(ckpt_dir, wanted=lambda k, shape: False)]


def load_into(module: nn.Module, ckpt_dir: str, key_map: Callable[[str], Optional[str]],
              dtype: Optional[torch.dtype] = None, device=None) -> nn.Module:
    """Strict load of `ckpt_dir` into `module` (built on meta). dtype=None keeps the checkpoint's
    floating dtype; device=None -> cpu."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    state: Dict[str, torch.Tensor] = {}
    unexpected, misshaped, duplicated = [], [], []
    seen = set()  # model names the checkpoint provides (loaded or mis-shaped)
    dev = torch.device(device) if device is not None else torch.device("cpu")

    def wanted(key, shape):
        name = key_map(key)
        return name in expected and expected[name] == shape

    for key, shape, tensor in _iter_tensors(ckpt_dir, wanted, dev):
        name = key_map(key)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if name in seen:
            duplicated.append(f"{key} -> {name}")
            continue
        seen.add(name)
        if shape != expected[name]:
            misshaped.append(f"{key}: checkpoint {shape} vs model {expected[name]}")
            continue
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor
    missing = sorted(set(expected) - seen)
    if unexpected or misshaped or duplicated or missing:
        parts = []
        if missing:
            parts.append(f"missing ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected ({len(unexpected)}): {sorted(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped ({len(misshaped)}): {misshaped}")
        if duplicated:
            parts.append(f"mapped twice ({len(duplicated)}): {duplicated}")
        raise CheckpointError(f"{type(module).__name__}.from_pretrained({ckpt_dir!r}): checkpoint "
                              f"does not match the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True, assign=True)
    return module
