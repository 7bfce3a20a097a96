"""Tests for the models, the Trainer and train.py: python -m unittest test_models

Each of the article's bugs has a test here that fails on the article's code (README, "What the
article got wrong"). Everything runs on the CPU, on data the tests make, with no network.
"""
import contextlib
import copy
import csv
import functools
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import unittest
import urllib.error
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torchvision
from PIL import Image

import config
import layers
import train
from alexnet import AlexNet
from resnet import ResNet18, ResNet34, ResNet50, count_parameters

HERE = Path(__file__).resolve().parent
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


SCRIPTS = ('resnet.py', 'alexnet.py')


@functools.lru_cache(maxsize=None)
def script_outputs():
    """Run each of SCRIPTS as __main__, as `python NAME` does, in one fresh interpreter (one
    torch import for all), then `import train`; return {name: stdout}."""
    code = ('import runpy, sys\n'
            'for name in sys.argv[1:]:\n'
            '    print("=== " + name, flush=True)\n'
            '    runpy.run_path(name, run_name="__main__")\n'
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


def blocks_per_stage(model):
    return [1 + len(s.blocks) for s in (model.layer1, model.layer2, model.layer3, model.layer4)]


def copy_weights(src, dst):
    """Copy src's parameters and buffers into dst in order, tensor by tensor."""
    src_t = list(src.state_dict().values())
    dst_t = list(dst.state_dict().values())
    assert len(src_t) == len(dst_t)
    with torch.no_grad():
        for s, d in zip(src_t, dst_t):
            assert s.shape == d.shape
            d.copy_(s)


class TorchvisionEquivalence:
    """Mixin: the model equals torchvision's (parameter shapes, order and outputs)."""
    ours = None
    theirs = None
    size = 64

    def test_same_parameter_shapes_in_order(self):
        ours, theirs = self.ours(10), self.theirs(num_classes=10)
        self.assertEqual([p.shape for p in ours.parameters()],
                         [p.shape for p in theirs.parameters()])

    def test_same_outputs_with_torchvision_weights(self):
        torch.manual_seed(0)
        # float64, so that only a real difference, not rounding, can exceed the tolerance.
        ours = self.ours(10).double().eval()
        theirs = self.theirs(num_classes=10).double().eval()
        # Non-trivial BN statistics, so a mix-up of running mean and var would show.
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        copy_weights(theirs, ours)
        x = torch.randn(2, 3, self.size, self.size, dtype=torch.double)
        with torch.no_grad():
            diff = (ours(x) - theirs(x)).abs().max().item()
        self.assertLess(diff, 1e-10)


class AlexNetTest(unittest.TestCase):

    def test_parameter_count(self):
        self.assertEqual(count_parameters(AlexNet(3, 10)), 58_322_314)

    def test_output_shape_224_and_227(self):
        model = AlexNet(3, 10).eval()
        with torch.no_grad():
            for size in (224, 227):
                self.assertEqual(model(torch.zeros(2, 3, size, size)).shape, (2, 10))

    def test_has_relu_and_dropout(self):
        # Article bug: no non-linearity at all.
        model = AlexNet(3, 10)
        self.assertEqual(sum(isinstance(m, nn.ReLU) for m in model.modules()), 7)
        self.assertEqual(sum(isinstance(m, nn.Dropout) for m in model.modules()), 2)

    def test_returns_logits_not_softmax(self):
        # Article bug: nn.Softmax(dim=0), across the batch, before CrossEntropyLoss.
        torch.manual_seed(0)
        model = AlexNet(3, 10).eval()
        self.assertFalse(any(isinstance(m, nn.Softmax) for m in model.modules()))
        with torch.no_grad():
            out = model(torch.randn(4, 3, 67, 67))
        self.assertFalse(torch.allclose(out.sum(dim=0), torch.ones(10), atol=1e-3))
        self.assertFalse(torch.allclose(out.sum(dim=1), torch.ones(4), atol=1e-3))

    def test_small_input_gets_clear_error(self):
        model = AlexNet(3, 10).eval()
        with torch.no_grad():
            self.assertEqual(model(torch.zeros(1, 3, 67, 67)).shape, (1, 10))
            with self.assertRaisesRegex(ValueError, 'at least 67'):
                model(torch.zeros(1, 3, 32, 32))

    def test_script_prints_shape(self):
        out = run_script('alexnet.py')
        self.assertIn('[16, 3, 227, 227] -> [16, 10]', out)
        self.assertIn('58,322,314', out)


class LayersTest(unittest.TestCase):

    def test_convs_have_no_bias(self):
        self.assertIsNone(layers.conv3x3(8, 8).bias)
        self.assertIsNone(layers.conv1x1(8, 8).bias)

    def test_residual_layer_builds_num_blocks(self):
        # Article bug: first_block plus num_blocks more, so 3 blocks for num_blocks=2.
        for n in (1, 2, 3):
            layer = layers.ResidualLayer(n, 16, 16)
            self.assertEqual(1 + len(layer.blocks), n)

    def test_projection_exactly_when_shape_changes(self):
        # Article bug: the projection had stride 1 and no stage ever downsampled.
        self.assertIsNone(layers.ResidualLayer(2, 16, 16).first_block.downsample)
        for stride, out_ch in ((2, 16), (1, 32), (2, 32)):
            proj = layers.ResidualLayer(2, 16, out_ch, stride=stride).first_block.downsample
            self.assertIsNotNone(proj)
            self.assertEqual(proj[0].stride, (stride, stride))
            self.assertIsInstance(proj[1], nn.BatchNorm2d)
        for block in layers.ResidualLayer(3, 16, 32, stride=2).blocks:
            self.assertIsNone(block.downsample)

    def test_one_pixel_conv_is_the_same_conv(self):
        # Conv2d's CPU route for a 1x1 output (ResNet18's last stage at 32 px) is a matrix
        # product over the window the conv sees: the same outputs and gradients as nn.Conv2d.
        torch.manual_seed(0)
        cases = [  # input px, kernel, stride, padding, whether the route is taken
            (1, 3, 1, 1, True), (2, 3, 2, 1, True), (2, 1, 2, 0, True), (3, 3, 3, 0, True),
            (2, 3, 1, 1, False), (4, 3, 2, 1, False)]
        for px, k, s, p, route in cases:
            for bias, fmt in ((False, torch.channels_last), (True, torch.contiguous_format)):
                with self.subTest(px=px, kernel=k, stride=s, bias=bias):
                    ref = nn.Conv2d(6, 5, k, s, p, bias=bias).double()
                    ours = layers.Conv2d(6, 5, k, s, p, bias=bias).double()
                    ours.load_state_dict(ref.state_dict())
                    x = torch.randn(4, 6, px, px, dtype=torch.double)
                    x = x.contiguous(memory_format=fmt)
                    self.assertEqual(ours.one_pixel_out(x), route)
                    results, grad_out = [], None
                    for conv in (ref, ours):
                        xi = x.clone().requires_grad_()
                        out = conv(xi)
                        grad_out = torch.randn_like(out) if grad_out is None else grad_out
                        out.backward(grad_out)
                        results.append([out, xi.grad] + [w.grad for w in conv.parameters()])
                    for a, b in zip(*results):
                        self.assertEqual(a.shape, b.shape)
                        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    def test_stride_halves_the_feature_map(self):
        layer = layers.ResidualLayer(2, 16, 32, stride=2)
        self.assertEqual(layer(torch.zeros(2, 16, 8, 8)).shape, (2, 32, 4, 4))

    def test_bottleneck(self):
        layer = layers.ResidualLayer(3, 64, 256, block=layers.Bottleneck)
        first = layer.first_block
        self.assertEqual([first.conv1.kernel_size, first.conv2.kernel_size,
                          first.conv3.kernel_size], [(1, 1), (3, 3), (1, 1)])
        self.assertEqual(first.conv2.out_channels, 64)  # width = out_channels / expansion
        self.assertEqual(layer(torch.zeros(1, 64, 8, 8)).shape, (1, 256, 8, 8))
        down = layers.ResidualLayer(1, 256, 512, block=layers.Bottleneck, stride=2)
        self.assertEqual(down.first_block.conv2.stride, (2, 2))
        self.assertEqual(down(torch.zeros(1, 256, 8, 8)).shape, (1, 512, 4, 4))


class ResNet18Test(TorchvisionEquivalence, unittest.TestCase):
    ours = ResNet18
    theirs = staticmethod(torchvision.models.resnet18)
    size = 224

    def test_parameter_count(self):
        self.assertEqual(count_parameters(ResNet18(10)), 11_181_642)
        self.assertEqual(count_parameters(ResNet18(10, small_input=True)), 11_173_962)

    def test_two_blocks_per_stage(self):
        self.assertEqual(blocks_per_stage(ResNet18(10)), [2, 2, 2, 2])

    def test_last_stage_at_32px_is_matrix_products_with_torchvisions_gradients(self):
        # At 32 px every conv of layer4 has a 1x1 output and takes Conv2d's CPU route.
        torch.manual_seed(0)
        # float64: with BatchNorm over 4 samples of 1x1 maps, float32 rounding would show.
        ours, theirs = ResNet18(10).double(), torchvision.models.resnet18(num_classes=10).double()
        copy_weights(theirs, ours)
        routed = []

        def note_route(conv, args):
            if conv.one_pixel_out(args[0]):
                routed.append(names[conv])

        names = {m: name for name, m in ours.named_modules() if isinstance(m, layers.Conv2d)}
        for conv in names:
            conv.register_forward_pre_hook(note_route)
        x, y = torch.randn(4, 3, 32, 32, dtype=torch.double), torch.tensor([0, 1, 2, 3])
        for model in (ours, theirs):
            model = model.to(memory_format=torch.channels_last)
            nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)),
                                        y).backward()
        self.assertEqual(sorted(routed), [
            'layer4.blocks.0.conv1', 'layer4.blocks.0.conv2', 'layer4.first_block.conv1',
            'layer4.first_block.conv2', 'layer4.first_block.downsample.0'])
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-9)

    def test_feature_maps_halve_each_stage(self):
        model = ResNet18(10).eval()
        sizes = []
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
        with torch.no_grad():
            model(torch.zeros(1, 3, 224, 224))
        self.assertEqual(sizes, [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)])

    def test_output_shapes(self):
        model = ResNet18(10).eval()
        with torch.no_grad():
            for size in (32, 224, 227):
                self.assertEqual(model(torch.zeros(2, 3, size, size)).shape, (2, 10))

    def test_torchvision_initialisation(self):
        torch.manual_seed(0)
        model = ResNet18(10)
        w = model.layer3.first_block.conv1.weight  # 256 out, 3x3: fan_out = 256 * 9
        self.assertAlmostEqual(w.std().item(), math.sqrt(2 / (256 * 9)), delta=0.002)
        self.assertAlmostEqual(model.conv1.weight.std().item(), math.sqrt(2 / (64 * 49)),
                               delta=0.005)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                self.assertTrue(torch.all(m.weight == 1) and torch.all(m.bias == 0))

    def test_backward_reaches_conv1(self):
        model = ResNet18(10)
        loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
        loss.backward()
        self.assertGreater(model.conv1.weight.grad.abs().sum().item(), 0)

    def test_small_input_stem(self):
        model = ResNet18(10, small_input=True).eval()
        self.assertEqual((model.conv1.kernel_size, model.conv1.stride), ((3, 3), (1, 1)))
        self.assertIsInstance(model.maxpool, nn.Identity)
        sizes = []
        model.layer1.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
        with torch.no_grad():
            self.assertEqual(model(torch.zeros(2, 3, 32, 32)).shape, (2, 10))
        self.assertEqual(sizes, [32])

    def test_script_runs_and_prints_shape(self):
        # Article bug: `from . import layers` fails under `python resnet.py`.
        out = run_script('resnet.py')
        self.assertIn('[16, 3, 224, 224] -> [16, 10]', out)
        self.assertIn('11,181,642', out)


