"""Batches for training: a resumable, distributed-ready sampler and a reproducible DataLoader."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from helpers.samples import CrowdDataset, collate_points


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that also works in one process and can start mid-epoch.

    Yields ``(epoch, index)`` keys so that :class:`CrowdDataset` draws each sample's augmentation
    from ``(seed, epoch, index)`` even in persistent worker processes. The order of an epoch is a
    permutation seeded by ``seed + epoch`` (the same on every rank, then split between ranks as
    ``DistributedSampler`` does); ``set_epoch(epoch, start)`` skips the first ``start`` samples of
    this rank, which is how a run resumes after the batches it had already done.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.start = int(start)

    def order(self) -> list[int]:
        """This rank's sample indices for the current epoch, from the beginning."""
        return [int(i) for i in super().__iter__()]

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.order()[self.start :]])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker from its torch seed (base seed + worker id)."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _collate(batch: list[Any]):
    from torch.utils.data import default_collate

    try:
        return default_collate(batch)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{exc}. Whole images of different sizes cannot be batched: use batch_size=1 in eval mode."
        ) from exc


def make_loader(
    dataset: CrowdDataset,
    batch_size: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
    workers: int = 0,
    distributed: bool = False,
):
    """A reproducible ``DataLoader`` over ``dataset`` with a :class:`ResumableSampler`.

    ``workers`` background processes (persistent across epochs) decode and augment; batches are
    pinned in page-locked memory when ``device`` is CUDA. With ``distributed`` the samples are
    split between the ranks of the initialised process group. A dataset with ``targets="points"``
    gives batches of (images, list of point tensors). Call
    ``loader.sampler.set_epoch(epoch, start)`` before each epoch.
    """
    from torch.utils.data import DataLoader

    num_replicas, rank = 1, 0
    if distributed:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
        num_replicas, rank = dist.get_world_size(), dist.get_rank()
    sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
    if workers > 0 and isinstance(dataset, CrowdDataset):
        dataset.preload()
    device = torch.device(device) if device is not None else torch.device("cpu")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker if workers > 0 else None,
        generator=generator,
        collate_fn=collate_points if getattr(dataset, "targets", "density") == "points" else _collate,
        drop_last=False,
    )
