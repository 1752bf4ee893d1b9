import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(os.path.dirname(ROOT), "shared", "reference")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def reference_dir():
    """../shared/reference beside the repository: data read off the published code."""
    if not os.path.isdir(REFERENCE):
        pytest.fail(f"reference data not found at {REFERENCE}")
    return REFERENCE
