"""Same-bucket batches, deterministic by (seed, epoch), identical global order for any process count.

The sampler first builds the *global* batches (each `global_batch_size` samples from one bucket)
from (seed, epoch) alone; process p of n then takes the contiguous slice
`global_batch[p * b:(p + 1) * b]` with b = global_batch_size // n. So the union of what all
processes see at step k is the same set of samples whether you run 1, 2 or 8 processes.
With accelerate: build one sampler per process with num_processes=accelerator.num_processes and
process_index=accelerator.process_index, and do NOT pass the DataLoader through
accelerator.prepare (it would shard a second time); move batches to the device yourself.
"""
from __future__ import annotations

import torch

from training.errors import DataError


class BucketBatchSampler(torch.utils.data.Sampler):
    def __init__(self, bucket_ids, global_batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, num_processes: int = 1, process_index: int = 0):
        if global_batch_size < 1:
            raise DataError(f"optim.batch_size: a global micro-batch of {global_batch_size} samples; expected >= 1")
        if global_batch_size % num_processes:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                             f"{num_processes} processes")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} not in [0, {num_processes})")
        if not drop_last and num_processes > 1:
            raise ValueError("drop_last=False needs num_processes=1 (partial batches can't be split)")
        self.bucket_ids = [int(b) for b in bucket_ids]
        self.global_batch_size = global_batch_size
        self.per_process = global_batch_size // num_processes
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.num_processes, self.process_index = num_processes, process_index
        self.epoch = 0
        if len(self) == 0:
            sizes = {b: self.bucket_ids.count(b) for b in set(self.bucket_ids)}
            raise DataError(f"config key 'optim.batch_size': no full batch: a global micro-batch of "
                            f"{global_batch_size} samples (optim.batch_size / optim.grad_accum) is larger than "
                            f"every bucket of the data (samples per bucket: {sizes}); lower optim.batch_size "
                            "or add images")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All processes' batches for one epoch, in order (independent of num_processes)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + (self.epoch if epoch is None else epoch))
        by_bucket: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_ids):
            by_bucket.setdefault(b, []).append(i)
        batches = []
        for b in sorted(by_bucket):
            idx = by_bucket[b]
            if self.shuffle:
                idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            for s in range(0, len(idx), self.global_batch_size):
                chunk = idx[s:s + self.global_batch_size]
                if len(chunk) == self.global_batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self):
        lo = self.process_index * self.per_process
        for batch in self.global_batches():
            yield batch[lo:lo + self.per_process] if self.num_processes > 1 else batch

    def __len__(self) -> int:
        counts: dict[int, int] = {}
        for b in self.bucket_ids:
            counts[b] = counts.get(b, 0) + 1
        if self.drop_last:
            return sum(c // self.global_batch_size for c in counts.values())
        return sum(-(-c // self.global_batch_size) for c in counts.values())
