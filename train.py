"""Train ResNet18 on CIFAR-10 (or on your own image folder) with the article's Trainer.

Mirrors the article's "ResNetを用いた画像認識": the same Trainer with epoch_train and
epoch_valid, saving the best weights to weight.pth. Its bugs are fixed (each marked below), and
the data set is held as one tensor on the device, so an epoch costs about what the model costs.

    python train.py                          # ResNet18, CIFAR-10, 30 epochs
    python train.py --data DIR --epochs 5    # DIR/train/<class>/*, DIR/test/<class>/*
    python train.py --eval weight.pth        # test accuracy of saved weights
"""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import config
from alexnet import AlexNet
from resnet import ResNet18, ResNet34, ResNet50

MODELS = {'resnet18': ResNet18, 'resnet34': ResNet34, 'resnet50': ResNet50, 'alexnet': AlexNet}
CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
# The file types of torchvision's ImageFolder, listed here so that an image folder is read
# without importing torchvision (about 3 s of start-up on 2 CPU cores).
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class UsageError(Exception):
    """A problem the user can fix (arguments, data, files): one sentence, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Data: decoded once into one uint8 tensor (N, 3, H, W), then batched on the training device.

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
    `chunk` files into one array, so the main process copies a few arrays, not one per image."""
    out = torch.empty((len(files), size, size, 3), dtype=torch.uint8)
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
            out[i:i + len(arr)] = torch.from_numpy(arr)
    return out.permute(0, 3, 1, 2).contiguous()


