"""The data path: images decoded once into one uint8 tensor, then batched on the training device.

Stands in for the article's DataLoader over torchvision's CIFAR10 with PIL transforms
("ResNetを用いた画像認識"): CIFAR-10 or any image folder is read once (in parallel), checked,
and held as one (N, 3, H, W) uint8 tensor; TensorLoader crops, flips, normalises and resizes
whole batches of it on the device. (A folder too large for memory: stream.py, --stream.)
"""
import collections
import contextlib
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import config
from errors import UsageError

# The file types of torchvision's ImageFolder, listed here so that an image folder is read
# without importing torchvision (seconds of start-up on a small CPU).
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


# A split of a data set: images, (N, 3, H, W) uint8 (or stream.ImageFiles), and labels, (N,).
Split = collections.namedtuple('Split', 'images labels')


class Data(collections.namedtuple('Data', 'train test classes test_split download_seconds '
                                           'valid mean std', defaults=(None, 0.0, None, None,
                                                                       None))):
    """A data set: its train split (None unless asked for), its test split, the class names, the
    share of each class drawn as test images from a folder without a test/ folder (None: it had
    one), and the seconds a first download of CIFAR-10 took; then, as train.py prepares it, the
    validation images held out of the train split, and the mean and std (per colour channel,
    0-1 scale) that normalise the images."""

    def normalised(self, how):
        """This data with the mean and std that normalise it: its training images' ('train'),
        those ImageNet's weights were trained with ('imagenet'), or none (None: raw [0, 1])."""
        if how == 'imagenet':
            return self._replace(mean=config.IMAGENET_MEAN, std=config.IMAGENET_STD)
        mean, std = channel_stats(self.train.images) if how else ([0.0] * 3, [1.0] * 3)
        return self._replace(mean=mean, std=std)

    def held_out(self, fraction, seed):
        """This data with `fraction` of each class's training images held out (split_valid) as
        the validation images, which choose the best epoch. Article: it validated on the test
        set and kept the epoch best there, so its figure was chosen on the images it was
        measured on. The test images are measured once, at the end."""
        train, valid = (Split(self.train.images[i], self.train.labels[i])
                        for i in split_valid(self.train.labels, fraction, seed))
        return self._replace(train=train, valid=valid)

    def summary(self, image_size, seconds):
        """What the run trains on, in a line."""
        return (f'{len(self.train.labels):,} train, {len(self.valid.labels):,} valid and '
                f'{len(self.test.labels):,} test images, {len(self.classes)} classes, held at '
                f'{self.train.images.shape[-1]} px, fed at {image_size} px; mean '
                f'{[round(m, 4) for m in self.mean]}, std {[round(s, 4) for s in self.std]} '
                f'({seconds:.1f} s)')


Loaders = collections.namedtuple('Loaders', 'train valid test')  # valid: None without any


def load_cifar10(root):
    """CIFAR-10 through torchvision, downloaded into root on first use."""
    import torchvision  # here, not at the top: only this data set needs it (see IMG_EXTENSIONS)
    t0, there = time.monotonic(), Path(root, 'cifar-10-batches-py').is_dir()
    try:
        train = torchvision.datasets.CIFAR10(root, train=True, download=True)
        test = torchvision.datasets.CIFAR10(root, train=False, download=True)
    except Exception as e:  # offline, refused, truncated archive, ...
        raise UsageError(
            f'could not get CIFAR-10 into {root} ({type(e).__name__}: {e}); without internet, '
            f'fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz on another machine, put cifar-10-python.tar.gz in {root} '
            f'and run again, or train on an image folder with --data DIR') from None

    def split(ds):  # (N, 32, 32, 3) uint8 array -> (N, 3, 32, 32) tensor
        return Split(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                     torch.tensor(ds.targets))

    return Data(split(train), split(test), train.classes,
                download_seconds=0.0 if there else time.monotonic() - t0)


def find_images(folder):
    """The image files under folder, at any depth, as path strings in the order of
    torchvision's ImageFolder: folder by folder (sorted, symlinks followed), each folder's files
    sorted. Hidden files (a Mac's ._photo.jpg) and other file types are left out."""
    found = []
    for parent, _, names in sorted(os.walk(folder, followlinks=True)):  # faster than rglob
        found += [os.path.join(parent, n) for n in sorted(names) if not n.startswith('.')
                  and os.path.splitext(n)[1].lower() in IMG_EXTENSIONS]
    return found


# An image folder's files, listed and checked (list_image_folder): train and test, lists of
# (path, label) (train empty unless asked for), the classes, and the test_split of Data.
Files = collections.namedtuple('Files', 'train test classes test_split')


