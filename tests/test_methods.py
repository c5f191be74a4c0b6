"""The baselines as presets, shared stages and the epsilon sweep through Hydra multirun."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict

import pytest
import torch
from omegaconf import OmegaConf

from privimage.config.schema import method_of
from privimage.errors import ConfigError
from privimage.nets.models import build_unet, load_unet
from privimage.pipeline import run_pipeline, shared_key

METHODS = {
    "privimage": ("semantic", True),
    "pdp_diffusion": ("all", True),
    "dpdm": ("none", True),
    "nonprivate": ("semantic", False),
}


@pytest.mark.parametrize("suffix", ["", "_cifar10"])
def test_method_presets_differ_only_in_what_defines_the_method(suffix, compose):
    """Same data, model, pretraining compute (images seen), fine-tuning and evaluation."""
    configs = {m: compose([f"experiment={m}{suffix}"]) for m in METHODS}
    plain = {}
    for method, cfg in configs.items():
        subset, dp = METHODS[method]
        assert (cfg.pretrain.public_subset, cfg.finetune.dp) == (subset, dp)
        assert method_of(asdict(cfg)) == method
        assert ("query" in cfg.stages) == (subset == "semantic")
        assert cfg.pretrain.images_seen is not None  # compute in images, not epochs
        d = asdict(cfg)
        for key in ("name", "stages"):
            d.pop(key)
        d["pretrain"].pop("public_subset")
        d["finetune"].pop("dp")
        plain[method] = d
    first = plain["privimage"]
    for method, d in plain.items():
        assert d == first, method


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["pretrain.public_subset=everything"], "pretrain.public_subset"),
        (["pretrain.public_subset=all"], "stages=[pretrain,finetune,sample,evaluate]"),
        (["pretrain.images_seen=0"], "pretrain.images_seen"),
    ],
)
def test_bad_method_settings_are_refused_with_the_fix(overrides, needle, compose):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        compose(overrides)


@pytest.mark.slow
def test_pretraining_baselines_on_real_glyphs(tmp_path, compose):
    """none: the initial weights, untouched; all: every public image, unconditionally,
    for images_seen / batch_size steps; both name the sensitive classes for sampling."""
    base = ["experiment=smoke", "stages=[pretrain]"]
    none = compose([*base, "pretrain.public_subset=none"])
    run_pipeline(none, tmp_path / "none")
    unet, _ = load_unet(tmp_path / "none" / "pretrain" / "unet")
    torch.manual_seed(none.seed)
    fresh = build_unet(none.model, resolution=28, channels=1, num_classes=10)
    for (k, a), b in zip(unet.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert json.loads((tmp_path / "none" / "pretrain" / "processes.json").read_text())["steps"] == 0

    every = compose(
        [
            *base,
            "pretrain.public_subset=all",
            "pretrain.images_seen=130",
            "pretrain.max_images=null",
        ]
    )
    run_pipeline(every, tmp_path / "all")
    out = tmp_path / "all" / "pretrain"
    processes = json.loads((out / "processes.json").read_text())
    assert processes["steps"] == 3  # ceil(130 / 64)
    assert processes["processes"][0]["images_seen"] == 3 * 64
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classes"] == [str(i) for i in range(10)]
    trained, _ = load_unet(out / "unet")
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(trained.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    assert changed
    assert (out / "grid.png").stat().st_size > 0


@pytest.mark.slow
def test_nonprivate_finetuning_is_recorded_as_not_private(tmp_path, compose):
    cfg = compose(
        [
            "experiment=smoke",
            "stages=[pretrain,finetune,sample,evaluate]",
            "pretrain.public_subset=none",
            "finetune.dp=false",
            "finetune.checkpoint_every_steps=1",
        ]
    )
    run_pipeline(cfg, tmp_path)
    ledger = json.loads((tmp_path / "privacy.json").read_text())
    assert ledger["differentially_private"] is False
    assert ledger["mechanisms"] == []
    assert [e["name"] for e in ledger["non_private"]] == ["non_private_training"]
    stats = [
        json.loads(x) for x in (tmp_path / "finetune" / "stats.jsonl").read_text().splitlines()
    ]
    assert [s["step"] for s in stats] == list(range(1, len(stats) + 1))  # 600 / 100 per step
    assert len(stats) == 6 and all(s["epsilon"] is None for s in stats)
    assert not (tmp_path / "finetune" / "checkpoint.pt").exists()
    before, _ = load_unet(tmp_path / "pretrain" / "unet")
    after, _ = load_unet(tmp_path / "finetune" / "unet")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(before.state_dict().values(), after.state_dict().values(), strict=True)
    )
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert metrics["differentially_private"] is False
    report = (tmp_path / "evaluate" / "report.md").read_text()
    assert "no differential-privacy guarantee" in report and "finetune.dp=false" in report
    # Nothing of it may be shared as DP: release/ holds the ledger and says why.
    released = sorted(p.name for p in (tmp_path / "release").rglob("*") if p.is_file())
    assert released == ["MANIFEST.json", "RELEASE.md", "privacy.json"]
    release_md = (tmp_path / "release" / "RELEASE.md").read_text()
    assert "NOT differentially private" in release_md and "Only the ledger" in release_md


@pytest.mark.slow
def test_epsilon_sweep_computes_the_shared_stages_once(tmp_path, cache_dir, run_cli):
    """`sweep=epsilon` through Hydra multirun with two values: query and pretraining run
    in the first job only, the second copies them in (and records the query's spend);
    `privimage report` on the sweep folder has one row per epsilon."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        "experiment=smoke",
        "sweep=epsilon",
        "privacy.epsilon=4,8",
        f"hydra.sweep.dir={sweep}",
        f"cache_dir={cache_dir}",
        "device=cpu",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {e: sweep / f"privacy.epsilon={e}" for e in (4, 8)}
    how = {}
    for eps, job in jobs.items():
        timings = [json.loads(x) for x in (job / "timings.jsonl").read_text().splitlines()]
        how[eps] = {t["stage"]: t.get("how") for t in timings}
        ledger = json.loads((job / "privacy.json").read_text())
        assert [m["stage"] for m in ledger["mechanisms"]] == ["query", "finetune"]
        assert ledger["epsilon_spent"] <= eps
    assert how[4] == {
        "query": "computed",
        "pretrain": "computed",
        "finetune": None,
        "sample": None,
        "evaluate": None,
    }
    assert how[8] == {**how[4], "query": "reused", "pretrain": "reused"}
    for stage in ("query", "pretrain"):
        assert len([p for p in (sweep / "shared" / stage).iterdir() if p.is_dir()]) == 1
    for name in ("public_index.npy", "histogram_noisy.npy"):
        assert (jobs[4] / "query" / name).read_bytes() == (jobs[8] / "query" / name).read_bytes()
    weights = "pretrain/unet/diffusion_pytorch_model.safetensors"
    assert (jobs[4] / weights).read_bytes() == (jobs[8] / weights).read_bytes()
    # The budgets differ, so DP-SGD's noise does: the fine-tuned weights differ.
    weights = "finetune/unet/diffusion_pytorch_model.safetensors"
    assert (jobs[4] / weights).read_bytes() != (jobs[8] / weights).read_bytes()

    out = tmp_path / "report"
    report = run_cli("report", str(sweep), "--out", str(out), timeout=120)
    assert report.returncode == 0, report.stderr
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["target_epsilon"]) for r in rows) == [4.0, 8.0]
    assert {r["method"] for r in rows} == {"privimage"}


def test_a_sampling_change_keeps_the_shared_pretraining(compose):
    """Sampling settings are the sample stage's: a run that only samples differently
    reuses the shared pretraining (its grid has settings of its own, which do count)."""

    def key(*overrides: str) -> str:
        return shared_key(compose(["experiment=smoke", *overrides]), "pretrain")

    base = key()
    sampling = ("sample.guidance_scale=3", "sample.sampler=euler", "sample.num_inference_steps=9")
    assert key(*sampling) == base
    assert key("pretrain.grid_guidance_scale=3") != base
    assert key("pretrain.grid_num_inference_steps=5") != base
    assert key("pretrain.lr=1e-3") != base


def test_sweep_composes_with_the_slurm_launcher(compose_dict):
    """The same sweep on SLURM: hydra-submitit-launcher's config composes with ours."""
    cfg = compose_dict(
        ["sweep=epsilon", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
        return_hydra_config=True,
    )
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params["privacy.epsilon"] == "1,5,10"
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu"
    assert OmegaConf.to_container(cfg, resolve=False)["reuse_dir"] == "${hydra:sweep.dir}/shared"
    # Without the sweep preset nothing is shared.
    assert compose_dict([]).reuse_dir is None
