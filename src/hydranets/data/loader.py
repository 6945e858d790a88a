"""The in-memory batch iterator used for training: whole-batch tensor augmentation on the target device."""
from __future__ import annotations

import hashlib
import math
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from ..errors import HydraError
from .image_dataset import ImageDataset

AUGMENTS = ("crop_flip", "none")
PAD_MODES = ("zeros", "reflect")


@dataclass
class _EpochPlan:
    """Everything random about one epoch for one rank, drawn up front so batches never touch a global RNG."""

    indices: torch.Tensor
    offsets: torch.Tensor | None
    flips: torch.Tensor | None
    holes: torch.Tensor | None


class _End:
    pass


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed that depends only on (seed, epoch), well mixed across neighbouring values."""
    digest = hashlib.blake2b(f"hydranets/{int(seed)}/{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BatchLoader:
    """Iterates over an :class:`ImageDataset` in batches of normalised float32 images on ``device``.

    Images stay uint8 until they are on the device; there they are normalised, then (training only)
    randomly padded-and-cropped, flipped and optionally cut out, all as whole-batch tensor operations.
    The order and all augmentation randomness depend only on ``(seed, epoch)``, so a run can be
    resumed exactly, and ``prefetch`` or not gives identical batches. Call :meth:`set_epoch` before
    each epoch (as with ``DistributedSampler``); without it every epoch repeats epoch 0.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, train: bool, seed: int = 0,
                 device: str | torch.device = "cpu", augment: str = "crop_flip", cutout: int = 0,
                 drop_last: bool | None = None, rank: int = 0, world_size: int = 1, channels_last: bool = True,
                 prefetch: bool = True, padding: int = 4, pad_mode: str = "zeros") -> None:
        if not isinstance(dataset, ImageDataset):
            raise HydraError(f"BatchLoader needs an ImageDataset (from load_dataset), got {type(dataset).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise HydraError(f"batch_size must be a positive whole number, got {batch_size!r}")
        if augment not in AUGMENTS:
            raise HydraError(f"augment={augment!r} is unknown; use one of {', '.join(AUGMENTS)}")
        if pad_mode not in PAD_MODES:
            raise HydraError(f"pad_mode={pad_mode!r} is unknown; use one of {', '.join(PAD_MODES)}")
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise HydraError(f"rank={rank!r}, world_size={world_size!r} is invalid; need 0 <= rank < world_size")
        _, _, height, width = dataset.images.shape
        if padding < 0 or (pad_mode == "reflect" and padding >= min(height, width)):
            raise HydraError(f"padding={padding} is invalid for {height}x{width} images; use 0 to "
                             f"{min(height, width) - 1} (reflect) or any value >= 0 (zeros)")
        if cutout < 0:
            raise HydraError(f"cutout={cutout} is invalid; use 0 (off) or the side of the square in pixels")
        if len(dataset) == 0:
            raise HydraError("BatchLoader got an empty data set; check the split and classes= choice")
        self.dataset = dataset
        self.batch_size = batch_size
        self.train = bool(train)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.augment = augment if self.train else "none"
        self.cutout = int(cutout) if self.train else 0
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.prefetch = prefetch
        self.padding = int(padding)
        self.pad_mode = pad_mode
        self.epoch = 0
        std = torch.tensor(dataset.std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (mean / std).to(self.device)
        self._plan: tuple[int, _EpochPlan] | None = None
        if len(self) == 0:
            raise HydraError(f"batch_size={batch_size} is larger than the {self._local_count()} images per rank and "
                             "drop_last is on, so an epoch has no batches; lower batch_size or set drop_last=False")

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def _global_count(self) -> int:
        n = len(self.dataset)
        if self.world_size == 1:
            return n
        if self.drop_last:
            return n // self.world_size * self.world_size
        return math.ceil(n / self.world_size) * self.world_size

    def _local_count(self) -> int:
        return self._global_count() // self.world_size

    def __len__(self) -> int:
        n = self._local_count()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _epoch_plan(self) -> _EpochPlan:
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan[1]
        n = len(self.dataset)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        total = self._global_count()
        if total > n:
            order = order.repeat(math.ceil(total / n))
        order = order[:total]
        # drawn for the n places of one process first, so a place's augmentation is the same for every world size
        offsets, flips, holes = self._draw_augmentation(g, n)
        if total > n:
            extra = self._draw_augmentation(g, total - n)
            offsets, flips, holes = (None if a is None else torch.cat([a, b])
                                     for a, b in zip((offsets, flips, holes), extra))
        offsets, flips, holes = (None if a is None else a[:total] for a in (offsets, flips, holes))
        shard = slice(self.rank, total, self.world_size)
        plan = _EpochPlan(order[shard].contiguous(), None if offsets is None else offsets[shard].contiguous(),
                          None if flips is None else flips[shard].contiguous(),
                          None if holes is None else holes[shard].contiguous())
        self._plan = (self.epoch, plan)
        return plan

    def _draw_augmentation(self, g: torch.Generator, count: int
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Crop offsets, flips and cutout centres for ``count`` places, in that order from ``g``."""
        offsets = flips = holes = None
        _, _, h, w = self.dataset.images.shape
        if self.augment == "crop_flip":
            offsets = torch.randint(0, 2 * self.padding + 1, (count, 2), generator=g)
            flips = torch.randint(0, 2, (count,), generator=g).bool()
        if self.cutout:
            holes = torch.stack([torch.randint(0, h, (count,), generator=g),
                                 torch.randint(0, w, (count,), generator=g)], 1)
        return offsets, flips, holes

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self._epoch_plan()
        if self.prefetch:
            return self._prefetched(plan)
        return (self._batch(plan, b) for b in range(len(self)))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.device:
            return t
        if self.device.type == "cuda" and t.device.type == "cpu":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _batch(self, plan: _EpochPlan, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        idx = plan.indices[sl]
        source = self.dataset.images
        x = self._to_device(source.index_select(0, idx.to(source.device)))
        y = self._to_device(self.dataset.labels.index_select(0, idx.to(self.dataset.labels.device)))
        x = x.float().mul_(self._scale).sub_(self._shift)
        if plan.offsets is not None and plan.flips is not None:
            x = self._crop_flip(x, plan.offsets[sl].to(self.device), plan.flips[sl].to(self.device))
        if plan.holes is not None:
            x = self._cut_out(x, plan.holes[sl].to(self.device))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            # one-channel images can be both layouts at once; a convolution would then pick channels_last from
            # the strides, against train.channels_last=false (and its crash guard on the CPU): re-view them with
            # the standard strides (no copy)
            x = x.contiguous().view(-1).view(x.shape)
        return x, y

    def _crop_flip(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Pad, then take each image's crop (and mirror) with one advanced-indexing gather."""
        bsz, _, h, w = x.shape
        p = self.padding
        if p:
            x = F.pad(x, (p, p, p, p), mode="constant" if self.pad_mode == "zeros" else "reflect")
        rows = offsets[:, :1] + torch.arange(h, device=x.device)
        cols = offsets[:, 1:] + torch.arange(w, device=x.device)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        batch = torch.arange(bsz, device=x.device)[:, None, None]
        return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def _cut_out(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """Zero a ``cutout``-sided square around each image's centre point (clipped at the borders)."""
        _, _, h, w = x.shape
        start = centres - self.cutout // 2
        r = torch.arange(h, device=x.device)
        c = torch.arange(w, device=x.device)
        in_rows = (r >= start[:, :1]) & (r < start[:, :1] + self.cutout)
        in_cols = (c >= start[:, 1:]) & (c < start[:, 1:] + self.cutout)
        return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)

    def _prefetched(self, plan: _EpochPlan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Build batches in a background thread, two ahead, on a side CUDA stream when on a GPU."""
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for b in range(len(self)):
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            x, y = self._batch(plan, b)
                            done = torch.cuda.Event()
                            done.record(stream)
                    else:
                        x, y = self._batch(plan, b)
                        done = None
                    if not put((x, y, done)):
                        return
                put(_End())
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
                put(_Failure(e))

        thread = threading.Thread(target=work, name="hydranets-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, _End):
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                x, y, done = item
                if done is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(done)
                    x.record_stream(current)
                    y.record_stream(current)
                yield x, y
        finally:
            stop.set()
            thread.join(timeout=10)
