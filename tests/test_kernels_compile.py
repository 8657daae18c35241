"""The input pipeline's Triton kernels compiled for a Hopper GPU (sm_90) on any machine.

On the CPU the tests run these kernels under Triton's interpreter, which accepts some code the GPU
compiler refuses (a shape it does not broadcast, an op it lacks). Here each kernel goes through
Triton's real compiler to PTX and a cubin (ptxas ships with Triton), with the argument types and
constants its launcher passes, so a kernel that would not compile on the GPU fails in CI. The
compile runs in a child process without TRITON_INTERPRET (under it `@triton.jit` gives interpreted
functions, which the compiler does not take).
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

def compile_(fn, signature, constants, **options):
    signature = dict(signature, **{name: 'constexpr' for name in constants})
    return triton.compile(ASTSource(fn, signature, constants), target=GPUTarget('cuda', 90, 32),
                          options=options or None)
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
                                        factor_ptr='*' + F64, lut_ptr='*' + F32, mean_ptr='*' + F32, H=I32, W=I32),
                 dict(BLOCK=1024), enable_fp_fusion=False)
        compile_(ar._affine_kernel, dict(x_ptr='*' + F32, m_ptr='*' + F64, fill_ptr='*' + F32, out_ptr='*' + F32,
                                         H=I32, W=I32), dict(BLOCK=1024))
        ''')
