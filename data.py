"""The data path: images decoded once into one uint8 tensor, then batched on the training device.

Stands in for the article's DataLoader over torchvision's CIFAR10 with PIL transforms
("ResNetを用いた画像認識"): CIFAR-10 or any image folder is read once (in parallel), checked,
and held as one (N, 3, H, W) uint8 tensor; TensorLoader crops, flips, normalises and resizes
whole batches of it on the device.
"""
import contextlib
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import config

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
# The file types of torchvision's ImageFolder, listed here so that an image folder is read
# without importing torchvision (about 3 s of start-up on 2 CPU cores).
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
MEMORY_HEADROOM = 2**30  # bytes of RAM (and GPU memory) kept for the model beside the images


class UsageError(Exception):
    """A problem the user can fix (arguments, data, files): one sentence, exit code 2."""


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


def _list_images(split_dir, classes):
    """Image paths (str) under split_dir/<class>/, any depth, sorted within each class."""
    files, labels = [], []
    for label, name in enumerate(classes):
        found = []
        for folder, _, names in os.walk(split_dir / name):  # 3x faster than Path.rglob
            found += [os.path.join(folder, n) for n in names if not n.startswith('.')
                      and os.path.splitext(n)[1].lower() in IMG_EXTENSIONS]
        found.sort()
        files += found
        labels += [label] * len(found)
    return files, labels


def _decode(job):
    """Read images as RGB, resized to size x size, into one (n, size, size, 3) uint8 array, or
    return the sentence naming the first unreadable file. Runs in a worker process."""
    paths, size = job
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                if img.mode != 'RGB':
                    img = img.convert('RGB')  # grayscale, palette, RGBA, CMYK -> RGB
                if img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(img, dtype=np.uint8)
        except Exception as e:
            return f'{path} is not a readable image ({type(e).__name__}: {e})'
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
                raise UsageError(f'{arr}; remove or replace it')
            out[i:i + len(arr)] = torch.from_numpy(arr).permute(0, 3, 1, 2)  # (n, H, W, C)
    return out


def load_image_folder(root, image_size, workers=0, need_train=True, device=None):
    """An ImageFolder tree: root/train/<class>/* and root/test/<class>/* (or root/val), to
    be held on `device` (checked to fit before decoding)."""
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
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise UsageError(f'the class folders of {train_dir} and {test_dir} differ '
                         f'(only in train: {only_train}, only in test: {only_test})')
    train_files, train_labels = _list_images(train_dir, classes)
    test_files, test_labels = _list_images(test_dir, classes)
    empty = sorted(set(range(len(classes))) - set(train_labels))
    if empty:
        raise UsageError(f'{train_dir / classes[empty[0]]} holds no images '
                         f'(read: {", ".join(IMG_EXTENSIONS)})')
    if not test_files:
        raise UsageError(f'{test_dir} holds no images (read: {", ".join(IMG_EXTENSIONS)})')

    # Small square images (CIFAR's 32 px) are held at their own size and resized per batch on
    # the device: 224 px training on CIFAR then holds 150 MB, not 7.5 GB. Others are resized
    # to image_size here, once.
    try:
        with Image.open(train_files[0]) as img:
            w, h = img.size
    except Exception as e:
        raise UsageError(f'{train_files[0]} is not a readable image ({type(e).__name__}); '
                         f'remove or replace it') from None
    size = w if w == h and w <= image_size else image_size
    n_images = len(train_files) * need_train + len(test_files)
    check_memory(n_images, size, device)

    workers = workers or os.cpu_count() or 1
    print(f'decoding {n_images:,} images from {root} ({workers} processes)...', flush=True)
    # One pool (one start of `workers` processes) for both splits.
    images = decode_images((train_files if need_train else []) + test_files, size, workers)
    train_x = images[:len(train_files)] if need_train else None
    test_x = images[len(images) - len(test_files):]
    return train_x, torch.tensor(train_labels), test_x, torch.tensor(test_labels), classes


