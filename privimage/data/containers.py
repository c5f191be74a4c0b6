"""The in-memory form of a loaded dataset: uint8 tensors and class names."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSplit:
    """One split: ``images`` uint8 ``(N, C, H, W)`` and ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def as_float(self) -> torch.Tensor:
        """The images as float32 in [-1, 1] (``images / 127.5 - 1``)."""
        return self.images.to(torch.float32) / 127.5 - 1.0

    def subset(self, index) -> ImageSplit:
        """The images at ``index`` (anything torch can index with), as a new split."""
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSplit(images=self.images[index], labels=self.labels[index])


@dataclass
class ImageDataset:
    """A preprocessed dataset: train and test splits plus human-readable class names."""

    train: ImageSplit
    test: ImageSplit
    # Index = label.
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
