"""Failure paths: fewer GPUs on resume, divergence, crashes in evaluation, bad data, and the
checks that tell a broken model from a working one."""
import torch

from util.checkpoint import get_rng_states, set_rng_states


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
