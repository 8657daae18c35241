"""Window attention: softmax(q k^T * scale + bias + mask) v for every (window, head).

Shapes: qkv [B*nW, N, 3C] straight from the qkv projection (split as (3, heads, head_dim));
bias [heads, N, N] gathered once per step from relative_position_bias_table; mask [nW, N, N]
(0 / -100) or None, window b uses mask[b % nW]. Output [B*nW, N, C], the layout proj reads.
"""
from typing import Optional

import torch


def window_attention_ref(qkv: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor],
                         num_heads: int, scale: float) -> torch.Tensor:
    """Upstream's math, op for op."""
    B_, N, C3 = qkv.shape
    C = C3 // 3
    qkv = qkv.reshape(B_, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                                  # B*nW, heads, N, hd
    attn = (q * scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)      # B*nW, heads, N, N
    if mask is not None:
        nW = mask.shape[0]
        attn = attn.view(B_ // nW, nW, num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, N, N)
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B_, N, C)               # B*nW, N, C


IMPLS = {
    'torch': window_attention_ref,
    'triton': None,
}
