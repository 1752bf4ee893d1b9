"""Failure paths: fewer GPUs on resume, divergence, crashes in evaluation, bad data, and the
checks that tell a broken model from a working one."""
import pytest
import torch

import main
from tests.test_main import TINY, run_cli, run_main
from util.checkpoint import get_rng_states, load_checkpoint, set_rng_states


def test_rng_states_restore_on_a_process_that_sees_fewer_gpus(monkeypatch):
    states = get_rng_states()
    states["cuda"] = [bytes(range(16)), bytes(range(1, 17))]  # written by a process with 2 GPUs
    restored = {}

    def set_rng_state(state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        if index is None or index >= 1:  # as torch does for a device it does not have
            raise RuntimeError(f"invalid device ordinal {device}")
        restored[index] = bytes(state.tolist())

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    set_rng_states(states)
    assert restored == {0: bytes(range(16))}


# ----------------------------------------------------------------------------------------------
# Runs that fail: divergence, errors during the run, evaluation crashes, resumed learning rates

# two training iterations (batch 2) and one validation batch per epoch
SMALL_TOY = ["--dataset_file", "toy", "--toy_num_train", "4", "--toy_num_val", "2"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return tmp_path_factory.mktemp("toy") / "toy_data"


def test_divergence_with_an_absurd_learning_rate_stops_with_the_loss_message(toy_root, tmp_path):
    out = tmp_path / "out"
    common = [*SMALL_TOY, "--toy_path", toy_root, *TINY, "--output_dir", out, "--epochs", 1,
              "--enc_rpe2d", "rpe-2.0-product-ctx-1-k"]
    run_main(*common)
    before = (out / "checkpoint.pth").read_bytes()
    # Adam moves every weight by about lr per step: the second iteration's predictions are nan,
    # which the Hungarian matcher (scipy) would reject with an unrelated ValueError
    proc = run_cli("main.py", *common, "--lr", "1e30", "--lr_backbone", "1e30")
    assert proc.returncode != 0
    assert "the loss is nan at epoch 0, iteration 1" in proc.stderr, proc.stderr[-2000:]
    assert "predictions are not finite" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "checkpoint.pth").read_bytes() == before


def test_a_failure_during_the_run_keeps_its_traceback_in_run_log(toy_root, tmp_path, monkeypatch):
    from models.matcher import HungarianMatcher

    def broken(self, outputs, targets):
        raise ValueError("cost matrix is infeasible")  # as scipy's linear_sum_assignment raises

    monkeypatch.setattr(HungarianMatcher, "forward", broken)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="infeasible"):  # not turned into a one-line input error
        run_main(*SMALL_TOY, "--toy_path", toy_root, *TINY, "--output_dir", out, "--epochs", 1)
    log = (out / "run.log").read_text()
    assert "the run failed" in log and "Traceback (most recent call last)" in log
    assert "ValueError: cost matrix is infeasible" in log


def test_input_errors_stay_one_line(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        run_main("--coco_path", tmp_path / "nowhere", "--output_dir", out, *TINY)
    assert str(err.value).startswith("error: ") and str(tmp_path / "nowhere") in str(err.value)
    assert "Traceback" not in (out / "run.log").read_text()


def test_checkpoint_of_an_epoch_survives_a_crash_in_its_evaluation(toy_root, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(main, "evaluate", crash)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        run_main(*SMALL_TOY, "--toy_path", toy_root, *TINY, "--output_dir", out, "--epochs", 2)
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 0 and "optimizer" in checkpoint


def test_resume_with_another_learning_rate_says_which_is_used(toy_root, tmp_path):
    out = tmp_path / "out"
    common = [*SMALL_TOY, "--toy_path", toy_root, *TINY, "--output_dir", out]
    run_main(*common, "--epochs", 1)
    run_main(*common, "--epochs", 2, "--resume", out / "checkpoint.pth", "--lr", "5e-4")
    log = (out / "run.log").read_text()
    assert log.count("--lr 0.0005 differs from the checkpoint's 0.0001: the checkpoint's is used") == 1
    assert "--lr_backbone" not in log.split("differs from")[0].splitlines()[-1]
    assert log.count("differs from the checkpoint's") == 1  # --lr_backbone was left as it was
    # and it is so: the optimizer runs at the checkpoint's rate
    assert load_checkpoint(out / "checkpoint.pth")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
