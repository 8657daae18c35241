"""Our Triton kernels (window process, window attention, LayerNorm, the bias gradients, Swin-MLP's
spatial MLP, the fused optimizers, the input pipeline's) compiled for a Hopper GPU (sm_90) on any machine.

On the CPU the tests run the kernels under Triton's interpreter, which accepts some code the GPU
compiler refuses (a shape it does not broadcast, an op it lacks) and knows no shared-memory limit.
Here each kernel goes through Triton's real compiler to PTX and a cubin (ptxas ships with Triton),
with the argument types and constants its launcher passes at representative shapes, and must fit
sm_90's 227 KB of shared memory a block: a kernel that would not compile on the GPU fails in CI. The
shared-memory bound is as this machine's Triton allocates it, which can differ from the GPU's: the
window attention backward at head dim 128 with 64-row blocks took 254 KB under Triton 3.6 on an H200
and 107 KB under Triton 3.8 here (2026-11-29). The compile runs in a child process without
TRITON_INTERPRET (under it `@triton.jit` gives interpreted functions, which the compiler does not
take).
"""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

pytest.importorskip('triton')

_PRELUDE = '''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
I32, I64, F32, F64, U8 = 'i32', 'i64', 'fp32', 'fp64', 'u8'

SMEM = 227 * 1024          # sm_90's shared memory a block

def compile_(fn, signature, constants, **options):
    signature = dict(signature, **{name: 'constexpr' for name in constants})
    kernel = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget('cuda', 90, 32),
                            options=options or None)
    assert kernel.metadata.shared <= SMEM, (fn, constants, kernel.metadata.shared)
    return kernel
'''


