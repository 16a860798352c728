"""Reading checkpoints lazily: keys, shapes and dtypes first, tensors only when asked for.

    reader = open_checkpoint(path)      # a file or a folder
    reader.keys(); reader.shape(key); reader.dtype(key); reader.get(key, device="cpu")

Accepted, in this order of preference:
  - a folder with `model.safetensors.index.json` (sharded safetensors), `model.safetensors`, or
    any `*.safetensors` files (their union);
  - a folder with `pytorch_model.bin.index.json` or `pytorch_model.bin` (PyTorch pickles, read
    with `torch.load(weights_only=True, mmap=True)`; convert them once with
    `python -m hires_lmm.convert`), or any `*.bin`/`*.pt`/`*.pth` files (their union);
  - one `.safetensors`, `.bin`/`.pt`/`.pth` file, or an `*.index.json` file.
Safetensors files are memory-mapped (`safetensors.safe_open`): a full LLaVA checkpoint costs
only the tensors that are read. Pickles are memory-mapped too (zip format, `mmap=True`); only one
pickle shard is loaded at a time (keys() lists the keys shard by shard, so reading them in that
order loads each shard once); old non-zip pickles cannot be mapped and are read whole, one at a
time.

Rules (each broken one raises CheckpointError, a ValueError, naming the file and what is wrong):
  - every file must be a readable safetensors file or a pickle that `weights_only=True` accepts
    (no code from a checkpoint ever runs, and no advice to turn that off is ever given);
  - a key may live in one file only: the same key in two files or shards is an error, never
    "the last one wins";
  - with an index, the index decides: its `weight_map` must be a {key: shard file} object, every
    shard it names must exist inside the checkpoint folder (no absolute paths, no `..`; the names
    are checked as written, so symlinked files such as the Hugging Face cache's still load), every
    key it lists must be in the shard it names, and every key of a shard must be listed for that
    shard;
  - a file or shard that is missing raises CheckpointNotFoundError (a CheckpointError and a
    FileNotFoundError).
"""
import json
import os
import re
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Dict, Iterable, List, Optional, Tuple

import torch

__all__ = ["CheckpointError", "CheckpointNotFoundError", "CheckpointReader", "open_checkpoint",
           "load_pickle_state_dict", "read_json"]


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Wrappers some training codes put around the state dict (FB ConvNeXt: {"model": ...}).
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_ema")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_SHOW = 8   # how many keys an error lists before "... and N more"


class CheckpointError(ValueError):
    """A checkpoint (or its config.json) that cannot be used: unreadable or damaged files, an
    inconsistent index, a bad config field, keys that do not fit the model, or a checkpoint of
    another kind. The message names the file (the shard) and what is wrong."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs does not exist (the path itself, a shard, config.json)."""


def _some(items, n: int = _SHOW) -> str:
    items = list(items)
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return f"{items[:n]}{more}"


def read_json(path, what: str = "JSON file") -> object:
    """json.load(path) with every failure as a CheckpointError naming the file (and the line and
    column of a syntax error)."""
    path = Path(os.fspath(path))
    if not path.exists():
        raise CheckpointNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a regular file (a folder?)")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        return json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} "
                              f"column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} {path} is not UTF-8 text ({e.reason} at byte "
                              f"{e.start})") from None
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read: {e.strerror or e}") from None


def _check_regular_file(f: Path, what: str = "checkpoint file") -> None:
    if not f.exists():
        raise CheckpointNotFoundError(f"{what} {f} does not exist")
    if not f.is_file():
        raise CheckpointError(f"{what} {f} is not a regular file (a folder?)")


def _pickle_reason(e: BaseException) -> str:
    """What went wrong in torch.load, without torch's advice to load with weights_only=False."""
    import pickle
    if isinstance(e, pickle.UnpicklingError):
        # keep only the line naming what was refused ("Unsupported global: GLOBAL x.y", ...)
        lines = [ln.strip() for ln in str(e).splitlines()
                 if re.search(r"GLOBAL|[Uu]nsupported|Unpickler", ln) and "weights_only" not in ln]
        what = f" ({lines[0]})" if lines else ""
        return ("it holds something other than tensors and plain containers, or is not a pickle "
                f"at all{what}; hires_lmm loads checkpoints with weights_only=True only")
    if isinstance(e, EOFError):
        return "it ends before the pickle does (truncated)"
    if isinstance(e, RuntimeError) and "zip archive" in str(e):
        return "its zip archive is damaged or truncated (" + str(e).split(".")[0] + ")"
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def load_pickle_state_dict(path, mmap: bool = True) -> Dict[str, torch.Tensor]:
    """torch.load(path, weights_only=True) -> {name: tensor}; unwraps {"model": {...}} style
    wrappers; entries that are not tensors are dropped. Zip-format files are memory-mapped when
    mmap (no copy of the data in memory); old non-zip pickles cannot be and are read whole.
    Raises CheckpointError naming the file when it is empty, truncated, damaged, refused by
    weights_only, or not a state dict."""
    path = Path(os.fspath(path))
    _check_regular_file(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty (0 bytes)")
    use_mmap = bool(mmap) and zipfile.is_zipfile(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=use_mmap)
    except Exception as e:   # noqa: BLE001  every failure of torch.load is a damaged file here
        raise CheckpointError(f"checkpoint file {path} cannot be read as a PyTorch state dict: "
                              f"{_pickle_reason(e)}") from None
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint file {path} holds a {type(obj).__name__}, expected a "
                              f"dict of tensors (a state dict)")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


