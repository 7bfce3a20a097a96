"""The data path: images decoded once into one uint8 tensor, then batched on the training device.

Stands in for the article's DataLoader over torchvision's CIFAR10 with PIL transforms
("ResNetを用いた画像認識"): CIFAR-10 or any image folder is read once (in parallel), checked,
and held as one (N, 3, H, W) uint8 tensor; TensorLoader crops, flips, normalises and resizes
whole batches of it on the device. A folder too large for memory is streamed instead:
StreamLoader has DataLoader workers decode its batches in every epoch, then treats them as
TensorLoader does.
"""
import contextlib
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import config
from errors import UsageError

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
# The file types of torchvision's ImageFolder, listed here so that an image folder is read
# without importing torchvision (seconds of start-up on a small CPU).
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
MEMORY_HEADROOM = 2**30  # bytes of RAM (and GPU memory) kept for the model beside the images


def load_cifar10(root):
    """CIFAR-10 through torchvision, downloaded into root on first use."""
    import torchvision  # here, not at the top: only this data set needs it (see IMG_EXTENSIONS)
    try:
        train = torchvision.datasets.CIFAR10(root, train=True, download=True)
        test = torchvision.datasets.CIFAR10(root, train=False, download=True)
    except Exception as e:  # offline, refused, truncated archive, ...
        raise UsageError(
            f'could not get CIFAR-10 into {root} ({type(e).__name__}: {e}); without internet, '
            f'fetch {CIFAR10_URL} on another machine, put cifar-10-python.tar.gz in {root} '
            f'and run again, or train on an image folder with --data DIR') from None

    def to_tensor(ds):  # (N, 32, 32, 3) uint8 array -> (N, 3, 32, 32) tensor
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()

    return (to_tensor(train), torch.tensor(train.targets),
            to_tensor(test), torch.tensor(test.targets), train.classes)


def _class_names(split_dir):
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith('.'))


def find_images(folder):
    """The image files under folder, at any depth, as path strings in the order of
    torchvision's ImageFolder: folder by folder (sorted, symlinks followed), each folder's files
    sorted. Hidden files (a Mac's ._photo.jpg) and other file types are left out."""
    found = []
    for parent, _, names in sorted(os.walk(folder, followlinks=True)):  # faster than rglob
        found += [os.path.join(parent, n) for n in sorted(names) if not n.startswith('.')
                  and os.path.splitext(n)[1].lower() in IMG_EXTENSIONS]
    return found


def _list_images(split_dir, classes):
    """Image paths under split_dir/<class>/, class by class, and their labels."""
    files, labels = [], []
    for label, name in enumerate(classes):
        found = find_images(split_dir / name)
        files += found
        labels += [label] * len(found)
    return files, labels


def decode_image(path, size):
    """One image file as a (size, size, 3) uint8 array: upright, RGB, resized. Every path that
    reads an image file (in memory, streaming, predict.py) reads it through here."""
    with Image.open(path) as img:
        img.draft('RGB', (size, size))  # a large JPEG decodes at 1/2 to 1/8 scale: faster
        # A phone stores a portrait photo as landscape pixels and an EXIF orientation tag,
        # which PIL does not apply by itself.
        img = ImageOps.exif_transpose(img)
        if img.mode != 'RGB':
            img = img.convert('RGB')  # grayscale, palette, RGBA, CMYK -> RGB
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.array(img, dtype=np.uint8)  # a writable copy, which torch can take


def unreadable(path, e):
    return f'{path} is not a readable image ({type(e).__name__}: {e}); remove or replace it'


def _decode(job):
    """Decode images into one (n, size, size, 3) uint8 array, or return the sentence naming
    the first unreadable file. Runs in a worker process."""
    paths, size = job
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            out[i] = decode_image(path, size)
        except Exception as e:
            return unreadable(path, e)
    return out


