"""Hugging Face cards for what a run shares: a model card at the root of the fine-tuned
pipeline's folder and a dataset card beside the synthetic dataset.

Both are written by the stage that makes the folder, after the ledger holds its
mechanisms, and reach ``release/`` inside that folder (``model/README.md``,
``synthetic/dataset/README.md``). They are built from the ledger and the run's settings
only, never from the data: the guarantee in words, (epsilon, delta), the accountant,
every mechanism, and what DP-SGD trained. The evaluation's figures are not on them: they
are measured on the sensitive data outside the budget and stay in ``evaluate/``.
``huggingface_hub.ModelCard.load`` / ``DatasetCard.load`` parse them.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

from privimage.config.schema import Config, method_of
from privimage.io.artifacts import guarantee, mechanism_line, privacy_status, read_ledger
from privimage.io.atomic import write_text

CARD = "README.md"
TAGS = ["privimage", "differential-privacy", "synthetic-data", "diffusion"]
PAPER = "https://www.usenix.org/conference/usenixsecurity24/presentation/li-kecen"


def run_summary(cfg: Config) -> dict[str, str]:
    """What was done, from the settings (never from the data): RELEASE.md and the cards."""
    method = method_of(asdict(cfg)) or cfg.synthesizer
    summary = {
        "method": f"{method} (synthesizer {cfg.synthesizer})",
        "sensitive data": f"{cfg.data.source}, {cfg.data.resolution}x{cfg.data.resolution}, "
        f"{cfg.data.channels} channel(s)",
    }
    if cfg.synthesizer == "diffusion":
        summary["public data"] = cfg.public.source
        summary["pretraining subset"] = cfg.pretrain.public_subset
        summary["DP fine-tuning"] = (
            f"{cfg.finetune.epochs:g} epochs at batch {cfg.finetune.batch_size}, clipping "
            f"norm {cfg.finetune.max_grad_norm:g}, {cfg.finetune.noise_multiplicity} noise "
            "draws per example"
            if cfg.finetune.dp
            else "none (finetune.dp=false)"
        )
    summary["budget"] = (
        f"target epsilon {cfg.privacy.target_epsilon:g} at delta {cfg.privacy.delta:g}, "
        f"{cfg.privacy.accountant} accountant"
    )
    return summary


def _privacy_lines(ledger: dict) -> list[str]:
    lines = ["## Privacy", "", f"**{guarantee(ledger)}.**", ""]
    mechanisms = ledger.get("mechanisms", [])
    if mechanisms:
        lines += [
            f"Every mechanism that touched the sensitive data, composed by one "
            f"`{ledger.get('accountant')}` accountant (the ledger, `privacy.json`):",
            "",
        ]
        lines += [mechanism_line(m) for m in mechanisms]
    for entry in ledger.get("non_private", []):
        lines.append(f"- NOT private: `{entry['stage']}/{entry['name']}`: {entry['description']}")
    return [*lines, ""]


def _save(card_type, data, folder: Path, cfg: Config, ledger: dict, head: list[str]) -> Path:
    """A card of ``card_type`` with metadata ``data``: ``head``, then the privacy, how the
    run was made and where its evaluation is; saved as ``folder/README.md``."""
    body = [
        *head,
        "",
        *_privacy_lines(ledger),
        "## How it was made",
        "",
        *(f"- {k}: {v}" for k, v in run_summary(cfg).items()),
        "",
        "## Evaluation",
        "",
        "Not on this card: the run's fidelity, utility and leakage figures are measured on "
        "the sensitive data outside the privacy budget, so they stay with the run "
        "(`evaluate/report.md`) and are not released.",
        "",
    ]
    path = Path(folder) / CARD
    write_text(path, str(card_type("---\n" + data.to_yaml() + "\n---\n" + "\n".join(body))))
    return path


def write_model_card(pipeline_dir: Path, cfg: Config, run_dir: Path) -> Path:
    """``README.md`` at the root of the fine-tuned pipeline's folder (what a hub repo
    shows); returns its path."""
    ledger = read_ledger(run_dir)
    dp = privacy_status(ledger) == "dp"
    data = ModelCardData(
        library_name="diffusers",
        license="other",
        tags=[*TAGS, "class-conditional"] + ([] if dp else ["not-differentially-private"]),
        datasets=[cfg.public.source],
    )
    how = "fine-tuned with DP-SGD" if dp else "fine-tuned without a DP guarantee"
    head = [
        f"# {cfg.name}: a class-conditional diffusion model {how}",
        "",
        f"Made with privimage ([PrivImage, Li et al., USENIX Security 2024]({PAPER})). "
        "A diffusers pipeline; with privimage installed:",
        "",
        "```python",
        "from privimage import PrivImagePipeline",
        "",
        'pipe = PrivImagePipeline.from_pretrained("<this folder or repo>")',
        "images = pipe(class_labels=[0, 1, 2]).images  # PIL images, one per label",
        "```",
        "",
        "`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` loads it too "
        "(`pipeline.py` is one import from privimage), and the UNet alone loads with "
        '`UNet2DModel.from_pretrained(..., subfolder="unet")`. By default it samples as '
        "the run did (`model_index.json`: steps, guidance, black floor; the scheduler's solver).",
    ]
    return _save(ModelCard, data, pipeline_dir, cfg, ledger, head)


def write_dataset_card(
    dataset_dir: Path, cfg: Config, run_dir: Path, *, images: int, class_names: list[str]
) -> Path:
    """``README.md`` beside the synthetic dataset (``save_to_disk``); returns its path."""
    ledger = read_ledger(run_dir)
    dp = privacy_status(ledger) == "dp"
    data = DatasetCardData(
        pretty_name=f"privimage synthetic {cfg.data.source} ({cfg.name})",
        task_categories=["image-classification"],
        tags=TAGS + ([] if dp else ["not-differentially-private"]),
        license="other",
    )
    head = [
        f"# Synthetic images standing in for {cfg.data.source}",
        "",
        f"{images} labelled images, {len(class_names)} classes "
        f"({', '.join(class_names)}), made by privimage. Load with "
        "`datasets.load_from_disk`; columns `image`, `label`, `seed` (each image is a "
        "function of its seed and the model).",
    ]
    return _save(DatasetCard, data, dataset_dir, cfg, ledger, head)