def load_image_folder(root, image_size, workers=0, need_train=True):
    """An ImageFolder tree: root/train/<class>/* and root/test/<class>/* (or root/val)."""
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

    workers = workers or os.cpu_count() or 1
    print(f'decoding {len(train_files) * need_train + len(test_files):,} images '
          f'from {root} ({workers} processes)...', flush=True)
    # One pool (one start of `workers` processes) for both splits.
    images = decode_images((train_files if need_train else []) + test_files, size, workers)
    train_x = images[:len(train_files)] if need_train else None
    test_x = images[len(images) - len(test_files):]
    return train_x, torch.tensor(train_labels), test_x, torch.tensor(test_labels), classes


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
    flip, the normalisation and any resize are done on whole batches on the device.
    Iterating yields (inputs, targets) like a DataLoader; call set_epoch(k) before each epoch.
    """

    def __init__(self, images, labels, batch_size, mean, std, image_size, train,
                 seed=0, padding=config.CROP_PADDING, memory_format=torch.contiguous_format):
        self.images = images                    # (N, C, H, W) uint8, on the device
        self.labels = labels.to(images.device)  # (N,) int64
        self.batch_size = batch_size
        self.image_size = image_size
        self.train = train
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
            shift = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=g).to(device)
            flip = (torch.rand(n, generator=g) < 0.5).to(device)
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


# ----------------------------------------------------------------------------------------------
# The article's Trainer, fixed and made fast.

class Trainer:

    def __init__(self, model, optimizer, criterion, device='cpu', scheduler=None, amp=True):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.criterion = criterion
        self.scheduler = scheduler  # stepped once per batch
        self.amp_dtype = amp_dtype(self.device) if amp else None  # None: fp32
        # fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.amp_dtype == torch.float16)
        self.progress = sys.stdout.isatty()  # a live progress line on a terminal, none in a log
        self.class_accuracy = None  # per-class accuracy (%) of the last epoch_valid
        self.graphed_step = None  # a GraphedStep replaces train_step when set (CUDA only)
        self.autocast_cache = True  # off while a CUDA graph records: graphs cannot use it

    def _autocast(self):
        if self.amp_dtype is None:  # fp32: no autocast at all (torch before 2.5 refuses even
            return contextlib.nullcontext()  # a disabled one on Apple's 'mps' device)
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              cache_enabled=self.autocast_cache)

    def train_step(self, inputs, targets):
        """One step of the article's loop: forward, loss, backward, SGD update. Returns the
        loss and the outputs."""
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            outputs = self.model(inputs)
            loss = self.criterion(outputs, targets)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, outputs

    def epoch_train(self, train_loader):
        self.model.train()
        # Per-batch losses and predictions stay on the device and are summed once at the end:
        # no per-batch .item() (the GPU never waits for the host) and one kernel a batch.
        losses, predictions, labels = [], [], []
        last_print = time.monotonic()

        step = self.graphed_step or self.train_step  # the article's step, or its CUDA graph
        for batch_idx, (inputs, targets) in enumerate(train_loader):
            loss, outputs = step(inputs, targets)
            if self.scheduler is not None:
                self.scheduler.step()

            losses.append(loss.detach())
            predictions.append(outputs.argmax(dim=1))
            labels.append(targets)
            if self.progress and time.monotonic() - last_print > 0.5:
                last_print = time.monotonic()
                print(f'\r  batch {batch_idx + 1}/{len(train_loader)}  loss {loss.item():.3f}',
                      end='', flush=True)
        if self.progress:
            print('\r' + ' ' * 40 + '\r', end='', flush=True)

        # The article averaged per-batch means; this is the mean over samples.
        sizes = [len(t) for t in labels]
        total = sum(sizes)
        weights = torch.tensor(sizes, dtype=torch.float, device=self.device)
        epoch_loss = (torch.stack(losses).float() * weights).sum().item() / total
        correct = (torch.cat(predictions) == torch.cat(labels)).sum().item()
        return epoch_loss, 100 * correct / total

    @torch.no_grad()  # the article validated with autograd on, storing every activation
    def epoch_valid(self, valid_loader):
        self.model.eval()
        epoch_loss = torch.zeros((), device=self.device)
        class_correct = class_total = 0  # per-class counts, (num_classes,) after a batch

        for inputs, targets in valid_loader:
            with self._autocast():
                outputs = self.model(inputs)
            # The loss in fp32 (the logits may be bf16 under autocast).
            epoch_loss += self.criterion(outputs.float(), targets) * targets.size(0)
            hit = (outputs.argmax(dim=1) == targets).float()
            zeros = outputs.new_zeros(outputs.shape[1], dtype=torch.float)
            class_correct = class_correct + zeros.index_add(0, targets, hit)
            class_total = class_total + zeros.index_add(0, targets, torch.ones_like(hit))

        total = class_total.sum().item()
        self.class_accuracy = (100 * class_correct / class_total.clamp_min(1)).tolist()
        return epoch_loss.item() / total, 100 * class_correct.sum().item() / total

    @property
    def params(self):
        return self.model.state_dict()  # live tensors: copy before keeping (see train())


def amp_dtype(device):
    """bf16 autocast on CUDA (fp16 where bf16 is missing); fp32 elsewhere."""
    if device.type != 'cuda':
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def use_cuda_graphs(args, device):
    # AlexNet's few large kernels keep a GPU busy already, and its dropout draws random numbers.
    return args.cuda_graphs and device.type == 'cuda' and args.model != 'alexnet'


def graph_model(model, sample, amp_dtype):
    """CUDA only (--no-graph-whole-step, or fp16): record the model's training forward and
    backward as two CUDA graphs.

    A ResNet18 step at 32 px is hundreds of small kernels, and launching them one by one from
    Python takes about as long as the GPU takes to run them; a graph launches a pass at once.
    The model is changed in place: in train mode it replays the graphs, which hold fixed input
    buffers, so every batch must have the shape of `sample` (the train batches all do); in
    eval mode it runs as before. Recording runs 3 warm-up passes on `sample` first.
    """
    _quiet_graph_warnings()
    # Recorded under autocast so the graphs hold its casts; graphs cannot use its weight cache.
    amp = (torch.autocast('cuda', dtype=amp_dtype, cache_enabled=False) if amp_dtype
           else contextlib.nullcontext())
    with amp:
        return torch.cuda.make_graphed_callables(model, (sample,))


def _quiet_graph_warnings():
    # Recording runs on a side stream, and PyTorch then warns at each backward that the
    # gradients' streams differ (and once that cuBLAS had no context yet). The graphed runs
    # train as the eager ones do (README, Results), so those two messages are left out.
    warnings.filterwarnings('ignore', message="The AccumulateGrad node's stream does not match")
    warnings.filterwarnings('ignore', message='Attempting to run cuBLAS, but there was no current')


def can_graph_whole_step(amp_dtype):
    """Whether GraphedStep can record the step: in bf16 or fp32, yes; fp16's loss scaling
    (GradScaler) is not recorded in a graph here, so with fp16 the model alone is graphed."""
    return amp_dtype != torch.float16


class GraphedStep:
    """CUDA only, the default there (--no-graph-whole-step: graph_model instead): the Trainer's
    whole train_step - forward, loss, backward and the SGD update - recorded as one CUDA graph
    and replayed for each batch.

    graph_model records the model alone, so between two replays the host still launches the
    loss, its backward, the optimizer's update and the data path. Here it launches, per batch,
    the data path, two copies into the graph's input buffers, the lr and the replay (and the
    Trainer's loss copy and argmax). The graph reads the lr from a tensor, which each call sets
    from the optimizer's current lr (the scheduler's).

    Recording runs the step `warmup` times first on the sample batch (cuDNN picks its kernels,
    SGD makes its momentum buffers), then puts the weights, the BatchNorm statistics and the
    momentum back as they were: the replays train exactly as train_step would. The loss and
    outputs a call returns live in the graph's memory until the next call; the loss is copied.
    """

    def __init__(self, trainer, inputs, targets, warmup=3):
        self.trainer, self.warmup = trainer, warmup
        trainer.model.train()  # BatchNorm as in training: the graph replays what it records
        self.inputs, self.targets = inputs.clone(), targets.clone()  # the fixed input buffers
        self.groups = trainer.optimizer.param_groups
        # One lr tensor per parameter group, in the weights' dtype (float32 on CUDA, which is
        # what fused SGD reads there).
        self.lrs = [torch.tensor(float(g['lr']), dtype=g['params'][0].dtype, device=inputs.device)
                    for g in self.groups]
        self.loss = self.outputs = None
        state = self._state()
        saved = [t.detach().clone() for t in state]
        trainer.autocast_cache = False
        try:
            with self._lr_from_tensors():
                self._replay = self._record(self._step)
        finally:
            trainer.autocast_cache = True
        with torch.no_grad():
            for t, s in zip(state, saved):
                t.copy_(s)
            for t in self._state():
                if not any(t is s for s in state):  # momentum that the warm-up created:
                    t.zero_()  # from zero, the next update equals SGD's first one

    def __call__(self, inputs, targets):
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        for lr, group in zip(self.lrs, self.groups):
            lr.fill_(group['lr'])
        self._replay()
        return self.loss.detach().clone(), self.outputs.detach()

    def _step(self):
        self.loss, self.outputs = self.trainer.train_step(self.inputs, self.targets)

    def _state(self):
        """What a step changes besides the gradients: the weights, the model's buffers, then
        the momentum buffers that exist."""
        model, optimizer = self.trainer.model, self.trainer.optimizer
        momentum = [optimizer.state[p]['momentum_buffer'] for g in self.groups
                    for p in g['params'] if optimizer.state[p].get('momentum_buffer') is not None]
        return [*model.parameters(), *model.buffers(), *momentum]

    @contextlib.contextmanager
    def _lr_from_tensors(self):
        """The optimizer reads its lr from self.lrs while this is on (the graph records that)."""
        floats = [g['lr'] for g in self.groups]
        for lr, group in zip(self.lrs, self.groups):
            group['lr'] = lr
        try:
            yield
        finally:
            for lr, group in zip(floats, self.groups):
                group['lr'] = lr

    def _record(self, step):
        """Run `step` `warmup` times, record it as a CUDA graph, and return the graph's replay.
        (The tests stand in for this one method on the CPU.)"""
        _quiet_graph_warnings()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up and recording on one side stream
            for _ in range(self.warmup):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.trainer.optimizer.zero_grad(set_to_none=True)  # the graph makes its own gradients
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
        return graph.replay


def build_model(name, num_classes, small_input=False):
    if name == 'alexnet':
        return AlexNet(in_channels=3, num_classes=num_classes)
    return MODELS[name](num_classes, small_input=small_input)


def build_optimizer(model, lr, device):
    """SGD with Nesterov momentum and weight decay (config.py). On CUDA, PyTorch's fused SGD:
    one kernel updates every parameter, where its default (foreach) launches several a step,
    each also costing the host time between two CUDA-graph replays. The update is the same."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=config.MOMENTUM, nesterov=True,
                           weight_decay=config.WEIGHT_DECAY,
                           fused=True if device.type == 'cuda' else None)  # None: the default


