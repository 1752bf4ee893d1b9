"""util.misc's helpers that DETR's scripts import: interpolate, get_sha, setup_for_distributed,
init_distributed_mode and save_on_master (in one process and in a real two-process group)."""
import argparse
import builtins
import io
import os
import pickle
import re
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


# ----------------------------------------------------------------------------------------------
# Progress lines (MetricLogger.log_every)

class _Console(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


COMPACT = (r"\d\d:\d\d:\d\d Epoch: \[3\] (\d)/5 \((\d+)%\)  eta \d+:\d\d:\d\d  loss (\d\.\d{4})  "
           r"class_error 12\.50  lr 1\.00e-04  \d+\.\d\d it/s")


def _epoch_through_main_logging(tmp_path, monkeypatch, tty):
    """Five steps of a training-like loop (print_freq 2) under main.py's logging set-up
    (util.misc.setup_logging); returns (what the console showed, run.log)."""
    import logging
    console = _Console(tty)
    monkeypatch.setattr("sys.stdout", console)
    root = logging.getLogger()
    saved = root.handlers[:], root.level, utils.progress_logger.handlers[:]
    utils.setup_logging(str(tmp_path))
    try:
        metric_logger = utils.MetricLogger(delimiter="  ")
        metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
        metric_logger.add_meter("class_error", utils.SmoothedValue(window_size=1, fmt="{value:.2f}"))
        for i in metric_logger.log_every(range(5), 2, "Epoch: [3]"):
            metric_logger.update(loss=1.0 + i, loss_ce=0.5, class_error=12.5, lr=1e-4)
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level, utils.progress_logger.handlers[:] = saved
    run_log = tmp_path / "run.log"
    return console.getvalue(), run_log.read_text() if run_log.exists() else None


def _full_lines(text):
    return [line for line in text.splitlines() if "eta: " in line]


def test_on_a_terminal_the_console_shows_compact_lines_and_run_log_the_full_ones(tmp_path,
                                                                                 monkeypatch):
    shown, run_log = _epoch_through_main_logging(tmp_path, monkeypatch, tty=True)
    compact = [re.fullmatch(COMPACT, line) for line in shown.splitlines() if "it/s" in line]
    assert all(compact) and len(compact) == 3, shown
    # steps 1, 3 and 5 of 5; the loss shown is the median of the window (1, 1..3, 1..5)
    assert [m.groups() for m in compact] == [("1", "20", "1.0000"), ("3", "60", "2.0000"),
                                             ("5", "100", "3.0000")]
    assert _full_lines(shown) == [] and "Total time" in shown
    full = _full_lines(run_log)
    assert len(full) == 3 and "it/s" not in run_log
    for line, step, loss in zip(full, (0, 2, 4), ("1.0000 (1.0000)", "2.0000 (2.0000)",
                                                  "3.0000 (3.0000)")):
        assert f"Epoch: [3] [{step}/5]" in line and f"loss: {loss}" in line
        assert "loss_ce: 0.5000 (0.5000)" in line and "class_error: 12.50" in line
        assert "lr: 0.000100" in line and "time: " in line and "data: " in line


def test_elsewhere_the_full_lines_go_to_the_console_too(tmp_path, monkeypatch):
    shown, run_log = _epoch_through_main_logging(tmp_path, monkeypatch, tty=False)
    assert "it/s" not in shown
    assert len(_full_lines(run_log)) == 3 and _full_lines(shown) == _full_lines(run_log)


def test_only_the_main_process_writes_the_compact_line(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "get_rank", lambda: 1)
    shown, run_log = _epoch_through_main_logging(tmp_path, monkeypatch, tty=True)
    assert shown == "" and run_log is None


def test_compact_line_names_the_meters_it_has():
    metric_logger = utils.MetricLogger()
    metric_logger.update(loss=0.25)
    line = metric_logger.compact_line("Test:", 40, 625, "0:02:10", 9.87)
    expected = "Test: 40/625 (6%)  eta 0:02:10  loss 0.2500  9.87 it/s"
    if torch.cuda.is_available():
        expected += f"  mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GB"
    assert line == expected
