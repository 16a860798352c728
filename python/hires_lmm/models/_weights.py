"""Checkpoint loading shared by the models: config.json, then the tensors through
hires_lmm.checkpoint (safetensors single file or sharded with model.safetensors.index.json,
memory-mapped; PyTorch .bin as a fallback, torch.load(weights_only=True)), and one strict load
with an explicit key map.

Order of a from_pretrained (every failure a CheckpointError naming the file or the field):
  1. open_pretrained: config.json (valid JSON, an object) and the checkpoint's keys, shapes and
     dtypes (headers only);
  2. check_kind: the keys are of the model's kind; otherwise the error says which kind they are
     (from the keys and config.json's model_type / architectures) and which class loads it;
  3. parse_config: the config dataclass validates types and ranges (check_int, check_real, ...);
     a bad field is reported with the config file's path;
  4. check_count: counts the config asks for (layers, blocks) must be present in the keys, before
     anything is built (a config of 10**12 layers never starts building);
  5. build on meta and load_into: maps every checkpoint key through `key_map(key)` -> our name, or
     None for keys the model deliberately ignores (e.g. CLIP's text tower); compares names, shapes
     and dtypes with the module and raises ONE error listing the missing, unexpected and
     mis-shaped keys; then loads with assign=True.

dtype=None keeps the checkpoint's floating dtype; a checkpoint whose loaded tensors mix floating
dtypes is refused (the error names the keys of each dtype) unless dtype= picks one."""
import math
import os
import re
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional

import torch
from torch import nn

from ..checkpoint import (CheckpointError, CheckpointNotFoundError, CheckpointReader,
                          open_checkpoint, read_json)

__all__ = ["read_config", "config_from_file", "checkpoint_keys", "load_into", "CheckpointError",
           "CheckpointNotFoundError", "open_pretrained", "Pretrained", "check_kind",
           "parse_config", "check_count", "describe_checkpoint", "check_int", "check_real",
           "check_bool", "check_str", "check_int_list", "MAX_LAYERS", "MAX_SIZE"]

# Upper bounds for config values: far above any released model, low enough that a corrupt value
# (1e12 layers) fails at once instead of building for hours.
MAX_LAYERS = 1024          # layers / blocks per stage
MAX_SIZE = 1 << 20         # hidden / intermediate sizes, channels
MAX_VOCAB = 1 << 24
MAX_HEADS = 1 << 12
MAX_POSITIONS = 1 << 30


# ---- config field checks (raise ValueError naming the class and the field) ---------------------
def _got(v) -> str:
    return f"{type(v).__name__} {v!r}"


def check_int(owner: str, name: str, v, lo: int = 1, hi: Optional[int] = None) -> int:
    """v must be an int (not a bool, not a float) in [lo, hi]."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{owner}: field '{name}' must be an integer, got {_got(v)}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{owner}: field '{name}' must be {rng}, got {v}")
    return v


def check_real(owner: str, name: str, v, lo: Optional[float] = None, hi: Optional[float] = None,
               lo_open: bool = False, hi_open: bool = False) -> float:
    """v must be a finite real number (int or float, not a bool, not a string) in the range."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ValueError(f"{owner}: field '{name}' must be a number, got {_got(v)}")
    if not math.isfinite(v):
        raise ValueError(f"{owner}: field '{name}' must be finite, got {v}")
    bad = ((lo is not None and (v <= lo if lo_open else v < lo))
           or (hi is not None and (v >= hi if hi_open else v > hi)))
    if bad:
        rng = " and ".join(s for s in (
            None if lo is None else f"{'>' if lo_open else '>='} {lo}",
            None if hi is None else f"{'<' if hi_open else '<='} {hi}") if s)
        raise ValueError(f"{owner}: field '{name}' must be {rng}, got {v}")
    return v


def check_bool(owner: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{owner}: field '{name}' must be true or false, got {_got(v)}")
    return v


def check_str(owner: str, name: str, v, allowed: Optional[Iterable[str]] = None) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{owner}: field '{name}' must be a string, got {_got(v)}")
    if allowed is not None and v not in allowed:
        raise ValueError(f"{owner}: field '{name}' must be one of {sorted(allowed)}, got {v!r}")
    return v


def check_int_list(owner: str, name: str, v, lo: int = 1, hi: Optional[int] = None) -> tuple:
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{owner}: field '{name}' must be a list of integers, got {_got(v)}")
    for i, x in enumerate(v):
        check_int(owner, f"{name}[{i}]", x, lo, hi)
    return tuple(v)


# ---- config.json and the checkpoint ------------------------------------------------------------
def read_config(ckpt_dir: str) -> dict:
    """ckpt_dir/config.json as a dict; CheckpointError naming the file when it is not valid JSON
    or not an object; CheckpointNotFoundError (also a FileNotFoundError) when it is absent."""
    path = os.path.join(os.fspath(ckpt_dir), "config.json")
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"from_pretrained: argument 'dir' has no config.json: "
                                      f"{os.fspath(ckpt_dir)!r}")
    d = read_json(path, "config file")
    if not isinstance(d, dict):
        raise CheckpointError(f"config file {path} must hold a JSON object, got a "
                              f"{type(d).__name__}")
    return d