def build_criterion():
    """The loss of training, and of every evaluation, so that --eval reports the valid loss the
    training log printed: cross-entropy with label smoothing (config.py)."""
    return nn.CrossEntropyLoss(label_smoothing=config.LABEL_SMOOTHING)


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict(state), but keeping the optimizer's own implementation (fused
    or not): a checkpoint written on another device carries that device's."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group['fused'] = optimizer.defaults['fused']
        group['foreach'] = optimizer.defaults['foreach']


def warmup_linear(total_steps, warmup):
    """lr factor: linear rise over the first `warmup` fraction of steps, then linear to 0."""
    peak = max(1, round(total_steps * warmup))

    def factor(step):
        if step < peak:
            return (step + 1) / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))
    return factor


def pick_device(name):
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        if torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise UsageError('--device cuda was asked for, but torch sees no CUDA GPU here; '
                         'use --device auto or cpu')
    if name == 'mps' and not torch.backends.mps.is_available():
        raise UsageError('--device mps was asked for, but torch sees no Apple GPU here; '
                         'use --device auto or cpu')
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# Files: every write goes to a temporary file first, then replaces the target in one step.

def atomic_write(path, write):
    """Call write(f) on a temporary file beside path, then rename it over path."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_torch(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_text(text, path):
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path):
    """The JSON object in path, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def history_csv(history):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]) if history else ['epoch'])
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def save_plot(history, path):
    """Loss and accuracy curves, when matplotlib happens to be installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [h['epoch'] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ('train', 'valid'):
        ax1.plot(epochs, [h[f'{split}_loss'] for h in history], label=split)
        ax2.plot(epochs, [h[f'{split}_acc'] for h in history], label=split)
    ax1.set(xlabel='epoch', ylabel='loss')
    ax2.set(xlabel='epoch', ylabel='accuracy (%)')
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)


def load_weights(path):
    """A state_dict from path, with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f'no weight file at {path}; train one with python train.py first')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UsageError(f'{path} is not a readable weight file ({type(e).__name__}); it may be '
                         f'truncated or not a state_dict: retrain, or pick another file') from None
    if not isinstance(state, dict):
        raise UsageError(f'{path} holds a {type(state).__name__}, not a state_dict')
    return state


