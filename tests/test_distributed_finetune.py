"""DP fine-tuning on several processes (gloo on CPUs) means the same as on one.

* One step of 2 processes, each with half of a fixed batch, gives the update of one step
  of 1 process with the whole batch (same noise draw, added once by process 0).
* A 2-process fine-tune of the smoke preset through torchrun records the same ledger as a
  1-process one: one sampling rate, the same sigma and steps.
* ``kill -9`` of the launcher and its workers mid-run, then the same command again, finishes equal
  to an uninterrupted 2-process run (seeded noise, so the two can be compared).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest
import torch
from diffusers import UNet2DModel

pytestmark = pytest.mark.slow

STEP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    from privimage.config.schema import ModelConfig
    from privimage.diffusion.ddpm import add_noise, linear_alphas_cumprod
    from privimage.dp.bookkeeping import (
        BookKeeping, BookKeepingDPOptimizer, DistributedBookKeepingDPOptimizer,
    )
    from privimage.nets.models import build_unet

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    cfg = ModelConfig(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                      attention=True)
    model = build_unet(cfg, resolution=16, channels=1, num_classes=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples, k = 4, 2
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(examples, 1, 16, 16, generator=g) * 2 - 1).repeat_interleave(k, 0)
    y = (torch.arange(examples) % 10).repeat_interleave(k, 0)
    t = torch.randint(0, 1000, (examples * k,), generator=g)
    noise = torch.randn(examples * k, 1, 16, 16, generator=g)
    per = examples // world * k
    mine = slice(rank * per, (rank + 1) * per)
    engine = BookKeeping(model, max_grad_norm=0.5, noise_multiplicity=k)
    cls = DistributedBookKeepingDPOptimizer if world > 1 else BookKeepingDPOptimizer
    optimizer = cls(
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.3, max_grad_norm=0.5,
        expected_batch_size=examples / world, generator=torch.Generator().manual_seed(7),
    )
    x_t = add_noise(x[mine], noise[mine], t[mine], linear_alphas_cumprod(1000)).float()
    out = engine(x_t, t[mine], class_labels=y[mine]).sample
    (out - noise[mine]).pow(2).flatten(1).mean(1).mean().backward()
    optimizer.step()
    if rank == 0:
        torch.save({n: p.detach() - before[n] for n, p in model.named_parameters()}, sys.argv[1])
    """
)


def _port() -> str:
    # Distinct per call: a killed launcher's port can stay in TIME_WAIT.
    _port.n = getattr(_port, "n", 0) + 1
    return str(20000 + (os.getpid() * 7 + _port.n * 13) % 20000)


def _torchrun(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        _port(),
    ]


def test_a_two_process_step_is_the_one_process_step(tmp_path, repo_root):
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT)
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for launcher, out in (([sys.executable], one), (_torchrun(2), two)):
        result = subprocess.run(
            [*launcher, str(script), str(out)], cwd=repo_root, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    total = torch.sqrt(sum(v.pow(2).sum() for v in a.values()))
    assert total > 0
    for name in a:
        assert (a[name] - b[name]).norm() <= 1e-5 * max(float(a[name].norm()), 1e-3), name


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, pretrain_smoke):
    return pretrain_smoke(tmp_path_factory.mktemp("multi-base"))


@pytest.fixture
def finetune_command(cli_command, resumable_finetune):
    """``finetune_command(launcher, run_dir)``: the resumable fine-tune's command line."""

    def command(launcher, run_dir):
        return cli_command(resumable_finetune, run_dir, launcher=launcher)

    return command


@pytest.fixture
def run_finetune(finetune_command, repo_root):
    """``run_finetune(launcher, run_dir)``: the resumable fine-tune, run to a clean end."""

    def run(launcher, run_dir):
        result = subprocess.run(
            finetune_command(launcher, run_dir), cwd=repo_root, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    return run


def _mechanisms(run_dir):
    data = json.loads((run_dir / "privacy.json").read_text())
    return data["epsilon_spent"], [
        {k: v for k, v in m.items() if k != "time"} for m in data["mechanisms"]
    ]


def test_two_processes_record_the_one_process_ledger(
    pretrained, copy_run, run_finetune, jsonl_lines
):
    one = copy_run(pretrained, "one")
    run_finetune([sys.executable], one)
    two = copy_run(pretrained, "two")
    result = run_finetune(_torchrun(2), two)
    assert _mechanisms(two) == _mechanisms(one)
    # One writer: each logical step logged once, one outputs line.
    assert [json.loads(s)["step"] for s in jsonl_lines(two / "finetune" / "stats.jsonl")] == list(
        range(1, 13)
    )
    assert result.stdout.count("outputs in") == 1
    UNet2DModel.from_pretrained(two / "finetune" / "unet")
    assert not (two / "finetune" / "checkpoint.pt").exists()


def test_kill_9_of_the_launcher_then_resume_equals_an_uninterrupted_run(
    pretrained, copy_run, finetune_command, run_finetune, repo_root, wait_for_lines, jsonl_lines
):
    straight = copy_run(pretrained, "straight")
    run_finetune(_torchrun(2), straight)

    crashed = copy_run(pretrained, "crashed")
    stats = crashed / "finetune" / "stats.jsonl"
    proc = subprocess.Popen(
        finetune_command(_torchrun(2), crashed),
        cwd=repo_root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Past the step-3 checkpoint with steps 4 and 5 done but not checkpointed.
    wait_for_lines(stats, 5, proc)
    # The launcher and its workers at once, as a job kill or a dead node does (torchrun's
    # workers do not share the launcher's process group, so killpg would miss them).
    launcher = psutil.Process(proc.pid)
    workers = launcher.children(recursive=True)
    assert workers, "torchrun started no workers"
    for p in [*workers, launcher]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(workers, timeout=30)
    assert (crashed / "finetune" / "checkpoint.pt").exists()
    assert not (crashed / "finetune" / "DONE").exists()
    assert len(jsonl_lines(stats)) < 12

    run_finetune(_torchrun(2), crashed)
    assert _mechanisms(crashed) == _mechanisms(straight)
    assert jsonl_lines(stats) == jsonl_lines(straight / "finetune" / "stats.jsonl")
    events = [e["event"] for e in json.loads((crashed / "privacy.json").read_text())["events"]]
    assert events.count("resume") == 1 and events.count("complete") == 2  # query + DP-SGD
    a = UNet2DModel.from_pretrained(straight / "finetune" / "unet").state_dict()
    b = UNet2DModel.from_pretrained(crashed / "finetune" / "unet").state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
