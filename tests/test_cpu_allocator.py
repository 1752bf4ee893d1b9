"""main.py turns on huge pages for large CPU tensors before torch is imported (util/cpu_allocator)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import {first}
import torch
x = torch.ones(64 << 20, dtype=torch.uint8)
print(next(l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")))
"""


def thp_mode():
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return re.search(r"\[(\w+)\]", text).group(1)


def huge_kib(first, **env):
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    environment.update(env, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], cwd=ROOT,
                         env=environment, capture_output=True, text=True, check=True).stdout
    return int(re.search(r"(\d+) kB", out).group(1))


@pytest.mark.skipif(thp_mode() != "madvise",
                    reason="needs Linux transparent huge pages in madvise mode (the usual default)")
def test_importing_main_gives_large_tensors_huge_pages_and_the_variable_opts_out():
    assert huge_kib("main") >= 32 << 10
    assert huge_kib("main", THP_MEM_ALLOC_ENABLE="0") == 0
    assert huge_kib("os") == 0  # torch alone does not