class _Entry:
    __slots__ = ("file", "shape", "dtype")

    def __init__(self, file: Path, shape: Tuple[int, ...], dtype):
        self.file, self.shape, self.dtype = file, shape, dtype


class CheckpointReader:
    """Union of one or more checkpoint files as one lazy {key: tensor} view.

    files: the files (safetensors or pickles); weight_map/index: an index's {key: file} and the
    index's path, when the files come from one (the index then decides: see the module docstring).
    Metadata (keys, shapes, dtypes) is read at construction; safetensors data only by get(), pickle
    shards one at a time (the last one loaded is kept, memory-mapped)."""

    def __init__(self, files: List[Path], description: str,
                 weight_map: Optional[Dict[str, Path]] = None, index: Optional[Path] = None):
        self.description = description
        self.index = index
        self._entries: Dict[str, _Entry] = {}
        self._st: Dict[Path, object] = {}            # safetensors handles
        self._pickle: Tuple[Optional[Path], Dict[str, torch.Tensor]] = (None, {})
        dups: List[str] = []
        files = [Path(os.fspath(f)) for f in files]
        for f in files:
            for key, shape, dtype in self._scan(f):
                prev = self._entries.get(key)
                if prev is not None:
                    named = ""
                    if weight_map is not None:
                        named = f" (the index names {getattr(weight_map.get(key), 'name', None)})"
                    dups.append(f"{key!r} in {prev.file.name} and {f.name}{named}")
                    continue
                self._entries[key] = _Entry(f, shape, dtype)
        where = f"the index {index}" if index is not None else description
        if dups:
            raise CheckpointError(f"open_checkpoint: {where}: {len(dups)} key(s) are stored in "
                                  f"more than one file (which copy is meant is ambiguous): "
                                  f"{_some(dups)}")
        if weight_map is not None:
            absent = [f"{k!r} (index: {f.name})" for k, f in weight_map.items()
                      if k not in self._entries]
            if absent:
                raise CheckpointError(f"open_checkpoint: {where} lists {len(absent)} key(s) that "
                                      f"their shard does not hold: {_some(absent)}")
            wrong = [f"{k!r} is in {e.file.name}, the index names "
                     f"{weight_map[k].name if k in weight_map else 'no shard for it'}"
                     for k, e in self._entries.items() if weight_map.get(k) != e.file]
            if wrong:
                raise CheckpointError(f"open_checkpoint: the shards disagree with {where}: "
                                      f"{_some(wrong)}")

    # -- reading metadata --------------------------------------------------------------------
    def _scan(self, f: Path):
        _check_regular_file(f)
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
                out = []
                for k in h.keys():
                    sl = h.get_slice(k)
                    out.append((k, tuple(int(s) for s in sl.get_shape()), sl.get_dtype()))
            except Exception as e:   # noqa: BLE001  safetensors' own errors do not name the file
                raise CheckpointError(f"checkpoint file {f} is not a valid safetensors file: "
                                      f"{e}") from None
            self._st[f] = h
            return [(k, s, _ST_DTYPES.get(d, d)) for k, s, d in out]
        if f.suffix in _PICKLE_SUFFIXES:
            sd = self._load_pickle(f)
            return [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
        raise CheckpointError(f"checkpoint file {f} has an unsupported type (want .safetensors, "
                              f".bin, .pt or .pth)")

    def _load_pickle(self, f: Path) -> Dict[str, torch.Tensor]:
        if self._pickle[0] != f:
            self._pickle = (None, {})                # drop the previous shard first
            self._pickle = (f, load_pickle_state_dict(f))
        return self._pickle[1]

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"open_checkpoint: {self.description} has no key {key!r}") from None

    # -- public view -------------------------------------------------------------------------
    def keys(self) -> Iterable[str]:
        """Every key, file by file (the files' order), so a pass in this order reads each pickle
        shard once."""
        return self._entries.keys()

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def files(self) -> List[Path]:
        """The files the keys come from, in keys() order."""
        return list(dict.fromkeys(e.file for e in self._entries.values()))

    def file(self, key: str) -> Path:
        """The file (shard) that holds key."""
        return self._entry(key).file

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._entry(key).shape

    def dtype(self, key: str):
        """The stored dtype (a torch.dtype; a string for a safetensors dtype torch lacks)."""
        return self._entry(key).dtype

    def get(self, key: str, device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The tensor (memory-mapped when the file allows); floating tensors cast to dtype when
        given, then moved to device. Errors name the file and the key."""
        e = self._entry(key)
        if isinstance(e.dtype, str):
            raise CheckpointError(f"checkpoint file {e.file}: key {key!r} has dtype {e.dtype}, "
                                  f"which torch cannot hold")
        if e.file.suffix == ".safetensors":
            try:
                t = self._st[e.file].get_tensor(key)
            except Exception as err:   # noqa: BLE001
                raise CheckpointError(f"checkpoint file {e.file}: key {key!r} cannot be read: "
                                      f"{err}") from None
        else:
            t = self._load_pickle(e.file)[key]
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        return t


def _shard_path(index: Path, name) -> Path:
    """The shard an index names, refused unless it is a relative path inside the index's folder."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"index {index}: a weight_map value must be a shard file name, "
                              f"got {name!r}")
    pp, wp = PurePosixPath(name), PureWindowsPath(name)
    if pp.is_absolute() or wp.is_absolute() or wp.drive or name.startswith(("/", "\\")):
        raise CheckpointError(f"index {index}: shard {name!r} is an absolute path; shards must "
                              f"be files inside the checkpoint folder")
    if ".." in pp.parts or ".." in wp.parts:
        raise CheckpointError(f"index {index}: shard {name!r} leaves the checkpoint folder "
                              f"('..'); shards must be files inside it")
    return index.parent / pp


