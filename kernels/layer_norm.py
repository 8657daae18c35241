"""LayerNorm over the last dimension: y = (x - mean) / sqrt(var + eps) * weight + bias.

Reference: `layer_norm_ref` (torch's F.layer_norm). The Triton kernels are not written yet:
`IMPLS['triton']` is None, so `--fused_layernorm` on CUDA stops at start with a clear error.
apex: `apex.normalization.fused_layer_norm_affine` where apex is importable.
"""
import torch
import torch.nn.functional as F

from ._utils import apex_available

APEX_MODULE = 'apex.normalization'


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _apex_layer_norm(x, weight, bias, eps=1e-5):
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    return fused_layer_norm_affine(x, weight, bias, (x.shape[-1],), eps)


IMPLS = {
    'torch': layer_norm_ref,
    'triton': None,
    'apex': _apex_layer_norm if apex_available(APEX_MODULE) else None,
}
