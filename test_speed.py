"""Tests of speed: speed.py and graphs.py (the CPU's one-pixel conv route, the CUDA graphs, whose
logic runs here on the CPU, and the precision choice) and benchmark.py. Each trick must compute
what the plain code computes.
"""
import contextlib
import io
import json
import tempfile
import types
import unittest
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torchvision

import budget
import data
import layers
import graphs
import speed
import train
from resnet import ResNet18
from test_helpers import EagerGraphedStep, copy_weights

CPU = torch.device('cpu')


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
            optimizer = train.build_optimizer(model.parameters(), 0.02, 0.9, 5e-4, True, CPU)
            return train.Trainer(model, optimizer, train.build_criterion(0.1),
                                 scheduler=budget.Schedule(optimizer, 4, 0.5))

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
        # a ResNet's is recorded (here its recording, CUDA-only, stands in), AlexNet's never is.
        step = object()
        self.assertEqual(speed.prepare_step(step, None, None, speed.MixedPrecision(CPU), None,
                                            'resnet18'), (step, speed.ONE_PIXEL_ROUTE))
        on_cuda = types.SimpleNamespace(device=torch.device('cuda'), dtype=None)
        with mock.patch.object(graphs, 'record_graphs', return_value=(None, 'graphed')) as rec:
            for name, how in (('resnet18', 'graphed'), ('alexnet', 'eager')):
                got = speed.prepare_step(step, None, None, on_cuda, None, name)
                self.assertEqual(got, (step, how), name)
        self.assertEqual(rec.call_count, 1)
        torch.backends.cudnn.benchmark = False

    def test_fp32_asks_for_no_autocast(self):
        # fp32 (CPU, Apple's mps) runs without torch.autocast: before torch 2.5 even a disabled
        # autocast raised "unsupported autocast device_type 'mps'".
        trainer = train.Trainer(nn.Linear(3, 3), None, nn.CrossEntropyLoss())
        self.assertIsNone(trainer.amp.dtype)
        self.assertIsInstance(trainer.amp.autocast(), contextlib.nullcontext)
        self.assertIsInstance(speed.autocast(torch.device('mps'), None), contextlib.nullcontext)