def check_memory(n_images, size, device=None, headroom=MEMORY_HEADROOM):
    """Stop, before decoding, when the images held as one uint8 tensor would not fit: in the
    RAM they are decoded into and, on CUDA, in the GPU memory they are copied to. `headroom`
    bytes are left over for the model and its activations."""
    needed = n_images * 3 * size * size
    free = [('RAM', available_ram())]
    if device is not None and device.type == 'cuda':
        free.append(('GPU memory', torch.cuda.mem_get_info(device)[0]))
    for where, available in free:
        if available is not None and needed + headroom > available:
            raise UsageError(
                f'the {n_images:,} images, held at {size}x{size} px, need {needed / 2**30:.1f} GiB '
                f'of {where}, and {available / 2**30:.1f} GiB is free (of which '
                f'{headroom / 2**30:.0f} GiB stays for the model); pass a smaller --image-size, '
                f'or train on fewer images')


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


def channel_stats(images, chunk=4096):
    """Per-channel mean and std (0-1 scale) over every pixel of a uint8 (N, C, H, W) tensor.

    This is the std of all pixels together. The 0.2023/0.1994/0.2010 often quoted for CIFAR-10
    is the mean of per-image stds, which is smaller; the true figures are 0.2470/0.2435/0.2616.
    """
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    n = images.numel() / images.shape[1]
    mean = total / n
    std = (total_sq / n - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


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
                 augment=True):
        self.images = images                    # (N, C, H, W) uint8, on the device
        self.labels = labels.to(images.device)  # (N,) int64
        self.batch_size = batch_size
        self.image_size = image_size
        self.train = train
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.padding = min(padding, images.shape[-1] - 1, images.shape[-2] - 1)
        self.memory_format = memory_format
        # On the CPU, resize the uint8 channels-last batch (about 15x faster there than resizing
        # floats); elsewhere resize after the float conversion (GPUs resize floats only).
        self.resize_uint8 = images.device.type == 'cpu'
        # x_norm = (x / 255 - mean) / std  ==  x * scale - shift
        std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
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
        device = self.images.device
        labels = self.labels
        if self.train:
            # One generator per (seed, epoch): the same run gives the same batches, resumed too.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            n = len(self.images)
            order = torch.randperm(n, generator=g).to(device)
            if self.augment:
                shift = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=g).to(device)
                flip = (torch.rand(n, generator=g) < 0.5).to(device)
            else:  # every window centred (no shift), none flipped
                shift = torch.full((n, 2), self.padding, device=device)
                flip = torch.zeros(n, dtype=torch.bool, device=device)
            # The whole epoch's crop windows and labels at once, in batch order: a batch is then
            # slices of these, one gather and the normalisation (4 kernels; 23 when each batch
            # worked out its own windows, which on a GPU cost a fifth of a CUDA-graphed step).
            rows, cols = self._crop_windows(shift[order], flip[order])
            labels = labels[order]
        b = self.batch_size
        for i in range(len(self)):
            batch = slice(i * b, (i + 1) * b)
            if self.train:
                x = self._gather(order[batch], rows[batch], cols[batch])
            else:
                x = self.images[batch]
            yield self._finish(x), labels[batch]

    def _crop_windows(self, shift, flip):
        """The rows (B, H) and columns (B, W) that each sample's random crop reads: a window
        shifted by `shift` - padding in the reflect-padded image, its columns reversed where
        `flip` is set."""
        _, _, h, w = self.images.shape
        p = self.padding
        rows = _reflect(shift[:, :1] + torch.arange(h, device=shift.device) - p, h)
        cols = _reflect(shift[:, 1:] + torch.arange(w, device=shift.device) - p, w)
        return rows, torch.where(flip[:, None], cols.flip(1), cols)

    def _gather(self, idx, rows, cols):
        """Images idx, each cropped to its rows and columns, as one gather from the uint8 set."""
        x = self.images[idx[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W), stored channels-last

    def _finish(self, x):
        """uint8 -> resized to image_size, normalised float, in the model's memory format."""
        size = (self.image_size, self.image_size)
        if x.shape[-2:] != size and self.resize_uint8:
            x = _resize(x.contiguous(memory_format=torch.channels_last), size)
        x = x.float().mul_(self.scale).sub_(self.shift)
        if x.shape[-2:] != size:
            x = _resize(x, size)
        return x.contiguous(memory_format=self.memory_format)


def _resize(x, size):
    # Bilinear; antialias only matters when shrinking, and selects PyTorch's fast uint8 kernel.
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False, antialias=True)


def _reflect(i, n):
    """Map indices in [-n+1, 2n-2] into [0, n-1] as reflect padding does (no edge repeat)."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)