CHECKPOINT_KEYS = ('model', 'optimizer', 'scheduler', 'scaler', 'rng', 'epoch', 'epochs',
                   'batch_size', 'setup', 'history')


def load_checkpoint(path):
    """The resume checkpoint at path (train() writes it), with a clear error for a missing,
    unreadable or incomplete file."""
    if not path.is_file():
        raise UsageError(f'nothing to resume: no checkpoint at {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # truncated, or not a file torch.save wrote
        ckpt = None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
        raise UsageError(f'{path} is not a readable checkpoint of train.py (it may be truncated); '
                         f'run again without --resume to start over (the best weights beside it '
                         f'are replaced only by better ones)')
    return ckpt


def load_into(model, state, path, what):
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UsageError(f'{path} does not fit {what}: its tensors have other names or shapes; '
                         f'pass the --model (and --small-input) it was trained with') from None


# ----------------------------------------------------------------------------------------------
# The command line.

def positive(kind, allow_zero=False):
    """An argparse type: a number of `kind` above 0 (or 0 and above, with allow_zero)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
        if not (value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(
                f'must be {"0 or more" if allow_zero else "positive"}, got {text}')
        return value
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Train ResNet18 (or another model) on CIFAR-10 or an image folder.')
    p.add_argument('--data', default=config.DATA_DIR, metavar='DIR',
                   help='ImageFolder tree DIR/train/<class>/*, DIR/test/<class>/* '
                        '(default: CIFAR-10, downloaded into --data-root)')
    p.add_argument('--data-root', default=config.DATA_ROOT, metavar='DIR',
                   help='where CIFAR-10 is downloaded or placed (default: %(default)s)')
    p.add_argument('--epochs', type=positive(int), default=config.NUM_EPOCHS,
                   help='passes over the training set (default: %(default)s)')
    p.add_argument('--batch-size', type=positive(int), default=None,
                   help=f'images per step (default: {config.BATCH_SIZE}; '
                        f'{config.SMALL_INPUT_BATCH_SIZE} with --small-input)')
    p.add_argument('--lr', type=positive(float), default=None,
                   help=f'peak learning rate (default: {config.LR}; '
                        f'{config.ALEXNET_LR} for alexnet)')
    p.add_argument('--image-size', type=positive(int), default=config.IMAGE_SIZE, metavar='PX',
                   help='side of the square images fed to the model (default: %(default)s)')
    p.add_argument('--model', choices=sorted(MODELS), default=config.MODEL,
                   help='network to train (default: %(default)s)')
    p.add_argument('--small-input', action='store_true', default=config.SMALL_INPUT,
                   help='ResNet stem for small images: 3x3/1 conv, no max-pool')
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default=config.DEVICE,
                   help='auto picks cuda, then mps, then cpu (default: %(default)s)')
    p.add_argument('--seed', type=positive(int, allow_zero=True), default=config.SEED,
                   help='seeds weights, shuffling and augmentation (default: %(default)s)')
    p.add_argument('--out', default=config.OUT_PATH, metavar='PATH',
                   help='best weights; .json, .csv, .png and .ckpt go beside it '
                        '(default: %(default)s)')
    p.add_argument('--resume', action='store_true',
                   help='continue the interrupted run whose checkpoint is beside --out')
    p.add_argument('--eval', metavar='PATH', help='test saved weights and train nothing')
    p.add_argument('--workers', type=positive(int, allow_zero=True),
                   default=config.NUM_WORKERS,
                   help='processes decoding an image folder; 0: one per CPU core '
                        '(default: %(default)s)')
    p.add_argument('--no-cuda-graphs', dest='cuda_graphs', action='store_false',
                   default=config.CUDA_GRAPHS,
                   help='on CUDA, launch the ResNet\'s kernels one by one instead of replaying '
                        'them as a CUDA graph (slower at small image sizes)')
    p.add_argument('--graph-whole-step', action=argparse.BooleanOptionalAction, default=None,
                   help='on CUDA, record the whole training step (forward, loss, backward, '
                        'SGD update) as one CUDA graph; --no-graph-whole-step records the '
                        'model\'s forward and backward alone (default: '
                        f'{"whole step" if config.GRAPH_WHOLE_STEP else "model alone"})')
    p.add_argument('--save-every', type=positive(float, allow_zero=True),
                   default=config.SAVE_EVERY, metavar='SECONDS',
                   help='seconds between writes of weights and checkpoint (default: %(default)s)')
    args = p.parse_args(argv)
    # Defaults that depend on other arguments; an explicit value always wins.
    if args.batch_size is None:
        args.batch_size = config.SMALL_INPUT_BATCH_SIZE if args.small_input else config.BATCH_SIZE
    if args.graph_whole_step is None:
        args.graph_whole_step = config.GRAPH_WHOLE_STEP and args.cuda_graphs
    return args


def setup_of(args, classes):
    """What must match for two runs' weights to be compared, or for a run to be resumed."""
    data = str(Path(args.data).resolve()) if args.data else 'cifar10'
    return {'model': args.model, 'small_input': args.small_input, 'image_size': args.image_size,
            'data': data, 'classes': list(classes)}


def check_args(args):
    if args.model == 'alexnet':
        if args.small_input:
            raise UsageError('--small-input changes the ResNet stem; AlexNet has no such option')
        if args.image_size < AlexNet.MIN_INPUT_SIZE:
            raise UsageError(f'--image-size {args.image_size} is too small for AlexNet, which '
                             f'needs at least {AlexNet.MIN_INPUT_SIZE} px; '
                             f'try --image-size {AlexNet.MIN_INPUT_SIZE} or more')
    if args.resume and args.eval:
        raise UsageError('--resume continues training and --eval trains nothing; pick one')
    if args.graph_whole_step and not args.cuda_graphs:
        raise UsageError('--graph-whole-step records a CUDA graph and --no-cuda-graphs turns '
                         'them off; pick one')


def load_data(args, need_train=True):
    if args.data:
        return load_image_folder(args.data, args.image_size, args.workers, need_train)
    return load_cifar10(args.data_root)


def print_class_accuracy(classes, accuracy):
    width = max(len(c) for c in classes)
    for name, acc in zip(classes, accuracy):
        print(f'  {name:<{width}}  {acc:6.2f}%')


def evaluate(args, device):
    """--eval PATH: test accuracy and per-class accuracy of saved weights."""
    path = Path(args.eval)
    state = load_weights(path)
    meta = read_json(path.with_suffix('.json')) or {}
    model_name = meta.get('model', args.model)
    small_input = meta.get('small_input', args.small_input)
    image_size = meta.get('image_size', args.image_size)
    if model_name not in MODELS:
        raise UsageError(f'{path.with_suffix(".json")} names an unknown model {model_name!r}')
    args.image_size = image_size
    _, _, test_x, test_y, classes = load_data(args, need_train='mean' not in meta)
    if 'classes' in meta and meta['classes'] != list(classes):
        raise UsageError(f'{path} was trained on the classes {meta["classes"]}, '
                         f'but the data has {list(classes)}')
    if 'mean' in meta:
        mean, std = meta['mean'], meta['std']
    else:
        mean, std = channel_stats(load_data(args)[0])

    model = build_model(model_name, len(classes), small_input)
    load_into(model, state, path, model_name + (' --small-input' if small_input else ''))
    mf = memory_format(device)
    trainer = Trainer(model.to(memory_format=mf), None, build_criterion(), device)
    loader = TensorLoader(test_x.to(device), test_y, config.EVAL_BATCH_SIZE, mean, std,
                          image_size, train=False, memory_format=mf)
    loss, acc = trainer.epoch_valid(loader)
    print('per-class accuracy:')
    print_class_accuracy(classes, trainer.class_accuracy)
    print(f'{path}: test accuracy {acc:.2f}% on {len(test_x):,} images ({model_name}, '
          f'{image_size} px, loss {loss:.3f})')
    return 0


def plural(n, one, many):
    """'1 epoch' or '30 epochs'."""
    return f'{n} {one if n == 1 else many}'


def memory_format(device):
    # channels_last (NHWC) picks the faster convolution kernels of cuDNN and of oneDNN on the
    # CPU (ResNet18 step at 32 px, batch 512, on 2 CPU cores: 457-479 against 371-430 img/s).
    return torch.channels_last if device.type in ('cuda', 'cpu') else torch.contiguous_format


def train(args, device):
    out = Path(args.out)
    meta_path, ckpt_path = out.with_suffix('.json'), out.with_suffix('.ckpt')
    csv_path, png_path = out.with_suffix('.csv'), out.with_suffix('.png')
    ckpt = load_checkpoint(ckpt_path) if args.resume else None  # before the data: fail fast

    t_load = time.perf_counter()
    train_x, train_y, test_x, test_y, classes = load_data(args)
    setup = setup_of(args, classes)
    mean, std = channel_stats(train_x)
    t_load = time.perf_counter() - t_load
    print(f'{len(train_x):,} train and {len(test_x):,} test images, {len(classes)} classes, '
          f'held at {train_x.shape[-1]} px, fed at {args.image_size} px; '
          f'mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]} '
          f'({t_load:.1f} s)')

    # A good weight.pth is only ever replaced by better weights of the same setup.
    best_acc, best_epoch = -1.0, 0
    if out.exists():
        prev = read_json(meta_path)
        if prev is None or not isinstance(prev.get('best_acc'), (int, float)):
            raise UsageError(f'{out} already holds weights, but {meta_path}, which says what they '
                             f'are and how good, is missing or unreadable; pass --out NEW.pth '
                             f'to write elsewhere, or move {out} away')
        if {k: prev.get(k) for k in setup} != setup:
            raise UsageError(f'{out} already holds weights of another setup; pass --out NEW.pth '
                             f'to write elsewhere, or move {out} away')
        best_acc, best_epoch = prev['best_acc'], prev.get('best_epoch', 0)
        if not args.resume:
            print(f'{out} exists ({best_acc:.2f}%); this run replaces it only with better weights')

    torch.manual_seed(args.seed)
    model = build_model(args.model, len(classes), args.small_input)
    mf = memory_format(device)
    model = model.to(device, memory_format=mf)
    lr = args.lr or (config.ALEXNET_LR if args.model == 'alexnet' else config.LR)
    # The article used plain SGD at lr 0.001 with no schedule, which barely moves in 30 epochs.
    optimizer = build_optimizer(model, lr, device)
    train_loader = TensorLoader(train_x.to(device), train_y, args.batch_size, mean, std,
                                args.image_size, train=True, seed=args.seed, memory_format=mf)
    valid_loader = TensorLoader(test_x.to(device), test_y, config.EVAL_BATCH_SIZE, mean, std,
                                args.image_size, train=False, memory_format=mf)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear(args.epochs * len(train_loader), config.WARMUP))
    trainer = Trainer(model, optimizer, build_criterion(), device, scheduler)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # time cuDNN's algorithms once per shape

    history, start = [], 1
    if ckpt is not None:
        if ckpt['setup'] != setup or ckpt['epochs'] != args.epochs \
                or ckpt['batch_size'] != args.batch_size:
            was = ckpt['setup']
            raise UsageError(f'{ckpt_path} is from another run (--epochs {ckpt["epochs"]} '
                             f'--batch-size {ckpt["batch_size"]} --model {was["model"]}'
                             f'{" --small-input" if was["small_input"] else ""} --image-size '
                             f'{was["image_size"]}); resume it with the same arguments')
        model.load_state_dict(ckpt['model'])
        load_optimizer_state(optimizer, ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        trainer.scaler.load_state_dict(ckpt['scaler'])
        torch.set_rng_state(ckpt['rng'])
        history, start = ckpt['history'], ckpt['epoch'] + 1
        if start > args.epochs:
            print(f'{ckpt_path}: that run already finished (epoch {args.epochs} of {args.epochs})')
            return 0
        print(f'resuming from epoch {ckpt["epoch"]} of {args.epochs}')
    t_graphs = time.perf_counter()
    graphs = use_cuda_graphs(args, device)
    if graphs:
        inputs, targets = next(iter(train_loader))
        if args.graph_whole_step and can_graph_whole_step(trainer.amp_dtype):
            trainer.graphed_step = GraphedStep(trainer, inputs, targets)
        else:
            if args.graph_whole_step:
                print('the whole step is graphed in bf16 only, and this GPU has fp16 only: '
                      'recording the model\'s forward and backward instead')
            graph_model(model, inputs, trainer.amp_dtype)
    t_graphs = time.perf_counter() - t_graphs

    launch = ('' if not graphs else ', the whole step as a CUDA graph' if trainer.graphed_step
              else ', the model as CUDA graphs')
    print(f'{args.model}{" (small input)" if args.small_input else ""}, {device.type}{launch}, '
          f'{plural(args.epochs, "epoch", "epochs")} of '
          f'{plural(len(train_loader), "batch", "batches")} of '
          f'{args.batch_size}, peak lr {lr}')
    out.parent.mkdir(parents=True, exist_ok=True)
    best_params = None
    run_best = (-1.0, 0, None)  # this run's best: accuracy, epoch, per-class accuracy
    improved = False  # whether this run beat the weights already in out (if any)
    epoch, last_save = start - 1, time.monotonic()
    t_train = t_valid = t_save = 0.0  # this run's seconds in epoch_train, epoch_valid, save

    def save(completed):
        """Write the best weights (if new) and, after a completed epoch, the checkpoint."""
        nonlocal best_params, last_save, t_save
        t = time.perf_counter()
        if best_params is not None:
            save_torch(best_params, out)
            save_text(json.dumps({**setup, 'mean': mean, 'std': std, 'best_acc': best_acc,
                                  'best_epoch': best_epoch, 'epochs': args.epochs}, indent=1),
                      meta_path)
            best_params = None
        if completed:
            save_torch({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                        'scheduler': scheduler.state_dict(), 'scaler': trainer.scaler.state_dict(),
                        'rng': torch.get_rng_state(), 'epoch': epoch, 'epochs': args.epochs,
                        'batch_size': args.batch_size, 'setup': setup, 'history': history},
                       ckpt_path)
            save_text(history_csv(history), csv_path)
            save_plot(history, png_path)
        last_save = time.monotonic()
        t_save += time.perf_counter() - t

    try:
        for epoch in range(start, args.epochs + 1):
            t0 = time.perf_counter()
            train_loader.set_epoch(epoch)
            train_loss, train_acc = trainer.epoch_train(train_loader)
            train_time = time.perf_counter() - t0
            t_train += train_time
            if not math.isfinite(train_loss):
                save(completed=False)
                print(f'error: the loss became {train_loss} in epoch {epoch}; stopped. The best '
                      f'weights so far stay in {out}. Try a lower --lr than {lr}.',
                      file=sys.stderr)
                return 1
            valid_loss, valid_acc = trainer.epoch_valid(valid_loader)
            seconds = time.perf_counter() - t0
            t_valid += seconds - train_time

            if valid_acc > run_best[0]:
                run_best = (valid_acc, epoch, trainer.class_accuracy)
            if valid_acc > best_acc:
                best_acc, best_epoch, improved = valid_acc, epoch, True
                # The article kept `trainer.params`, a live view of the weights, so the "best"
                # weights it saved were the last epoch's. Copy them.
                best_params = {k: v.detach().clone() for k, v in trainer.params.items()}

            lr_now = optimizer.param_groups[0]['lr']
            history.append({'epoch': epoch, 'train_loss': round(train_loss, 4),
                            'train_acc': round(train_acc, 2), 'valid_loss': round(valid_loss, 4),
                            'valid_acc': round(valid_acc, 2), 'lr': round(lr_now, 6),
                            'seconds': round(seconds, 2),
                            'img_per_s': round(len(train_loader) * args.batch_size / train_time)})
            # The article printed {num_epochs}, a name it never defined: NameError in epoch 1.
            print(f'epoch {epoch:>{len(str(args.epochs))}}/{args.epochs}  '
                  f'train loss {train_loss:.3f} acc {train_acc:5.2f}%  '
                  f'valid loss {valid_loss:.3f} acc {valid_acc:5.2f}%  lr {lr_now:.4f}  '
                  f'{seconds:5.1f}s  {history[-1]["img_per_s"]:,} img/s', flush=True)
            if epoch == args.epochs or time.monotonic() - last_save >= args.save_every:
                save(completed=True)
    except KeyboardInterrupt:
        save(completed=False)
        kept = (f'the best weights so far ({best_acc:.2f}%) are in {out}' if out.exists()
                else 'no epoch had finished, so nothing was saved')
        resume = ('; to continue: python train.py --resume with the same arguments'
                  if ckpt_path.exists() else '')
        print(f'\ninterrupted in epoch {epoch}; {kept}{resume}', file=sys.stderr)
        return 130

    print(f'per-class accuracy at epoch {run_best[1]}, this run\'s best:')
    print_class_accuracy(classes, run_best[2])
    # Where the wall time went; the rest is start-up (imports, CUDA, building the model and the
    # optimizer) and exit.
    print(f'seconds: loading data {t_load:.1f}, '
          + (f'recording CUDA graphs {t_graphs:.1f}, ' if graphs else '')
          + f'training {t_train:.1f}, evaluating {t_valid:.1f}, saving {t_save:.1f}')
    if improved:
        print(f'done: best valid accuracy {best_acc:.2f}% at epoch {best_epoch}, saved to {out}')
    else:
        print(f'done: this run\'s best valid accuracy {run_best[0]:.2f}% (epoch {run_best[1]}) '
              f'did not beat the {best_acc:.2f}% (epoch {best_epoch}) already in {out}, '
              f'which is kept')
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        torch.set_float32_matmul_precision('high')  # TF32 on Ampere and later; no-op on CPU
        check_args(args)
        device = pick_device(args.device)
        if args.eval:
            return evaluate(args, device)
        return train(args, device)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while loading data: nothing written yet
        print('\ninterrupted before training started; nothing was written', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