def list_image_folder(root, need_train=True, test_split=config.TEST_SPLIT):
    """The files of an image folder, in torchvision ImageFolder's order: root/train/<class>/*
    and root/test/<class>/* (or root/val), or, for a folder of class folders alone, its images
    with `test_split` of each class drawn (seeded, config.TEST_SEED) as the test images."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f'data folder {root} does not exist')
    if not (root / 'train').is_dir():  # your photos, a folder per class: draw the test images
        classes = class_names(root)
        files = labelled(root, classes)
        labels = torch.tensor([label for _, label in files])
        train_idx, test_idx = split_valid(labels, test_split, config.TEST_SEED)
        if need_train:
            print(f'{root} has no train/ and test/ folders: {test_split:.0%} of each class\'s '
                  f'images, drawn at random, are the test images', flush=True)
        return Files([files[i] for i in train_idx.tolist()] if need_train else [],
                     [files[i] for i in test_idx.tolist()], classes, test_split)
    test_dir = root / 'test' if (root / 'test').is_dir() else root / 'val'
    if not test_dir.is_dir():
        raise UsageError(f'{root} has a train/ folder but no test/ (or val/) beside it; add one '
                         f'with a folder of images per class, or put the class folders '
                         f'directly in {root} and the test images are drawn from them')
    classes, test_classes = class_names(root / 'train'), class_names(test_dir)
    if classes != test_classes:
        raise UsageError(f'the class folders of {root / "train"} and {test_dir} differ (only in '
                         f'train: {sorted(set(classes) - set(test_classes))}, only in test: '
                         f'{sorted(set(test_classes) - set(classes))})')
    return Files(labelled(root / 'train', classes) if need_train else [],
                 labelled(test_dir, classes, need_all=False), classes, None)


def class_names(folder):
    """The class folders in folder, sorted; at least two."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith('.'))
    if len(classes) < 2:
        found = f'one class folder ({classes[0]})' if classes else 'no class folders'
        raise UsageError(f'{folder} has {found}, and a classifier needs at least two: put each '
                         f'class\'s images in a folder of its own')
    return classes


def labelled(folder, classes, need_all=True):
    """(path, label) of the images under folder/<class>/, class by class; every class must
    have images when need_all, and the folder some."""
    files = [(f, label) for label, name in enumerate(classes) for f in find_images(folder / name)]
    found = {label for _, label in files}
    empty = [name for label, name in enumerate(classes) if label not in found]
    if not files or need_all and empty:
        where = folder / empty[0] if files else folder
        raise UsageError(f'{where} holds no images (read: {", ".join(IMG_EXTENSIONS)})')
    return files


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


