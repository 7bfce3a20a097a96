"""What the test files share: small data they make, ways to run the scripts, and the few stand-ins
for what a test cannot make happen (Ctrl-C, a NaN, the clock, the network, a GPU). No tests here."""
import contextlib
import functools
import io
import os
import shutil
import subprocess
import tempfile
import time
import types
import unittest
import sys
from pathlib import Path
from unittest import mock

import torch
import torchvision
from PIL import Image

import budget
import graphs
import train

HERE = Path(__file__).resolve().parent
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # as CI's 2 cores, on any machine
# A short training run's time goes mostly to writing its checkpoint (200 MB for ResNet18); the
# tests write theirs to memory (Linux's /dev/shm) where it has room, else to the usual place.
if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK) and \
        shutil.disk_usage('/dev/shm').free > 4 * 2**30:
    tempfile.tempdir = '/dev/shm'

SCRIPTS = ('resnet.py', 'alexnet.py')


@functools.lru_cache(maxsize=None)
def script_outputs():
    """Run each of SCRIPTS as __main__, as `python NAME` does, in one fresh interpreter (one
    torch import for all), then `import train`; return {name: stdout}."""
    code = ('import runpy, sys\n'
            'for name in sys.argv[1:]:\n'
            '    print("=== " + name, flush=True)\n'
            '    argv, sys.argv = sys.argv, [name]  # as `python NAME` sees it\n'
            '    runpy.run_path(name, run_name="__main__")\n'
            '    sys.argv = argv\n'
            # And which torchvision modules `import train` brings in (TrainTest).
            'import train\n'
            'print("=== import train")\n'
            'print(*sorted(m for m in sys.modules if m.split(".")[0] == "torchvision"))\n')
    out = subprocess.run([sys.executable, '-c', code, *SCRIPTS], cwd=HERE, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    parts = out.split('=== ')[1:]
    return {p.split('\n', 1)[0]: p.split('\n', 1)[1] for p in parts}


def run_script(name):
    """The stdout of `python name` (see script_outputs)."""
    return script_outputs()[name]


def copy_weights(src, dst):
    """Copy src's parameters and buffers into dst in order, tensor by tensor."""
    src_t = list(src.state_dict().values())
    dst_t = list(dst.state_dict().values())
    assert len(src_t) == len(dst_t)
    with torch.no_grad():
        for s, d in zip(src_t, dst_t):
            assert s.shape == d.shape
            d.copy_(s)


COLOURS = {'blue': (40, 60, 200), 'green': (40, 180, 60), 'red': (200, 40, 40)}


def make_colour_folder(root, n_train=16, n_test=10, size=8, seed=0):
    """An ImageFolder task where the colour is the class, as PNGs with noise."""
    g = torch.Generator().manual_seed(seed)
    for split, n in (('train', n_train), ('test', n_test)):
        for name, rgb in COLOURS.items():
            folder = Path(root, split, name)
            folder.mkdir(parents=True)
            for i in range(n):
                noise = torch.randint(-40, 41, (size, size, 3), generator=g)
                pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f'{i:03d}.png')
    # Grayscale and RGBA images are read too (converted to RGB).
    Image.new('L', (size, size), 90).save(Path(root, 'train', 'blue', 'gray.png'))
    Image.new('RGBA', (size + 4, size), (200, 40, 40, 128)).save(
        Path(root, 'train', 'red', 'rgba.png'))
    return root


