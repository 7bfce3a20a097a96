"""Tests for speed.py and graphs.py: the CPU's one-pixel conv route, the CUDA graphs (their
logic, on the CPU) and the precision choice. Each trick must compute what the plain code computes.
"""
import contextlib
import tempfile
import types
import unittest
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torchvision

import data
import layers
import graphs
import speed
import train
from resnet import ResNet18
from test_helpers import EagerGraphedStep, copy_weights


class SpeedTest(unittest.TestCase):

    def test_one_pixel_conv_is_the_same_conv(self):
        # OnePixelConv2d's CPU route for a 1x1 output (ResNet18's last stage at 32 px) is a
        # matrix product over the window the conv sees: the same outputs and gradients as
        # nn.Conv2d.
        torch.manual_seed(0)
        cases = [  # input px, kernel, stride, padding, whether the route is taken
            (1, 3, 1, 1, True), (2, 3, 2, 1, True), (2, 1, 2, 0, True), (3, 3, 3, 0, True),
            (2, 3, 1, 1, False), (4, 3, 2, 1, False)]
        for px, k, s, p, route in cases:
            for bias, fmt in ((False, torch.channels_last), (True, torch.contiguous_format)):
                with self.subTest(px=px, kernel=k, stride=s, bias=bias):
                    ref = nn.Conv2d(6, 5, k, s, p, bias=bias).double()
                    ours = speed.OnePixelConv2d(6, 5, k, s, p, bias=bias).double()
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

    def test_last_stage_at_32px_is_matrix_products_with_torchvisions_gradients(self):
        # At 32 px every conv of layer4 has a 1x1 output and takes the one-pixel CPU route,
        # which training puts on the plain model: its state_dict stays the plain model's.
        torch.manual_seed(0)
        ours = speed.prepare_model(ResNet18(10), torch.device('cpu'))
        self.assertEqual(list(ours.state_dict()), list(ResNet18(10).state_dict()))
        self.assertTrue(all(type(m) is not nn.Conv2d for m in ours.modules()))
        # float64: with BatchNorm over 4 samples of 1x1 maps, float32 rounding would show.
        ours, theirs = ours.double(), torchvision.models.resnet18(num_classes=10).double()
        copy_weights(theirs, ours)
        routed = []

        def note_route(conv, args):
            if conv.one_pixel_out(args[0]):
                routed.append(names[conv])

        names = {m: name for name, m in ours.named_modules()
                 if isinstance(m, speed.OnePixelConv2d)}
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

    def test_model_files_hold_plain_convs(self):
        # The route is speed.py's, put on by training: the model files build nn.Conv2d.
        self.assertIs(type(layers.conv3x3(4, 4)), nn.Conv2d)
        self.assertIs(type(layers.conv1x1(4, 4)), nn.Conv2d)
        self.assertEqual({type(m) for m in ResNet18(10).modules() if isinstance(m, nn.Conv2d)},
                         {nn.Conv2d})

    def test_whole_step_graph_trains_as_the_plain_step(self):
        # The recorded step must train exactly as Trainer.train_step: its warm-up leaves no
        # trace (weights, BatchNorm statistics, momentum) and each replay takes the current lr.
        # A small network with each kind of state is enough (train.py's test runs a ResNet).
        def trainer():
            torch.manual_seed(0)
            model = nn.Sequential(layers.conv3x3(3, 8), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double()
            optimizer = train.build_optimizer(model, 0.02, torch.device('cpu'))
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.WarmupLinear(4, 0.5))
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
            graphed.train_step = EagerGraphedStep(graphed.train_step, graphed.model,
                                                  graphed.optimizer, graphed.amp,
                                                  *batches[start], warmup=2)
            for inputs, targets in batches[start:]:
                loss, outputs = plain.train_step(inputs, targets)
                plain.scheduler.step()
                g_loss, g_outputs = graphed.train_step(inputs, targets)
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

    def test_cuda_graphs_only_for_resnets_on_cuda(self):
        # On the CPU the step is the plain one (the one-pixel route is in the model); on CUDA
        # a ResNet's is recorded, unless --no-cuda-graphs; AlexNet's never is.
        cpu, step = torch.device('cpu'), object()
        with mock.patch.object(graphs, 'record_graphs', return_value=(None, 'graphed')) as rec:
            self.assertEqual(speed.prepare_step(step, None, None, speed.MixedPrecision(cpu),
                                                None, 'resnet18'),
                             (step, speed.ONE_PIXEL_ROUTE, 0.0))
            with mock.patch.object(speed.MixedPrecision, '__init__', return_value=None):
                cuda = speed.MixedPrecision('cuda')
            cuda.device, cuda.dtype = torch.device('cuda'), None
            for name, graphed, how in (('resnet18', True, 'graphed'),
                                       ('resnet18', False, 'eager'), ('alexnet', True, 'eager')):
                got, said, _ = speed.prepare_step(step, None, None, cuda, None, name, graphed)
                self.assertEqual((got, said), (step, how), (name, graphed))
        self.assertEqual(rec.call_count, 1)
        torch.backends.cudnn.benchmark = False

    def test_fp32_asks_for_no_autocast(self):
        # fp32 (CPU, Apple's mps) runs without torch.autocast: before torch 2.5 even a disabled
        # autocast raised "unsupported autocast device_type 'mps'".
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = train.Trainer(model, optimizer, nn.CrossEntropyLoss())
        self.assertIsNone(trainer.amp.dtype)
        images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
        loader = data.TensorLoader(images, torch.arange(8) % 3, 4, [0.5] * 3, [0.25] * 3, 4,
                                   train=False)
        refused = RuntimeError("User specified an unsupported autocast device_type 'mps'")
        with mock.patch.object(torch, 'autocast', side_effect=refused):
            trainer.epoch_train(loader)
            trainer.epoch_valid(loader)


