"""Swin Transformer V2 (Liu et al., 2022), with upstream's semantics and state-dict layout.

What differs from V1 (models/swin_transformer.py, whose helpers this file reuses):
- res-post-norm blocks: x = x + drop_path(norm1(attn(x))), x = x + drop_path(norm2(mlp(x))), the
  norms' weights starting at zero;
- scaled cosine attention: normalize(q) @ normalize(k)^T * exp(min(logit_scale, log 100)), per head;
- a continuous relative position bias: 16 * sigmoid(cpb_mlp(log-spaced coordinates)), the table
  computed once per forward (not per window), indexed as V1's;
- q and v biases (k has none) as separate parameters beside a bias-free qkv Linear;
- patch merging: concat -> reduction -> norm over 2C (V1 normalises before reducing).

Read top-down: attention -> block -> merging -> stage -> model. Fused ops come from the same
`kernels.Ops` bundle as V1's: --fused_window_process (shift + partition, merge + shift),
--fused_layernorm (every LayerNorm), --fused_dense, --fused_mlp, and --unfused_mha: V1's fused
attention kernel with the cosine normalisation and per-head scale folded into q and k
(kernels/window_attention.py, `cosine_window_attention`); windows up to 32.
"""
import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

import kernels
from kernels.window_attention import cosine_window_attention

from .swin_transformer import (Mlp, PatchMerging, Stage, SwinBackbone, add_window_mask, attention_ops, dense,
                               drop_path_scale, relative_position_index, shifted_window_mask, WindowBlock)

LOGIT_SCALE_MAX = math.log(1. / 0.01)       # exp(logit_scale) is clamped at 100


def relative_coords_table(window_size: int, pretrained_window_size: int = 0) -> torch.Tensor:
    """[1, 2w-1, 2w-1, 2] log-spaced relative coordinates for the cpb MLP: (dy, dx) divided by
    (pretrained window - 1), or (window - 1) when no pretrained window is given, times 8, then
    sign(t) * log2(|t| + 1) / log2(8)."""
    r = torch.arange(-(window_size - 1), window_size, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(r, r, indexing='ij')).permute(1, 2, 0).contiguous()[None]
    table = table / ((pretrained_window_size if pretrained_window_size > 0 else window_size) - 1)
    table = table * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