def _from_index(index: Path) -> CheckpointReader:
    data = read_json(index, "index")
    if not isinstance(data, dict) or "weight_map" not in data:
        raise CheckpointError(f"index {index} has no 'weight_map' (expected a JSON object with "
                              f"\"weight_map\": {{key: shard file}})")
    wm = data["weight_map"]
    if not isinstance(wm, dict):
        raise CheckpointError(f"index {index}: 'weight_map' must be a JSON object {{key: shard "
                              f"file}}, got {type(wm).__name__}")
    if not wm:
        raise CheckpointError(f"index {index}: 'weight_map' is empty")
    paths: Dict[str, Path] = {}
    weight_map: Dict[str, Path] = {}
    for key, name in wm.items():
        if name not in paths:
            paths[name] = _shard_path(index, name)
        weight_map[key] = paths[name]
    files = sorted(set(paths.values()))
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointNotFoundError(f"open_checkpoint: the index {index} names shard files that "
                                      f"do not exist: {_some(missing)}")
    return CheckpointReader(files, str(index), weight_map=weight_map, index=index)


def open_checkpoint(path) -> CheckpointReader:
    """A CheckpointReader over a checkpoint file or folder (see the module docstring)."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise CheckpointNotFoundError(f"open_checkpoint: argument 'path' does not exist: {p}")
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _from_index(p)
        return CheckpointReader([p], str(p))
    if not p.is_dir():
        raise CheckpointError(f"open_checkpoint: argument 'path' is neither a file nor a folder: "
                              f"{p}")
    if (p / "model.safetensors.index.json").exists():
        return _from_index(p / "model.safetensors.index.json")
    if (p / "model.safetensors").exists():
        return CheckpointReader([p / "model.safetensors"], str(p / "model.safetensors"))
    st = sorted(p.glob("*.safetensors"))
    if st:
        return CheckpointReader(st, str(p))
    if (p / "pytorch_model.bin.index.json").exists():
        return _from_index(p / "pytorch_model.bin.index.json")
    if (p / "pytorch_model.bin").exists():
        return CheckpointReader([p / "pytorch_model.bin"], str(p / "pytorch_model.bin"))
    bins = sorted(f for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES)
    if bins:
        return CheckpointReader(bins, str(p))
    raise CheckpointNotFoundError(f"open_checkpoint: no *.safetensors, "
                                  f"model.safetensors.index.json or pytorch_model.bin in the "
                                  f"folder {p}")
