"""util.misc's helpers that DETR's scripts import: interpolate, get_sha, setup_for_distributed,
init_distributed_mode and save_on_master (in one process and in a real two-process group)."""
import argparse
import builtins
import io
import os
import pickle
import socket
import subprocess
import warnings
import zipfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import util.misc as utils

from tests.conftest import ROOT


# ----------------------------------------------------------------------------------------------
# interpolate

def test_interpolate_is_f_interpolate_with_detrs_argument_order():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 5, 7)
    # nearest at an integer factor repeats every pixel: an independent reference
    torch.testing.assert_close(utils.interpolate(x, scale_factor=2.0),
                               x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1))
    torch.testing.assert_close(utils.interpolate(x, [10, 3]), F.interpolate(x, size=[10, 3]))
    # DETR's positional order: input, size, scale_factor, mode, align_corners
    for align_corners in (False, True):
        torch.testing.assert_close(utils.interpolate(x, None, 1.5, "bilinear", align_corners),
                                   F.interpolate(x, scale_factor=1.5, mode="bilinear",
                                                 align_corners=align_corners))
    # an empty batch (no detections to upsample masks for) keeps its shape
    empty = utils.interpolate(torch.rand(0, 3, 5, 7), size=[9, 4], mode="bilinear",
                              align_corners=False)
    assert empty.shape == (0, 3, 9, 4)
    assert utils.interpolate(torch.rand(0, 1, 5, 7), scale_factor=2.0).shape == (0, 1, 10, 14)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(utils.interpolate)
    torch.testing.assert_close(scripted(x, [4, 4], None, "bilinear", False),
                               F.interpolate(x, size=[4, 4], mode="bilinear", align_corners=False))


# ----------------------------------------------------------------------------------------------
# get_sha

def git(cwd, *args):
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c",
               "commit.gpgsign=false", *args]
    done = subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout.strip()


@pytest.fixture
def no_outer_git(tmp_path, monkeypatch):
    """Git may not look above tmp_path, nor be pointed elsewhere by the environment."""
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    return tmp_path


def test_get_sha_of_a_checkout(no_outer_git, capfd):
    repo = no_outer_git / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("one\n")
    git(repo, "add", "a.txt")
    git(repo, "commit", "-q", "-m", "first")
    git(repo, "checkout", "-q", "-b", "feature")
    sha = git(repo, "rev-parse", "HEAD")
    assert len(sha) == 40
    assert utils.get_sha(repo) == f"sha: {sha}, status: clean, branch: feature"
    (repo / "b.txt").write_text("untracked\n")  # untracked files are not changes
    assert utils.get_sha(str(repo)) == f"sha: {sha}, status: clean, branch: feature"
    (repo / "a.txt").write_text("two\n")
    assert utils.get_sha(repo) == f"sha: {sha}, status: has uncommitted changes, branch: feature"
    assert capfd.readouterr().err == ""


def test_get_sha_outside_a_checkout_or_without_git(no_outer_git, monkeypatch, capfd):
    plain = no_outer_git / "plain"
    plain.mkdir()
    assert utils.get_sha(plain) == "sha: N/A, status: N/A, branch: N/A"
    empty = no_outer_git / "empty"  # a repository without a commit
    empty.mkdir()
    git(empty, "init", "-q")
    assert utils.get_sha(empty) == "sha: N/A, status: N/A, branch: N/A"
    monkeypatch.setenv("PATH", str(no_outer_git))  # no git program at all
    assert utils.get_sha(ROOT) == "sha: N/A, status: N/A, branch: N/A"
    assert capfd.readouterr().err == ""


def test_get_sha_defaults_to_this_repository():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    expected = head.stdout.strip() if head.returncode == 0 else "N/A"  # e.g. an unpacked archive
    assert utils.get_sha().startswith(f"sha: {expected}, status: ")


# ----------------------------------------------------------------------------------------------
# One process: rank 0

def test_save_on_master_writes_atomically_on_the_main_process(tmp_path):
    assert utils.get_rank() == 0 and utils.is_main_process()
    path = tmp_path / "checkpoint.pth"
    utils.save_on_master({"model": torch.arange(3), "epoch": 1}, path)
    assert torch.equal(torch.load(path)["model"], torch.arange(3))
    # a save that fails half-way (a lambda does not pickle) leaves the previous file whole
    with pytest.raises((pickle.PicklingError, AttributeError)):
        utils.save_on_master({"model": torch.zeros(3), "epoch": lambda: 2}, str(path))
    assert torch.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    # torch.save's own arguments pass through; a file object is written as torch.save writes it
    utils.save_on_master({"epoch": 3}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path) and torch.load(path)["epoch"] == 3
    buffer = io.BytesIO()
    utils.save_on_master({"epoch": 4}, buffer)
    buffer.seek(0)
    assert torch.load(buffer)["epoch"] == 4


def test_setup_for_distributed_silences_print_except_on_the_master(monkeypatch, capsys):
    original = builtins.print
    monkeypatch.setattr(builtins, "print", original)  # restored after the test
    utils.setup_for_distributed(False)
    print("hidden")
    print("shown", "anyway", sep="-", force=True)
    utils.setup_for_distributed(True)  # a second call replaces the first, not wraps it
    assert builtins.print.__wrapped__ is original
    print("master")
    assert capsys.readouterr().out == "shown-anyway\nmaster\n"


def test_init_distributed_mode_without_a_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(dist_url="env://", device="cpu")  # DETR's options: no --local_rank
    utils.init_distributed_mode(args)
    assert args.distributed is False and args.rank == 0


# ----------------------------------------------------------------------------------------------
# Two processes (gloo)

def _two_process_worker(rank, folder, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    args = argparse.Namespace(dist_url="env://", device="cpu")
    utils.init_distributed_mode(args)
    try:
        assert (args.distributed, args.rank, args.world_size, args.dist_backend) == \
            (True, rank, 2, "gloo")
        assert (utils.get_rank(), utils.get_world_size(), utils.is_main_process()) == \
            (rank, 2, rank == 0)
        # both call it; only the main process writes
        utils.save_on_master({"rank": rank}, os.path.join(folder, "shared.pth"))
        utils.save_on_master({"rank": rank}, os.path.join(folder, f"rank{rank}.pth"))
        # init_distributed_mode silenced print on the other process (as DETR's does)
        with open(os.path.join(folder, f"print{rank}.txt"), "w") as f:
            print("plain", file=f)
            print("forced", file=f, force=True)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_rank_and_save_on_master(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_worker, args=(str(tmp_path), port), nprocs=2, join=True)
    assert sorted(os.listdir(tmp_path)) == ["print0.txt", "print1.txt", "rank0.pth", "shared.pth"]
    assert torch.load(tmp_path / "shared.pth") == {"rank": 0}
    assert (tmp_path / "print0.txt").read_text() == "plain\nforced\n"
    assert (tmp_path / "print1.txt").read_text() == "forced\n"
