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
faults = []
for i in range(24):  # the last sixteen, once the heap has grown to the loop's high-water mark
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(48 << 20, dtype=torch.uint8)  # 48 MiB: 12,288 pages of 4 KiB
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("faults", *faults[8:])
"""


def faults(first, **env):
    """Page faults of each of the sixteen allocations."""
    environment = {k: v for k, v in os.environ.items() if k != "RPE_KEEP_FREED_MEMORY"}
    environment.update(env, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], cwd=ROOT,
                         env=environment, capture_output=True, text=True, check=True).stdout
    return [int(n) for n in re.search(r"faults ([\d ]+)", out).group(1).split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_main_keeps_freed_memory_for_reuse_and_the_variable_opts_out():
    # with the setting most allocations reuse the freed block (small objects allocated between
    # them can push it up the heap a few times before the heap settles, so not every one);
    # without it every allocation is a fresh mapping, faulted in anew
    reused = [n for n in faults("main") if n < 100]
    assert len(reused) >= 8, faults("main")
    assert min(faults("main", RPE_KEEP_FREED_MEMORY="0")) >= 12288 - 100
    assert min(faults("os")) >= 12288 - 100  # torch alone