class PrecisionTest(unittest.TestCase):
    """--precision auto on each kind of machine, with the device queries mocked."""

    def choose(self, name, device, capability=(8, 0), cpu_bf16=True):
        with mock.patch.object(torch.cuda, 'get_device_capability', return_value=capability), \
                mock.patch.object(speed, 'cpu_has_native_bf16', return_value=cpu_bf16), \
                mock.patch.object(speed, 'autocast_works', return_value=True):
            return speed.choose_precision(name, torch.device(device))

    def test_auto(self):
        self.assertEqual(self.choose('auto', 'cuda', (8, 0)), torch.bfloat16)  # A100
        self.assertEqual(self.choose('auto', 'cuda', (9, 0)), torch.bfloat16)  # H100
        # T4 and V100: torch.cuda.is_bf16_supported() says True there (emulation); fp16.
        with mock.patch.object(torch.cuda, 'is_bf16_supported', return_value=True):
            self.assertEqual(self.choose('auto', 'cuda', (7, 5)), torch.float16)
            self.assertEqual(self.choose('auto', 'cuda', (7, 0)), torch.float16)
        self.assertEqual(self.choose('auto', 'cpu', cpu_bf16=True), torch.bfloat16)
        self.assertIsNone(self.choose('auto', 'cpu', cpu_bf16=False))
        self.assertIsNone(self.choose('auto', 'mps'))

    def test_an_explicit_precision_wins_unless_the_device_cannot(self):
        self.assertIsNone(self.choose('fp32', 'cuda', (9, 0)))
        self.assertEqual(self.choose('fp16', 'cuda', (9, 0)), torch.float16)
        self.assertEqual(self.choose('bf16', 'cpu', cpu_bf16=False), torch.bfloat16)
        self.assertEqual(self.choose('fp16', 'cpu'), torch.float16)
        with self.assertRaisesRegex(speed.UsageError, 'capability 7.5.*--precision fp16'):
            self.choose('bf16', 'cuda', (7, 5))
        with mock.patch.object(speed, 'autocast_works', return_value=False), \
                self.assertRaisesRegex(speed.UsageError, 'cannot compute in fp16 on cpu'):
            speed.choose_precision('fp16', torch.device('cpu'))

    def test_autocast_works_asks_torch(self):
        cpu = torch.device('cpu')
        self.assertTrue(speed.autocast_works(cpu, torch.bfloat16))  # every torch it supports
        refused = RuntimeError("User specified an unsupported autocast device_type 'mps'")
        with mock.patch.object(torch, 'autocast', side_effect=refused):
            self.assertFalse(speed.autocast_works(cpu, torch.float16))
        # An old CPU build turns fp16 autocast off (a warning) and computes in fp32.
        with mock.patch.object(torch, 'autocast', return_value=contextlib.nullcontext()):
            self.assertFalse(speed.autocast_works(cpu, torch.float16))

    def test_cpu_bf16_from_the_cpu_flags(self):
        # Where torch cannot say (its private functions are missing), /proc/cpuinfo's flags.
        with tempfile.TemporaryDirectory() as tmp, \
                mock.patch.object(torch, 'cpu', types.SimpleNamespace()):
            path = Path(tmp, 'cpuinfo')
            for flags, expected in (('fpu avx512f avx512_bf16 sse', True),
                                    ('fpu amx_bf16 amx_tile', True),
                                    ('fpu avx2 avx512f avx512bw', False)):
                path.write_text(f'processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n')
                self.assertEqual(speed.cpu_has_native_bf16(path), expected, flags)
            self.assertFalse(speed.cpu_has_native_bf16(Path(tmp, 'missing')))  # not Linux
        with mock.patch.object(torch.cpu, '_is_avx512_bf16_supported', create=True,
                               return_value=True):
            self.assertTrue(speed.cpu_has_native_bf16('/nonexistent'))

    def test_one_pixel_route_under_bf16(self):
        # Under CPU bf16 autocast the route still computes nn.Conv2d's outputs and gradients,
        # within bf16's rounding.
        torch.manual_seed(0)
        for px, k, s, p in ((1, 3, 1, 1), (2, 3, 2, 1), (2, 1, 2, 0)):
            ref = nn.Conv2d(64, 32, k, s, p, bias=False)
            ours = speed.OnePixelConv2d(64, 32, k, s, p, bias=False)
            ours.load_state_dict(ref.state_dict())
            x = torch.randn(8, 64, px, px).contiguous(memory_format=torch.channels_last)
            results = []
            for conv in (ref, ours):
                xi = x.clone().requires_grad_()
                with torch.autocast('cpu', dtype=torch.bfloat16):
                    out = conv(xi)
                self.assertEqual(out.dtype, torch.bfloat16)
                out.float().square().sum().backward()
                results.append([out.float(), xi.grad, conv.weight.grad])
            for a, b in zip(*results):
                torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * a.abs().max().item())
