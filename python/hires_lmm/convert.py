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
"""
import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .checkpoint import load_pickle_state_dict

__all__ = ["convert_file", "convert_folder", "main"]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


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
    """Every pickle of a folder (sharded or not) -> safetensors in dst; returns the files written."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    bin_index = src / "pytorch_model.bin.index.json"
    pickles = sorted(f for f in src.iterdir() if f.is_file() and f.suffix in _PICKLE_SUFFIXES)
    if not pickles:
        raise FileNotFoundError(f"hires_lmm.convert: no .bin/.pt/.pth files in {src}")
    written, weight_map, total = [], {}, 0
    for f in pickles:
        out = dst / _safetensors_name(f.name)
        keys = convert_file(f, out)
        written.append(out)
        for k in keys:
            weight_map[k] = out.name
    if bin_index.exists() or len(pickles) > 1:
        from safetensors import safe_open
        for out in written:
            with safe_open(str(out), framework="pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    n = 1
                    for s in sl.get_shape():
                        n *= s
                    total += n * torch.empty((), dtype=_st_dtype(sl.get_dtype())).element_size()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(dst / "model.safetensors.index.json", "w") as fh:
            json.dump(index, fh, indent=2)
        written.append(dst / "model.safetensors.index.json")
    for f in src.iterdir():
        if f.is_file() and f.suffix not in _PICKLE_SUFFIXES and f != bin_index:
            shutil.copy2(f, dst / f.name)
    return written


def _st_dtype(name: str) -> torch.dtype:
    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
            "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
            "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[name]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hires_lmm.convert",
                                 description="PyTorch .bin checkpoints -> safetensors (key names kept)")
    ap.add_argument("src", help="a .bin/.pt/.pth file or a folder holding them")
    ap.add_argument("dst", help="the .safetensors file (for a file) or the output folder")
    args = ap.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
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
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
