import io
import lzma
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "data")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def load_reference(name):
    """A reference file of tests/data: `.json` as parsed JSON, `.pt` / `.pt.xz` as tensors."""
    path = os.path.join(REFERENCE, name)
    if name.endswith(".json"):
        with open(path) as f:
            import json
            return json.load(f)
    if name.endswith(".xz"):
        with lzma.open(path) as f:
            return torch.load(io.BytesIO(f.read()), weights_only=True)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def reference_dir():
    """tests/data: data read off the published code (see tests/data/README.md)."""
    return REFERENCE