class ResNet34Test(TorchvisionEquivalence, unittest.TestCase):
    ours = ResNet34
    theirs = staticmethod(torchvision.models.resnet34)

    def test_parameter_count_and_blocks(self):
        model = ResNet34(10)
        self.assertEqual(count_parameters(model), 21_289_802)
        self.assertEqual(blocks_per_stage(model), [3, 4, 6, 3])


class ResNet50Test(TorchvisionEquivalence, unittest.TestCase):
    ours = ResNet50
    theirs = staticmethod(torchvision.models.resnet50)
    size = 32  # layer4 at 1x1: its convs take layers.Conv2d's CPU route

    def test_parameter_count_and_blocks(self):
        model = ResNet50(10)
        self.assertEqual(count_parameters(model), 23_528_522)
        self.assertIsInstance(model.layer1.first_block, layers.Bottleneck)
        self.assertEqual(blocks_per_stage(model), [3, 4, 6, 3])


# ----------------------------------------------------------------------------------------------
# train.py

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


def run_main(*argv):
    """train.main(argv) with stdout and stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = train.main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


class EagerGraphedStep(train.GraphedStep):
    """train.GraphedStep with its one CUDA-only method stood in for on the CPU: 'recording'
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


class TrainTest(unittest.TestCase):
    """train.py end to end on a small generated image folder, on the CPU."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.data = make_colour_folder(Path(cls.tmp.name, 'colours'))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(dir=self.tmp.name))
        self.out = self.dir / 'weight.pth'

    def train(self, *extra, out=None):
        # 8 px colour patches: the small-input stem, a low lr and 2 epochs of 3 steps learn
        # them on any seed tried.
        return run_main('--data', self.data, '--image-size', 8, '--small-input', '--lr', 0.01,
                        '--batch-size', 16, '--epochs', 2, '--device', 'cpu', '--workers', 1,
                        '--out', out or self.out, *extra)

    def test_learns_colour_task_and_writes_its_files(self):
        real_open = Image.open
        with mock.patch.object(Image, 'open', side_effect=real_open) as opened:
            code, out, err = self.train()  # --workers 1: decoded in this process
        self.assertEqual(code, 0, err)
        # The article ran every image through PIL (Resize + ToTensor) in every epoch.
        n_images = sum(1 for _ in Path(self.data).rglob('*.png'))
        self.assertEqual(opened.call_count, n_images + 1)  # + 1: the size probe
        # The article printed {num_epochs}, undefined: NameError in the first epoch.
        self.assertIn('epoch 1/2', out)
        meta = json.loads(self.out.with_suffix('.json').read_text())
        self.assertGreater(meta['best_acc'], 80)  # chance is 33%
        last = out.strip().splitlines()[-1]
        self.assertRegex(last, r'best .*\d\d\.\d\d% .*epoch \d')
        self.assertIn(str(self.out), last)
        self.assertIn('per-class accuracy', out)
        self.assertRegex(out, r'\nseconds: loading data [\d.]+, training [\d.]+, '
                              r'evaluating [\d.]+, saving [\d.]+\n')
        # A plain state_dict that the article's model loads as the article implies.
        model = ResNet18(3, small_input=True)
        model.load_state_dict(torch.load(self.out, weights_only=True))
        self.assertEqual(meta['classes'], sorted(COLOURS))
        self.assertEqual(len(meta['mean']), 3)
        self.assertEqual(self.out.with_suffix('.csv').read_text().count('\n'), 3)
        self.assertTrue(self.out.with_suffix('.ckpt').is_file())
        self.assertEqual(list(self.dir.glob('*.tmp')), [])

    def test_best_weights_are_a_copy(self):
        # The article kept trainer.params (a live state_dict), so it saved the last epoch.
        accs = iter([60.0, 40.0])
        states = []
        real_valid = train.Trainer.epoch_valid

        def fake_valid(trainer, loader):
            loss, _ = real_valid(trainer, loader)
            states.append({k: v.clone() for k, v in trainer.params.items()})
            return loss, next(accs)

        with mock.patch.object(train.Trainer, 'epoch_valid', fake_valid):
            code, out, err = self.train()
        self.assertEqual(code, 0, err)
        saved = torch.load(self.out, weights_only=True)
        key = 'layer4.blocks.0.conv2.weight'
        self.assertTrue(torch.equal(saved[key], states[0][key]))
        self.assertFalse(torch.equal(saved[key], states[1][key]))
        self.assertIn('best valid accuracy 60.00% at epoch 1', out)

    def test_starts_without_torchvision(self):
        # Importing torchvision costs about 3 s on 2 cores; train.py needs it for CIFAR-10 only.
        self.assertEqual(run_script('import train').strip(), '')
        # The extensions it lists instead are torchvision's ImageFolder's.
        self.assertEqual(set(train.IMG_EXTENSIONS),
                         set(torchvision.datasets.folder.IMG_EXTENSIONS))

    def test_whole_step_graph_trains_as_the_plain_step(self):
        # The recorded step must train exactly as Trainer.train_step: its warm-up leaves no
        # trace (weights, BatchNorm statistics, momentum) and each replay takes the current lr.
        # A small network with each kind of state is enough (train.py's test runs a ResNet).
        def trainer():
            torch.manual_seed(0)
            model = nn.Sequential(layers.conv3x3(3, 8), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double()
            optimizer = train.build_optimizer(model, 0.02, torch.device('cpu'))
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.warmup_linear(4, 0.5))
            return train.Trainer(model, optimizer, train.build_criterion(), scheduler=scheduler)

        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64),
                    torch.randint(0, 3, (4,), generator=g)) for _ in range(4)]
        for resumed in (False, True):  # recorded before any step, or with momentum already
            plain, graphed = trainer(), trainer()
            start = 1 if resumed else 0
            for t in (plain, graphed):
                for inputs, targets in batches[:start]:
                    t.train_step(inputs, targets)
                    t.scheduler.step()
            graphed.graphed_step = EagerGraphedStep(graphed, *batches[start], warmup=2)
            for inputs, targets in batches[start:]:
                loss, outputs = plain.train_step(inputs, targets)
                plain.scheduler.step()
                g_loss, g_outputs = graphed.graphed_step(inputs, targets)
                graphed.scheduler.step()
                self.assertEqual(g_loss.item(), loss.item())
                self.assertTrue(torch.equal(g_outputs, outputs))
            for (k, v), w in zip(plain.model.state_dict().items(),
                                 graphed.model.state_dict().values()):
                self.assertTrue(torch.equal(v, w), (resumed, k))
            for p, q in zip(plain.model.parameters(), graphed.model.parameters()):
                self.assertTrue(torch.equal(plain.optimizer.state[p]['momentum_buffer'],
                                            graphed.optimizer.state[q]['momentum_buffer']))
            self.assertIsInstance(graphed.optimizer.param_groups[0]['lr'], float)

    def test_cuda_graphs_are_recorded_once_on_a_full_train_batch(self):
        # CUDA graphs hold fixed input buffers, so the sample must be a train batch (all are
        # full), recorded in train mode: the graphs replay only in the mode they were made in.
        # With --no-graph-whole-step, the model's graphs (graph_model, a no-op stand-in here:
        # that run trains plainly)...
        calls = []

        def record(model, sample, amp_dtype):
            calls.append((model.training, tuple(sample.shape), amp_dtype))

        with mock.patch.object(train, 'use_cuda_graphs', return_value=True), \
                mock.patch.object(train, 'graph_model', side_effect=record):
            code, out, err = self.train('--epochs', 1, '--no-graph-whole-step',
                                        out=self.dir / 'plain' / 'weight.pth')
        self.assertEqual(code, 0, err)
        self.assertEqual(calls, [(True, (16, 3, 8, 8), None)])
        self.assertIn('cpu, the model as CUDA graphs, 1 epoch of 3 batches of 16', out)
        self.assertRegex(out, r'seconds: loading data [\d.]+, recording CUDA graphs [\d.]+, ')

        # ... or, by default, the whole step (GraphedStep's CPU stand-in), which must train as
        # that plain run did.
        replays = []

        class Counted(EagerGraphedStep):
            def __call__(self, inputs, targets):
                replays.append(len(inputs))
                return super().__call__(inputs, targets)

        with mock.patch.object(train, 'use_cuda_graphs', return_value=True), \
                mock.patch.object(train, 'graph_model', side_effect=AssertionError), \
                mock.patch.object(train, 'GraphedStep', Counted):
            code, out, err = self.train('--epochs', 1, out=self.dir / 'step' / 'weight.pth')
        self.assertEqual(code, 0, err)
        self.assertEqual(replays, [16, 16, 16])  # every train batch, through the graph
        self.assertIn('cpu, the whole step as a CUDA graph, 1 epoch of 3 batches of 16', out)
        self.assertRegex(out, r'seconds: loading data [\d.]+, recording CUDA graphs [\d.]+, ')
        plain = torch.load(self.dir / 'plain' / 'weight.ckpt', weights_only=True)
        step = torch.load(self.dir / 'step' / 'weight.ckpt', weights_only=True)
        for k, v in plain['model'].items():  # the lr is a float32 tensor in the graph
            self.assertTrue(torch.allclose(v.float(), step['model'][k].float(), atol=1e-6), k)
        self.assertEqual(plain['history'][0]['train_loss'], step['history'][0]['train_loss'])
        self.assertIsInstance(step['optimizer']['param_groups'][0]['lr'], float)

    def test_defaults_that_depend_on_other_arguments(self):
        # --small-input trains at batch 256 (README, Results), the ImageNet stem at 512; an
        # explicit --batch-size wins either way.
        self.assertEqual(train.parse_args([]).batch_size, config.BATCH_SIZE)
        self.assertEqual(train.parse_args(['--small-input']).batch_size,
                         config.SMALL_INPUT_BATCH_SIZE)
        self.assertEqual(config.SMALL_INPUT_BATCH_SIZE, 256)
        self.assertEqual(train.parse_args(['--small-input', '--batch-size', '512']).batch_size,
                         512)
        # On CUDA the whole step is graphed unless --no-graph-whole-step, and --no-cuda-graphs
        # alone turns every graph off, the whole step's too, with no complaint.
        self.assertTrue(train.parse_args([]).graph_whole_step)
        self.assertFalse(train.parse_args(['--no-graph-whole-step']).graph_whole_step)
        args = train.parse_args(['--no-cuda-graphs'])
        self.assertFalse(args.graph_whole_step)
        train.check_args(args)

    def test_cuda_graphs_only_for_resnets_on_cuda(self):
        cuda, cpu = torch.device('cuda'), torch.device('cpu')
        self.assertTrue(train.use_cuda_graphs(train.parse_args([]), cuda))
        self.assertFalse(train.use_cuda_graphs(train.parse_args([]), cpu))
        self.assertFalse(train.use_cuda_graphs(train.parse_args(['--no-cuda-graphs']), cuda))
        self.assertFalse(train.use_cuda_graphs(train.parse_args(['--model', 'alexnet']), cuda))

    def test_validation_runs_without_autograd(self):
        model = ResNet18(3)
        seen = []
        model.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
        trainer = train.Trainer(model, None, nn.CrossEntropyLoss())
        images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
        loader = train.TensorLoader(images, torch.arange(8) % 3, 4, [0.5] * 3, [0.25] * 3, 16,
                                    train=False)
        loss, acc = trainer.epoch_valid(loader)
        self.assertEqual(seen, [False, False])
        self.assertTrue(math.isfinite(loss) and 0 <= acc <= 100)
        self.assertEqual(len(trainer.class_accuracy), 3)

    def test_fp32_asks_for_no_autocast(self):
        # fp32 (CPU, Apple's mps) runs without torch.autocast: before torch 2.5 even a disabled
        # autocast raised "unsupported autocast device_type 'mps'".
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = train.Trainer(model, optimizer, nn.CrossEntropyLoss())
        self.assertIsNone(trainer.amp_dtype)
        images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
        loader = train.TensorLoader(images, torch.arange(8) % 3, 4, [0.5] * 3, [0.25] * 3, 4,
                                    train=False)
        refused = RuntimeError("User specified an unsupported autocast device_type 'mps'")
        with mock.patch.object(torch, 'autocast', side_effect=refused):
            trainer.epoch_train(loader)
            trainer.epoch_valid(loader)

    def test_valid_loss_is_the_mean_over_samples(self):
        # The article divided the sum of batch means by the number of batches, which weights
        # the images of a short last batch more.
        torch.manual_seed(0)
        model = ResNet18(3, small_input=True).eval()
        trainer = train.Trainer(model, None, nn.CrossEntropyLoss())
        images = torch.randint(0, 256, (9, 3, 8, 8), dtype=torch.uint8)
        labels = torch.arange(9) % 3
        loader = train.TensorLoader(images, labels, 4, [0.5] * 3, [0.25] * 3, 8, train=False)
        loss, _ = trainer.epoch_valid(loader)  # batches of 4, 4 and 1
        with torch.no_grad():
            inputs = torch.cat([x for x, _ in loader])
            expected = nn.functional.cross_entropy(model(inputs), labels).item()
        self.assertAlmostEqual(loss, expected, places=5)

    def test_train_loss_and_accuracy_are_over_samples(self):
        # As in validation, the article's mean of batch means over-weighted a short batch.
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay put
        trainer = train.Trainer(model, optimizer, nn.CrossEntropyLoss())
        inputs, labels = torch.randn(9, 3, 2, 2), torch.arange(9) % 3
        batches = [(inputs[i:i + 4], labels[i:i + 4]) for i in (0, 4, 8)]  # 4, 4 and 1
        loss, acc = trainer.epoch_train(batches)
        with torch.no_grad():
            outputs = model(inputs)
        self.assertAlmostEqual(loss, nn.functional.cross_entropy(outputs, labels).item(),
                               places=5)
        self.assertAlmostEqual(acc, 100 * (outputs.argmax(1) == labels).sum().item() / 9)

    def test_resume_gives_the_same_result(self):
        code, _, err = self.train('--save-every', 0, out=self.dir / 'a' / 'weight.pth')
        self.assertEqual(code, 0, err)
        # Ctrl-C in the second epoch, then --resume.
        calls = []
        real_train = train.Trainer.epoch_train

        def interrupted(trainer, loader):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real_train(trainer, loader)

        b = self.dir / 'b' / 'weight.pth'
        with mock.patch.object(train.Trainer, 'epoch_train', interrupted):
            code, _, err = self.train('--save-every', 0, out=b)
        self.assertEqual(code, 130)
        self.assertIn('--resume', err)
        self.assertTrue(b.is_file())  # the best weights so far are kept
        code, out, err = self.train('--save-every', 0, '--resume', out=b)
        self.assertEqual(code, 0, err)
        self.assertIn('resuming from epoch 1', out)
        done_a = torch.load(self.dir / 'a' / 'weight.ckpt', weights_only=True)
        done_b = torch.load(b.with_suffix('.ckpt'), weights_only=True)
        for k, v in done_a['model'].items():
            self.assertTrue(torch.allclose(v.float(), done_b['model'][k].float(), atol=1e-6), k)
        self.assertEqual(done_a['history'][-1]['valid_acc'], done_b['history'][-1]['valid_acc'])

    def test_unreadable_checkpoint_or_metadata_stops_and_keeps_the_weights(self):
        code, _, err = self.train('--epochs', 1)
        self.assertEqual(code, 0, err)
        ckpt, meta = self.out.with_suffix('.ckpt'), self.out.with_suffix('.json')
        weights = self.out.read_bytes()
        good_ckpt = ckpt.read_bytes()
        code, out, err = self.train('--epochs', 1, '--resume')
        self.assertEqual(code, 0, err)
        self.assertIn('already finished (epoch 1 of 1)', out)
        code, _, err = self.train('--resume')  # 2 epochs: not the run the checkpoint is from
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('another run (--epochs 1 --batch-size 16 --model resnet18 --small-input',
                      err)
        # A truncated checkpoint, and one that is a readable file of something else.
        for bad in (good_ckpt[:2000], None):
            if bad is None:
                torch.save({'model': {}}, ckpt)
            else:
                ckpt.write_bytes(bad)
            code, out, err = self.train('--resume')
            self.assertEqual((code, err.count('\n')), (2, 1), err)
            self.assertIn('not a readable checkpoint', err)
            self.assertNotIn('decoding', out)  # it fails before reading the data
            self.assertEqual(self.out.read_bytes(), weights)
        # Weights whose .json is gone: what they are is unknown, so they are not touched.
        ckpt.write_bytes(good_ckpt)
        meta.unlink()
        code, _, err = self.train()
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('missing or unreadable', err)
        self.assertEqual(self.out.read_bytes(), weights)

    def test_sgd_is_fused_on_cuda_and_resume_keeps_the_devices_choice(self):
        model = nn.Linear(3, 2)
        on_cpu = train.build_optimizer(model, 0.1, torch.device('cpu'))
        self.assertIsNone(on_cpu.defaults['fused'])  # PyTorch's default (foreach on CUDA)
        self.assertTrue(train.build_optimizer(model, 0.1, torch.device('cuda')).defaults['fused'])
        self.assertEqual({k: on_cpu.defaults[k] for k in ('momentum', 'nesterov', 'weight_decay')},
                         {'momentum': config.MOMENTUM, 'nesterov': True,
                          'weight_decay': config.WEIGHT_DECAY})
        # A checkpoint written on CUDA (fused), resumed on the CPU: its momentum, the CPU's SGD.
        model(torch.randn(4, 3)).sum().backward()
        on_cpu.step()
        state = on_cpu.state_dict()
        state['param_groups'][0]['fused'] = True
        resumed = train.build_optimizer(model, 0.1, torch.device('cpu'))
        train.load_optimizer_state(resumed, copy.deepcopy(state))
        self.assertIsNone(resumed.param_groups[0]['fused'])
        self.assertTrue(torch.equal(resumed.state[model.weight]['momentum_buffer'],
                                    on_cpu.state[model.weight]['momentum_buffer']))
        plain = train.build_optimizer(model, 0.1, torch.device('cpu'))
        plain.load_state_dict(copy.deepcopy(state))
        self.assertTrue(plain.param_groups[0]['fused'])  # what the helper undoes

    def test_nan_loss_stops_and_keeps_weights(self):
        results = iter([None, (float('nan'), 0.0)])
        real_train = train.Trainer.epoch_train

        def nan_in_epoch_2(trainer, loader):
            r = next(results)
            return real_train(trainer, loader) if r is None else r

        with mock.patch.object(train.Trainer, 'epoch_train', nan_in_epoch_2):
            code, _, err = self.train()
        self.assertEqual(code, 1)
        self.assertIn('lower --lr', err)
        self.assertEqual(json.loads(self.out.with_suffix('.json').read_text())['best_epoch'], 1)
        ResNet18(3, small_input=True).load_state_dict(torch.load(self.out, weights_only=True))

    def test_eval_round_trip_and_bad_weight_files(self):
        code, _, err = self.train()
        self.assertEqual(code, 0, err)
        best = json.loads(self.out.with_suffix('.json').read_text())['best_acc']
        code, out, err = run_main('--eval', self.out, '--data', self.data, '--device', 'cpu',
                                  '--workers', 1)
        self.assertEqual(code, 0, err)
        self.assertIn(f'test accuracy {best:.2f}%', out)
        self.assertIn('per-class accuracy', out)
        # The loss is the one the training log printed for that epoch (label smoothing too).
        meta = json.loads(self.out.with_suffix('.json').read_text())
        with open(self.out.with_suffix('.csv')) as f:
            logged = next(float(row['valid_loss']) for row in csv.DictReader(f)
                          if int(row['epoch']) == meta['best_epoch'])
        printed = float(re.search(r'loss (\d+\.\d+)\)', out).group(1))
        self.assertAlmostEqual(printed, logged, delta=0.0006)

        code, _, err = run_main('--eval', self.dir / 'missing.pth', '--data', self.data)
        self.assertEqual((code, err.count('\n')), (2, 1))
        self.assertIn('no weight file', err)

        corrupt = self.dir / 'corrupt.pth'
        corrupt.write_bytes(self.out.read_bytes()[:1000])
        code, _, err = run_main('--eval', corrupt, '--data', self.data)
        self.assertEqual((code, err.count('\n')), (2, 1))
        self.assertIn('not a readable weight file', err)

        other = self.dir / 'other.pth'
        torch.save(ResNet34(3).state_dict(), other)  # no .json: --model resnet18 assumed
        code, _, err = run_main('--eval', other, '--data', self.data, '--image-size', 8)
        self.assertEqual((code, err.count('\n')), (2, 1))
        self.assertIn('does not fit resnet18', err)

    def test_atomic_save_keeps_the_old_file(self):
        path = self.dir / 'w.pth'
        train.save_torch({'a': torch.ones(3)}, path)

        def broken_save(obj, f):
            f.write(b'half a file')
            raise OSError('disk full')

        with mock.patch.object(torch, 'save', broken_save):
            with self.assertRaises(OSError):
                train.save_torch({'a': torch.zeros(3)}, path)
        self.assertTrue(torch.equal(torch.load(path, weights_only=True)['a'], torch.ones(3)))
        self.assertEqual([p.name for p in self.dir.iterdir()], ['w.pth'])

    def test_plot_is_optional(self):
        history = [{'epoch': e, 'train_loss': 1 / e, 'train_acc': 50 + e, 'valid_loss': 1 / e,
                    'valid_acc': 40 + e} for e in (1, 2, 3)]
        with mock.patch.dict(sys.modules, {'matplotlib': None}):  # not installed
            train.save_plot(history, self.dir / 'none.png')
        self.assertFalse((self.dir / 'none.png').exists())
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.skipTest('matplotlib is not installed')
        train.save_plot(history, self.dir / 'plot.png')
        self.assertEqual((self.dir / 'plot.png').read_bytes()[:8], b'\x89PNG\r\n\x1a\n')

    def test_better_weights_are_not_replaced(self):
        code, _, err = self.train()
        self.assertEqual(code, 0, err)
        meta_path = self.out.with_suffix('.json')
        meta = json.loads(meta_path.read_text())
        meta['best_acc'] = 100.0
        meta_path.write_text(json.dumps(meta))
        before = self.out.read_bytes()
        code, out, err = self.train()
        self.assertEqual(code, 0, err)
        self.assertEqual(self.out.read_bytes(), before)
        self.assertIn('kept', out.splitlines()[-1])
        # Weights of another setup are not compared; the run refuses to touch them.
        code, _, err = self.train('--model', 'resnet34')
        self.assertEqual((code, err.count('\n')), (2, 1))
        self.assertEqual(self.out.read_bytes(), before)


class TrainInputTest(unittest.TestCase):
    """Bad arguments and bad data: one sentence, exit code 2, no traceback."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)
        # No test downloads: a test that reached CIFAR-10's download by mistake fails here.
        no_download = mock.patch.object(torchvision.datasets.CIFAR10, 'download',
                                        side_effect=AssertionError('a test tried to download'))
        no_download.start()
        self.addCleanup(no_download.stop)

    def tearDown(self):
        self.tmp.cleanup()

    def assertFails(self, argv, text):
        code, _, err = run_main('--out', self.root / 'w.pth', '--device', 'cpu', '--workers', 1,
                                '--data-root', self.root, *argv)
        self.assertEqual(code, 2, err)
        self.assertIn(text, err)
        self.assertNotIn('Traceback', err)
        self.assertFalse((self.root / 'w.pth').exists())

    def test_bad_numbers(self):
        for flag in ('--epochs', '--batch-size', '--lr'):
            for value in ('0', '-1'):
                self.assertFails([flag, value], 'must be positive')
        self.assertFails(['--epochs', 'ten'], 'not a number')

    def test_contradicting_options(self):
        self.assertFails(['--graph-whole-step', '--no-cuda-graphs'], 'pick one')

    def test_image_too_small_for_alexnet(self):
        self.assertFails(['--model', 'alexnet', '--image-size', '32'], 'at least 67 px')

    def test_missing_and_empty_data_folders(self):
        self.assertFails(['--data', self.root / 'nowhere'], 'does not exist')
        self.assertFails(['--data', self.root], 'needs a train/')
        (self.root / 'train').mkdir()
        (self.root / 'test').mkdir()
        self.assertFails(['--data', self.root], 'no class folders')
        (self.root / 'train' / 'cat').mkdir()
        (self.root / 'test' / 'cat').mkdir()
        self.assertFails(['--data', self.root], 'holds no images')
        Image.new('RGB', (8, 8)).save(self.root / 'train' / 'cat' / 'a.png')
        Image.new('RGB', (8, 8)).save(self.root / 'test' / 'cat' / 'a.png')
        (self.root / 'train' / 'dog').mkdir()
        (self.root / 'test' / 'dog').mkdir()
        self.assertFails(['--data', self.root], f"{Path(self.root, 'train', 'dog')} holds no")

    def test_class_sets_differ(self):
        data = make_colour_folder(self.root / 'd', n_train=1, n_test=1)
        os.rename(data / 'test', data / 'val')  # no test/: val/ is used instead
        os.rename(data / 'val' / 'red', data / 'val' / 'orange')
        self.assertFails(['--data', data], "only in train: ['red'], only in test: ['orange']")

    def test_unreadable_image_is_named(self):
        data = make_colour_folder(self.root / 'd', n_train=1, n_test=1)
        (data / 'train' / 'red' / 'broken.png').write_bytes(b'not a png')
        self.assertFails(['--data', data], 'broken.png is not a readable image')

    def test_cifar10_path_trains(self):
        # The default data path, on a miniature CIFAR-10 in torchvision's format (the real one
        # is downloaded; its checksums cannot match this one, so that check is skipped).
        import pickle
        folder = self.root / 'cifar-10-batches-py'
        folder.mkdir()
        g = torch.Generator().manual_seed(0)
        for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
            labels = [i % 10 for i in range(10)]
            data = torch.randint(0, 256, (10, 3072), generator=g, dtype=torch.uint8).numpy()
            with open(folder / name, 'wb') as f:
                pickle.dump({'data': data, 'labels': labels}, f)
        with open(folder / 'batches.meta', 'wb') as f:
            pickle.dump({'label_names': [f'class{i}' for i in range(10)]}, f)
        with mock.patch('torchvision.datasets.cifar.check_integrity', return_value=True), \
                mock.patch.object(torchvision.datasets.CIFAR10, 'download'):
            code, out, err = run_main('--data-root', self.root, '--epochs', 1, '--batch-size', 25,
                                      '--out', self.root / 'w.pth', '--device', 'cpu')
        self.assertEqual(code, 0, err)
        self.assertIn('50 train and 10 test images, 10 classes', out)
        self.assertEqual(json.loads((self.root / 'w.json').read_text())['data'], 'cifar10')

    def test_offline_download_says_what_to_do(self):
        offline = urllib.error.URLError('network is unreachable')
        with mock.patch.object(torchvision.datasets.CIFAR10, 'download', side_effect=offline):
            self.assertFails([], 'cifar-10-python.tar.gz')

    @unittest.skipIf(torch.cuda.is_available(), 'this machine has a CUDA GPU')
    def test_cuda_asked_for_but_missing(self):
        self.assertFails(['--device', 'cuda'], 'sees no CUDA GPU')

    def test_resume_without_checkpoint(self):
        self.assertFails(['--resume'], 'nothing to resume')


