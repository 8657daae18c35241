"""Linear with the bias in the GEMM epilogue: y = x @ weight^T + bias.

Reference: `dense_ref` (F.linear, whose cuBLAS call already adds the bias in its epilogue).
No Triton kernel yet: `--fused_dense` on CUDA stops at start with a clear error.
apex: `apex.fused_dense.FusedDenseFunc` where apex is importable.
"""
import torch
import torch.nn.functional as F

from ._utils import apex_available

APEX_MODULE = 'apex.fused_dense'


def dense_ref(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _apex_dense(x, weight, bias=None):
    if bias is None:
        return F.linear(x, weight)
    from apex.fused_dense import FusedDenseFunc
    shape = x.shape
    return FusedDenseFunc.apply(x.reshape(-1, shape[-1]), weight, bias).view(*shape[:-1], weight.shape[0])


IMPLS = {
    'torch': dense_ref,
    'triton': None,
    'apex': _apex_dense if apex_available(APEX_MODULE) else None,
}
