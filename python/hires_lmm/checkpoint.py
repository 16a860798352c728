"""Reading checkpoints lazily: keys and shapes first, tensors only when asked for.

    reader = open_checkpoint(path)      # a file or a folder
    reader.keys(); reader.shape(key); reader.get(key, device="cpu")

Accepted, in this order of preference:
  - a folder with `model.safetensors.index.json` (sharded safetensors), `model.safetensors`, or
    any `*.safetensors` files (their union);
  - a folder with `pytorch_model.bin.index.json` or `pytorch_model.bin` (PyTorch pickles, read
    with `torch.load(weights_only=True, mmap=True)`; convert them once with
    `python -m hires_lmm.convert`);
  - one `.safetensors`, `.bin`/`.pt`/`.pth` file, or an `*.index.json` file.
Safetensors files are memory-mapped (`safetensors.safe_open`): a full LLaVA checkpoint costs
only the tensors that are read. Pickles are memory-mapped too when torch can (`mmap=True`).
"""
import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

__all__ = ["CheckpointReader", "open_checkpoint", "load_pickle_state_dict"]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Wrappers some training codes put around the state dict (FB ConvNeXt: {"model": ...}).
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_ema")


def load_pickle_state_dict(path, mmap: bool = True) -> Dict[str, torch.Tensor]:
    """torch.load(path, weights_only=True) -> {name: tensor}; unwraps {"model": {...}} style
    wrappers; entries that are not tensors are dropped."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError:
        if not mmap:
            raise
        # old (non-zip) pickles cannot be memory-mapped
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"load_pickle_state_dict: argument 'path' ({path}) holds a "
                         f"{type(obj).__name__}, expected a dict of tensors (a state dict)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


class CheckpointReader:
    """Union of one or more checkpoint files as one lazy {key: tensor} view."""

    def __init__(self, files: List[Path], description: str):
        self.description = description
        self._where: Dict[str, Tuple[str, object]] = {}   # key -> (kind, handle)
        self._handles = []
        for f in files:
            if f.suffix == ".safetensors":
                from safetensors import safe_open
                h = safe_open(str(f), framework="pt", device="cpu")
                self._handles.append(h)
                for k in h.keys():
                    self._where[k] = ("st", h)
            elif f.suffix in _PICKLE_SUFFIXES:
                sd = load_pickle_state_dict(f)
                for k, v in sd.items():
                    self._where[k] = ("pt", v)
            else:
                raise ValueError(f"open_checkpoint: unsupported file {f} (want .safetensors or .bin)")

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def __contains__(self, key) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> Tuple[int, ...]:
        kind, h = self._where[key]
        if kind == "st":
            return tuple(h.get_slice(key).get_shape())
        return tuple(h.shape)

    def get(self, key: str, device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        kind, h = self._where[key]
        t = h.get_tensor(key) if kind == "st" else h
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        return t


def _single(files: List[Path], description: str) -> CheckpointReader:
    return CheckpointReader(files, description)


def _from_index(index: Path) -> CheckpointReader:
    with open(index) as fh:
        weight_map = json.load(fh)["weight_map"]
    files = sorted({index.parent / f for f in weight_map.values()})
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"open_checkpoint: the index {index} names shard files that do not "
                                f"exist: {missing}")
    return CheckpointReader(files, str(index))


def open_checkpoint(path) -> CheckpointReader:
    """A CheckpointReader over a checkpoint file or folder (see the module docstring)."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundError(f"open_checkpoint: argument 'path' does not exist: {p}")
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _from_index(p)
        return _single([p], str(p))
    for name in ("model.safetensors.index.json",):
        if (p / name).exists():
            return _from_index(p / name)
    if (p / "model.safetensors").exists():
        return _single([p / "model.safetensors"], str(p / "model.safetensors"))
    st = sorted(p.glob("*.safetensors"))
    if st:
        return _single(st, str(p))
    if (p / "pytorch_model.bin.index.json").exists():
        return _from_index(p / "pytorch_model.bin.index.json")
    if (p / "pytorch_model.bin").exists():
        return _single([p / "pytorch_model.bin"], str(p / "pytorch_model.bin"))
    bins = sorted(f for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES)
    if bins:
        return _single(bins, str(p))
    raise FileNotFoundError(f"open_checkpoint: no *.safetensors, model.safetensors.index.json or "
                            f"pytorch_model.bin in the folder {p}")