class DataPathTest(unittest.TestCase):
    """The tensor data path that replaces the article's per-image PIL transforms."""

    def test_channel_stats_is_the_std_over_all_pixels(self):
        # Images of different brightness: the mean of per-image stds (how 0.2023 came about for
        # CIFAR-10) is far below the true per-channel std, which channel_stats returns.
        g = torch.Generator().manual_seed(0)
        base = torch.randint(0, 200, (64, 1, 1, 1), generator=g)
        images = (base + torch.randint(0, 56, (64, 3, 8, 8), generator=g)).to(torch.uint8)
        mean, std = train.channel_stats(images, chunk=10)
        x = images.double() / 255
        true_std = x.transpose(0, 1).reshape(3, -1).std(dim=1, unbiased=False)
        per_image = x.std(dim=(2, 3), unbiased=False).mean(dim=0)
        for c in range(3):
            self.assertAlmostEqual(std[c], true_std[c].item(), places=6)
            self.assertAlmostEqual(mean[c], x[:, c].mean().item(), places=6)
            self.assertGreater(std[c], 2 * per_image[c].item())

    def test_decode_keeps_file_order_across_chunks_and_workers(self):
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for i in range(7):  # image i is filled with the value 10 * i
                files.append(str(Path(tmp, f'{i}.png')))
                Image.new('RGB', (4, 4), (10 * i,) * 3).save(files[-1])
            Image.new('L', (6, 4), 200).save(files[3])  # grayscale and not square
            images = train.decode_images(files, 4, workers=2, chunk=3)
            self.assertEqual(images.shape, (7, 3, 4, 4))
            self.assertEqual(images.dtype, torch.uint8)
            expected = [10 * i for i in range(7)]
            expected[3] = 200
            self.assertEqual(images[:, :, 1, 1].tolist(), [[v] * 3 for v in expected])
            Path(files[5]).write_bytes(b'not a png')  # in the second of three chunks
            with self.assertRaisesRegex(train.UsageError, '5.png is not a readable image'):
                train.decode_images(files, 4, workers=2, chunk=3)

    def test_batches_are_normalised_and_augmented(self):
        # The article fed raw [0, 1] pixels with no augmentation.
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
        mean, std = train.channel_stats(images)
        loader = train.TensorLoader(images, torch.zeros(64, dtype=torch.long), 64, mean, std, 8,
                                    train=False)
        x, _ = next(iter(loader))
        for c in range(3):
            self.assertAlmostEqual(x[:, c].mean().item(), 0, places=4)
            self.assertAlmostEqual(x[:, c].std(unbiased=False).item(), 1, places=3)

        loader.train = True
        loader.set_epoch(1)
        a, _ = next(iter(loader))
        a_again, _ = next(iter(loader))
        loader.set_epoch(2)
        b, _ = next(iter(loader))
        self.assertTrue(torch.equal(a, a_again))  # same seed and epoch, same batch
        self.assertFalse(torch.equal(a, b))

    def test_crop_and_flip(self):
        images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
        loader = train.TensorLoader(images, torch.zeros(4, dtype=torch.long), 4, [0] * 3,
                                    [1] * 3, 8, train=True, padding=4)
        idx = torch.arange(4)
        centre = torch.full((4, 2), 4)
        no, yes = torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)

        def crop(shift, flip):
            return loader._gather(idx, *loader._crop_windows(shift, flip))
        self.assertTrue(torch.equal(crop(centre, no), images))
        self.assertTrue(torch.equal(crop(centre, yes), images.flip(3)))
        padded = nn.functional.pad(images.float(), (4, 4, 4, 4), mode='reflect')
        corner = torch.tensor([[0, 8]] * 4)  # top rows, right-most columns
        self.assertTrue(torch.equal(crop(corner, no).float(), padded[:, :, 0:8, 8:16]))

    def test_each_image_once_an_epoch_with_its_label(self):
        # Every train sample must be a reflect-padded crop (flipped or not) of the image its
        # label belongs to, and every image must come once an epoch: here label i is image i.
        n, p = 12, 2
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
        loader = train.TensorLoader(images, torch.arange(n), 4, [0] * 3, [1 / 255] * 3, 8,
                                    train=True, padding=p)
        padded = nn.functional.pad(images.float(), (p, p, p, p), mode='reflect')
        crops = [[padded[i, :, r:r + 8, c:c + 8] for r in range(2 * p + 1)
                  for c in range(2 * p + 1)] for i in range(n)]
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            seen = []
            for x, y in loader:
                for sample, label in zip(x, y.tolist()):
                    seen.append(label)
                    self.assertTrue(any(torch.equal(sample, c) or torch.equal(sample, c.flip(2))
                                        for c in crops[label]), f'sample of image {label}')
            self.assertEqual(sorted(seen), list(range(n)))

    def test_a_train_batch_is_one_gather_and_a_normalise(self):
        # Crop windows and labels are worked out once an epoch. Per batch this leaves four
        # kernels (gather, to float, multiply, subtract); on a GPU at 32 px each launch costs
        # about what its work does, and working out the windows per batch took 23.
        from torch.utils._python_dispatch import TorchDispatchMode

        class CountKernels(TorchDispatchMode):
            count = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.count += not func.is_view
                return func(*args, **(kwargs or {}))

        def kernels(n_batches):
            images = torch.randint(0, 256, (4 * n_batches, 3, 8, 8), dtype=torch.uint8)
            loader = train.TensorLoader(images, torch.zeros(4 * n_batches, dtype=torch.long), 4,
                                        [0.5] * 3, [0.25] * 3, 8, train=True,
                                        memory_format=torch.channels_last)
            with CountKernels() as mode:
                for _ in loader:
                    pass
            return mode.count
        self.assertLessEqual((kernels(6) - kernels(2)) / 4, 4)

    def test_resize_on_the_device(self):
        images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
        loader = train.TensorLoader(images, torch.zeros(5, dtype=torch.long), 2, [0.5] * 3,
                                    [0.25] * 3, 20, train=False)
        self.assertEqual([tuple(x.shape) for x, _ in loader],
                         [(2, 3, 20, 20), (2, 3, 20, 20), (1, 3, 20, 20)])

    def test_lr_schedule_warms_up_then_decays_to_zero(self):
        # The article used a constant lr of 0.001.
        f = train.warmup_linear(100, 0.2)
        self.assertAlmostEqual(f(0), 1 / 20)
        self.assertAlmostEqual(f(19), 1.0)
        self.assertAlmostEqual(f(60), 0.5)
        self.assertAlmostEqual(f(100), 0.0)
        self.assertEqual(max(f(s) for s in range(100)), 1.0)


