"""Samplers. `ShardSampler`: each index exactly once across ranks, no padding (validation)."""
import torch


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, ... of range(n): ranks may get counts differing by one, and no
    sample is repeated, so reduced sums and counts give the exact dataset metric (upstream's
    DistributedSampler padded with duplicates)."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0, shuffle: bool = False, seed: int = 0):
        self.n, self.world_size, self.rank, self.shuffle, self.seed = n, world_size, rank, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.n)
        return iter(order[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))
