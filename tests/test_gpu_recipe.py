"""The GPU recipe, ``experiment=privimage_cifar10_gpu``, run end to end on a CPU.

CI has no GPU, so the recipe is kept working by running the same file with only its
sizes shrunk (images, epochs, widths, batch sizes): every other setting (the UNet's
formulation, the query's top-k, DP-SGD with K=4, the sampler, the evaluation) runs as
the GPU run would. The first test pins that the shrink touches sizes only.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from privimage.pipeline import run_pipeline

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"

RECIPE = "experiment=privimage_cifar10_gpu"
SHRINK = [
    "data.max_train_images=400",
    "data.max_test_images=200",
    "public.max_train_images=2000",
    "public.max_test_images=400",
    "model=nano",
    "query.classifier_epochs=1",
    "query.classifier_width=8",
    "query.batch_size=128",
    "pretrain.images_seen=256",
    "pretrain.batch_size=64",
    "pretrain.warmup_steps=2",
    "pretrain.checkpoint_every_steps=2",
    "pretrain.grid_images_per_class=2",
    "pretrain.grid_num_inference_steps=3",
    "finetune.epochs=1.0",
    "finetune.batch_size=100",
    "finetune.physical_batch_size=50",
    "finetune.checkpoint_every_steps=2",
    "sample.images_per_class=4",
    "sample.num_inference_steps=3",
    "sample.batch_size=40",
    "evaluate.reference_images.cpu=60",
    "evaluate.heldout_images.cpu=40",
    "evaluate.feature_batch_size=20",
    "evaluate.classifier_epochs=1",
    "evaluate.linear_epochs=1",
    "evaluate.classifier_width=8",
    "evaluate.classifier_batch_size=64",
    "evaluate.validation_fraction=0.25",
]
# Everything SHRINK may change: sizes and durations, nothing that defines the method.
SIZE_KEYS = {
    "data.max_train_images",
    "data.max_test_images",
    "public.max_train_images",
    "public.max_test_images",
    "model.block_out_channels",
    "model.norm_num_groups",
    "model.attention",
    "query.classifier_epochs",
    "query.classifier_width",
    "query.batch_size",
    "pretrain.images_seen",
    "pretrain.batch_size",
    "pretrain.warmup_steps",
    "pretrain.checkpoint_every_steps",
    "pretrain.grid_images_per_class",
    "pretrain.grid_num_inference_steps",
    "finetune.epochs",
    "finetune.batch_size",
    "finetune.physical_batch_size",
    "finetune.checkpoint_every_steps",
    "sample.images_per_class",
    "sample.num_inference_steps",
    "sample.batch_size",
    "evaluate.reference_images",
    "evaluate.heldout_images",
    "evaluate.feature_batch_size",
    "evaluate.classifier_epochs",
    "evaluate.linear_epochs",
    "evaluate.classifier_width",
    "evaluate.classifier_batch_size",
    "evaluate.validation_fraction",
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("reference_images", "heldout_images"):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def test_the_cpu_copy_shrinks_sizes_only(compose):
    full = _flat(asdict(compose([RECIPE])))
    small = _flat(asdict(compose([RECIPE, *SHRINK])))
    changed = {k for k in full if full[k] != small[k]}
    assert changed <= SIZE_KEYS, sorted(changed - SIZE_KEYS)
    # The settings that make it the GPU recipe and not the CPU benchmark.
    assert full["finetune.noise_multiplicity"] == 4
    assert full["sample.images_per_class"] * 10 >= 10_000
    assert full["evaluate.reference_images"]["gpu"] >= 10_000
    assert full["pretrain.mixed_precision"] == "auto"  # bf16 on a GPU


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED_DATA / "cifar10.tar.gz").is_file()
    or not (SHARED_DATA / "tiny-imagenet-200.tar.gz").is_file(),
    reason=f"CIFAR-10 or Tiny-ImageNet is absent from {SHARED_DATA} (shared data)",
)
def test_gpu_recipe_runs_end_to_end_on_cpu_shrunk(tmp_path, compose):
    cfg = compose([RECIPE, *SHRINK])
    run_dir = tmp_path / "run"
    run_pipeline(cfg, run_dir)
    for stage in ("query", "pretrain", "finetune", "sample", "evaluate"):
        assert (run_dir / stage / "DONE").is_file(), stage
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["differentially_private"] and metrics["noise_secret"]
    assert metrics["epsilon_spent"] <= cfg.privacy.target_epsilon + 1e-9
    assert metrics["fidelity"]["synthetic_images"] == 40
    assert np.isfinite(metrics["fid"])
    ledger = json.loads((run_dir / "privacy.json").read_text())
    names = [m["name"] for m in ledger["mechanisms"]]
    assert names == ["gaussian_histogram", "dp_sgd"]
    samples = np.load(run_dir / "sample" / "samples.npz")
    assert sorted(np.unique(samples["labels"]).tolist()) == list(range(10))
    assert Path(run_dir / "release" / "MANIFEST.json").is_file()
