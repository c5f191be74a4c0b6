"""The one fine-tuning checkpoint type (``privimage.dp.training.Checkpoint``): the same
file layout for the DP-SGD and the non-private path, and a non-private fine-tune that is
killed after a checkpoint resumes to exactly the model of an uninterrupted one."""

from __future__ import annotations

import shutil

import pytest
import torch

from privimage import compose
from privimage.dp.training import Checkpoint
from privimage.errors import ConfigError, PrivImageError
from privimage.pipeline import run_pipeline
from privimage.stages import finetune


def _checkpoint(**dp) -> Checkpoint:
    return Checkpoint(
        step=3,
        identity={"settings": {"lr": 0.1}, "reproducible_noise": False},
        model={"w": torch.arange(4.0)},
        ema={"w": torch.ones(4)},
        optimizer={"state": {}, "param_groups": []},
        **dp,
    )


@pytest.mark.parametrize(
    "dp", [{}, {"accountant": {"history": [(1.0, 0.1, 3)]}, "rng": {"processes": [{}]}}]
)
def test_round_trip_keeps_the_flat_layout(tmp_path, dp):
    path = tmp_path / "checkpoint.pt"
    ckpt = _checkpoint(**dp)
    ckpt.save(path)
    raw = torch.load(path, weights_only=True)
    # One dictionary: the identity flat beside the state, as resumes have always read it.
    expected = ["step", "settings", "reproducible_noise", "model", "ema", "optimizer"]
    assert list(raw) == expected + (["accountant", "rng"] if dp else [])
    back = Checkpoint.load(path, torch.device("cpu"))
    assert back.step == 3 and back.identity == ckpt.identity
    assert torch.equal(back.model["w"], ckpt.model["w"])
    assert back.accountant == dp.get("accountant") and back.rng == dp.get("rng")
    back.check({"settings": {"lr": 0.1}}, path)
    with pytest.raises(ConfigError, match=r"settings=\{'lr': 0.1\}, this run has"):
        back.check({"settings": {"lr": 0.2}}, path)


def test_missing_and_foreign_files(tmp_path):
    assert Checkpoint.load(tmp_path / "none.pt", torch.device("cpu")) is None
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PrivImageError, match="delete it to restart fine-tuning from step 0"):
        Checkpoint.load(tmp_path / "bad.pt", torch.device("cpu"))


@pytest.mark.slow
def test_non_private_fine_tune_resumes_to_the_uninterrupted_model(tmp_path, cache_dir, monkeypatch):
    overrides = [
        "experiment=smoke",
        "pretrain.public_subset=none",
        "finetune.dp=false",
        "finetune.checkpoint_every_steps=1",
        f"cache_dir={cache_dir}",
        "device=cpu",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_pipeline(compose([*overrides, "stages=[pretrain,finetune]"]), whole)
    shutil.copytree(whole / "pretrain", killed / "pretrain")
    only_finetune = compose([*overrides, "stages=[finetune]"])

    real_step = finetune._non_private_step

    def dies_at_step_four(*args, step, **kwargs):
        if step == 3:
            raise KeyboardInterrupt  # after the checkpoint of step 3
        return real_step(*args, step=step, **kwargs)

    monkeypatch.setattr(finetune, "_non_private_step", dies_at_step_four)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(only_finetune, killed)
    ckpt = Checkpoint.load(killed / "finetune" / finetune.CHECKPOINT, torch.device("cpu"))
    assert ckpt.step == 3 and ckpt.accountant is None and "settings" in ckpt.identity
    monkeypatch.setattr(finetune, "_non_private_step", real_step)
    run_pipeline(only_finetune, killed)

    weights = "finetune/unet/diffusion_pytorch_model.safetensors"
    assert (killed / weights).read_bytes() == (whole / weights).read_bytes()
    stats = "finetune/stats.jsonl"
    assert (killed / stats).read_text() == (whole / stats).read_text()
    assert not (killed / "finetune" / finetune.CHECKPOINT).exists()
