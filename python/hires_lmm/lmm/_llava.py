"""Loading pieces shared by the LLaVA-style families with a CLIP tower (deepstack_vl.py, slime.py):
the CLIP-L/336 tower from the LLM shards or from the folder config.json's mm_vision_tower names,
and one strict, header-checked load of everything else (LLM + the family's visual modules) with
the family's key map."""
import logging
import os
import re
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..models._weights import load_into
from ..models.clip import ClipVisionConfig, ClipVisionTower

__all__ = ["TOWER_PREFIX", "load_clip_tower", "load_parts"]

log = logging.getLogger(__name__)

TOWER_PREFIX = "model.vision_tower.vision_tower."


def _clip_name(key: str) -> Optional[str]:
    """model.vision_tower.vision_tower.[vision_model.]<HF CLIP name> -> our tower's name."""
    if not key.startswith(TOWER_PREFIX):
        return None
    key = key[len(TOWER_PREFIX):]
    if key.startswith("vision_model."):
        key = key[len("vision_model."):]
    return None if key == "embeddings.position_ids" else key


def _clip_config_from_shapes(reader) -> ClipVisionConfig:
    """CLIP vision config of a tower stored inside LLaVA shards (no config.json of its own):
    sizes from the stored shapes; heads = hidden / 64 (CLIP-L: 16), activation quick_gelu and
    eps 1e-5 (OpenAI CLIP)."""
    by = {_clip_name(k): k for k in reader.keys() if _clip_name(k) is not None}
    hidden, ch, patch, _ = reader.shape(by["embeddings.patch_embedding.weight"])
    n_pos = reader.shape(by["embeddings.position_embedding.weight"])[0]
    inter = reader.shape(by["encoder.layers.0.mlp.fc1.weight"])[0]
    layers = 1 + max(int(m.group(1)) for k in by
                     for m in [re.match(r"encoder\.layers\.(\d+)\.", k)] if m)
    side = int(round((n_pos - 1) ** 0.5))
    return ClipVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // 64), num_channels=ch,
                            image_size=side * patch, patch_size=patch)


def load_clip_tower(path: Path, reader, cfg: dict, vision_tower, dtype, dev,
                    where: str = "hires_lmm.load") -> ClipVisionTower:
    """The CLIP tower: from the folder the user passed (vision_tower=, the local copy of the repo
    config.json's mm_vision_tower names) when given, else from the LLM shards'
    model.vision_tower.vision_tower.* keys; neither: one error naming mm_vision_tower and the
    option. Nothing is downloaded."""
    in_shards = any((_clip_name(k) or "") == "embeddings.patch_embedding.weight"
                    for k in reader.keys())
    if vision_tower is not None:
        tower_dir = Path(os.fspath(vision_tower))
        if not tower_dir.exists():
            raise FileNotFoundError(f"{where}: argument 'vision_tower' does not exist: {tower_dir}")
        return ClipVisionTower.from_pretrained(str(tower_dir), dtype=dtype, device=dev)
    if not in_shards:
        raise ValueError(
            f"{where}: the checkpoint {path} has no {TOWER_PREFIX}* keys and no vision tower folder "
            f"was given. config.json's mm_vision_tower is {cfg.get('mm_vision_tower')!r}: download "
            f"that repository yourself and pass its local folder as vision_tower= (CLI: "
            f"--vision-tower PATH); nothing is downloaded")
    config = _clip_config_from_shapes(reader)
    with torch.device("meta"):
        tower = ClipVisionTower(config)

    load_into(tower, str(path), _clip_name, dtype=dtype, device=dev, reader=reader)
    return tower.eval()


def load_parts(part: nn.Module, path: Path, reader, key_map: Callable[[str], Optional[str]],
               dtype, dev, progress: Optional[bool], family: str) -> None:
    """Strict load of `part` (built on meta) from the checkpoint: names and shapes checked from
    the headers first (one error listing missing / unexpected / mis-shaped keys), then shard by
    shard; a tqdm bar when loading takes more than 2 s (progress=False: never)."""
    keys = list(reader.keys())
    expected = {n: tuple(t.shape) for n, t in part.state_dict().items()}
    problems = []
    for k in keys:
        n = key_map(k)
        if n is not None and n not in expected:
            problems.append(f"unexpected {k}")
        elif n is not None and tuple(reader.shape(k)) != expected[n]:
            problems.append(f"mis-shaped {k}: checkpoint {tuple(reader.shape(k))} vs model {expected[n]}")
    provided = {key_map(k) for k in keys}
    problems += [f"missing {n}" for n in sorted(set(expected) - provided)]
    if problems:
        raise ValueError(f"hires_lmm.load: the checkpoint {path} does not match the {family} "
                         f"model ({len(problems)} problem(s)): " + "; ".join(problems[:30]))
    bar = None
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=2 * len(keys), desc=f"loading {family}", unit="key",
                   delay=0 if progress else 2.0, disable=progress is False, leave=False)
    except ImportError:
        pass

    def counted(k):            # load_into asks twice per key: once to decide, once to place
        if bar is not None:
            bar.update(1)
        return key_map(k)

    try:
        load_into(part, str(path), counted, dtype=dtype, device=dev, reader=reader)
    finally:
        if bar is not None:
            bar.close()
