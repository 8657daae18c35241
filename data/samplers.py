"""Samplers. `ShardSampler`: each index exactly once across ranks, no padding (validation)."""
import torch


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, ... of range(n): ranks may get counts differing by one, and no
    sample is repeated, so reduced sums and counts give the exact dataset metric (upstream's
    DistributedSampler padded with duplicates).

    shuffle: a new permutation each epoch (set_epoch) before sharding. fixed_shard: each rank keeps
    the same shard every epoch, in a new order (upstream's sampler for --zip --cache-mode part,
    where each rank holds only its shard in memory).
    """

    def __init__(self, n: int, world_size: int = 1, rank: int = 0, shuffle: bool = False, seed: int = 0,
                 fixed_shard: bool = False):
        self.n, self.world_size, self.rank, self.shuffle, self.seed = n, world_size, rank, shuffle, seed
        self.fixed_shard = fixed_shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.fixed_shard:
            shard = torch.arange(self.rank, self.n, self.world_size)
            order = shard[torch.randperm(len(shard), generator=g)] if self.shuffle else shard
            return iter(order.tolist())
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        return iter(order[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))