class PrecisionTest(unittest.TestCase):
    """--precision on each kind of machine: what speed.pick_precision makes of the device."""

    def test_auto(self):
        pick = speed.pick_precision
        self.assertEqual(pick('auto', 'cuda', (8, 0)), torch.bfloat16)  # A100
        self.assertEqual(pick('auto', 'cuda', (9, 0)), torch.bfloat16)  # H100
        # T4 and V100: torch.cuda.is_bf16_supported() says True there (emulation); fp16.
        self.assertEqual(pick('auto', 'cuda', (7, 5)), torch.float16)
        self.assertEqual(pick('auto', 'cuda', (7, 0)), torch.float16)
        self.assertEqual(pick('auto', 'cpu', cpu_bf16=True), torch.bfloat16)
        self.assertIsNone(pick('auto', 'cpu', cpu_bf16=False))
        self.assertIsNone(pick('auto', 'mps'))
        self.assertEqual(speed.choose_precision('auto', CPU),
                         torch.bfloat16 if speed.cpu_has_native_bf16() else None)

    def test_an_explicit_precision_wins_unless_the_device_cannot(self):
        pick = speed.pick_precision
        self.assertIsNone(pick('fp32', 'cuda', (9, 0)))
        self.assertEqual(pick('fp16', 'cuda', (9, 0)), torch.float16)
        self.assertEqual(pick('bf16', 'cpu', cpu_bf16=False), torch.bfloat16)
        self.assertEqual(pick('fp16', 'cpu'), torch.float16)
        with self.assertRaisesRegex(speed.UsageError, 'capability 7.5.*--precision fp16'):
            pick('bf16', 'cuda', (7, 5))
        self.assertEqual(speed.choose_precision('bf16', CPU), torch.bfloat16)

    def test_autocast_works_asks_torch(self):
        self.assertTrue(speed.autocast_works(CPU, torch.bfloat16))  # every torch it supports
        # A dtype CPU autocast does not do: torch turns it off (a warning) and computes in fp32.
        self.assertFalse(speed.autocast_works(CPU, torch.float64))

    def test_cpu_bf16_from_the_cpu_flags(self):
        # Where torch cannot say (its private functions are missing), /proc/cpuinfo's flags.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, 'cpuinfo')
            for flags, expected in (('fpu avx512f avx512_bf16 sse', True),
                                    ('fpu amx_bf16 amx_tile', True),
                                    ('fpu avx2 avx512f avx512bw', False)):
                path.write_text(f'processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n')
                self.assertEqual(speed.cpu_flags_have_bf16(path), expected, flags)
            self.assertFalse(speed.cpu_flags_have_bf16(Path(tmp, 'missing')))  # not Linux

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
        for key in ('pil_224_img_s', 'tensor_224_img_s', 'tensor_32_img_s', 'stream_32_img_s',
                    'stream_224_img_s'):
            self.assertGreater(result['data_path'][key], 0)

    def test_a_failed_row_is_reported_and_the_others_still_run(self):
        import benchmark

        def measure(name, *args, **kwargs):  # AlexNet's row runs out of memory
            if name == 'alexnet':
                raise RuntimeError('CUDA out of memory. Tried to allocate\n(details)')
            return {'model': name, 'px': 32, 'batch': 8, 'precision': 'fp32', 'launch': 'eager',
                    'step_img_s': 2.0, 'epoch_img_s': 1.0, 'efficiency': 0.5, 'eval_img_s': 3.0}

        rows = benchmark.configs('cpu', True, None)
        with mock.patch.object(benchmark, 'measure', measure), \
                contextlib.redirect_stdout(io.StringIO()) as out:
            results, failed = benchmark.run_rows(rows, CPU, 1, 1, types.SimpleNamespace(
                steps=1, quick=True))
        self.assertEqual(failed, ['alexnet'])
        self.assertIn('failed: CUDA out of memory. Tried to allocate', out.getvalue())
        self.assertEqual([r['model'] for r in results], ['resnet18', 'resnet18-small',
                                                         'resnet18-article'])

    def test_whole_rows_replay_the_whole_step(self):
        # On CUDA, the 'whole' rows time train.py's default step; here its CPU stand-in.
        import benchmark
        made = []

        class Made(EagerGraphedStep):
            def __init__(self, step, model, optimizer, scaler, inputs, targets):
                made.append(tuple(inputs.shape))
                super().__init__(step, model, optimizer, scaler, inputs, targets)

        with mock.patch.object(graphs, 'GraphedStep', Made):
            r = benchmark.measure('resnet18', 16, 4, torch.device('cpu'), 'fp32', 2, 1, 'whole',
                                  warmup=0)
        self.assertEqual(made, [(4, 3, 16, 16)])
        self.assertEqual((r['launch'], r['precision']), ('whole', 'fp32'))
        self.assertGreater(r['efficiency'], 0)

    def test_the_rows_follow_what_train_py_runs(self):
        # A GPU with fp16 only: train.py falls back to the model's graphs there, so there is
        # no fp16 'whole' row (only the fp32 one). On a CPU, bf16 rows where train.py's auto
        # would pick bf16, and the one-pixel route timed against no route in each precision.
        import benchmark
        for auto, whole in ((torch.bfloat16, ['auto', 'fp32']), (torch.float16, ['fp32'])):
            rows = benchmark.configs('cuda', False, auto)
            self.assertEqual([r[3] for r in rows if r[4] == 'whole'], whole, auto)
            self.assertIn(('resnet18', 32, 512, 'auto', 'graph'), rows)
        for auto, precisions in ((torch.bfloat16, {'fp32', 'bf16'}), (None, {'fp32'})):
            rows = benchmark.configs('cpu', False, auto)
            self.assertEqual({r[3] for r in rows}, precisions)
            self.assertEqual({r[3] for r in rows if r[4] == 'no-route'}, precisions)

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