def config_from_file(path, factory: Callable[[dict], object], owner: str):
    """factory(json of path) with every failure (unreadable or invalid JSON, not an object, a bad
    field) a CheckpointError naming the file."""
    d = read_json(path, "config file")
    if not isinstance(d, dict):
        raise CheckpointError(f"config file {path} must hold a JSON object, got a "
                              f"{type(d).__name__}")
    try:
        return factory(d)
    except (ValueError, TypeError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointError(f"{owner}: config file {path}: {msg}") from None


def _iter_tensors(ckpt_dir: str, wanted: Optional[Callable[[str, tuple], bool]] = None,
                  device="cpu"):
    """Yield (key, shape, tensor) over the checkpoint, shard by shard; a tensor is read only when
    wanted(key, shape), else it is None. (Kept for callers of the earlier helper.)"""
    reader = open_checkpoint(ckpt_dir)
    for key in list(reader.keys()):
        shape = tuple(reader.shape(key))
        yield key, shape, (reader.get(key, device=device)
                           if wanted is None or wanted(key, shape) else None)


def checkpoint_keys(ckpt_dir: str):
    """All tensor names in the checkpoint (reads headers only for safetensors)."""
    return list(open_checkpoint(ckpt_dir).keys())


class Pretrained(NamedTuple):
    owner: str                 # "Llama.from_pretrained" (for messages)
    dir: str
    config: Optional[dict]     # config.json, or None when there is none and none is needed
    config_path: Optional[str]
    reader: CheckpointReader


def open_pretrained(owner: str, ckpt_dir, need_config: bool = True) -> Pretrained:
    """Step 1: config.json and the checkpoint's metadata."""
    d = os.fspath(ckpt_dir)
    if not os.path.exists(d):
        raise CheckpointNotFoundError(f"{owner}: argument 'dir' does not exist: {d!r}")
    cfg, cfg_path = None, os.path.join(d, "config.json")
    if need_config or os.path.exists(cfg_path):
        cfg = read_config(d)
    else:
        cfg_path = None
    return Pretrained(owner, d, cfg, cfg_path, open_checkpoint(d))


# key signatures of the kinds hires_lmm loads: (description, class that loads it, regex)
_KINDS = [
    ("a Llama decoder", "Llama", re.compile(r"(model\.)?layers\.\d+\.self_attn\.q_proj\.weight")),
    ("a CLIP vision tower", "ClipVisionTower",
     re.compile(r"(.*\.)?embeddings\.patch_embedding\.weight")),
    ("a ConvNeXt tower", "ConvNeXtTower", re.compile(
        r"(.*\.)?(embeddings\.patch_embeddings\.weight|stem\.0\.weight|"
        r"downsample_layers\.0\.0\.weight)")),
    ("SliME's projector and sampler", "SliMEVisual",
     re.compile(r"model\.(mm_projector|sampler\.post_qformer)\..*")),
]


def describe_checkpoint(config: Optional[dict], keys: Iterable[str]) -> str:
    """What a checkpoint is, from config.json's model_type / architectures and the key names."""
    keys = list(keys)
    parts = []
    if isinstance(config, dict):
        mt, arch = config.get("model_type"), config.get("architectures")
        if mt is not None or arch is not None:
            parts.append(f"config.json says model_type {mt!r}, architectures {arch!r}")
        else:
            parts.append("config.json has no model_type or architectures")
    found = []
    for desc, cls, rx in _KINDS:
        hit = next((k for k in keys if rx.fullmatch(k)), None)
        if hit is not None:
            found.append(f"{desc} (e.g. key {hit!r}; load it with {cls}.from_pretrained)")
    if found:
        parts.append("its keys hold " + " and ".join(found))
    else:
        parts.append(f"its keys match no model hires_lmm loads ({len(keys)} keys, e.g. "
                     f"{sorted(keys)[:5]})")
    return "; ".join(parts)


def check_kind(pre: Pretrained, cls_name: str) -> None:
    """Step 2: the keys hold cls_name's kind, else CheckpointError saying what they hold."""
    rx = next(rx for _, c, rx in _KINDS if c == cls_name)
    if not any(rx.fullmatch(k) for k in pre.reader.keys()):
        desc = next(d for d, c, _ in _KINDS if c == cls_name)
        raise CheckpointError(f"{pre.owner}({pre.dir!r}): not {desc} checkpoint: "
                              f"{describe_checkpoint(pre.config, pre.reader.keys())}")


def parse_config(pre: Pretrained, factory: Callable[[dict], object]):
    """Step 3: factory(config dict) with a bad field reported as a CheckpointError naming
    config.json."""
    try:
        return factory(pre.config)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointError(f"{pre.owner}: config file {pre.config_path}: {msg}") from None


def layer_indices(keys: Iterable[str], pattern: str) -> List[int]:
    """Sorted distinct integers captured by group 1 of pattern (matched at the key's start)."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys for m in [rx.match(k)] if m})


def check_count(pre: Pretrained, field: str, configured: int, present: int, what: str) -> None:
    """Step 4: the config asks for `configured` items (layers, blocks); the keys hold `present`."""
    if configured > present:
        raise CheckpointError(f"{pre.owner}: config file {pre.config_path}: field '{field}' is "
                              f"{configured} but the checkpoint holds {present} {what}; the "
                              f"config and the weights disagree (nothing was built)")


# ---- the load ----------------------------------------------------------------------------------
def _mixed_dtypes_error(owner, where, by_dtype: Dict[torch.dtype, List[str]]) -> CheckpointError:
    parts = [f"{dt} ({len(ks)} keys, e.g. {sorted(ks)[:3]})"
             for dt, ks in sorted(by_dtype.items(), key=lambda kv: -len(kv[1]))]
    return CheckpointError(f"{owner}({where!r}): the checkpoint's tensors mix floating dtypes: "
                           f"{'; '.join(parts)}; pass dtype= to cast all of them to one")


def load_into(module: nn.Module, ckpt_dir: str, key_map: Callable[[str], Optional[str]],
              dtype: Optional[torch.dtype] = None, device=None,
              reader: Optional[CheckpointReader] = None) -> nn.Module:
    """Strict load of `ckpt_dir` into `module` (built on meta). dtype=None keeps the checkpoint's
    floating dtype (mixed floating dtypes among the loaded keys: CheckpointError naming them);
    device=None -> cpu. reader: an already opened checkpoint (saves re-reading the headers).
    Names, shapes and dtype kinds (floating or not) are compared before any tensor is read."""
    owner = f"{type(module).__name__}.from_pretrained"
    if reader is None:
        reader = open_checkpoint(ckpt_dir)
    params = module.state_dict()
    expected = {name: tuple(t.shape) for name, t in params.items()}
    plan: Dict[str, str] = {}            # our name -> checkpoint key
    unexpected, misshaped, duplicated, wrong_kind = [], [], [], []
    by_dtype: Dict[torch.dtype, List[str]] = {}
    for key in reader.keys():
        name = key_map(key)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if name in plan:
            duplicated.append(f"{key} -> {name} (also {plan[name]})")
            continue
        plan[name] = key
        shape, dt = tuple(reader.shape(key)), reader.dtype(key)
        if shape != expected[name]:
            misshaped.append(f"{key}: checkpoint {shape} vs model {expected[name]}")
        floating = isinstance(dt, torch.dtype) and dt.is_floating_point
        if floating != params[name].is_floating_point():
            wrong_kind.append(f"{key}: checkpoint {dt} vs model {params[name].dtype} "
                              f"({reader.file(key).name})")
        elif floating:
            by_dtype.setdefault(dt, []).append(key)
    missing = sorted(set(expected) - set(plan))
    if unexpected or misshaped or duplicated or missing or wrong_kind:
        parts = []
        if missing:
            parts.append(f"missing ({len(missing)}): {_cap(missing)}")
        if unexpected:
            parts.append(f"unexpected ({len(unexpected)}): {_cap(sorted(unexpected))}")
        if misshaped:
            parts.append(f"mis-shaped ({len(misshaped)}): {_cap(misshaped)}")
        if wrong_kind:
            parts.append(f"wrong dtype ({len(wrong_kind)}): {_cap(wrong_kind)}")
        if duplicated:
            parts.append(f"mapped twice ({len(duplicated)}): {_cap(duplicated)}")
        raise CheckpointError(f"{owner}({os.fspath(ckpt_dir)!r}): checkpoint "
                              f"{reader.description} does not match the model: "
                              + "; ".join(parts))
    if dtype is None and len(by_dtype) > 1:
        raise _mixed_dtypes_error(owner, os.fspath(ckpt_dir), by_dtype)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    state: Dict[str, torch.Tensor] = {}
    order = {k: i for i, k in enumerate(reader.keys())}
    for name, key in sorted(plan.items(), key=lambda nk: order[nk[1]]):   # shard by shard
        state[name] = reader.get(key, device=dev, dtype=dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def _cap(items: List[str], n: int = 50) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return f"{items[:n]}{more}"
