"""Swin Transformer V1 (Liu et al., 2021), with upstream's semantics and state-dict layout.

Read top-down: helpers -> attention -> block -> merging -> stage -> embedding -> model.
Every fused op is looked up once at build time in `kernels` (an `ops` bundle handed down to the
blocks); with every flag off the forward is upstream's sequence of PyTorch ops. No flag adds,
removes or renames a parameter or buffer: a checkpoint saved with any flags loads with any other.
"""
import functools
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint as checkpoint
from timm.layers import DropPath, trunc_normal_

import kernels


def relative_position_index(window_size: int) -> torch.Tensor:
    """[N, N] index into the (2w-1)^2-row bias table: (dy + w-1) * (2w-1) + (dx + w-1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                        indexing='ij')).flatten(1)           # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)      # N, N, 2 (dy, dx)
    rel = rel + (window_size - 1)
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]              # N, N


def shifted_window_mask(H: int, W: int, window_size: int, shift_size: int) -> torch.Tensor:
    """[nW, N, N] additive mask: 0 within a region of the shifted map, -100 across regions."""
    img_mask = torch.zeros(1, H, W, 1)
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    region = 0
    for h in slices:
        for w in slices:
            img_mask[:, h, w, :] = region
            region += 1
    mask_windows = kernels.window_partition_ref(img_mask, window_size, 0).view(-1, window_size ** 2)  # nW, N
    mask = mask_windows[:, None, :] - mask_windows[:, :, None]                          # nW, N, N
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


_OWN_BIAS = object()


def dense(ops: kernels.Ops, module: nn.Linear, x: torch.Tensor, bias=_OWN_BIAS) -> torch.Tensor:
    """`module`'s Linear (with `bias` instead of its own where given) through the ops bundle. A module
    swapped for an FP8 Linear (amp.enable_fp8) runs its own forward, with any outside bias added."""
    if type(module) is not nn.Linear:
        y = module(x)
        return y if bias is _OWN_BIAS or bias is None else y + bias.to(y.dtype)
    return ops.linear(x, module.weight, module.bias if bias is _OWN_BIAS else bias)


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> dropout -> fc2 -> dropout; fused as one op under --fused_mlp."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer=nn.GELU, drop: float = 0.,
                 ops: Optional[kernels.Ops] = None):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)
        self.ops = ops or kernels.Ops()
        if self.ops.mlp is not None and drop > 0:
            raise ValueError(f"--fused_mlp needs MLP dropout 0 (MODEL.DROP_RATE is {drop}): "
                             f"set MODEL.DROP_RATE 0.0 or turn --fused_mlp off")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops.mlp is not None:
            return self.ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        x = self.drop(self.act(dense(self.ops, self.fc1, x)))
        return self.drop(dense(self.ops, self.fc2, x))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias.

    Args:
        dim: Channels.
        window_size: (Wh, Ww); square windows only, as upstream's configs.
        num_heads: Attention heads.
        qkv_bias: Learnable bias on q, k, v.
        qk_scale: Overrides head_dim ** -0.5.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout on the output.
    """

    def __init__(self, dim: int, window_size: Sequence[int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 ops: Optional[kernels.Ops] = None):
        super().__init__()
        self.dim = dim
        self.window_size = tuple(window_size)
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        w = self.window_size[0]
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, num_heads))
        self.register_buffer('relative_position_index', relative_position_index(w))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)
        self.softmax = nn.Softmax(dim=-1)
        self.ops = attention_ops(ops, attn_drop)

    def relative_position_bias(self) -> torch.Tensor:
        """[heads, N, N] bias gathered from the table (once per step, shared by all windows)."""
        N = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(N, N, -1).permute(2, 0, 1)                       # heads, N, N

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B*nW, N, C]; mask: [nW, N, N] (0 or -100) or None. Returns [B*nW, N, C]."""
        B_, N, C = x.shape
        qkv = dense(self.ops, self.qkv, x)                                # B*nW, N, 3C
        if self.ops.window_attention is not None:
            x = self.ops.window_attention(qkv, self.relative_position_bias_table,
                                          self.relative_position_index, mask, self.num_heads,
                                          self.scale)                   # B*nW, N, C
        else:
            bias = self.relative_position_bias()
            qkv = qkv.reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]                              # B*nW, heads, N, hd
            attn = (q * self.scale) @ k.transpose(-2, -1)                 # B*nW, heads, N, N
            attn = attn + bias.unsqueeze(0)
            attn = self.attn_drop(self.softmax(add_window_mask(attn, mask)))
            x = (attn @ v).transpose(1, 2).reshape(B_, N, C)              # B*nW, N, C
        return self.proj_drop(dense(self.ops, self.proj, x))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}'

    def flops(self, N: int) -> int:
        """Multiply-adds of one window of N tokens (upstream's count)."""
        flops = N * self.dim * 3 * self.dim                               # qkv
        flops += self.num_heads * N * (self.dim // self.num_heads) * N    # q @ k^T
        flops += self.num_heads * N * N * (self.dim // self.num_heads)    # attn @ v
        flops += N * self.dim * self.dim                                  # proj
        return flops


def attention_ops(ops: Optional[kernels.Ops], attn_drop: float) -> kernels.Ops:
    """An attention module's ops (upstream's by default); the fused attention has no dropout."""
    ops = ops or kernels.Ops()
    if ops.window_attention is not None and attn_drop > 0:
        raise ValueError(f"--unfused_mha (fused window attention) needs attention dropout 0, "
                         f"got {attn_drop}: turn the flag off or the dropout off")
    return ops


def add_window_mask(attn: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """attn [B*nW, heads, N, N] + the shifted-window mask [nW, N, N] of each window (None: as is)."""
    if mask is None:
        return attn
    nW, N = mask.shape[0], mask.shape[-1]
    heads = attn.shape[1]
    return (attn.view(-1, nW, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, N, N)


def fit_window(resolution: Sequence[int], window_size: int, shift_size: int) -> tuple:
    """-> (window, shift) of a block on a map of `resolution`: where one window covers the map there
    is no shift and the window shrinks to the map (upstream's rule)."""
    if min(resolution) <= window_size:
        return min(resolution), 0
    assert 0 <= shift_size < window_size, 'shift_size must be in [0, window_size)'
    return window_size, shift_size


def drop_path_scale(x: torch.Tensor, drop_path: nn.Module) -> Optional[torch.Tensor]:
    """timm's drop_path as its per-sample factor [B, 1, ...] (None where it is the identity), drawn
    exactly as timm draws it, so `x * scale` equals `drop_path(x)` and consumes the same random
    numbers: fused and unfused blocks stay on one random stream."""
    prob = getattr(drop_path, 'drop_prob', 0.)
    if not prob or not drop_path.training:
        return None
    keep = 1 - prob
    scale = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0 and getattr(drop_path, 'scale_by_keep', True):
        scale.div_(keep)
    return scale


def add_residual(x: torch.Tensor, pending: tuple) -> torch.Tensor:
    """x + branch * scale for pending = (branch, scale): `x + drop_path(branch)`, the same ops."""
    branch, scale = pending
    return x + (branch * scale if scale is not None else branch)


class WindowBlock(nn.Module):
    """What every (shifted-)window block shares: its geometry, under upstream's window-fitting
    rule, and its repr. V1, V2 and Swin-MLP blocks subclass it."""

    def _geometry(self, dim: int, input_resolution: Sequence[int], num_heads: int, window_size: int,
                  shift_size: int, mlp_ratio: float) -> None:
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.num_heads = num_heads
        self.window_size, self.shift_size = fit_window(self.input_resolution, window_size, shift_size)
        self.mlp_ratio = mlp_ratio

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, '
                f'window_size={self.window_size}, shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}')


class SwinTransformerBlock(WindowBlock):
    """(Shifted-)window attention and MLP, each with a pre-norm and a drop-path residual."""

    def __init__(self, dim: int, input_resolution: Sequence[int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 fused_window_process: bool = False, ops: Optional[kernels.Ops] = None):
        super().__init__()
        self._geometry(dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio)
        # Built alone (as upstream's block can be), fused_window_process picks the fused shuffles;
        # inside a SwinTransformer the model's `ops` bundle, resolved once for every flag, decides.
        self.ops = ops or kernels.build_ops(window_process=fused_window_process)

        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, (self.window_size, self.window_size), num_heads, qkv_bias,
                                    qk_scale, attn_drop, drop, ops=self.ops)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, ops=self.ops)

        H, W = self.input_resolution
        if self.shift_size > 0:
            if H % self.window_size or W % self.window_size:
                raise ValueError(f'feature map {H}x{W} is not a multiple of window {self.window_size}')
            attn_mask = shifted_window_mask(H, W, self.window_size, self.shift_size)
        else:
            attn_mask = None
        self.register_buffer('attn_mask', attn_mask)

    @property
    def defers_mlp_residual(self) -> bool:
        """Whether the stage runs forward_deferred: where norm1 + partition takes the residual in its kernel."""
        return self.ops.defer_mlp_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H*W, C] -> [B, H*W, C]."""
        return add_residual(*self.forward_deferred(x))

    def forward_deferred(self, x: torch.Tensor, pending: Optional[tuple] = None) -> tuple:
        """forward() with the MLP's residual add left to the next block: -> (h, (branch, scale)), the
        block's output being h + branch * scale (scale: drop-path's per-sample factor, drawn as timm's
        DropPath draws it, or None). `pending`, the previous block's (branch, scale), is added here,
        inside norm1's kernel where --fused_layernorm and --fused_window_process fold."""
        H, W = self.input_resolution
        B, L, C = x.shape
        assert L == H * W, f'input has {L} tokens, expected {H}x{W}'
        # [residual add,] norm1, roll by -shift, partition: [B, H*W, C] -> [B*nW, w, w, C]
        if pending is None:
            shortcut = x
            windows = self.ops.norm_partition(x, self.norm1.weight, self.norm1.bias, self.norm1.eps,
                                              H, W, self.window_size, self.shift_size)
        else:
            shortcut, windows = self.ops.add_norm_partition(x, *pending, self.norm1.weight, self.norm1.bias,
                                                            self.norm1.eps, H, W, self.window_size, self.shift_size)
        windows = windows.view(-1, self.window_size * self.window_size, C)   # B*nW, N, C
        attn_windows = self.attn(windows, mask=self.attn_mask)              # B*nW, N, C
        attn_windows = attn_windows.view(-1, self.window_size, self.window_size, C)
        # merge, roll by +shift, x = shortcut + drop_path(merged), y = norm2(x): [B, H*W, C] each.
        # One kernel each way under --fused_layernorm with --fused_window_process.
        x, y = self.ops.merge_add_norm(shortcut, attn_windows, drop_path_scale(shortcut, self.drop_path),
                                       self.norm2.weight, self.norm2.bias, self.norm2.eps, H, W, self.shift_size)
        branch = self.mlp(y)
        return x, (branch, drop_path_scale(branch, self.drop_path))

    def flops(self) -> int:
        H, W = self.input_resolution
        nW = H * W / self.window_size / self.window_size
        flops = self.dim * H * W                                          # norm1
        flops += nW * self.attn.flops(self.window_size * self.window_size)
        flops += 2 * H * W * self.dim * self.dim * self.mlp_ratio         # mlp
        flops += self.dim * H * W                                         # norm2
        return flops


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> concat (x0,x1,x2,x3 at offsets (0,0),(1,0),(0,1),(1,1)) -> norm -> 4C->2C.
    NORM_FIRST False (Swin V2's PatchMergingV2): reduce 4C->2C first, then norm over 2C."""
    NORM_FIRST = True

    def __init__(self, input_resolution: Sequence[int], dim: int, norm_layer=nn.LayerNorm,
                 ops: Optional[kernels.Ops] = None):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim if self.NORM_FIRST else 2 * dim)
        self.ops = ops or kernels.Ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H*W, C] -> [B, H/2*W/2, 2C]."""
        H, W = self.input_resolution
        B, L, C = x.shape
        assert L == H * W, 'input feature has wrong size'
        assert H % 2 == 0 and W % 2 == 0, f'x size ({H}*{W}) are not even.'
        x = x.view(B, H // 2, 2, W // 2, 2, C)
        # (h-offset, w-offset) order (0,0),(1,0),(0,1),(1,1): w-offset outer, as upstream's cat.
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2 * W // 2, 4 * C)  # B, H/2*W/2, 4C
        if self.NORM_FIRST:
            x = self.ops.layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps)
        x = dense(self.ops, self.reduction, x)                              # B, H/2*W/2, 2C
        if not self.NORM_FIRST:
            x = self.ops.layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps)
        return x

    def extra_repr(self) -> str:
        return f'input_resolution={self.input_resolution}, dim={self.dim}'

    def flops(self) -> int:
        H, W = self.input_resolution
        norm = H * W * self.dim if self.NORM_FIRST else H * W * self.dim // 2
        return norm + (H // 2) * (W // 2) * 4 * self.dim * 2 * self.dim


class Stage(nn.Module):
    """One stage: `depth` blocks alternating shift 0 and window // 2, then an optional merge. The
    block comes from `make_block(shift_size=..., drop_path=...)` (V1, V2 and Swin-MLP differ only there)."""

    def __init__(self, dim: int, input_resolution: Sequence[int], depth: int, window_size: int, make_block,
                 drop_path=0., norm_layer=nn.LayerNorm, downsample=None, use_checkpoint: bool = False,
                 ops: Optional[kernels.Ops] = None):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            make_block(shift_size=0 if i % 2 == 0 else window_size // 2,
                       drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path)
            for i in range(depth)])
        self.downsample = (downsample(input_resolution, dim=dim, norm_layer=norm_layer, ops=ops)
                           if downsample is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # V1 and Swin-MLP blocks hand their MLP residual to the next block's norm1 kernel where that
        # adds it in the same pass (V1: --fused_layernorm with --fused_window_process; Swin-MLP:
        # --fused_layernorm); the stage's last one is added here. The blocks share one Ops bundle
        # (make_block): the first one's decides.
        # V2 blocks write the next block's windows with their output where that is one kernel.
        defer = getattr(self.blocks[0], 'defers_mlp_residual', False)
        carry = getattr(self.blocks[0], 'carries_windows', False)
        pending = windows = None
        for i, blk in enumerate(self.blocks):
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint.checkpoint(blk, x, use_reentrant=False)
            elif defer:
                x, pending = blk.forward_deferred(x, pending)
            elif carry:
                next_shift = self.blocks[i + 1].shift_size if i + 1 < len(self.blocks) else None
                x, windows = blk.forward_windows(x, windows, next_shift)
            else:
                x = blk(x)
        if pending is not None:
            x = add_residual(x, pending)
        return self.downsample(x) if self.downsample is not None else x

    def extra_repr(self) -> str:
        return f'dim={self.dim}, input_resolution={self.input_resolution}, depth={self.depth}'

    def flops(self) -> int:
        flops = sum(blk.flops() for blk in self.blocks)
        return flops + (self.downsample.flops() if self.downsample is not None else 0)


class BasicLayer(Stage):
    """A Swin V1 stage (upstream's BasicLayer)."""

    def __init__(self, dim: int, input_resolution: Sequence[int], depth: int, num_heads: int,
                 window_size: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path=0., norm_layer=nn.LayerNorm, downsample=None, use_checkpoint: bool = False,
                 fused_window_process: bool = False, ops: Optional[kernels.Ops] = None):
        ops = ops or kernels.build_ops(window_process=fused_window_process)     # see SwinTransformerBlock
        make_block = functools.partial(
            SwinTransformerBlock, dim=dim, input_resolution=input_resolution, num_heads=num_heads,
            window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop,
            attn_drop=attn_drop, norm_layer=norm_layer, fused_window_process=fused_window_process, ops=ops)
        super().__init__(dim, input_resolution, depth, window_size, make_block, drop_path, norm_layer, downsample,
                         use_checkpoint, ops)


class PatchEmbed(nn.Module):
    """Image [B, 3, H, W] -> patch tokens [B, H/p*W/p, C] by a strided conv (+ LayerNorm)."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 96, norm_layer=None, ops: Optional[kernels.Ops] = None):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.patches_resolution = [img_size[0] // patch_size[0], img_size[1] // patch_size[1]]
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None
        self.ops = ops or kernels.Ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if (H, W) != self.img_size:
            raise ValueError(f"input image size ({H}*{W}) doesn't match model "
                             f"({self.img_size[0]}*{self.img_size[1]}): set DATA.IMG_SIZE")
        x = self.proj(x).flatten(2).transpose(1, 2)                       # B, Ph*Pw, C
        if self.norm is not None:
            x = self.ops.layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps)
        return x

    def flops(self) -> int:
        Ho, Wo = self.patches_resolution
        flops = Ho * Wo * self.embed_dim * self.in_chans * (self.patch_size[0] * self.patch_size[1])
        if self.norm is not None:
            flops += Ho * Wo * self.embed_dim
        return flops


class SwinBackbone(nn.Module):
    """What Swin V1, V2 and Swin-MLP share around their stages: patch embedding (+ absolute
    position embedding), the final norm, pooling and head, weight init, weight-decay exemptions,
    forward and flops. Subclasses build `self.layers` between `_build_stem` and `_build_head`
    (that order is the parameter order optimizer state dicts rely on)."""

    def _build_stem(self, img_size, patch_size, in_chans, embed_dim, depths, norm_layer, ape, patch_norm,
                    drop_rate, mlp_ratio, num_classes) -> None:
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.mlp_ratio = mlp_ratio
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                      norm_layer if patch_norm else None, ops=self.ops)
        self.patches_resolution = self.patch_embed.patches_resolution
        if self.ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

    def _stage_args(self, i: int, depths, drop_path_rate: float) -> dict:
        """Width, resolution and drop-path rates of stage i (stochastic depth over all blocks;
        linspace on the CPU, so a model builds under a meta device too)."""
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        return dict(dim=int(self.embed_dim * 2 ** i),
                    input_resolution=(self.patches_resolution[0] // (2 ** i), self.patches_resolution[1] // (2 ** i)),
                    depth=depths[i], drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])])

    def _build_head(self, norm_layer) -> None:
        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv1d)):        # Conv1d: Swin-MLP's spatial MLP
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'relative_position_bias_table'}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)                                           # B, L, C
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        x = self.ops.layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps)  # B, L, C
        return torch.flatten(self.avgpool(x.transpose(1, 2)), 1)         # B, C

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        if isinstance(self.head, nn.Linear):
            return dense(self.ops, self.head, x)
        return self.head(x)

    def flops(self) -> int:
        flops = self.patch_embed.flops()
        flops += sum(layer.flops() for layer in self.layers)
        flops += self.num_features * self.patches_resolution[0] * self.patches_resolution[1] // (2 ** self.num_layers)
        flops += self.num_features * self.num_classes
        return flops


class SwinTransformer(SwinBackbone):
    """Swin Transformer V1, keyword-compatible with upstream's class.

    Our keyword switches (all off by default) choose fused implementations at build time:
    `fused_window_process`, `fused_layernorm`, `fused_mlp`, `fused_dense`, `fused_attention`
    (the `--unfused_mha` flag), resolved through `kernels` for `kernel_backend`
    ('auto', 'triton', 'apex' or 'torch'); `fold_window_norm=False` keeps the window shuffles out
    of the LayerNorm kernels (benchmarks only: same math, one more pass).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0.1, norm_layer=nn.LayerNorm,
                 ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False,
                 fused_window_process: bool = False, fused_layernorm: bool = False,
                 fused_mlp: bool = False, fused_dense: bool = False, fused_attention: bool = False,
                 kernel_backend: str = 'auto', fold_window_norm: bool = True, **kwargs):
        super().__init__()
        if kwargs:      # a misspelled switch (fused_layer_norm=True) must not build a plain model
            raise TypeError(f'SwinTransformer got unknown keyword arguments: {sorted(kwargs)}')
        self.ops = kernels.build_ops(window_process=fused_window_process, layer_norm=fused_layernorm,
                                     mlp=fused_mlp, dense=fused_dense, window_attention=fused_attention,
                                     backend=kernel_backend, fold_window_norm=fold_window_norm)
        self._build_stem(img_size, patch_size, in_chans, embed_dim, depths, norm_layer, ape, patch_norm, drop_rate,
                         mlp_ratio, num_classes)
        self.layers = nn.ModuleList([
            BasicLayer(**self._stage_args(i, depths, drop_path_rate), num_heads=num_heads[i], window_size=window_size,
                       mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                       attn_drop=attn_drop_rate, norm_layer=norm_layer,
                       downsample=PatchMerging if i < self.num_layers - 1 else None,
                       use_checkpoint=use_checkpoint, fused_window_process=fused_window_process, ops=self.ops)
            for i in range(self.num_layers)])
        self._build_head(norm_layer)
