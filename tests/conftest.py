"""Test setup. Without a GPU, Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1),
so CI checks the real kernel code on the CPU; it must be set before triton is imported."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    assert 'triton' not in sys.modules, 'triton was imported before TRITON_INTERPRET could be set'
    os.environ['TRITON_INTERPRET'] = '1'

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


@pytest.fixture(scope='session')
def demo_data(tmp_path_factory):
    """A small generated ImageFolder dataset (10 classes, 16 train / 4 val images each, 32 px)."""
    from data.demo_dataset import generate
    return generate(str(tmp_path_factory.mktemp('data') / 'shapes'), train_per_class=16, val_per_class=4)
