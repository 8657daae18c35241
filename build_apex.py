"""Build NVIDIA apex for this machine's GPU, for KERNEL_BACKEND apex.

    git clone https://github.com/NVIDIA/apex /path/to/apex     # or any source snapshot of it
    python build_apex.py /path/to/apex                          # build and pip-install into this Python
    python build_apex.py /path/to/apex --wheel-dir wheels       # or build a wheel to install elsewhere

What it does: checks what a build needs before starting one (a CUDA build of torch, nvcc with the
same CUDA major.minor as torch, ninja), takes the architecture list from the visible GPUs (or
--arch), and builds apex's C++ extension plus its core CUDA extensions (`--cpp_ext --cuda_ext`:
fused LayerNorm, fused dense, the multi-tensor optimizers, among others) with one compile job per
core. apex cannot build a subset of its core extensions, so the optional "contrib" ones are the
only ones left out. Afterwards it imports the modules our flags use and says which flags apex now
backs. About three minutes on 16 cores.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

# the apex modules our flags use (KERNEL_BACKEND apex), and which flag each backs
MODULES = {'apex.normalization': '--fused_layernorm', 'apex.fused_dense': '--fused_dense',
           'apex.optimizers': '--fused_adam, --optim fused_lamb'}


class BuildError(RuntimeError):
    """A prerequisite is missing: the message says which and how to get it."""


def _nvcc(cuda_home):
    nvcc = os.path.join(cuda_home, 'bin', 'nvcc') if cuda_home else shutil.which('nvcc')
    if not nvcc or not os.path.exists(nvcc):
        raise BuildError('nvcc was not found: install the CUDA toolkit (the "devel" one, with nvcc) matching '
                         'your torch build, or point CUDA_HOME at it')
    return nvcc


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, '--version'], capture_output=True, text=True, check=True).stdout
    found = re.search(r'release (\d+\.\d+)', out)
    if not found:
        raise BuildError(f'could not read the CUDA version from `{nvcc} --version`')
    return found.group(1)


def check_prerequisites(source: str, arch: str, cuda_home: str) -> dict:
    """-> the build's environment additions; raises BuildError naming the first missing piece."""
    import torch
    if not os.path.exists(os.path.join(source, 'setup.py')) or not os.path.isdir(os.path.join(source, 'apex')):
        raise BuildError(f'{source} is not an apex source checkout (no setup.py and apex/ there): '
                         'git clone https://github.com/NVIDIA/apex')
    if torch.version.cuda is None:
        raise BuildError(f'this torch ({torch.__version__}) is a CPU build: apex needs a CUDA build of torch')
    from torch.utils.cpp_extension import CUDA_HOME
    cuda_home = cuda_home or os.environ.get('CUDA_HOME') or CUDA_HOME
    nvcc = _nvcc(cuda_home)
    have, want = nvcc_version(nvcc), '.'.join(torch.version.cuda.split('.')[:2])
    if have != want:   # apex's setup.py refuses any mismatch: say so before the build starts
        raise BuildError(f'nvcc is CUDA {have} ({nvcc}) but torch was built with CUDA {want}: apex refuses to '
                         f'build across versions. Install the CUDA {want} toolkit and set CUDA_HOME, or a '
                         f'torch built for CUDA {have}')
    if shutil.which('ninja') is None:
        raise BuildError('ninja is not on the PATH (without it the build is serial and takes an hour): '
                         'pip install ninja')
    if not arch:
        if not torch.cuda.is_available():
            raise BuildError('no GPU is visible to take the architecture from: pass --arch, e.g. --arch 9.0 '
                             'for H100, 8.0 for A100')
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch = ';'.join(f'{major}.{minor}' for major, minor in caps)
    return {'CUDA_HOME': os.path.dirname(os.path.dirname(nvcc)), 'TORCH_CUDA_ARCH_LIST': arch}


def build(source: str, jobs: int, env_extra: dict, wheel_dir: str, pip_args: list) -> None:
    env = dict(os.environ, APEX_CPP_EXT='1', APEX_CUDA_EXT='1', APEX_PARALLEL_BUILD=str(jobs),
               MAX_JOBS=str(jobs), **env_extra)
    if wheel_dir:
        cmd = [sys.executable, '-m', 'pip', 'wheel', '--no-build-isolation', '--no-deps', '-w', wheel_dir, source]
    else:
        cmd = [sys.executable, '-m', 'pip', 'install', '--no-build-isolation', '--no-deps', *pip_args, source]
    print(f"building apex for sm {env_extra['TORCH_CUDA_ARCH_LIST']} with {jobs} jobs:\n  {' '.join(cmd)}",
          flush=True)
    subprocess.run(cmd, env=env, check=True)


def report() -> int:
    """Import, in a fresh process, each apex module our flags use; -> the number missing."""
    code = ('import importlib, sys\n'
            f'for m in {list(MODULES)!r}:\n'
            '    try:\n        importlib.import_module(m); print("ok", m)\n'
            '    except Exception as e:\n        print("missing", m, type(e).__name__, e)\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True).stdout.split('\n')
    missing = 0
    for line in filter(None, out):
        status, module = line.split()[:2]
        print(f"  {MODULES[module]}: {'apex ' + module if status == 'ok' else 'NOT available: ' + line}")
        missing += status != 'ok'
    return missing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('source', help='an apex source checkout')
    p.add_argument('--arch', default='', help='CUDA architectures, e.g. "9.0" or "8.0;9.0" (default: the visible GPUs)')
    p.add_argument('--jobs', type=int, default=os.cpu_count() or 4, help='parallel compile jobs (default: all cores)')
    p.add_argument('--cuda-home', default='', help='the CUDA toolkit to use (default: CUDA_HOME, or torch\'s guess)')
    p.add_argument('--wheel-dir', default='', help='build a wheel into this folder instead of installing')
    p.add_argument('--pip-args', default='', help='extra arguments for pip install, e.g. "--target /opt/site"')
    a = p.parse_args(argv)
    try:
        env = check_prerequisites(a.source, a.arch, a.cuda_home)
    except BuildError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    try:
        build(a.source, a.jobs, env, a.wheel_dir, a.pip_args.split())
    except subprocess.CalledProcessError as e:
        print(f'error: the apex build failed (exit {e.returncode}); its log is above', file=sys.stderr)
        return 1
    if a.wheel_dir:
        print(f'wheel written to {a.wheel_dir}: pip install --no-deps it where it will run')
        return 0
    print('apex installed; what it backs now (use with --kernel-backend apex):')
    return 1 if report() else 0


if __name__ == '__main__':
    sys.exit(main())