class ColourFolderCase(unittest.TestCase):
    """Tests that train: a colour folder for the class (cls.data; 18 train images a class, and
    2 more: 6 held out for validation, 50 to train on), and a scratch folder for each test
    (self.dir, removed after it: a run writes 200 MB)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.data = make_colour_folder(Path(cls.tmp.name, 'colours'), n_train=18)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(dir=self.tmp.name))
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)


def make_mini_cifar(root):
    """A CIFAR-10 of 10 images a split, in torchvision's format, in root/cifar-10-batches-py
    (torchvision's checksums cannot match it: see offline_cifar10)."""
    import pickle
    folder = Path(root, 'cifar-10-batches-py')
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        pixels = torch.randint(0, 256, (10, 3072), generator=g, dtype=torch.uint8).numpy()
        with open(folder / name, 'wb') as f:
            pickle.dump({'data': pixels, 'labels': [i % 10 for i in range(10)]}, f)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': [f'class{i}' for i in range(10)]}, f)


@contextlib.contextmanager
def offline_cifar10(download=AssertionError('a test tried to download CIFAR-10')):
    """No network: CIFAR-10's download does `download` (an exception to raise, None: nothing,
    or a function of the dataset), and make_mini_cifar's files pass its checksums."""
    fake = download if callable(download) else mock.Mock(side_effect=download)
    with mock.patch('torchvision.datasets.cifar.check_integrity', return_value=True), \
            mock.patch.object(torchvision.datasets.CIFAR10, 'download', fake):
        yield


@contextlib.contextmanager
def in_a_folder(folder):
    """Run in `folder`: CIFAR-10 is read from ./data there (config.DATA_ROOT)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def the_epochs(train_epoch=None, valid_epoch=None):
    """Stand in for what a real run cannot be made to do: Ctrl-C, a loss that becomes NaN or
    running out of memory in a chosen epoch, or validation accuracies a test chooses.
    train_epoch(real, trainer, loader) replaces Trainer.epoch_train (it may call the real one),
    valid_epoch Trainer.epoch_valid. Yields a list of what they were given, in order: (the
    method's name, the loader)."""
    seen = []

    def wrap(name, fake):
        real = getattr(train.Trainer, name)

        def epoch(trainer, loader):
            seen.append((name, loader))
            return (fake or (lambda real, *a: real(*a)))(real, trainer, loader)
        return epoch

    with mock.patch.object(train.Trainer, 'epoch_train', wrap('epoch_train', train_epoch)), \
            mock.patch.object(train.Trainer, 'epoch_valid', wrap('epoch_valid', valid_epoch)):
        yield seen


@contextlib.contextmanager
def image_reads():
    """Count the image files opened (PIL's Image.open), in this process: a list that grows."""
    opened, real = [], Image.open

    def counted(*args, **kwargs):
        opened.append(args[0])
        return real(*args, **kwargs)

    with mock.patch.object(Image, 'open', counted):
        yield opened


class FakeClock:
    """The clock that train.py and budget.py read (their time.monotonic and time.perf_counter),
    moved by the test alone: `now` seconds after train.START. With `speed`, it runs that many
    times faster than the real one instead."""

    def __init__(self, now=0.0, speed=None):
        self.now, self.speed, self.started = now, speed, time.monotonic()

    def read(self):
        if self.speed:
            return train.START + (time.monotonic() - self.started) * self.speed
        return train.START + self.now

    def __enter__(self):
        fake = types.SimpleNamespace(monotonic=self.read, perf_counter=self.read)
        self.patches = [mock.patch.object(budget, 'time', fake),
                        mock.patch.object(train, 'time', fake)]
        for patch in self.patches:
            patch.start()
        return self

    def __exit__(self, *exc):
        for patch in self.patches:
            patch.stop()


def train_weights(data, out, image_size, epochs):
    """Train the small-input ResNet18 on a colour folder into out (a fixture); return out."""
    code, _, err = run_main('--data', data, '--image-size', image_size, '--small-input',
                            '--lr', 0.01, '--batch-size', 16, '--epochs', epochs, '--device',
                            'cpu', '--workers', 1, '--out', out)
    assert code == 0, err
    return out


def run_cli(main, *argv):
    """main(argv) of a script (train.py, predict.py) with stdout and stderr captured:
    (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def run_main(*argv):
    """train.main(argv), captured (see run_cli)."""
    return run_cli(train.main, *argv)


class EagerGraphedStep(graphs.GraphedStep):
    """graphs.GraphedStep with its one CUDA-only method stood in for on the CPU: 'recording'
    runs the step eagerly (once more than the warm-up, though a CUDA graph only records that
    pass), and each 'replay' runs it again, reading the lr from the tensors and writing the loss
    and outputs into the recorded ones, as the graph does."""

    def _record(self, step):
        for _ in range(self.warmup + 1):
            step()

        def replay():
            recorded = self.loss, self.outputs
            with self._lr_from_tensors():
                step()
            with torch.no_grad():
                for old, new in zip(recorded, (self.loss, self.outputs)):
                    old.copy_(new)
            self.loss, self.outputs = recorded
        return replay