class BenchmarkTest(unittest.TestCase):

    def test_quick_benchmark_runs(self):
        import benchmark
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, 'bench.json')
            with contextlib.redirect_stdout(io.StringIO()) as out:
                code = benchmark.main(['--quick', '--device', 'cpu', '--json', str(path)])
            self.assertEqual(code, 0)
            result = json.loads(path.read_text())
        self.assertIn('efficiency', out.getvalue())
        self.assertIn("the article's ResNet18 as written", out.getvalue())
        models = {r['model'] for r in result['results']}
        self.assertEqual(models, {'resnet18', 'resnet18-small', 'alexnet', 'resnet18-article'})
        for r in result['results']:
            for key in ('step_img_s', 'epoch_img_s', 'eval_img_s', 'efficiency'):
                self.assertGreater(r[key], 0, (r['model'], key))
        for key in ('pil_224_img_s', 'tensor_224_img_s', 'tensor_32_img_s'):
            self.assertGreater(result['data_path'][key], 0)

    def test_a_failed_row_is_reported_and_fails_the_run(self):
        import benchmark

        def measure(name, *args, **kwargs):
            if name == 'alexnet':
                raise RuntimeError('CUDA out of memory. Tried to allocate\n(details)')
            return {'model': name, 'px': 32, 'batch': 8, 'precision': 'fp32', 'launch': 'eager',
                    'step_img_s': 2.0, 'epoch_img_s': 1.0, 'efficiency': 0.5, 'eval_img_s': 3.0}

        rates = {'pil_224_img_s': 1, 'tensor_224_img_s': 2, 'tensor_32_img_s': 3}
        with mock.patch.object(benchmark, 'measure', measure), \
                mock.patch.object(benchmark, 'data_path_rates', return_value=rates), \
                contextlib.redirect_stdout(io.StringIO()) as out:
            code = benchmark.main(['--quick', '--device', 'cpu'])
        self.assertEqual(code, 1)
        self.assertIn('failed: CUDA out of memory. Tried to allocate', out.getvalue())
        self.assertIn('resnet18-article', out.getvalue())  # the rows after it still ran

    def test_whole_rows_replay_the_whole_step(self):
        # On CUDA, the 'whole' rows time train.py's default step; here its CPU stand-in.
        import benchmark
        made = []

        class Made(EagerGraphedStep):
            def __init__(self, trainer, inputs, targets):
                made.append(tuple(inputs.shape))
                super().__init__(trainer, inputs, targets)

        with mock.patch.object(train, 'GraphedStep', Made):
            r = benchmark.measure('resnet18', 16, 4, torch.device('cpu'), True, 2, 1, 'whole',
                                  warmup=0)
        self.assertEqual(made, [(4, 3, 16, 16)])
        self.assertEqual((r['launch'], r['precision']), ('whole', 'fp32'))
        self.assertGreater(r['efficiency'], 0)

    def test_no_fp16_whole_rows(self):
        # A GPU with fp16 only: train.py falls back to the model's graphs
        # there, so the benchmark has no fp16 'whole' row (only the fp32 one).
        import benchmark
        cuda = torch.device('cuda')
        for amp, whole in ((torch.bfloat16, [True, False]), (torch.float16, [False])):
            with mock.patch.object(train, 'amp_dtype', return_value=amp):
                rows = benchmark.configs(cuda, quick=False)
            self.assertEqual([r[3] for r in rows if r[4] == 'whole'], whole, amp)
            self.assertIn(('resnet18', 32, 512, True, 'graph'), rows)

    def test_article_specimen_has_the_article_bugs(self):
        # The specimen the benchmark times is the article's network: 3 blocks a stage, no
        # downsampling, biased convs. The checks that pin those bugs fail on it.
        import benchmark
        model = benchmark.article_resnet18(10).eval()
        self.assertEqual([len(s) for s in (model.layer1, model.layer2, model.layer3,
                                           model.layer4)], [3, 3, 3, 3])
        self.assertIsNotNone(model.layer2[0].conv1.bias)
        sizes = []
        model.layer4.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
        with torch.no_grad():
            model(torch.zeros(1, 3, 224, 224))
        self.assertEqual(sizes, [56])  # the fixed network is at 7 here


if __name__ == '__main__':
    unittest.main()