def decode_images(files, size, workers, chunk=500):
    """Decode files in parallel into one (N, 3, size, size) uint8 tensor. Each worker decodes
    `chunk` files into one array, so the main process copies a few arrays, not one per image,
    straight into their place in the one tensor."""
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    jobs = [(files[i:i + chunk], size) for i in range(0, len(files), chunk)]
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(min(workers, len(jobs))))
            decoded = pool.map(_decode, jobs)
        else:
            decoded = map(_decode, jobs)
        for i, arr in zip(range(0, len(files), chunk), decoded):
            if isinstance(arr, str):
                raise UsageError(arr)
            out[i:i + len(arr)] = torch.from_numpy(arr).permute(0, 3, 1, 2)  # (n, H, W, C)
    return out


class ImageFiles(torch.utils.data.Dataset):
    """Image files, decoded one by one when asked (in a DataLoader's worker processes): the
    article's torchvision ImageFolder, over list_image_folder's files (ImageFolder's own list
    and order), so that the in-memory and streaming paths read the same images in one order.
    Every file is decoded by decode_image, upright and at the held size."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    @property
    def shape(self):  # as the tensor of the decoded images would have it
        return (len(self.files), 3, self.size, self.size)

    def __getitem__(self, i):
        try:
            arr = decode_image(self.files[i], self.size)
        except Exception as e:
            raise UsageError(unreadable(self.files[i], e)) from None
        return torch.from_numpy(arr).permute(2, 0, 1)  # (3, size, size) uint8


def list_image_folder(root, need_train=True):
    """The files of an ImageFolder tree, root/train/<class>/* and root/test/<class>/* (or
    root/val), checked: (train files, train labels, test files, test labels, class names).
    The train lists are empty unless need_train."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f'data folder {root} does not exist')
    train_dir = root / 'train'
    test_dir = root / 'test' if (root / 'test').is_dir() else root / 'val'
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise UsageError(f'{root} needs a train/ and a test/ (or val/) folder, '
                         f'each with one folder of images per class')
    classes, test_classes = _class_names(train_dir), _class_names(test_dir)
    if not classes:
        raise UsageError(f'{train_dir} has no class folders; put each class in its own folder')
    if len(classes) == 1:
        raise UsageError(f'{train_dir} has one class folder ({classes[0]}), and a classifier '
                         f'needs at least two; add a folder of images for each other class')
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise UsageError(f'the class folders of {train_dir} and {test_dir} differ '
                         f'(only in train: {only_train}, only in test: {only_test})')
    train_files, train_labels = _list_images(train_dir, classes) if need_train else ([], [])
    test_files, test_labels = _list_images(test_dir, classes)
    empty = sorted(set(range(len(classes))) - set(train_labels)) if need_train else []
    if empty:
        raise UsageError(f'{train_dir / classes[empty[0]]} holds no images '
                         f'(read: {", ".join(IMG_EXTENSIONS)})')
    if not test_files:
        raise UsageError(f'{test_dir} holds no images (read: {", ".join(IMG_EXTENSIONS)})')
    return train_files, train_labels, test_files, test_labels, classes


def load_image_folder(root, image_size, workers=0, need_train=True, device=None, stream=False):
    """An ImageFolder tree (list_image_folder): the train and test images (train None unless
    need_train), their labels and the class names. The images are one uint8 tensor each,
    decoded now, or, with stream or when they would not fit in memory (on `device`),
    ImageFiles to decode batch by batch."""
    train_files, train_labels, test_files, test_labels, classes = list_image_folder(
        root, need_train)
    size = held_size(train_files[0] if need_train else test_files[0], image_size)
    files = train_files + test_files
    why_not = memory_shortfall(len(files), size, device)
    if stream or why_not:
        print(f'streaming {len(files):,} images from {root}: '
              f'{why_not or "--stream asks for it"}; decoded in every epoch', flush=True)
        train_x = ImageFiles(train_files, size) if need_train else None
        test_x = ImageFiles(test_files, size)
    else:
        workers = workers or os.cpu_count() or 1
        print(f'decoding {len(files):,} images from {root} ({workers} processes)...', flush=True)
        # One pool (one start of `workers` processes) for both splits.
        images = decode_images(files, size, workers)
        train_x = images[:len(train_files)] if need_train else None
        test_x = images[len(train_files):]
    return train_x, torch.tensor(train_labels), test_x, torch.tensor(test_labels), classes


def load_dataset(data_dir, data_root, image_size, workers=0, need_train=True, device=None,
                 stream=False):
    """The image folder data_dir (load_image_folder) or, without one, CIFAR-10 in data_root:
    (train images, train labels, test images, test labels, classes)."""
    if data_dir:
        return load_image_folder(data_dir, image_size, workers, need_train, device, stream)
    return load_cifar10(data_root)


def held_size(probe, image_size):
    """The side the images are held (decoded) at. Small square images (CIFAR's 32 px) are
    held at their own size and resized per batch on the device: 224 px training on CIFAR then
    holds 150 MB, not 7.5 GB. Others are resized to image_size when decoded."""
    try:
        with Image.open(probe) as img:
            w, h = img.size
    except Exception as e:
        raise UsageError(unreadable(probe, e)) from None
    return w if w == h and w <= image_size else image_size


def memory_shortfall(n_images, size, device=None, headroom=MEMORY_HEADROOM):
    """None when the images, held as one uint8 tensor, fit: in the RAM they are decoded into
    and, on CUDA, in the GPU memory they are copied to, with `headroom` bytes left over for
    the model and its activations; otherwise a sentence saying what they need."""
    needed = n_images * 3 * size * size
    free = [('RAM', available_ram())]
    if device is not None and device.type == 'cuda':
        free.append(('GPU memory', torch.cuda.mem_get_info(device)[0]))
    for where, available in free:
        if available is not None and needed + headroom > available:
            return (f'held at {size} px they need {needed / 2**30:.1f} GiB of {where}, and '
                    f'{available / 2**30:.1f} GiB is free (of which {headroom / 2**30:.0f} GiB '
                    f'stays for the model)')
    return None


def available_ram():
    """Bytes of RAM this process can still take, on Linux (the least of what the system and
    its container allow); None elsewhere."""
    limits = []
    try:
        with open('/proc/meminfo') as f:
            info = dict(line.split(':', 1) for line in f)
        limits.append(int(info['MemAvailable'].split()[0]) * 1024)  # in kB
    except (OSError, KeyError, ValueError):
        return None
    for limit, usage in (('memory.max', 'memory.current'),  # cgroup v2, then v1
                         ('memory/memory.limit_in_bytes', 'memory/memory.usage_in_bytes')):
        try:
            with open(f'/sys/fs/cgroup/{limit}') as f1, open(f'/sys/fs/cgroup/{usage}') as f2:
                limits.append(int(f1.read()) - int(f2.read()))
        except (OSError, ValueError):  # no such cgroup, or 'max' (no limit)
            pass
    return min(limits)


def channel_stats(images, chunk=4096, sample=10_000, workers=1):
    """Per-channel mean and std (0-1 scale) over every pixel of a uint8 (N, C, H, W) tensor,
    or, for images to stream (ImageFiles), of a seeded sample of `sample` of them.

    This is the std of all pixels together. The 0.2023/0.1994/0.2010 often quoted for CIFAR-10
    is the mean of per-image stds, which is smaller; the true figures are 0.2470/0.2435/0.2616.
    """
    if isinstance(images, ImageFiles):
        picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        files = [images.files[i] for i in sorted(picked[:sample].tolist())]
        parts = (decode_images(files[i:i + chunk], images.size, workers)
                 for i in range(0, len(files), chunk))
    else:
        parts = (images[i:i + chunk] for i in range(0, len(images), chunk))
    total, total_sq, n = 0, 0, 0
    for part in parts:
        x = part.to(torch.float64) / 255
        total = total + x.sum(dim=(0, 2, 3))
        total_sq = total_sq + (x * x).sum(dim=(0, 2, 3))
        n += x.numel() / x.shape[1]
    mean = total / n
    std = (total_sq / n - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def split_valid(labels, fraction, seed):
    """Indices (train, valid) that hold out `fraction` of each class's images for validation,
    drawn with `seed`: the same images for the same labels, fraction and seed. Every class with
    two images or more gives at least one, and keeps at least one to train on. fraction 0:
    every image trains."""
    g = torch.Generator().manual_seed(seed)
    train, valid = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(max(round(fraction * len(idx)), 1), len(idx) - 1) if fraction > 0 else 0
        valid.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(valid).sort().values


def subset(images, idx):
    """The images at idx (a tensor of indices): of a uint8 tensor, or of ImageFiles."""
    if isinstance(images, ImageFiles):
        return ImageFiles([images.files[i] for i in idx.tolist()], images.size)
    return images[idx]


class Split(NamedTuple):
    images: object  # (N, 3, H, W) uint8 tensor, or ImageFiles to stream
    labels: torch.Tensor


class Data(NamedTuple):
    """The images a run trains, validates and tests on, their classes, and the mean and std
    (per colour channel, 0-1 scale) that normalise them."""
    train: Split
    valid: Split
    test: Split
    classes: list
    mean: list
    std: list


class Loaders(NamedTuple):
    train: object
    valid: Optional[object]  # None with --valid-split 0
    test: object


def make_loader(images, labels, *, batch_size, mean, std, image_size, train, device,
                workers=0, **kwargs):
    """The loader of a data set: TensorLoader for a uint8 tensor (moved to device), or
    StreamLoader for ImageFiles. Both batch, crop, flip and normalise alike; train=True
    shuffles and keeps full batches only."""
    if isinstance(images, ImageFiles):
        return StreamLoader(images, labels, batch_size, mean, std, image_size, train, device,
                            workers=workers, **kwargs)
    return TensorLoader(images.to(device), labels, batch_size, mean, std, image_size, train,
                        **kwargs)


class TensorLoader:
    """Batches of a data set held as one uint8 tensor on the training device.

    Stands in for the article's DataLoader over PIL transforms (Resize(224) + ToTensor, in one
    process, every epoch). Here the random crop (reflect-pad, then crop back), the horizontal
    flip, the normalisation and any resize are done on whole batches on the device (augment=False:
    no crop and no flip, as in the article). Iterating yields (inputs, targets) like a
    DataLoader; call set_epoch(k) before each epoch.
    """

    def __init__(self, images, labels, batch_size, mean, std, image_size, train,
                 seed=0, padding=config.CROP_PADDING, memory_format=torch.contiguous_format,
                 augment=True, device=None):
        self.images = images                    # (N, C, H, W) uint8, on the device
        self.device = device or images.device
        self.labels = labels.to(self.device)    # (N,) int64
        self.batch_size = batch_size
        self.image_size = image_size
        self.train = train
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        h, w = images.shape[-2:]
        self.padding = min(padding, h - 1, w - 1)
        self.memory_format = memory_format
        # On the CPU, resize the uint8 channels-last batch (much faster there than resizing
        # floats); elsewhere resize after the float conversion (GPUs resize floats only).
        self.resize_uint8 = self.device.type == 'cpu'
        # x_norm = (x / 255 - mean) / std  ==  x * scale - shift
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.scale = 1 / (255 * std_t)
        self.shift = mean_t / std_t

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        n, b = len(self.images), self.batch_size
        if self.train:  # full batches only (the article's drop_last=True), at least one
            return max(1, n // b)
        return math.ceil(n / b)

    def __iter__(self):
        order, labels, rows, cols = self._plan()
        b = self.batch_size
        for i in range(len(self)):
            batch = slice(i * b, (i + 1) * b)
            if self.train:
                x = _gather(self.images, order[batch], rows[batch], cols[batch])
            else:
                x = self.images[batch]
            yield self._finish(x), labels[batch]

    def _plan(self):
        """The epoch's order of the images, their labels in that order, and the rows and
        columns each one's crop reads (None outside training, which keeps the order). One
        generator per (seed, epoch): the same run gives the same batches, resumed too."""
        n, device = len(self.images), self.device
        if not self.train:
            return torch.arange(n, device=device), self.labels, None, None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g).to(device)
        if self.augment:
            shift = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=g).to(device)
            flip = (torch.rand(n, generator=g) < 0.5).to(device)
        else:  # every window centred (no shift), none flipped
            shift = torch.full((n, 2), self.padding, device=device)
            flip = torch.zeros(n, dtype=torch.bool, device=device)
        # The whole epoch's crop windows at once, in batch order: a batch is then slices of
        # these, one gather and the normalisation (4 kernels; 23 when each batch worked out its
        # own windows, which on a GPU cost a fifth of a CUDA-graphed step).
        rows, cols = self._crop_windows(shift[order], flip[order])
        return order, self.labels[order], rows, cols

    def _crop_windows(self, shift, flip):
        """The rows (B, H) and columns (B, W) that each sample's random crop reads: a window
        shifted by `shift` - padding in the reflect-padded image, its columns reversed where
        `flip` is set."""
        h, w = self.images.shape[-2:]
        p = self.padding
        rows = _reflect(shift[:, :1] + torch.arange(h, device=shift.device) - p, h)
        cols = _reflect(shift[:, 1:] + torch.arange(w, device=shift.device) - p, w)
        return rows, torch.where(flip[:, None], cols.flip(1), cols)

    def _finish(self, x):
        """uint8 -> resized to image_size, normalised float, in the model's memory format."""
        size = (self.image_size, self.image_size)
        if x.shape[-2:] != size and self.resize_uint8:
            x = _resize(x.contiguous(memory_format=torch.channels_last), size)
        x = x.float().mul_(self.scale).sub_(self.shift)
        if x.shape[-2:] != size:
            x = _resize(x, size)
        return x.contiguous(memory_format=self.memory_format)


class StreamLoader(TensorLoader):
    """TensorLoader's batches, for images that are not held in memory: each epoch, DataLoader
    worker processes decode the images (ImageFiles) batch by batch, in the epoch's order, and
    the crop, flip and normalisation run on the device as in TensorLoader.

    The article's answer for data of any size: torch.utils.data.DataLoader. Here the order and
    each sample's crop come from TensorLoader's plan, so both loaders give the same batches.
    """

    def __init__(self, images, labels, batch_size, mean, std, image_size, train, device,
                 workers=0, **kwargs):
        super().__init__(images, labels, batch_size, mean, std, image_size, train,
                         device=device, **kwargs)
        workers = workers or os.cpu_count() or 1
        self.workers = workers if workers > 1 else 0  # 1: decode in this process
        self.batches = _EpochBatches(batch_size, len(self))
        self.loader = torch.utils.data.DataLoader(
            images, batch_sampler=self.batches, num_workers=self.workers,
            persistent_workers=self.workers > 0, pin_memory=device.type == 'cuda')

    def __iter__(self):
        order, labels, rows, cols = self._plan()
        self.batches.order = order.tolist()
        b = self.batch_size
        try:
            for i, x in enumerate(self.loader):
                x = x.to(self.device, non_blocking=True)  # (B, C, H, W) uint8
                batch = slice(i * b, (i + 1) * b)
                if self.train:
                    x = _gather(x, torch.arange(len(x), device=self.device), rows[batch],
                                cols[batch])
                yield self._finish(x), labels[batch]
        except UsageError as e:
            self.close()
            message = str(e)
            if 'Original Traceback' in message:  # raised in a worker, which adds its traceback
                message = message.strip().splitlines()[-1].split(': ', 1)[-1]
            raise UsageError(message) from None
        except (Exception, KeyboardInterrupt):
            self.close()
            raise

    def close(self):
        """Stop the worker processes now. (Left to the garbage collector after an error, their
        shutdown can wait 5 s for each.)"""
        iterator = getattr(self.loader, '_iterator', None)
        if iterator is not None and hasattr(iterator, '_shutdown_workers'):
            iterator._shutdown_workers()
            self.loader._iterator = None


class _EpochBatches:
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


def _gather(images, idx, rows, cols):
    """Images idx, each cropped to its rows and columns, as one gather from a uint8 set."""
    x = images[idx[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return x.permute(0, 3, 1, 2)  # (B, C, H, W), stored channels-last


def _resize(x, size):
    # Bilinear; antialias only matters when shrinking, and selects PyTorch's fast uint8 kernel.
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False, antialias=True)


def _reflect(i, n):
    """Map indices in [-n+1, 2n-2] into [0, n-1] as reflect padding does (no edge repeat)."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)
