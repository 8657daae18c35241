"""Swin-MLP: Swin V1 with each window's attention replaced by a per-head spatial MLP, with upstream's
semantics and state-dict layout.

The spatial MLP mixes the N = w*w tokens of a window, separately for each head's channels: for head h,
out[n, :] = sum_m W_h[n, m] x[m, :] + b_h[n], one N x N matrix per head, stored (as upstream) as a
grouped 1x1 Conv1d over heads * N channels (`spatial_mlp.weight` [heads*N, N, 1]). Shifted windows
pad the map (w - s before, s after, on both axes, with zeros) instead of rolling it, so no mask is
needed; the map is cut back after merging.

Flags: --fused_layernorm (every LayerNorm, the residual add + norm2 as one kernel, and the MLP's residual
add inside the next block's norm1 kernel),
--fused_window_process (pad, partition, spatial MLP, merge and crop as one kernel each way:
kernels/spatial_mlp.py), --fused_dense, --fused_mlp. --unfused_mha is refused: Swin-MLP has no attention.
"""
import functools
from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath

import kernels
from kernels.spatial_mlp import spatial_mlp_padding

from .swin_transformer import Mlp, PatchMerging, Stage, SwinBackbone, WindowBlock, add_residual, drop_path_scale


class SwinMLPBlock(WindowBlock):
    """Spatial MLP over (shifted, padded) windows and a channel MLP, each with a pre-norm and a
    drop-path residual."""

    def __init__(self, dim: int, input_resolution: Sequence[int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4., drop: float = 0., drop_path: float = 0.,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, ops: Optional[kernels.Ops] = None):
        super().__init__()
        self._geometry(dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio)
        w, s = self.window_size, self.shift_size
        self.padding = spatial_mlp_padding(w, s)                              # left, right, top, bottom
        self.ops = ops or kernels.Ops()
        self.norm1 = norm_layer(dim)
        self.spatial_mlp = nn.Conv1d(num_heads * w * w, num_heads * w * w, kernel_size=1, groups=num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, ops=self.ops)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The window spatial MLP: x [B, H, W, C] (normalised) -> [B, H, W, C]."""
        return self.ops.spatial_mlp(x, self.spatial_mlp.weight, self.spatial_mlp.bias, self.num_heads,
                                    self.window_size, self.shift_size)

    @property
    def defers_mlp_residual(self) -> bool:
        """Whether the stage runs forward_deferred: where the residual add + LayerNorm is our kernel."""
        return self.ops.add_norm_fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H*W, C] -> [B, H*W, C]."""
        return add_residual(*self.forward_deferred(x))

    def forward_deferred(self, x: torch.Tensor, pending: Optional[tuple] = None) -> tuple:
        """forward() with the MLP's residual add left to the next block: -> (h, (branch, scale)), the
        block's output being h + branch * scale (scale: drop-path's per-sample factor, drawn as timm's
        DropPath draws it, or None). `pending`, the previous block's (branch, scale), is added inside
        norm1's kernel (one pass in place of the drop-path product, the add and the norm)."""
        H, W = self.input_resolution
        B, L, C = x.shape
        assert L == H * W, f'input has {L} tokens, expected {H}x{W}'
        n1, n2 = self.norm1, self.norm2
        if pending is None:
            shortcut = x
            x = self.ops.layer_norm(x, n1.weight, n1.bias, n1.eps)
        else:
            shortcut, x = self.ops.add_layer_norm(x, *pending, n1.weight, n1.bias, n1.eps)
        branch = self.spatial(x.view(B, H, W, C)).reshape(B, H * W, C)
        # x = shortcut + drop_path(branch), y = norm2(x): one kernel under --fused_layernorm
        x, y = self.ops.add_layer_norm(shortcut, branch, drop_path_scale(shortcut, self.drop_path),
                                       n2.weight, n2.bias, n2.eps)
        branch = self.mlp(y)
        return x, (branch, drop_path_scale(branch, self.drop_path))

    def flops(self) -> int:
        """Upstream's count."""
        H, W = self.input_resolution
        w = self.window_size
        nW = (H / w + 1) * (W / w + 1) if self.shift_size > 0 else H * W / w / w
        flops = 2 * self.dim * H * W                                      # norm1, norm2
        flops += nW * self.dim * (w * w) * (w * w)                        # spatial MLP
        return flops + 2 * H * W * self.dim * self.dim * self.mlp_ratio   # channel MLP


class BasicLayerMLP(Stage):
    """A Swin-MLP stage (upstream's BasicLayer in its Swin-MLP file)."""

    def __init__(self, dim: int, input_resolution: Sequence[int], depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float = 4., drop: float = 0., drop_path=0., norm_layer=nn.LayerNorm, downsample=None,
                 use_checkpoint: bool = False, ops: Optional[kernels.Ops] = None):
        ops = ops or kernels.Ops()
        make_block = functools.partial(
            SwinMLPBlock, dim=dim, input_resolution=input_resolution, num_heads=num_heads, window_size=window_size,
            mlp_ratio=mlp_ratio, drop=drop, norm_layer=norm_layer, ops=ops)
        super().__init__(dim, input_resolution, depth, window_size, make_block, drop_path, norm_layer, downsample,
                         use_checkpoint, ops)


class SwinMLP(SwinBackbone):
    """Swin-MLP, keyword-compatible with upstream's class, plus the fused switches that apply."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4., drop_rate: float = 0., drop_path_rate: float = 0.1, norm_layer=nn.LayerNorm,
                 ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False,
                 fused_window_process: bool = False, fused_layernorm: bool = False, fused_mlp: bool = False,
                 fused_dense: bool = False, fused_attention: bool = False, kernel_backend: str = 'auto',
                 **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f'SwinMLP got unknown keyword arguments: {sorted(kwargs)}')
        if fused_attention:
            raise kernels.KernelUnavailable('--unfused_mha: Swin-MLP has no attention to fuse; turn the flag off '
                                            'for MODEL.TYPE swin_mlp (the other flags apply)')
        self.ops = kernels.build_ops(window_process=fused_window_process, layer_norm=fused_layernorm, mlp=fused_mlp,
                                     dense=fused_dense, backend=kernel_backend, spatial_mlp=True)
        self._build_stem(img_size, patch_size, in_chans, embed_dim, depths, norm_layer, ape, patch_norm, drop_rate,
                         mlp_ratio, num_classes)
        self.layers = nn.ModuleList([
            BasicLayerMLP(**self._stage_args(i, depths, drop_path_rate), num_heads=num_heads[i],
                          window_size=window_size, mlp_ratio=mlp_ratio, drop=drop_rate, norm_layer=norm_layer,
                          downsample=PatchMerging if i < self.num_layers - 1 else None,
                          use_checkpoint=use_checkpoint, ops=self.ops)
            for i in range(self.num_layers)])
        self._build_head(norm_layer)
