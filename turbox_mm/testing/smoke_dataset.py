"""A deterministic in-memory dataset for smoke runs of the training machinery."""
from typing import Dict, Sequence

import torch
from torch.utils.data import Dataset

from turbox_mm.registry import DATASETS


@DATASETS.register_module()
class SmokeDataset(Dataset):
    """Random images with a regression target that a small network can learn.

    Sample ``i`` is drawn from a generator seeded with ``(seed, i)``, so every worker, rank
    and run sees the same data. The target of an image is its per-channel mean scaled by the
    channel's index plus one, which a conv net with global pooling fits within a few dozen
    iterations: a falling loss proves the loop, optimizer and hooks work end to end.

    Args:
        num_samples (int): Length of the dataset. Defaults to 64.
        image_size (Sequence[int]): ``(channels, height, width)``. Defaults to (3, 32, 32).
        seed (int): Seed of the data. Defaults to 0.

    Examples:
        >>> ds = SmokeDataset(num_samples=4, image_size=(3, 8, 8))
        >>> sample = ds[0]
        >>> tuple(sample['inputs'].shape), tuple(sample['data_samples'].shape)
        ((3, 8, 8), (3,))
    """

    def __init__(self,
                 num_samples: int = 64,
                 image_size: Sequence[int] = (3, 32, 32),
                 seed: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f'SmokeDataset: num_samples must be >= 1, got {num_samples}')
        if len(image_size) != 3 or min(image_size) < 1:
            raise ValueError('SmokeDataset: image_size must be (channels, height, width) of '
                             f'positive sizes, got {tuple(image_size)}')
        self.num_samples = num_samples
        self.image_size = tuple(int(s) for s in image_size)
        self.seed = seed
        self.metainfo = dict(classes=('smoke', ), image_size=self.image_size)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f'SmokeDataset index {index} out of range [0, {self.num_samples})')
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.rand(self.image_size, generator=gen)
        scale = torch.arange(1, self.image_size[0] + 1, dtype=image.dtype)
        target = image.mean(dim=(1, 2)) * scale
        return dict(inputs=image, data_samples=target)
