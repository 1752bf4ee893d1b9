"""main.py keeps freed memory for reuse (util/cpu_allocator.py): a large tensor allocated again
after being freed costs no new page faults; without it (or with RPE_KEEP_FREED_MEMORY=0) every
fresh allocation is faulted in anew."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import resource
import {first}
import torch
for i in range(8):  # the last four, once the heap has grown to the loop's high-water mark
    if i == 4:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(48 << 20, dtype=torch.uint8)  # 48 MiB: 12,288 pages of 4 KiB
    del x
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(first, **env):
    environment = {k: v for k, v in os.environ.items() if k != "RPE_KEEP_FREED_MEMORY"}
    environment.update(env, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], cwd=ROOT,
                         env=environment, capture_output=True, text=True, check=True).stdout
    return int(re.search(r"faults (\d+)", out).group(1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_main_keeps_freed_memory_for_reuse_and_the_variable_opts_out():
    # four allocations: at most two land on fresh heap (small objects between them can push the
    # large block up once); without the setting every one is a fresh mapping, faulted in anew
    assert faults("main") <= 2 * 12288 + 1000
    assert faults("main", RPE_KEEP_FREED_MEMORY="0") >= 4 * 12288 - 100
    assert faults("os") >= 4 * 12288 - 100  # torch alone
