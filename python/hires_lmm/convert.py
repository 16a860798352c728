"""Convert PyTorch pickle checkpoints (.bin/.pt/.pth) to safetensors, keeping every key name.

    python -m hires_lmm.convert pytorch_model.bin model.safetensors
    python -m hires_lmm.convert ConvLLaVA-ConvNeXt-1536/ ConvLLaVA-ConvNeXt-1536-st/
    python -m hires_lmm.convert ConvLLaVA-sft-1536/ out/      # sharded: pytorch_model.bin.index.json

Pickles are read with `torch.load(weights_only=True)` (no code runs from the file). A folder:
each shard `pytorch_model-0000k-of-0000n.bin` becomes `model-0000k-of-0000n.safetensors`
(`pytorch_model.bin` -> `model.safetensors`; other `*.bin` names keep their stem), the index
becomes `model.safetensors.index.json`, and every other file (config.json, tokenizer, ...) is
copied. Tensors that share storage (tied weights) are written as separate copies, as safetensors
requires. Wrappers such as {"model": state_dict} are unwrapped; non-tensor entries are dropped.
With `pytorch_model.bin.index.json` the index decides which shards are converted and is checked
first (hires_lmm.checkpoint's rules: every shard present inside the folder, no key in two shards,
shards and index agree). Shards are converted one at a time. Any damage (a missing shard, a
truncated or refused pickle, ...) exits with status 1 and a message naming the file; nothing is
skipped silently.
"""
import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .checkpoint import (CheckpointError, CheckpointNotFoundError, CheckpointReader, _from_index,
                         load_pickle_state_dict)

__all__ = ["convert_file", "convert_folder", "main"]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
logger = logging.getLogger(__name__)


def _safetensors_name(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def _unshare(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous tensors, each with its own storage (safetensors refuses shared memory)."""
    out, seen = {}, set()
    for k, t in sd.items():
        t = t.detach()
        st = t.untyped_storage()
        whole = (t.is_contiguous() and t.storage_offset() == 0
                 and t.numel() * t.element_size() == st.nbytes())
        if st.data_ptr() in seen or not whole:
            t = t.clone(memory_format=torch.contiguous_format)
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def convert_file(src, dst, metadata: Optional[Dict[str, str]] = None) -> List[str]:
    """One pickle -> one safetensors file; returns the keys written."""
    from safetensors.torch import save_file
    sd = _unshare(load_pickle_state_dict(src))
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(dst), metadata={"format": "pt", **(metadata or {})})
    return list(sd)


def convert_folder(src, dst) -> List[Path]:
    """Every pickle of a folder (sharded or not) -> safetensors in dst; returns the files written.

    With `pytorch_model.bin.index.json` the index decides: exactly its shards are converted (one
    safetensors shard per pickle shard, same keys), after checking that every shard it names
    exists inside the folder and that the shards and the index agree (no key in two shards, none
    missing); `model.safetensors.index.json` is written from it. Without an index,
    `pytorch_model.bin` when present, else every .bin/.pt/.pth file (a key in two files is an
    error). Other pickles are left out (logged), other files copied. Nothing is written before
    these checks pass; every failure is a CheckpointError naming the file. Shards are read one
    at a time, memory-mapped."""
    src, dst = Path(src), Path(dst)
    bin_index = src / "pytorch_model.bin.index.json"
    if bin_index.exists():
        reader = _from_index(bin_index)
    else:
        pickles = sorted(f for f in src.iterdir() if f.is_file() and f.suffix in _PICKLE_SUFFIXES)
        if (src / "pytorch_model.bin").is_file():     # open_checkpoint's choice: this file only
            pickles = [src / "pytorch_model.bin"]     # (not e.g. a Trainer's training_args.bin)
        if not pickles:
            raise CheckpointNotFoundError(f"hires_lmm.convert: no .bin/.pt/.pth files in {src}")
        reader = CheckpointReader(pickles, str(src))
    shards = reader.files()
    by_file: Dict[Path, List[str]] = {f: [] for f in shards}
    for k in reader.keys():
        by_file[reader.file(k)].append(k)
    out_names = {f: _safetensors_name(f.name) for f in shards}
    if len(set(out_names.values())) != len(out_names):
        raise CheckpointError(f"hires_lmm.convert: shards of {src} would get the same output name: "
                              f"{sorted(str(f) for f in shards)}")
    from safetensors.torch import save_file
    dst.mkdir(parents=True, exist_ok=True)
    written, weight_map, total = [], {}, 0
    for f in shards:                                  # one shard in memory (mapped) at a time
        sd = _unshare({k: reader.get(k) for k in by_file[f]})
        out = dst / out_names[f]
        save_file(sd, str(out), metadata={"format": "pt"})
        written.append(out)
        for k, t in sd.items():
            weight_map[k] = out.name
            total += t.numel() * t.element_size()
        del sd
        logger.info("hires_lmm.convert: %s -> %s (%d tensors)", f, out, len(by_file[f]))
    if bin_index.exists() or len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(dst / "model.safetensors.index.json", "w") as fh:
            json.dump(index, fh, indent=2)
        written.append(dst / "model.safetensors.index.json")
    for f in src.iterdir():
        if f.is_file() and f not in by_file and f != bin_index:
            if f.suffix in _PICKLE_SUFFIXES:
                logger.warning("hires_lmm.convert: %s is not part of the checkpoint (not in its "
                               "index / not pytorch_model.bin): neither converted nor copied", f)
            else:
                shutil.copy2(f, dst / f.name)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hires_lmm.convert",
                                 description="PyTorch .bin checkpoints -> safetensors (key names kept)")
    ap.add_argument("src", help="a .bin/.pt/.pth file or a folder holding them")
    ap.add_argument("dst", help="the .safetensors file (for a file) or the output folder")
    args = ap.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    try:
        if src.is_dir():
            files = convert_folder(src, dst)
        elif src.is_file():
            if dst.suffix != ".safetensors":
                dst = dst / _safetensors_name(src.name)
            convert_file(src, dst)
            files = [dst]
        else:
            print(f"hires_lmm.convert: {src} does not exist", file=sys.stderr)
            return 2
    except CheckpointError as e:
        print(f"hires_lmm.convert: error: {e}", file=sys.stderr)
        return 1
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
