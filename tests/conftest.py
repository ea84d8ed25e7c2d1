import os

import torch

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_configure(config):
    # triton < 3.7's interpreter calls int() on a 1-element array (range() over a scalar kernel argument), which
    # numpy >= 2.4 refuses: Triton tests would fail with a TypeError from inside triton (triton issue 9171).
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        raise pytest.UsageError(f"the Triton interpreter of triton {triton.__version__} fails with numpy "
                                f"{numpy.__version__} (triton issue 9171): pip install 'numpy<2.4', or triton >= 3.7")


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
