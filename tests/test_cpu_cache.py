"""The cache of rpe_ops' large CPU results (rpe_ops/csrc/cpu_cache.cpp): a freed result's memory
is handed to the next result of its size, so repeated calls fault in no fresh pages, in a plain
script that imports only the iRPE modules (no main.py, no malloc setting); results alive at the
same time never share memory; RPE_OPS_CPU_CACHE_MB=0 turns it off."""
import os
import re
import subprocess
import sys

import pytest
import torch

import rpe_ops
from rpe_ops import _fallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def extension():
    if not rpe_ops.EXTENSION_AVAILABLE:
        if os.environ.get("RPE_OPS_REQUIRE_EXTENSION", "") not in ("", "0"):
            pytest.fail("the rpe_ops extension is not built")
        pytest.skip("the cache belongs to the compiled extension")
    rpe_ops.empty_cpu_cache()  # blocks kept by earlier tests would be better fits


def lookup_inputs(lq=700, lk=700, buckets=81, bh=(2, 8)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*bh, lq, buckets, generator=g)
    index = torch.randint(0, buckets, (lq, lk), generator=g)
    return x, index


def test_freed_result_memory_is_reused_and_live_results_never_share_it():
    x, index = lookup_inputs()
    first = rpe_ops.rpe_index(x, index)  # 31 MB
    pointer = first.data_ptr()
    second = rpe_ops.rpe_index(x * 2, index)  # the first is alive: its block is not free
    assert second.data_ptr() != pointer
    torch.testing.assert_close(first, _fallback.rpe_index(x, index), rtol=0, atol=0)
    torch.testing.assert_close(second, _fallback.rpe_index(x * 2, index), rtol=0, atol=0)
    assert rpe_ops.cpu_cache_stats()["live"] >= first.nbytes + second.nbytes
    del first
    assert rpe_ops.cpu_cache_stats()["kept"] >= second.nbytes
    third = rpe_ops.rpe_index(x * 3, index)
    assert third.data_ptr() == pointer  # the first's block, handed out again
    torch.testing.assert_close(third, _fallback.rpe_index(x * 3, index), rtol=0, atol=0)
    # a result a little smaller takes a cached block; one less than half the size does not
    pointers = {second.data_ptr(), third.data_ptr()}
    del second, third
    smaller = rpe_ops.rpe_index(x[:, :, :600], index[:600])
    assert smaller.data_ptr() in pointers
    much_smaller = rpe_ops.rpe_index(x[:, :, :100], index[:100])  # 4.5 MB
    assert much_smaller.data_ptr() not in pointers
    torch.testing.assert_close(much_smaller, _fallback.rpe_index(x[:, :, :100], index[:100]),
                               rtol=0, atol=0)
    del smaller, much_smaller
    rpe_ops.empty_cpu_cache()
    assert rpe_ops.cpu_cache_stats()["kept"] == 0


def test_small_results_and_gradients_flow_as_before():
    x, index = lookup_inputs(lq=40, lk=50, buckets=9)
    x.requires_grad_()
    y = rpe_ops.rpe_index(x, index)
    y.backward(torch.ones_like(y))
    counts = torch.zeros(40, 9).scatter_add_(1, index, torch.ones(40, 50))
    torch.testing.assert_close(x.grad, counts.expand_as(x))


PROBE = """
import resource
import torch
from models.rpe_attention import irpe
torch.manual_seed(0)
config = irpe.get_rpe_config(ratio=2.0, method="product", mode="ctx", shared_head=True, skip=0,
                             rpe_on="k")
_, rpe_k, _ = irpe.build_rpe(config, head_dim=32, num_heads=8)
q = torch.randn(2, 8, 950, 32, requires_grad=True)
grad = torch.randn(2, 8, 950, 950)
faults = []
for i in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rpe_k(q, 25, 38).backward(grad)  # a (2, 8, 950, 950) result: 58 MB, 14,100 pages
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
import sys
print("modules", sorted(m for m in sys.modules if m in ("main", "util.cpu_allocator")))
print("faults", *faults[4:])
"""


def module_faults(**env):
    environment = {k: v for k, v in os.environ.items() if k != "RPE_OPS_CPU_CACHE_MB"}
    environment.update(env, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=environment,
                         capture_output=True, text=True, check=True).stdout
    assert "modules []" in out  # neither main.py nor its malloc setting
    return [int(n) for n in re.search(r"faults ([\d ]+)", out).group(1).split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts of Linux")
def test_irpe_module_in_a_plain_script_faults_in_no_fresh_result_pages():
    cached = module_faults()
    assert max(cached) < 3000, cached  # the output's 14,100 pages are not faulted in again
    plain = module_faults(RPE_OPS_CPU_CACHE_MB="0")
    assert min(plain) > 14000, plain


def test_a_bad_cache_setting_is_reported():
    code = "import torch, rpe_ops; rpe_ops.rpe_index(torch.zeros(1, 1, 600, 600), torch.zeros(600, 600, dtype=torch.long))"
    environment = dict(os.environ, PYTHONPATH=ROOT, RPE_OPS_CPU_CACHE_MB="lots")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment,
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert "RPE_OPS_CPU_CACHE_MB must be a whole number of megabytes" in run.stderr