class WindowAttentionV2(nn.Module):
    """Scaled cosine self-attention inside each window, with a continuous relative position bias.

    Args:
        dim: Channels.
        window_size: (Wh, Ww); square windows only, as upstream's configs.
        num_heads: Attention heads.
        qkv_bias: Learnable q and v biases (k gets none).
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout on the output.
        pretrained_window_size: Window the cpb MLP was trained at (0: this window).
    """

    def __init__(self, dim: int, window_size: Sequence[int], num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., pretrained_window_size: int = 0,
                 ops: Optional[kernels.Ops] = None):
        super().__init__()
        self.dim = dim
        self.window_size = tuple(window_size)
        self.pretrained_window_size = pretrained_window_size
        self.num_heads = num_heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        w = self.window_size[0]
        self.register_buffer('relative_coords_table', relative_coords_table(w, pretrained_window_size))
        self.register_buffer('relative_position_index', relative_position_index(w))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)
        self.ops = attention_ops(ops, attn_drop)

    def relative_position_bias(self) -> torch.Tensor:
        """[heads, N, N]: 16 * sigmoid of the cpb MLP's table, gathered by the relative index."""
        N = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)   # (2w-1)^2, heads
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B*nW, N, C]; mask: [nW, N, N] (0 or -100) or None. Returns [B*nW, N, C]."""
        B_, N, C = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = dense(self.ops, self.qkv, x, qkv_bias)                      # B*nW, N, 3C
        if self.ops.window_attention is not None:     # --unfused_mha: V1's kernel with V2's inputs
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)      # once per step
            x = cosine_window_attention(qkv, self.logit_scale, table, self.relative_position_index, mask,
                                        self.num_heads, attention=self.ops.window_attention)
            return self.proj_drop(dense(self.ops, self.proj, x))
        qkv = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                  # B*nW, heads, N, hd
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)   # B*nW, heads, N, N
        # a Python float as the bound: upstream's CPU tensor there fails on CUDA
        attn = attn * torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()
        attn = attn + self.relative_position_bias().unsqueeze(0)
        attn = self.attn_drop(self.softmax(add_window_mask(attn, mask)))
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)                  # B*nW, N, C
        return self.proj_drop(dense(self.ops, self.proj, x))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, window_size={self.window_size}, '
                f'pretrained_window_size={self.pretrained_window_size}, num_heads={self.num_heads}')

    def flops(self, N: int) -> int:
        """Multiply-adds of one window of N tokens (upstream's count)."""
        flops = N * self.dim * 3 * self.dim
        flops += self.num_heads * N * (self.dim // self.num_heads) * N
        flops += self.num_heads * N * N * (self.dim // self.num_heads)
        return flops + N * self.dim * self.dim


class SwinTransformerBlockV2(WindowBlock):
    """(Shifted-)window cosine attention and MLP, each followed by its norm (res-post-norm)."""

    def __init__(self, dim: int, input_resolution: Sequence[int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4., qkv_bias: bool = True, drop: float = 0.,
                 attn_drop: float = 0., drop_path: float = 0., act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 pretrained_window_size: int = 0, ops: Optional[kernels.Ops] = None):
        super().__init__()
        self._geometry(dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio)
        self.ops = ops or kernels.Ops()
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttentionV2(dim, (self.window_size, self.window_size), num_heads, qkv_bias, attn_drop,
                                      drop, pretrained_window_size, ops=self.ops)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, ops=self.ops)
        H, W = self.input_resolution
        attn_mask = None
        if self.shift_size > 0:
            if H % self.window_size or W % self.window_size:
                raise ValueError(f'feature map {H}x{W} is not a multiple of window {self.window_size}')
            attn_mask = shifted_window_mask(H, W, self.window_size, self.shift_size)
        self.register_buffer('attn_mask', attn_mask)

    def _norm(self, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, norm.weight, norm.bias, norm.eps)

    @property
    def carries_windows(self) -> bool:
        """Whether the stage runs forward_windows: where the MLP residual kernel also writes the next
        block's windows (--fused_layernorm with --fused_window_process on our kernels)."""
        return self.ops.post_norm_add_partition is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H*W, C] -> [B, H*W, C]."""
        return self.forward_windows(x)[0]

    def forward_windows(self, x: torch.Tensor, windows: Optional[torch.Tensor] = None,
                        next_shift: Optional[int] = None) -> tuple:
        """forward() that takes its input's windows from the previous block where it wrote them
        (`windows`: x rolled by this block's shift and partitioned, [B*nW, w, w, C]) and, given the next
        block's shift, writes the next block's windows with its output: -> (x, next windows or None)."""
        H, W = self.input_resolution
        B, L, C = x.shape
        assert L == H * W, f'input has {L} tokens, expected {H}x{W}'
        w = self.window_size
        shortcut = x
        if windows is None:
            windows = self.ops.window_partition(x.view(B, H, W, C), w, self.shift_size)   # B*nW, w, w, C
        attn_windows = self.attn(windows.view(-1, w * w, C), mask=self.attn_mask)       # B*nW, N, C
        if self.ops.post_norm_add is not None:
            # --fused_layernorm: merge (with --fused_window_process), norm1, drop-path and the residual
            # add in one kernel each way; then norm2, drop-path and the add in another (which also
            # writes the next block's windows where it can)
            n1, n2 = self.norm1, self.norm2
            x = self.ops.merge_post_norm_add(shortcut, attn_windows.view(-1, w, w, C),
                                             drop_path_scale(shortcut, self.drop_path), n1.weight, n1.bias, n1.eps,
                                             H, W, self.shift_size)
            args = x, self.mlp(x), drop_path_scale(x, self.drop_path), n2.weight, n2.bias, n2.eps
            if next_shift is not None and self.carries_windows:
                return self.ops.post_norm_add_partition(*args, H, W, w, next_shift)
            return self.ops.post_norm_add(*args), None
        x = self.ops.window_merge(attn_windows.view(-1, w, w, C), H, W, self.shift_size)  # B, H, W, C
        x = shortcut + self.drop_path(self._norm(self.norm1, x.reshape(B, H * W, C)))
        return x + self.drop_path(self._norm(self.norm2, self.mlp(x))), None

    def flops(self) -> int:
        H, W = self.input_resolution
        nW = H * W / self.window_size / self.window_size
        flops = 2 * self.dim * H * W                                      # norm1, norm2
        flops += nW * self.attn.flops(self.window_size * self.window_size)
        return flops + 2 * H * W * self.dim * self.dim * self.mlp_ratio   # mlp


class PatchMergingV2(PatchMerging):
    """2x2 neighbourhood -> concat (as V1) -> 4C->2C reduction -> norm over 2C."""
    NORM_FIRST = False


class BasicLayerV2(Stage):
    """A Swin V2 stage (upstream's BasicLayer in its V2 file)."""

    def __init__(self, dim: int, input_resolution: Sequence[int], depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float = 4., qkv_bias: bool = True, drop: float = 0., attn_drop: float = 0.,
                 drop_path=0., norm_layer=nn.LayerNorm, downsample=None, use_checkpoint: bool = False,
                 pretrained_window_size: int = 0, ops: Optional[kernels.Ops] = None):
        ops = ops or kernels.Ops()
        make_block = functools.partial(
            SwinTransformerBlockV2, dim=dim, input_resolution=input_resolution, num_heads=num_heads,
            window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop,
            norm_layer=norm_layer, pretrained_window_size=pretrained_window_size, ops=ops)
        super().__init__(dim, input_resolution, depth, window_size, make_block, drop_path, norm_layer, downsample,
                         use_checkpoint, ops)

    def _init_respostnorm(self) -> None:
        """The post-norms start at zero: each block starts as the identity."""
        for blk in self.blocks:
            for norm in (blk.norm1, blk.norm2):
                nn.init.constant_(norm.bias, 0)
                nn.init.constant_(norm.weight, 0)


class SwinTransformerV2(SwinBackbone):
    """Swin Transformer V2, keyword-compatible with upstream's class.

    Our keyword switches (all off by default): `fused_window_process`, `fused_layernorm`,
    `fused_mlp`, `fused_dense`, `fused_attention` (--unfused_mha; windows up to 32), resolved through
    `kernels` for `kernel_backend`.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4., qkv_bias: bool = True, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1, norm_layer=nn.LayerNorm, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False, pretrained_window_sizes=(0, 0, 0, 0),
                 fused_window_process: bool = False, fused_layernorm: bool = False, fused_mlp: bool = False,
                 fused_dense: bool = False, fused_attention: bool = False, kernel_backend: str = 'auto',
                 **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f'SwinTransformerV2 got unknown keyword arguments: {sorted(kwargs)}')
        self.ops = kernels.build_ops(window_process=fused_window_process, layer_norm=fused_layernorm, mlp=fused_mlp,
                                     dense=fused_dense, window_attention=fused_attention, backend=kernel_backend,
                                     post_norm=True)
        if dict(self.ops.chosen).get('window_attention', 'torch') != 'torch' and window_size ** 2 > 1024:
            raise kernels.KernelUnavailable(
                f'--unfused_mha: the fused window attention holds windows of up to 32x32 tokens, this model\'s '
                f'are {window_size}x{window_size}: turn the flag off for this config (the other flags apply)')
        self._build_stem(img_size, patch_size, in_chans, embed_dim, depths, norm_layer, ape, patch_norm, drop_rate,
                         mlp_ratio, num_classes)
        self.layers = nn.ModuleList([
            BasicLayerV2(**self._stage_args(i, depths, drop_path_rate), num_heads=num_heads[i],
                         window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                         attn_drop=attn_drop_rate, norm_layer=norm_layer,
                         downsample=PatchMergingV2 if i < self.num_layers - 1 else None,
                         use_checkpoint=use_checkpoint, pretrained_window_size=pretrained_window_sizes[i], ops=self.ops)
            for i in range(self.num_layers)])
        self._build_head(norm_layer)
        for layer in self.layers:
            layer._init_respostnorm()

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'cpb_mlp', 'logit_scale', 'relative_position_bias_table'}
