"""Tests for benchmark.py: it runs, reports a failed row, and times what train.py runs."""
import contextlib
import io
import json
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch

import graphs
import speed
from test_helpers import EagerGraphedStep


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

    def test_a_failed_row_is_reported_and_fails_the_run(self):
        import benchmark

        def measure(name, *args, **kwargs):
            if name == 'alexnet':
                raise RuntimeError('CUDA out of memory. Tried to allocate\n(details)')
            return {'model': name, 'px': 32, 'batch': 8, 'precision': 'fp32', 'launch': 'eager',
                    'step_img_s': 2.0, 'epoch_img_s': 1.0, 'efficiency': 0.5, 'eval_img_s': 3.0}

        rates = {'pil_224_img_s': 1, 'tensor_224_img_s': 2, 'tensor_32_img_s': 3,
                 'stream_32_img_s': 4, 'stream_224_img_s': 5}
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
            def __init__(self, step, model, optimizer, scaler, inputs, targets):
                made.append(tuple(inputs.shape))
                super().__init__(step, model, optimizer, scaler, inputs, targets)

        with mock.patch.object(graphs, 'GraphedStep', Made):
            r = benchmark.measure('resnet18', 16, 4, torch.device('cpu'), 'fp32', 2, 1, 'whole',
                                  warmup=0)
        self.assertEqual(made, [(4, 3, 16, 16)])
        self.assertEqual((r['launch'], r['precision']), ('whole', 'fp32'))
        self.assertGreater(r['efficiency'], 0)

    def test_no_fp16_whole_rows(self):
        # A GPU with fp16 only: train.py falls back to the model's graphs
        # there, so the benchmark has no fp16 'whole' row (only the fp32 one).
        import benchmark
        cuda = torch.device('cuda')
        for native_bf16, whole in ((True, ['auto', 'fp32']), (False, ['fp32'])):
            with mock.patch.object(speed, 'cuda_has_native_bf16', return_value=native_bf16):
                rows = benchmark.configs(cuda, quick=False)
            self.assertEqual([r[3] for r in rows if r[4] == 'whole'], whole, native_bf16)
            self.assertIn(('resnet18', 32, 512, 'auto', 'graph'), rows)

    def test_cpu_rows_have_bf16_where_the_cpu_has_it(self):
        # bf16 rows where train.py's auto would pick bf16, and the one-pixel route timed
        # against no route in each precision.
        import benchmark
        cpu = torch.device('cpu')
        for native_bf16, precisions in ((True, {'fp32', 'bf16'}), (False, {'fp32'})):
            with mock.patch.object(speed, 'cpu_has_native_bf16', return_value=native_bf16):
                rows = benchmark.configs(cpu, quick=False)
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