def _compile_in_child(code: str) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception:
        pytest.skip("Triton's NVIDIA compiler is not installed")
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    p = subprocess.run([sys.executable, '-c', _PRELUDE + textwrap.dedent(code)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_normalize_erase_compiles_with_correctly_rounded_division():
    out = _compile_in_child('''
        from kernels import normalize_erase as ne
        sig = dict(x_ptr='*' + F32, mean_ptr='*' + F32, std_ptr='*' + F32, rects_ptr='*' + I32, seed=I32, C=I32,
                   H=I32, W=I32, K=I32)
        for mode in range(len(ne.MODES)):
            ptx = compile_(ne._normalize_erase_kernel, sig, dict(MODE=mode, BLOCK=1024)).asm['ptx']
            print(mode, 'div.rn.f32' in ptx, 'div.full.f32' in ptx)
        ''')
    assert out.split() == ['0', 'True', 'False', '1', 'True', 'False', '2', 'True', 'False'], out


def test_crop_resize_compiles():
    _compile_in_child('''
        from kernels import crop_resize as cr
        const = dict(S=224, ROWS=4, BLOCK_S=256, ROW=cr._ROW)
        compile_(cr._horizontal_kernel, dict(src_ptr='*' + U8, meta_ptr='*' + I64, tmp_ptr='*' + F32, max_h=I32,
                                             max_taps=I32), const)
        compile_(cr._vertical_kernel, dict(tmp_ptr='*' + F32, meta_ptr='*' + I64, out_ptr='*' + F32, max_h=I32,
                                           max_taps=I32), const)
        ''')


def test_randaugment_kernels_compile():
    _compile_in_child('''
        from kernels import affine_resample as ar
        from kernels import colour_ops as co
        stats = dict(luma_ptr='*' + I32, lo_ptr='*' + I32, hi_ptr='*' + I32, hist_ptr='*' + I32)
        compile_(co._stats_kernel, dict(x_ptr='*' + F32, code_ptr='*' + I64, **stats, HW=I32), dict(BLOCK=1024))
        compile_(co._tables_kernel, dict(code_ptr='*' + I64, host_ptr='*' + F64, **stats, lut_ptr='*' + F32,
                                         mean_ptr='*' + F32, HW=I32), {}, enable_fp_fusion=False)
        compile_(co._apply_kernel, dict(x_ptr='*' + F32, out_ptr='*' + F32, code_ptr='*' + I64,
                                        factor_ptr='*' + F64, lut_ptr='*' + F32, mean_ptr='*' + F32,
                                        m_ptr='*' + F64, fill_ptr='*' + F32, H=I32, W=I32),
                 dict(BLOCK=1024), enable_fp_fusion=False)
        compile_(ar._affine_kernel, dict(x_ptr='*' + F32, m_ptr='*' + F64, fill_ptr='*' + F32, out_ptr='*' + F32,
                                         H=I32, W=I32), dict(BLOCK=1024))
        ''')


def test_layer_norm_and_window_process_compile():
    _compile_in_child('''
        from kernels import layer_norm as ln, window_process as wp
        for C in (96, 768):
            rows, block_c, warps = ln._tile(C)
            geometry = dict(WINDOWED=True, H=56, W=56, WS=7, SHIFT=3, WIN_OUT=False)
            fwd = dict(x_ptr='*bf16', res_ptr='*fp32', scale_ptr='*bf16', h_ptr='*fp32', w_ptr='*fp32', b_ptr='*fp32',
                       y_ptr='*fp32', mean_ptr='*fp32', rstd_ptr='*fp32', M=I32, C=I32, rows_per_sample=I32, eps=F32)
            for residual, post, windowed, out in ((False, False, False, False), (True, False, True, False),
                                                  (True, True, False, False), (True, False, True, True),
                                                  (True, True, True, True)):     # V2's residual + next partition
                compile_(ln._layer_norm_fwd_kernel, fwd, dict(
                    HAS_RESIDUAL=residual and not post, HAS_SCALE=residual, POST=post,
                    **(dict(geometry, WIN_OUT=out) if windowed else
                       dict(WINDOWED=False, H=1, W=1, WS=1, SHIFT=0, WIN_OUT=False)),
                    BLOCK_ROWS=rows, BLOCK_C=block_c), num_warps=warps)
            brows, bwarps, _ = ln._bwd_launch(C)
            bwd = dict(dy_ptr='*fp32', x_ptr='*bf16', w_ptr='*fp32', mean_ptr='*fp32', rstd_ptr='*fp32', dx_ptr='*bf16',
                       dw_part_ptr='*fp32', db_part_ptr='*fp32', dres_ptr='*fp32', scale_ptr='*bf16',
                       dbranch_ptr='*bf16', M=I32, C=I32, rows_per_program=I32, rows_per_sample=I32)
            for dres, post, windowed, out in ((False, False, False, False), (True, False, True, False),
                                              (False, True, False, False), (True, False, True, True),
                                              (False, True, True, True)):
                compile_(ln._layer_norm_bwd_kernel, bwd, dict(
                    HAS_DRES=dres, HAS_DBRANCH=dres, HAS_SCALE=dres or post, POST=post,
                    **(dict(geometry, WIN_OUT=out) if windowed else
                       dict(WINDOWED=False, H=1, W=1, WS=1, SHIFT=0, WIN_OUT=False)),
                    BLOCK_ROWS=brows, BLOCK_C=block_c), num_warps=bwarps)
            compile_(ln._layer_norm_wgrad_kernel, dict(part_ptr='*fp32', dw_ptr='*fp32', db_ptr='*fp32', P=I32, C=I32),
                     dict(BLOCK_P=ln._WGRAD_ROWS, BLOCK_C=ln._WGRAD_COLS))
        for to_windows in (True, False):
            compile_(wp._window_shuffle_kernel, dict(map_ptr='*bf16', win_ptr='*bf16', n_rows=I32, stride_mb=I32,
                                                     stride_mh=I32, stride_mw=I32, stride_mc=I32),
                     dict(H=56, W=56, C=96, WS=7, SHIFT=3, TO_WINDOWS=to_windows, C_CONTIGUOUS=True,
                          BLOCK_ROWS=16, BLOCK_C=128))
        ''')


@pytest.mark.parametrize('window, head_dim', [(7, 32), (16, 32), (24, 32), (12, 128)])
def test_window_attention_compiles_within_shared_memory(window, head_dim):
    """V1 at window 7 (one key tile) and V2's cosine attention with a per-head scale at windows 12-24
    (keys in blocks of 64), bf16, forward and backward, the table-gradient scatter and the bias + mask tile."""
    _compile_in_child(f'''
        from kernels import window_attention as wa
        N, d = {window} ** 2, {head_dim}
        block_m, block_n, block_d, num_m, num_k, warps = wa._blocks(N, d)
        v2 = {window} > 7
        const = dict(HEAD_DIM=d, DOT_MODE=0, NUM_M=num_m, NUM_K=num_k, BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_D=block_d, HEAD_SCALE=v2, NORM_QK=v2)
        ints = dict(N=I32, C=I32, n_heads=I32, n_bm=I32, scale=F32)
        compile_(wa._window_attention_fwd_kernel, dict(qkv_ptr='*bf16', bm_ptr='*fp32', out_ptr='*bf16',
                                                       lse_ptr='*fp32', head_scale_ptr='*fp32', **ints),
                 const, num_warps=warps)
        compile_(wa._window_attention_bwd_kernel, dict(
            qkv_ptr='*bf16', bm_ptr='*fp32', out_ptr='*bf16', lse_ptr='*fp32', dout_ptr='*bf16', dqkv_ptr='*bf16',
            dbias_ptr='*fp32', dq_acc_ptr='*fp32', delta_ptr='*fp32', head_scale_ptr='*fp32', dscale_ptr='*fp32',
            B_=I32, **ints, n_groups=I32), const, num_warps=warps)
        compile_(wa._table_grad_kernel, dict(dbias_ptr='*fp32', order_ptr='*i64', starts_ptr='*i64',
                                             dtable_ptr='*fp32', NN=I32, heads=I32), dict(BLOCK_P=64, BLOCK_H=4))
        for table in ('fp32', 'bf16'):
            compile_(wa._bias_mask_kernel, dict(table_ptr='*' + table, index_ptr='*i64', mask_ptr='*' + table,
                                                out_ptr='*fp32', N=I32, heads=I32),
                     dict(HAS_MASK=True, ROWS_PAD=num_m * block_m, COLS_PAD=num_k * block_n, BLOCK_R=16,
                          BLOCK_C=min(num_k * block_n, 64)), num_warps=4)
        ''')


def test_spatial_mlp_compiles():
    """Swin-MLP's spatial MLP (--fused_window_process on swin_mlp), forward and backward, in each dtype at
    the shipped configs' windows and head widths (window 8: 24; window 7: 32, 12, 6), shifted and not."""
    _compile_in_child('''
        from kernels import spatial_mlp as sm
        for dtype in ('bf16', 'fp16', 'fp32'):
            mode = 1 if dtype == 'fp32' else 0
            for H, C, heads, ws, shift in ((64, 96, 4, 8, 4), (56, 128, 4, 7, 0), (56, 96, 8, 7, 3),
                                           (14, 768, 128, 7, 0)):
                _, block_n, block_d = sm._geometry(H, H, C, ws, shift, heads)
                geo = dict(H=H, W=H, C=C, WS=ws, SHIFT=shift, NH=heads, HD=C // heads, DOT_MODE=mode,
                           BLOCK_N=block_n, BLOCK_D=block_d)
                compile_(sm._spatial_mlp_fwd_kernel, dict(x_ptr='*' + dtype, w_ptr='*' + dtype, b_ptr='*' + dtype,
                                                          y_ptr='*' + dtype, n_windows=I32),
                         dict(geo, HAS_BIAS=True, WINDOWS=sm.FWD_WINDOWS), num_warps=4)
                compile_(sm._spatial_mlp_bwd_kernel, dict(dy_ptr='*' + dtype, x_ptr='*' + dtype, w_ptr='*' + dtype,
                                                          dx_ptr='*' + dtype, part_ptr='*fp32', n_windows=I32,
                                                          windows_per_group=I32), geo, num_warps=4)
        ''')


def test_bias_grad_compiles():
    """The bias gradients of --fused_dense / --fused_mlp (with and without GELU's backward) in each
    dtype at Swin-T's narrowest and Swin-L's widest shapes, with the launcher's tiles."""
    _compile_in_child('''
        import torch
        from kernels import bias_grad as bg
        for dtype in ('bf16', 'fp16', 'fp32'):
            sig = dict(dy_ptr='*' + dtype, z_ptr='*' + dtype, dz_ptr='*' + dtype, part_ptr='*fp32', M=I32, N=I32,
                       rows_per_program=I32)
            for M, N in ((401408, 96), (25088, 3072)):
                block_rows, block_n, _, _ = bg._launch(M, N, torch.device('cpu'))
                for dgelu in (False, True):
                    compile_(bg._bias_grad_kernel, sig, dict(DGELU=dgelu, BLOCK_ROWS=block_rows, BLOCK_N=block_n),
                             num_warps=4)
        ''')


def test_fused_optimizer_kernels_compile():
    """--fused_adam / fused_lamb: the gradient norm, the prepare step and the AdamW / LAMB updates for
    fp32 master weights with bf16 gradients and a bf16 model copy (O2) and for fp32 alone (O1)."""
    _compile_in_child('''
        import triton.language as tl
        from kernels import optimizers as o
        tables = dict(param_ptrs='*i64', grad_ptrs='*i64', exp_avg_ptrs='*i64', exp_avg_sq_ptrs='*i64')
        chunks = dict(numel_ptr='*i64', chunk_tensor_ptr='*i32', chunk_index_ptr='*i32')
        moments = dict(one_minus_beta1=F32, beta2=F32, one_minus_beta2=F32, eps=F32)
        size = dict(CHUNK=o.CHUNK, BLOCK=o.BLOCK)
        compile_(o._grad_sumsq_kernel, dict(grad_ptrs='*i64', **chunks, partial_ptr='*fp32'),
                 dict(GRAD_DTYPE=tl.bfloat16, **size))
        for lamb in (False, True):
            compile_(o._prepare_kernel, dict(partial_ptr='*fp32', n_partials=I32, inv_scale_ptr='*fp32',
                                             hparam_ptr='*fp64', group_ptr='*i32', global_ptr='*i32', steps_ptr='*fp32',
                                             pow_ptr='*fp64', scalar_ptr='*fp32', out_ptr='*fp32', n_tensors=I32,
                                             clip=F32, max_grad_norm=F32), dict(HAS_SCALE=True, LAMB=lamb, BLOCK=256))
        for grad, out, has_out in ((tl.bfloat16, tl.bfloat16, True), (tl.float32, tl.float32, False)):
            compile_(o._adamw_kernel, dict(**tables, out_ptrs='*i64', **chunks, scalar_ptr='*fp32', mult_ptr='*fp32',
                                           **moments),
                     dict(PARAM_DTYPE=tl.float32, GRAD_DTYPE=grad, OUT_DTYPE=out, HAS_OUT=has_out, **size))
            compile_(o._lamb_norms_kernel, dict(**tables, **chunks, scalar_ptr='*fp32', mult_ptr='*fp32',
                                                norm_part_ptr='*fp32', **moments, max_chunks=I32),
                     dict(PARAM_DTYPE=tl.float32, GRAD_DTYPE=grad, **size))
            compile_(o._lamb_apply_kernel, dict(param_ptrs='*i64', exp_avg_ptrs='*i64', exp_avg_sq_ptrs='*i64',
                                                out_ptrs='*i64', **chunks, scalar_ptr='*fp32', mult_ptr='*fp32',
                                                norm_part_ptr='*fp32', eps=F32, max_chunks=I32),
                     dict(PARAM_DTYPE=tl.float32, OUT_DTYPE=out, HAS_OUT=has_out, MAX_CHUNKS=64, **size))
        ''')
