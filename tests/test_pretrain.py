"""Pretraining with Accelerate: shards, two real processes, resume after kill -9, outputs.

The query's outputs (which public images, relabelled how) are written by hand from the
glyph dataset, so these tests exercise the pretraining stage alone on real images.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from privimage import data
from privimage.errors import ConfigError
from privimage.io.artifacts import mark_done
from privimage.io.atomic import write_json
from privimage.io.seeding import step_generator
from privimage.nets.models import load_unet
from privimage.schedule import epoch_order, micro_batch, scheduled_lr
from privimage.stages import pretrain

BASE = ["experiment=smoke", "stages=[pretrain]", "device=cpu", "pretrain.max_images=null"]


@pytest.fixture
def fake_query(compose, cache_dir):
    """``fake_query(run_dir, num_images=256, num_classes=10)``: the files the query stage
    hands to pretraining: public ids and their new labels."""

    def write(run_dir, num_images=256, num_classes=10):
        cfg = compose(BASE)
        public = data.load(cfg.public, cache_dir=cache_dir, progress=False)
        q = run_dir / "query"
        q.mkdir(parents=True)
        index = np.arange(num_images, dtype=np.int64) * (len(public.train) // num_images)
        np.save(q / "public_index.npy", index)
        np.save(q / "public_labels.npy", (public.train.labels.numpy()[index] % num_classes))
        write_json(
            q / "selection.json",
            {"classes": [{"sensitive_class": i, "name": str(i)} for i in range(num_classes)]},
        )
        mark_done(q)

    return write


@pytest.fixture
def run_pretrain(cli_command, repo_root):
    """``run_pretrain(run_dir, *extra, launcher=(python,))``: pretraining through the CLI."""

    def run(run_dir, *extra, launcher=(sys.executable,)):
        return subprocess.run(
            cli_command(BASE, run_dir, *extra, launcher=launcher),
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=600,
        )

    return run


def test_micro_batches_cut_each_global_batch_into_disjoint_equal_parts():
    order = epoch_order(seed=0, epoch=3, num_images=100)
    assert sorted(order.tolist()) == list(range(100))
    assert not np.array_equal(order, epoch_order(seed=0, epoch=4, num_images=100))
    for step_in_epoch in range(3):
        parts = [
            micro_batch(
                order,
                step_in_epoch=step_in_epoch,
                batch_size=32,
                process=p,
                num_processes=2,
                micro=m,
                accumulation=4,
            )
            for p in range(2)
            for m in range(4)
        ]
        assert all(len(part) == 4 for part in parts)
        joined = np.sort(np.concatenate(parts))
        assert np.array_equal(joined, np.sort(order[step_in_epoch * 32 : (step_in_epoch + 1) * 32]))


def test_each_micro_batch_has_its_own_seeded_stream():
    def draw(**kw):
        return torch.randn(3, generator=step_generator(**kw))

    a = draw(seed=0, step=5, process=0, micro=0)
    assert torch.equal(a, draw(seed=0, step=5, process=0, micro=0))
    for other in ({"step": 6}, {"process": 1}, {"micro": 1}, {"seed": 1}):
        kw = {"seed": 0, "step": 5, "process": 0, "micro": 0, **other}
        assert not torch.equal(a, draw(**kw))


def test_warmup_rises_linearly_to_the_learning_rate_and_stays():
    lrs = [scheduled_lr(0.01, step=s, warmup_steps=4) for s in range(6)]
    assert lrs == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    assert scheduled_lr(0.01, step=0, warmup_steps=0) == 0.01


def test_lr_decays_to_zero_at_the_end_after_the_warmup():
    lin = [
        scheduled_lr(1.0, step=s, warmup_steps=2, total_steps=6, decay="linear") for s in range(6)
    ]
    assert lin == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cos = [
        scheduled_lr(1.0, step=s, warmup_steps=0, total_steps=4, decay="cosine") for s in range(4)
    ]
    assert cos == pytest.approx(
        [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4)]
    )


def test_unknown_lr_decay_is_refused(compose):
    with pytest.raises(ConfigError, match="pretrain.lr_decay='step' is not one of none, linear"):
        compose([*BASE, "pretrain.lr_decay=step"])


def test_negative_warmup_is_refused(compose):
    with pytest.raises(ConfigError, match="pretrain.warmup_steps=-1"):
        compose([*BASE, "pretrain.warmup_steps=-1"])


@pytest.mark.slow
def test_batch_sizes_that_do_not_split_or_fit_are_refused(tmp_path, compose, fake_query):
    fake_query(tmp_path, num_images=40)
    cfg = compose([*BASE, "pretrain.batch_size=64"])
    with pytest.raises(ConfigError, match="exceeds the 40 selected public images"):
        pretrain.run(cfg, tmp_path)
    cfg = compose([*BASE, "pretrain.batch_size=30", "pretrain.gradient_accumulation_steps=4"])
    with pytest.raises(ConfigError, match="multiple of 4"):
        pretrain.run(cfg, tmp_path)


@pytest.mark.slow
def test_single_process_outputs_load_in_plain_diffusers(tmp_path, compose, fake_query):
    fake_query(tmp_path)
    cfg = compose(
        [
            *BASE,
            "pretrain.epochs=2",
            "pretrain.batch_size=32",
            "pretrain.gradient_accumulation_steps=2",
            "pretrain.log_every_steps=2",
            "pretrain.tracker=tensorboard",
        ]
    )
    out = pretrain.run(cfg, tmp_path)
    assert (out / "DONE").exists() and not (out / "checkpoint").exists()
    # Any diffusers user can load it; diffusion.json says how to precondition it.
    model = UNet2DModel.from_pretrained(out / "unet")
    assert model.config.num_class_embeds == 11  # 10 classes + the null class
    _, spec = load_unet(out / "unet")
    assert spec.formulation == "edm" and spec.sigma_data == 0.5
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == list(range(2, 17, 2))  # 2 epochs x 8 steps
    assert all(np.isfinite(s["loss"]) and s["images_per_s"] > 0 for s in stats)
    assert (out / "loss.png").stat().st_size > 0
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events written"
    procs = json.loads((out / "processes.json").read_text())
    assert procs["world_size"] == 1
    assert procs["processes"][0]["images_seen"] == 2 * 256


@pytest.mark.slow
def test_two_processes_each_train_on_their_own_shard(tmp_path, fake_query, run_pretrain):
    """A real 2-process gloo run (torchrun; `accelerate launch --cpu` would run one)."""
    fake_query(tmp_path)
    result = run_pretrain(
        tmp_path,
        "pretrain.epochs=1",
        launcher=(
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    procs = json.loads((tmp_path / "pretrain" / "processes.json").read_text())
    assert procs["world_size"] == 2
    ranks = {p["rank"]: p for p in procs["processes"]}
    assert set(ranks) == {0, 1}
    # One epoch of 256 images in 4 global batches of 64: 32 per process per step.
    assert ranks[0]["images_seen"] == ranks[1]["images_seen"] == 128
    # Disjoint shards covering the epoch: the id sums add up to 0 + 1 + ... + 255.
    assert ranks[0]["image_id_sum"] + ranks[1]["image_id_sum"] == sum(range(256))
    assert not set(ranks[0]["first_image_ids"]) & set(ranks[1]["first_image_ids"])
    UNet2DModel.from_pretrained(tmp_path / "pretrain" / "unet")


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(
    tmp_path, fake_query, run_pretrain, cli_command, repo_root
):
    # The warm-up spans the checkpoint and the kill: a resumed run must continue it.
    extra = (
        "pretrain.epochs=6",
        "pretrain.batch_size=32",
        "pretrain.checkpoint_every_steps=8",
        "pretrain.warmup_steps=20",
    )
    straight = tmp_path / "straight"
    fake_query(straight)
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    result = run_pretrain(straight, *extra, "pretrain.log_every_steps=1")
    assert result.returncode == 0, result.stderr[-2000:]

    stats = crashed / "pretrain" / "stats.jsonl"
    proc = subprocess.Popen(
        cli_command(BASE, crashed, *extra, "pretrain.log_every_steps=1"),
        cwd=repo_root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    # Past the step-8 checkpoint, with steps after it done but not checkpointed.
    while not stats.exists() or len(stats.read_text().splitlines()) < 11:
        assert proc.poll() is None, "pretraining ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (crashed / "pretrain" / "checkpoint").is_dir()
    assert not (crashed / "pretrain" / "DONE").exists()

    changed = run_pretrain(crashed, *extra, "pretrain.log_every_steps=1", "pretrain.lr=0.01")
    assert changed.returncode == 2 and "restore the original settings" in changed.stderr

    resumed = run_pretrain(crashed, *extra, "pretrain.log_every_steps=1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lines_s = (straight / "pretrain" / "stats.jsonl").read_text().splitlines()
    lines_c = stats.read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines_c]
    assert steps == list(range(1, 49))  # each step logged once
    losses = [json.loads(line)["loss"] for line in lines_c]
    assert losses == [json.loads(line)["loss"] for line in lines_s]
    a = UNet2DModel.from_pretrained(straight / "pretrain" / "unet").state_dict()
    b = UNet2DModel.from_pretrained(crashed / "pretrain" / "unet").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
