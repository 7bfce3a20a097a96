"""--stream: an image folder too large for memory, decoded batch by batch in every epoch.

The article's answer for data of any size: a DataLoader whose worker processes read an
ImageFolder's files anew in each epoch. ImageFiles is that ImageFolder, over data.py's list of
files and its decoding; StreamLoader gives TensorLoader's very batches (the same order, crops,
flips and normalisation) from it. predict.py reads your photos this way too.
"""
import os

import torch

import config
import data
from errors import UsageError


class ImageFiles(torch.utils.data.Dataset):
    """Image files held at `size` px, decoded when asked: images[i] is one (3, size, size)
    uint8 image, images[i:j] those images decoded at once (by `workers` processes), and
    images[indices] (a tensor) the subset of files, still to decode, as a tensor's would be."""

    def __init__(self, files, size, workers=1):
        self.files, self.size, self.workers = files, size, workers

    def __len__(self):
        return len(self.files)

    @property
    def shape(self):  # as the tensor of the decoded images would have it
        return (len(self.files), 3, self.size, self.size)

    def __getitem__(self, i):
        if isinstance(i, torch.Tensor):
            return ImageFiles([self.files[j] for j in i.tolist()], self.size, self.workers)
        if isinstance(i, slice):
            return data.decode_images(self.files[i], self.size, self.workers)
        return data.decode_images([self.files[i]], self.size, 1)[0]

    def __getitems__(self, indices):
        """A DataLoader worker's batch, (B, 3, size, size) uint8; or the sentence that names
        an unreadable file, which the worker returns for the loader to raise."""
        part = data.decode_chunk([self.files[i] for i in indices], self.size)
        return part if isinstance(part, str) else torch.from_numpy(part).permute(0, 3, 1, 2)


def load_dataset(data_dir, image_size, workers=0, need_train=True,
                 test_split=config.TEST_SPLIT):
    """data.load_dataset's Data, each split's images as ImageFiles."""
    files = data.list_image_folder(data_dir, need_train, test_split)
    size = data.held_size((files.train + files.test)[0][0], image_size)
    workers = workers or os.cpu_count() or 1
    print(f'streaming {len(files.train) + len(files.test):,} images from {data_dir}, decoded '
          f'in every epoch ({workers} processes)', flush=True)

    def split(pairs):
        return data.Split(ImageFiles([f for f, _ in pairs], size, workers),
                          torch.tensor([y for _, y in pairs]))

    return data.Data(split(files.train) if need_train else None, split(files.test),
                     files.classes, files.test_split)


def make_loader(images, labels, *, batch_size, mean, std, image_size, train, device,
                **kwargs):
    """data.make_loader, for ImageFiles: a StreamLoader."""
    return StreamLoader(images, labels, batch_size, mean, std, image_size, train,
                        device=device, **kwargs)


class StreamLoader(data.TensorLoader):
    """TensorLoader's batches, for images that are not held in memory: in each epoch, DataLoader
    worker processes decode the ImageFiles batch by batch, in the epoch's order, and the crop,
    flip and normalisation run on the device as in TensorLoader (its plan draws them)."""

    def __init__(self, images, labels, batch_size, mean, std, image_size, train, device,
                 **kwargs):
        super().__init__(images, labels, batch_size, mean, std, image_size, train,
                         device=device, **kwargs)
        self.batches = EpochBatches(batch_size, len(self))
        self.loader = torch.utils.data.DataLoader(
            images, batch_sampler=self.batches, collate_fn=as_is,
            num_workers=images.workers if images.workers > 1 else 0,  # 1: in this process
            pin_memory=device.type == 'cuda')

    def __iter__(self):
        order, labels, rows, cols = self._plan()
        self.batches.order, self.batches.num_batches = order.tolist(), len(self)
        b = self.batch_size
        for i, x in enumerate(self.loader):
            if isinstance(x, str):
                raise UsageError(x)
            x = x.to(self.device, non_blocking=True)  # (B, C, H, W) uint8
            batch = slice(i * b, (i + 1) * b)
            if self.train:
                x = data.gather(x, torch.arange(len(x), device=self.device), rows[batch],
                                 cols[batch])
            yield self._finish(x), labels[batch]


def as_is(batch):
    return batch  # a worker's batch comes decoded as one tensor (ImageFiles.__getitems__)


class EpochBatches:
    """The index lists of a StreamLoader's batches, in the order of its current epoch, which
    the StreamLoader sets before each epoch. (It holds no reference back to the loader: the
    two would make a cycle that outlives the loader, into the next workers' processes.)"""

    def __init__(self, batch_size, num_batches):
        self.batch_size, self.num_batches, self.order = batch_size, num_batches, []

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        b = self.batch_size
        return (self.order[i * b:(i + 1) * b] for i in range(self.num_batches))
