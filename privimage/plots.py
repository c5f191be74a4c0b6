"""Pictures people look at: image grids with row labels, loss curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run on servers without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _save(fig, path: Path) -> None:
    """Lay out, write (the folder made if needed) and close a figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _show(ax, img: torch.Tensor | None) -> None:
    """One bare cell: no ticks or frame, and the uint8 image ``(C, H, W)`` if given."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if img is None:
        return
    arr = img.numpy()
    if arr.shape[0] == 1:
        ax.imshow(arr[0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(np.transpose(arr, (1, 2, 0)))


def save_image_grid(
    rows: Sequence[torch.Tensor],
    path: Path,
    *,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    """Save a grid with one row per tensor of uint8 images ``(n, C, H, W)``.

    Rows may hold different numbers of images; missing cells stay blank.
    """
    ncols = max((len(r) for r in rows), default=1) or 1
    nrows = max(len(rows), 1)
    label_w = 2.2 if row_labels else 0.0
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(label_w + 0.8 * ncols, 0.8 * nrows + (0.4 if title else 0)),
        squeeze=False,
    )
    for r in range(nrows):
        for c in range(ncols):
            _show(axes[r][c], rows[r][c] if r < len(rows) and c < len(rows[r]) else None)
        if row_labels is not None and r < len(row_labels):
            axes[r][0].set_ylabel(
                row_labels[r], rotation=0, ha="right", va="center", fontsize=8, labelpad=6
            )
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def save_loss_curve(stats_path: Path, path: Path, *, title: str, key: str = "loss") -> None:
    """Plot ``key`` against ``step`` from a ``stats.jsonl`` (log scale), with a moving mean.

    Diffusion losses are noisy step to step (each step draws new noise levels), so the
    trend is the moving mean over about a twentieth of the run.
    """
    import json

    records = [json.loads(line) for line in Path(stats_path).read_text().splitlines() if line]
    records = [r for r in records if key in r and "step" in r]
    if not records:
        return
    steps = np.array([r["step"] for r in records])
    values = np.array([r[key] for r in records], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, lw=0.8, alpha=0.4, label=key)
    window = max(1, len(values) // 20)
    if window > 1:
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.8, label=f"moving mean ({window} points)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_pairs(
    top: torch.Tensor,
    bottom: torch.Tensor,
    path: Path,
    *,
    row_labels: tuple[str, str],
    captions: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    """Two aligned rows of uint8 images (e.g. synthetic images over their nearest training
    images), with an optional caption under each column."""
    n = max(len(top), 1)
    fig, axes = plt.subplots(2, n, figsize=(2.0 + 0.9 * n, 2.3), squeeze=False)
    for r, images in enumerate((top, bottom)):
        for c in range(n):
            ax = axes[r][c]
            _show(ax, images[c] if c < len(images) else None)
            if r == 1 and captions is not None and c < len(captions):
                ax.set_xlabel(captions[c], fontsize=7)
        axes[r][0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)


def save_histograms(
    panels: Sequence[tuple[str, dict[str, np.ndarray]]],
    path: Path,
    *,
    title: str | None = None,
) -> None:
    """One panel per ``(xlabel, {series name: values})``, the series overlaid as
    normalised histograms on shared bins, so two distributions compare at a glance."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (xlabel, series) in zip(axes[0], panels, strict=True):
        finite = [np.asarray(v, dtype=float) for v in series.values() if len(v)]
        values = np.concatenate(finite) if finite else np.zeros(1)
        bins = np.histogram_bin_edges(values, bins=30)
        for name, v in series.items():
            if len(v):
                ax.hist(v, bins=bins, density=True, alpha=0.5, label=f"{name} (n={len(v)})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)
