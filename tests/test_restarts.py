"""Interrupted runs: SIGTERM, SIGKILL, --auto_resume, torchrun's elastic restarts, several nodes on
one machine, and submitit's requeue. Runs that are stopped and restarted must end with exactly
the tensors of a run never stopped.

Two data sets: the toy data (96-pixel images, random-free evaluation transforms) and real
photographs through the COCO transforms (images of 480 to 1333 pixels, so the backbone runs in
channels-last; the evaluation's RandomResize draws from Python's random, in the main process with
--num_workers 0)."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from util import resume
from datasets.toy import generate_toy_coco
from tests.conftest import ROOT
from tests.photo_coco import write_photo_coco
from tests.test_main import TINY
from util.checkpoint import (get_rng_states, load_checkpoint, rng_states_kept, save_atomic,
                             set_rng_states)
from util.interrupt import Interrupted, signals_deferred, stop_signals_raise

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="finds worker processes through /proc")

# 2 iterations per epoch; --lr_drop 1 keeps every epoch's checkpoint as checkpointNNNN.pth
NUM_TRAIN, NUM_VAL = 4, 2
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def options(toy, out, epochs=3):
    return ["--dataset_file", "toy", "--toy_path", toy, "--toy_num_train", NUM_TRAIN,
            "--toy_num_val", NUM_VAL, *TINY, "--lr_drop", 1, "--epochs", epochs,
            "--output_dir", out]


# a small model of the published configuration (iRPE, dropout 0.1), one image per batch: two
# training photographs make 2 iterations per epoch (1 per process with two processes)
PHOTO_MODEL = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", 32,
               "--nheads", 4, "--enc_layers", 1, "--dec_layers", 1, "--num_queries", 10,
               "--batch_size", 1, "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--num_workers", 0,
               "--device", "cpu", "--print_freq", 1, "--vis_images", 0]


def photo_options(photos, out, epochs):
    return ["--coco_path", photos, *PHOTO_MODEL, "--epochs", epochs, "--output_dir", out]


def start(*argv, **kwargs):
    """A command of this repository's Python in a fresh process group, output to a pipe."""
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT,
                            env=dict(os.environ, **ENV),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_until(proc, ready, what, timeout=240, poll=0.05):
    """Wait until ready() is true; fail if `proc` ends first, or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{finish(proc)[1][-3000:]}")
        time.sleep(poll)
    proc.kill()
    pytest.fail(f"not {what} after {timeout} s")


def wait_for_line(proc, log, text, timeout=240, count=1, after=0):
    """Wait until `text` is `count` times in the file `log` (a run's run.log or log.txt) past its
    first `after` characters."""
    wait_until(proc, lambda: log.is_file() and log.read_text()[after:].count(text) >= count,
               f"{text!r} was {count} times in {log}", timeout)


def children(pid):
    """The process ids whose parent is `pid` (Linux)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_state(ours, theirs, where="checkpoint"):
    """Every tensor, number and random state equal (the options aside: paths differ)."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and torch.equal(ours, theirs), where
    elif isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for key in theirs:
            if key != "args":
                assert_same_state(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same_state(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, where


def log_records(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def logged_epochs(out):
    return [record["epoch"] for record in log_records(out)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("restarts") / "toy_data"
    generate_toy_coco(str(root), num_train=NUM_TRAIN, num_val=NUM_VAL)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """COCO folders of real photographs of at least 400 pixels a side: 2 training, 2 validation."""
    root = tmp_path_factory.mktemp("photos")
    sizes = write_photo_coco(root, train=("astronaut", "rocket"), val=("coffee", "hubble"))
    assert min(min(size) for split in sizes.values() for size in split) >= 400
    return root


@pytest.fixture(scope="module")
def straight(toy, tmp_path_factory):
    """3 epochs in one process, never interrupted."""
    out = tmp_path_factory.mktemp("straight")
    code, text = finish(start("main.py", *options(toy, out)))
    assert code == 0, text[-3000:]
    return out


# ----------------------------------------------------------------------------------------------
# Signals while a checkpoint is written; the --auto_resume rule

def test_a_signal_during_saving_acts_once_the_file_is_complete(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"epoch": 0}, path)
    real_save = torch.save

    def save_while_signalled(obj, f, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # as if the scheduler stopped the job now
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_while_signalled)
    with stop_signals_raise(), pytest.raises(Interrupted) as stop:
        save_atomic({"epoch": 1}, path)
    assert stop.value.signum == signal.SIGTERM
    assert torch.load(path)["epoch"] == 1  # the new file is in place, whole
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers of before are back


def test_deferred_signals_reach_the_handlers_of_before_once():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        with signals_deferred():
            signal.raise_signal(signal.SIGUSR1)
            signal.raise_signal(signal.SIGUSR1)
            assert received == []
        assert received == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_sigint_and_sigterm_raise_interrupted_unless_a_wrapper_claimed_them():
    # from Python's default SIGINT handler, whatever an earlier test in this process left there
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stop_signals_raise(), pytest.raises(Interrupted) as stop:
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, outer)
    assert stop.value.signum == signal.SIGINT
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with stop_signals_raise():  # as under submitit, which only logs SIGTERM
            signal.raise_signal(signal.SIGTERM)
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_interruption_message_names_only_a_checkpoint_of_this_run(tmp_path):
    args = main.get_args_parser().parse_args(["--output_dir", str(tmp_path)])
    stop = Interrupted(signal.SIGTERM)
    started = time.time()
    assert ("before the first epoch of this run finished"
            in resume.interruption_message(stop, args, started))
    save_atomic({"model": {}, "epoch": 3}, tmp_path / "checkpoint.pth")
    os.utime(tmp_path / "checkpoint.pth", (started - 60, started - 60))  # an older run's file
    assert "nothing was saved" in resume.interruption_message(stop, args, started)
    args.resume = str(tmp_path / "checkpoint.pth")  # ... unless this run resumed from it
    assert (f"the last finished epoch, 3, is saved intact in {tmp_path / 'checkpoint.pth'}"
            in resume.interruption_message(stop, args, started))


def test_auto_resume_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    parse = main.get_args_parser().parse_args
    own = tmp_path / "checkpoint.pth"

    args = parse(["--output_dir", str(tmp_path), "--auto_resume", "--resume", "pretrained.pth"])
    resume.resolve_auto_resume(args)
    assert args.resume == "pretrained.pth"  # nothing of this run yet: --resume gives the start
    args = parse(["--output_dir", str(tmp_path), "--auto_resume"])
    resume.resolve_auto_resume(args)
    assert args.resume == ""  # from scratch

    own.write_bytes(b"")
    args = parse(["--output_dir", str(tmp_path), "--auto_resume", "--resume", "pretrained.pth"])
    resume.resolve_auto_resume(args)
    assert args.resume == str(own)  # the run's own checkpoint wins
    args = parse(["--output_dir", str(tmp_path), "--resume", "pretrained.pth"])
    resume.resolve_auto_resume(args)
    assert args.resume == "pretrained.pth"  # without --auto_resume, nothing changes

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a group torchrun restarted
    args = parse(["--output_dir", str(tmp_path)])
    resume.resolve_auto_resume(args)
    assert args.auto_resume and args.resume == str(own)

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(SystemExit, match="pass --output_dir"):
        resume.resolve_auto_resume(parse(["--auto_resume"]))


def test_draws_inside_rng_states_kept_leave_every_stream_as_it_was():
    generator = torch.Generator().manual_seed(3)

    def draws():
        return [torch.rand(3), torch.rand(2, generator=generator),
                torch.tensor(np.random.rand(2)), torch.tensor([random.random()])]

    before = get_rng_states(generator)
    with rng_states_kept(generator):
        inside = draws()
    after = draws()
    set_rng_states(before, generator)
    assert all(torch.equal(a, b) for a, b in zip(inside, after))  # what follows drew the same
    assert_same_state(get_rng_states(generator), before)


def test_an_evaluation_cut_short_runs_again_only_for_the_run_s_own_checkpoint(tmp_path):
    args = main.get_args_parser().parse_args(["--output_dir", str(tmp_path),
                                              "--resume", str(tmp_path / "checkpoint.pth")])
    stats = {"loss": 1.5}
    assert resume.unevaluated_training(args, {"epoch": 0, "train_stats": stats}) == stats  # no log
    (tmp_path / "log.txt").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')  # the last line cut
    assert resume.unevaluated_training(args, {"epoch": 1, "train_stats": stats}) is None
    assert resume.unevaluated_training(args, {"epoch": 2, "train_stats": stats}) == stats
    assert resume.unevaluated_training(args, {"epoch": 2}) is None  # a file without the statistics
    args.resume = str(tmp_path / "other" / "checkpoint.pth")  # another run's file starts this one
    assert resume.unevaluated_training(args, {"epoch": 2, "train_stats": stats}) is None


# ----------------------------------------------------------------------------------------------
# One process: SIGTERM, then SIGKILL, each time the same command again

def test_sigterm_then_sigkill_then_the_same_command_ends_as_never_stopped(toy, straight, tmp_path):
    out = tmp_path / "out"
    command = ["main.py", *options(toy, out), "--auto_resume"]

    proc = start(*command)
    wait_for_line(proc, out / "run.log", "Epoch: [1] [0/2]")
    proc.send_signal(signal.SIGTERM)
    code, text = finish(proc)
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert (f"stopped by SIGTERM: the last finished epoch, 0, is saved intact in "
            f"{out / 'checkpoint.pth'}") in text
    assert "Traceback" not in text
    assert_same_state(load_checkpoint(out / "checkpoint.pth"),
                      load_checkpoint(straight / "checkpoint0000.pth"))

    proc = start(*command)  # continues from epoch 1 ...
    wait_for_line(proc, out / "run.log", "Epoch: [2] [0/2]")
    proc.kill()  # ... and is killed in epoch 2, with no chance to clean up
    assert finish(proc)[0] == -signal.SIGKILL
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1

    code, text = finish(start(*command))
    assert code == 0, text[-3000:]
    assert f"resumed from {out / 'checkpoint.pth'} (epoch 1)" in text
    assert_same_state(load_checkpoint(out / "checkpoint.pth"),
                      load_checkpoint(straight / "checkpoint.pth"))
    assert logged_epochs(out) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# Real photographs, --num_workers 0: SIGKILL at four points of epoch 2 (of 0 to 3), each time the
# same command again

PHOTO_EPOCHS = 4
# --lr_drop 3 keeps epoch 2's checkpoint as checkpoint0002.pth (the drop comes after it)
PHOTO_LR_DROP = ["--lr_drop", 3]


@pytest.fixture(scope="module")
def photo_straight(photos, tmp_path_factory):
    """PHOTO_EPOCHS epochs on the photographs in one process, never interrupted."""
    out = tmp_path_factory.mktemp("photo_straight")
    code, text = finish(start("main.py", *photo_options(photos, out, PHOTO_EPOCHS), *PHOTO_LR_DROP))
    assert code == 0, text[-3000:]
    return out


def temporary_checkpoints(out):
    return sorted(out.glob("checkpoint.pth.tmp-*"))


def start_and_kill(command, out, ready):
    """Run `command`, SIGKILL it once ready(proc, run_log, offset) returns (offset: the length of
    run.log before the start, so that only this run's lines count); returns its output."""
    log = out / "run.log"
    offset = len(log.read_text()) if log.is_file() else 0
    proc = start(*command)
    ready(proc, log, offset)
    proc.kill()
    code, text = finish(proc)
    assert code == -signal.SIGKILL, text[-3000:]
    return text


def test_sigkill_at_four_points_of_epoch_2_each_time_the_same_command_ends_as_never_stopped(
        photos, photo_straight, tmp_path):
    out = tmp_path / "out"
    command = ["main.py", *photo_options(photos, out, PHOTO_EPOCHS), *PHOTO_LR_DROP,
               "--auto_resume"]
    resumed = f"resumed from {out / 'checkpoint.pth'} (epoch "

    def checkpoint_epoch():
        return load_checkpoint(out / "checkpoint.pth")["epoch"]

    # early: once epoch 1's evaluation is in log.txt, epoch 2 starts
    start_and_kill(command, out, lambda proc, log, offset: wait_for_line(
        proc, out / "log.txt", "\n", count=2))
    assert checkpoint_epoch() == 1 and logged_epochs(out) == [0, 1]

    # mid-epoch: after the first of epoch 2's two iterations
    text = start_and_kill(command, out, lambda proc, log, offset: wait_for_line(
        proc, log, "Epoch: [2] [0/2]", after=offset))
    assert resumed + "1)" in text and checkpoint_epoch() == 1

    # while epoch 2's checkpoint is written: as soon as its temporary file appears
    def saving(proc, log, offset):
        wait_for_line(proc, log, "Epoch: [2] [1/2]", after=offset)
        wait_until(proc, lambda: temporary_checkpoints(out), "the checkpoint's temporary file "
                   "appeared", poll=0.001)

    text = start_and_kill(command, out, saving)
    assert resumed + "1)" in text
    assert temporary_checkpoints(out) and checkpoint_epoch() == 1  # the file of before, whole

    # during epoch 2's evaluation: after the first of its two images
    text = start_and_kill(command, out, lambda proc, log, offset: wait_for_line(
        proc, log, "Test: [0/2]", after=offset))
    assert resumed + "1)" in text and checkpoint_epoch() == 2 and logged_epochs(out) == [0, 1]
    # three runs stopped within epoch 2, the last one finished its training exactly
    assert_same_state(load_checkpoint(out / "checkpoint.pth"),
                      load_checkpoint(photo_straight / "checkpoint0002.pth"))

    code, text = finish(start(*command))
    assert code == 0, text[-3000:]
    assert resumed + "2)" in text
    # weights, optimizer, scheduler and random states, after an epoch that started where the
    # interrupted evaluation left the random states
    assert_same_state(load_checkpoint(out / "checkpoint.pth"),
                      load_checkpoint(photo_straight / "checkpoint.pth"))
    # the interrupted evaluation ran again: log.txt as that of the run never stopped
    assert "the evaluation of epoch 2 did not finish before the run stopped: it runs now" in text
    assert log_records(out) == log_records(photo_straight)


# ----------------------------------------------------------------------------------------------
# torchrun on the photographs: two nodes on one machine, and an elastic restart

def torchrun_options(photos, out):
    """3 epochs of one iteration per process; --lr_drop 2 keeps epoch 1's checkpoint."""
    return [*photo_options(photos, out, 3), "--lr_drop", 2]


@pytest.fixture(scope="module")
def two_nodes(photos, tmp_path_factory):
    """3 epochs on two "nodes" of one process each (two torchrun agents, c10d rendezvous)."""
    out = tmp_path_factory.mktemp("two_nodes")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [start("-m", "torch.distributed.run", "--nnodes", 2, "--nproc_per_node", 1,
                   "--node_rank", rank, "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                   "--rdzv_id", "two_nodes", "main.py", *torchrun_options(photos, out))
             for rank in (0, 1)]
    for node in nodes:
        code, text = finish(node)
        assert code == 0, text[-3000:]
    return out


@pytest.fixture(scope="module")
def restarted(photos, tmp_path_factory):
    """3 epochs on one node of two processes, one of them killed early in epoch 2 (once epoch 1's
    evaluation is logged); torchrun restarts the group."""
    out = tmp_path_factory.mktemp("restarted")
    proc = start("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
                 "--max_restarts", 1, "--monitor_interval", 0.1, "main.py",
                 *torchrun_options(photos, out))
    wait_for_line(proc, out / "log.txt", "\n", count=2)
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    code, text = finish(proc)
    assert code == 0, text[-3000:]
    return out


def test_two_nodes_of_one_process_equal_one_node_of_two(two_nodes, restarted):
    log = (two_nodes / "run.log").read_text()
    assert "world size 2 on 2 nodes, 1 images per process, effective batch 2" in log
    assert log.count("start training") == 1  # one process logs and writes
    assert "world size 2 on 1 node, 1 images per process" in (restarted / "run.log").read_text()
    # epoch 1 of the one-node run, written before one of its processes was killed
    assert_same_state(load_checkpoint(two_nodes / "checkpoint0001.pth"),
                      load_checkpoint(restarted / "checkpoint0001.pth"))


def test_worker_killed_in_epoch_2_group_restarts_and_ends_as_never_stopped(two_nodes, restarted):
    log = (restarted / "run.log").read_text()
    assert "restart 1 by torchrun: --auto_resume is on" in log
    assert f"resumed from {restarted / 'checkpoint.pth'} (epoch 1)" in log
    assert_same_state(load_checkpoint(restarted / "checkpoint.pth"),
                      load_checkpoint(two_nodes / "checkpoint.pth"))
    assert log_records(restarted) == log_records(two_nodes)


# ----------------------------------------------------------------------------------------------
# Slurm through submitit, with its local executor

def test_submitit_job_preempted_in_epoch_2_requeues_and_ends_as_never_stopped(toy, straight,
                                                                              tmp_path):
    pytest.importorskip("submitit")
    job_dir = tmp_path / "job"
    proc = start("run_with_submitit.py", "--local", "--ngpus", 0, "--timeout", 10,
                 "--job_dir", job_dir, *options(toy, "")[:-2])  # the output goes to --job_dir
    wait_for_line(proc, job_dir / "run.log", "Epoch: [2] [0/2]")
    # what Slurm does before a time-out or on preemption: SIGUSR2 to the job's task
    controller, = children(proc.pid)
    task, = children(controller)
    os.kill(task, signal.SIGUSR2)
    code, text = finish(proc)
    assert code == 0, text[-3000:]
    assert "finished" in text
    log = (job_dir / "run.log").read_text()
    assert f"resumed from {job_dir / 'checkpoint.pth'} (epoch 1)" in log
    task_logs = "".join(p.read_text() for p in (job_dir / "submitit").rglob("*_log.*"))
    assert "Requeued job" in task_logs
    assert_same_state(load_checkpoint(job_dir / "checkpoint.pth"),
                      load_checkpoint(straight / "checkpoint.pth"))
    assert logged_epochs(job_dir) == [0, 1, 2]


def test_submitit_script_messages(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    import run_with_submitit
    with pytest.raises(SystemExit, match="pass --job_dir"):
        run_with_submitit.submit(run_with_submitit.parse_args(["--local", "--ngpus", "0"]))
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    with pytest.raises(SystemExit, match="pass --local"):
        run_with_submitit.submit(run_with_submitit.parse_args(["--job_dir", str(tmp_path)]))