def decode_chunk(paths, size):
    """Decode images into one (n, size, size, 3) uint8 array, or return the sentence naming the
    first unreadable file (a worker process returns it rather than raise it)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            out[i] = decode_image(path, size)
        except Exception as e:
            return f'{path} is not a readable image ({type(e).__name__}: {e}); remove or replace it'
    return out


def decode_images(files, size, workers, chunk=500):
    """Decode files in parallel into one (N, 3, size, size) uint8 tensor. Each worker decodes
    `chunk` files into one array, so the main process copies a few arrays, not one per image,
    straight into their place in the one tensor."""
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    starts = range(0, len(files), chunk)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ProcessPoolExecutor(min(workers, len(starts)))) \
            if workers > 1 and len(starts) > 1 else None
        decoded = (pool.map if pool else map)(decode_chunk, [files[i:i + chunk] for i in starts],
                                              [size] * len(starts))
        for i, part in zip(starts, decoded):
            if isinstance(part, str):
                raise UsageError(part)
            out[i:i + len(part)] = torch.from_numpy(part).permute(0, 3, 1, 2)  # (n, H, W, C)
    return out


def load_dataset(data_dir, image_size, workers=0, need_train=True, device=None,
                 test_split=config.TEST_SPLIT):
    """The image folder data_dir or, without one, CIFAR-10 in config.DATA_ROOT, as Data: each
    split decoded now into one uint8 tensor. A folder that would not fit in memory (on
    `device`) is one sentence: --stream reads it batch by batch instead."""
    if not data_dir:
        return load_cifar10(config.DATA_ROOT)
    files = list_image_folder(data_dir, need_train, test_split)
    paths = [f for f, _ in files.train + files.test]
    size = held_size(paths[0], image_size)
    too_large = memory_shortfall(len(paths), size, free_memory(device))
    if too_large:
        raise UsageError(f'the images of {data_dir}, {too_large}; pass --stream to decode them '
                         f'batch by batch in every epoch instead, or a smaller --image-size')
    workers = workers or os.cpu_count() or 1
    print(f'decoding {len(paths):,} images from {data_dir} ({workers} processes)...', flush=True)
    images = decode_images(paths, size, workers)  # one pool for both splits
    n = len(files.train)
    train = Split(images[:n], torch.tensor([y for _, y in files.train])) if need_train else None
    return Data(train, Split(images[n:], torch.tensor([y for _, y in files.test])),
                files.classes, files.test_split)


def held_size(probe, image_size):
    """The side the images are held (decoded) at. Small square images (CIFAR's 32 px) are
    held at their own size and resized per batch on the device: 224 px training on CIFAR then
    holds 150 MB, not 7.5 GB. Others are resized to image_size when decoded."""
    try:
        with Image.open(probe) as img:
            w, h = img.size
    except Exception as e:
        raise UsageError(f'{probe} is not a readable image ({type(e).__name__}: {e}); remove or '
                         f'replace it') from None
    return w if w == h and w <= image_size else image_size


def memory_shortfall(n_images, size, free, headroom=2**30):
    """None when the images, held as one uint8 tensor, fit in each place of `free` (free_memory)
    with `headroom` bytes left over for the model and its activations; otherwise a sentence
    saying what they need."""
    needed = n_images * 3 * size * size
    for where, available in free:
        if available is not None and needed + headroom > available:
            return (f'held at {size} px they need {needed / 2**30:.1f} GiB of {where}, and '
                    f'{available / 2**30:.1f} GiB is free (of which {headroom / 2**30:.0f} GiB '
                    f'stays for the model)')
    return None


def free_memory(device=None):
    """[(place, bytes free or None where unknown)]: the RAM the images are decoded into (on
    Linux, the least of what the system and, where it sets a limit, its container allow) and,
    on CUDA, the GPU memory they are copied to."""
    ram = None
    try:
        with open('/proc/meminfo') as f:
            ram = int(dict(line.split(':', 1) for line in f)['MemAvailable'].split()[0]) * 1024
        with open('/sys/fs/cgroup/memory.max') as f1, open('/sys/fs/cgroup/memory.current') as f2:
            ram = min(ram, int(f1.read()) - int(f2.read()))  # a container's limit (cgroup v2)
    except (OSError, KeyError, ValueError):  # not Linux, or no limit: memory.max says 'max'
        pass
    on_cuda = device is not None and device.type == 'cuda'
    return [('RAM', ram)] + ([('GPU memory', torch.cuda.mem_get_info(device)[0])] if on_cuda else [])


def channel_stats(images, chunk=4096):
    """Per-channel mean and std (0-1 scale) over every pixel of (N, C, H, W) uint8 images,
    read `chunk` images at a time (images[i:i + chunk]).

    This is the std of all pixels together. The 0.2023/0.1994/0.2010 often quoted for CIFAR-10
    is the mean of per-image stds, which is smaller; the true figures are 0.2470/0.2435/0.2616.
    """
    total, total_sq, n = 0, 0, 0
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].to(torch.float64) / 255
        total = total + x.sum(dim=(0, 2, 3))
        total_sq = total_sq + (x * x).sum(dim=(0, 2, 3))
        n += x.numel() / x.shape[1]
    mean = total / n
    std = (total_sq / n - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def split_valid(labels, fraction, seed):
    """Indices (kept, held out) that hold out `fraction` of each class's images, drawn with
    `seed`: the same images for the same labels, fraction and seed. Every class with two images
    or more gives at least one, and keeps at least one. fraction 0: every image is kept."""
    g = torch.Generator().manual_seed(seed)
    train, valid = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(max(round(fraction * len(idx)), 1), len(idx) - 1) if fraction > 0 else 0
        valid.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(valid).sort().values


def make_loader(images, labels, *, batch_size, mean, std, image_size, train, device, **kwargs):
    """TensorLoader over images (a uint8 tensor, moved to device): batches cropped, flipped
    and normalised alike; train=True shuffles and keeps full batches only."""
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
        self.images, self.device = images, device or images.device  # (N, C, H, W) uint8
        self.labels = labels.to(self.device)  # (N,) int64
        self.batch_size, self.image_size, self.memory_format = batch_size, image_size, memory_format
        self.train, self.augment, self.seed, self.epoch = train, augment, seed, 0
        self.padding = min(padding, *(s - 1 for s in images.shape[-2:]))
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
                x = gather(self.images, order[batch], rows[batch], cols[batch])
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
        # these, one gather and the normalisation, a few kernels on a GPU (RESULTS.md).
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


def gather(images, idx, rows, cols):
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
