"""DeepStack's stack builder (specs/deepstack.md 1.2): crop features -> high-resolution map ->
2D dilated sampling into stacks.

    hires = mosaic_crops(crop_feats, grid_h, grid_w)      # (B, grid_h*P, grid_w*P, C)
    stacks = dilated_stacks(hires, (grid_h, grid_w))      # (grid_h*grid_w, B, P*P, C)

Stack i*s_w + j = hires[:, i::s_h, j::s_w] flattened row-major, i.e. token (y, x) of stack (i, j)
is hires[y*s_h + i, x*s_w + j]: each stack token is the spatial neighbour of the global token
(y, x). For DeepStack-L the stacks go to Llama(deepstack_visual_embeds=...) after being placed on
the visual rows; for DeepStack-V they go to ClipVisionTower(deepstack_stacks=...)."""
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["dilated_stacks", "mosaic_crops", "deepstack_stacks_from_crops"]


def _pair(s) -> Tuple[int, int]:
    return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))


def dilated_stacks(hires: torch.Tensor, s: Union[int, Tuple[int, int]] = 2,
                   grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """hires (B, H*s_h, W*s_w, C), or tokens (B, H*s_h*W*s_w, C) with grid=(H*s_h, W*s_w) ->
    stacks (s_h*s_w, B, H*W, C), stack i*s_w + j = hires[:, i::s_h, j::s_w].flatten(1, 2).
    s: int or (s_h, s_w). Returns a new contiguous tensor."""
    sh, sw = _pair(s)
    if hires.dim() == 3:
        if grid is None:
            raise ValueError("dilated_stacks: argument 'grid' (rows, cols) is required for tokens (B, N, C)")
        if grid[0] * grid[1] != hires.shape[1]:
            raise ValueError(f"dilated_stacks: argument 'grid' {tuple(grid)} does not match "
                             f"{hires.shape[1]} tokens")
        hires = hires.reshape(hires.shape[0], grid[0], grid[1], hires.shape[2])
    if hires.dim() != 4:
        raise ValueError(f"dilated_stacks: argument 'hires' must be (B, H, W, C) or (B, N, C), "
                         f"got {tuple(hires.shape)}")
    B, HH, WW, C = hires.shape
    if sh < 1 or sw < 1 or HH % sh or WW % sw:
        raise ValueError(f"dilated_stacks: argument 's' ({sh}, {sw}) must divide the map "
                         f"({HH}, {WW})")
    H, W = HH // sh, WW // sw
    # hires[b, y*sh + i, x*sw + j] -> (b, y, i, x, j) -> stacks[i*sw + j, b, y*W + x]
    x = hires.reshape(B, H, sh, W, sw, C).permute(2, 4, 0, 1, 3, 5)
    return x.reshape(sh * sw, B, H * W, C)


def mosaic_crops(crop_feats: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """crop_feats ([B,] grid_h*grid_w, P*P, C), crops in row-major grid order, tokens row-major
    inside a crop -> the hi-res map ([B,] grid_h*P, grid_w*P, C), DeepStack-VL's
    view(grid_h, grid_w, P, P, C).permute(0, 2, 1, 3, 4)."""
    squeeze = crop_feats.dim() == 3
    x = crop_feats.unsqueeze(0) if squeeze else crop_feats
    if x.dim() != 4 or x.shape[1] != grid_h * grid_w:
        raise ValueError(f"mosaic_crops: argument 'crop_feats' must be ([B,] {grid_h * grid_w}, P*P, C), "
                         f"got {tuple(crop_feats.shape)}")
    B, _, PP, C = x.shape
    P = int(round(PP ** 0.5))
    if P * P != PP:
        raise ValueError(f"mosaic_crops: argument 'crop_feats' must hold P*P tokens per crop, got {PP}")
    m = x.reshape(B, grid_h, grid_w, P, P, C).permute(0, 1, 3, 2, 4, 5)
    m = m.reshape(B, grid_h * P, grid_w * P, C)
    return m[0] if squeeze else m


def deepstack_stacks_from_crops(crop_feats: Sequence[torch.Tensor],
                                grids: Sequence[Tuple[int, int]], num_crops: int = 4) -> torch.Tensor:
    """Per sample b: crop_feats[b] (grid_h*grid_w, P*P, C) with grids[b] = (grid_h, grid_w) ->
    (num_crops, B, P*P, C): mosaic, dilated sampling with s = (grid_h, grid_w) (stack
    i*grid_w + j), zero stacks up to num_crops (DeepStack-VL's process_plain_deepstack)."""
    if len(crop_feats) != len(grids):
        raise ValueError("deepstack_stacks_from_crops: argument 'grids' needs one (grid_h, grid_w) per sample")
    out = []
    for feats, (gh, gw) in zip(crop_feats, grids):
        if gh * gw > num_crops:
            raise ValueError(f"deepstack_stacks_from_crops: argument 'num_crops' ({num_crops}) is "
                             f"smaller than the grid {gh}x{gw}")
        st = dilated_stacks(mosaic_crops(feats, gh, gw).unsqueeze(0), (gh, gw))[:, 0]
        if st.shape[0] < num_crops:
            st = torch.cat([st, st.new_zeros((num_crops - st.shape[0],) + tuple(st.shape[1:]))])
        out.append(st)
    return torch.stack(out, dim=1)
