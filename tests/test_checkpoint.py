"""Checkpoints round-trip bit-exactly, are atomic, and refuse files that do not match their manifest."""

from __future__ import annotations

import pytest
import torch

from braing3n_core.checkpoint import (
    CheckpointError,
    flatten_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    tensors_sha256,
    unflatten_optimizer_state,
)


def _trained_model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def test_model_and_optimizer_round_trip_bit_exactly(tmp_path):
    model, optimizer = _trained_model_and_optimizer()
    optim_tensors, optim_meta = flatten_optimizer_state(optimizer.state_dict())
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | optim_tensors
    save_checkpoint(tmp_path / "step-0003", tensors, {"step": 3, "optimizer": optim_meta})

    loaded = load_checkpoint(tmp_path / "step-0003.json")
    assert loaded.meta["step"] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.sub_state_dict("model")[key], value)
    restored = torch.optim.AdamW(model.parameters(), lr=1e-2)
    restored.load_state_dict(unflatten_optimizer_state(loaded.tensors, loaded.meta["optimizer"]))
    for pid, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(restored.state_dict()["state"][pid][name], value)
    assert tensors_sha256(loaded.sub_state_dict("model")) == tensors_sha256(model.state_dict())


def test_corrupted_weights_are_refused_with_the_file_named(tmp_path):
    model, _ = _trained_model_and_optimizer()
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), {})
    weights = tmp_path / "ckpt.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ckpt.safetensors"):
        load_checkpoint(tmp_path / "ckpt")


def test_weights_without_manifest_are_not_a_checkpoint(tmp_path):
    model, _ = _trained_model_and_optimizer()
    save_checkpoint(tmp_path / "round-0001", model.state_dict(), {"round": 1})
    save_checkpoint(tmp_path / "round-0002", model.state_dict(), {"round": 2})
    (tmp_path / "round-0002.json").unlink()  # a crash between the two writes
    assert latest_checkpoint(tmp_path, "round-") == tmp_path / "round-0001.json"
    with pytest.raises(CheckpointError, match="manifest not found"):
        load_checkpoint(tmp_path / "round-0002")


def test_hash_changes_with_any_value():
    a = {"w": torch.zeros(3)}
    b = {"w": torch.tensor([0.0, 0.0, 1e-7])}
    assert tensors_sha256(a) != tensors_sha256(b)
    assert tensors_sha256(a) == tensors_sha256({"w": torch.zeros(3)})
