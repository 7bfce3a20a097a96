"""Tests for degradation.py: it trains the nets, writes its table and figure, and says in one
sentence what is wrong with bad input."""
import copy
import json
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
import torchvision

import degradation
from resnet import CifarResNet
from test_helpers import make_colour_folder, run_cli


class DegradationTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = Path(cls.tmp.name)
        cls.data = make_colour_folder(cls.root / 'colours', n_train=12, n_test=4)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def run_degradation(self, *argv):
        return run_cli(degradation.main, '--data', self.data, '--device', 'cpu', '--workers', 1,
                       '--batch-size', 8, *argv)

    def test_trains_each_net_and_writes_its_table(self):
        # Two depths (8 = 6 x 1 + 2 and 14), each with and without shortcuts, on a subset of
        # the images; matplotlib missing: the table alone, and one line that says so.
        out = self.root / 'tiny' / 'result'
        with mock.patch.dict(sys.modules, {'matplotlib': None}):
            code, printed, err = self.run_degradation(
                '--depths', 14, 8, '--epochs', 2, '--train-images', 32, '--test-images', 0,
                '--out', out)
        self.assertEqual(code, 0, err)
        self.assertIn('32 train and 12 test images, 3 classes', printed)
        self.assertIn('matplotlib is not installed, so no figure was drawn', printed)
        self.assertFalse(out.with_suffix('.png').exists())
        table = out.with_suffix('.md').read_text()
        self.assertIn(table.strip(), printed)
        self.assertEqual([line.split(' | ')[0] for line in table.splitlines()[2:]],
                         ['| plain-8', '| plain-14', '| ResNet-8', '| ResNet-14'])
        records = json.loads(out.with_suffix('.json').read_text())['records']
        for r in records:
            self.assertEqual(len(r['train_error']), 2)
            self.assertEqual(len(r['test_error']), 2)
            blocks = 3 * (r['depth'] - 2) // 6
            self.assertEqual(len(r['gradients_at_init']), blocks)
            self.assertTrue(all(g > 0 for g in r['gradients_at_init'] + r['gradients_after']))
        # A net and its plain twin start from the same weights, so the same first batch.
        self.assertEqual(records[0]['parameters'], records[2]['parameters'])

    def test_a_net_and_its_plain_twin_start_from_the_same_weights(self):
        made = []
        real = degradation.CifarResNet

        def make(n, num_classes, plain):
            model = real(n, num_classes, plain)
            made.append((n, plain, copy.deepcopy(model.state_dict())))
            return model

        with mock.patch.object(degradation, 'CifarResNet', side_effect=make):
            code, _, err = self.run_degradation('--depths', 8, '--epochs', 1, '--train-images',
                                                16, '--out', self.root / 'twins' / 'result')
        self.assertEqual(code, 0, err)
        (n1, plain1, state1), (n2, plain2, state2) = made
        self.assertEqual((n1, plain1, n2, plain2), (1, True, 1, False))
        self.assertTrue(all(torch.equal(state1[k], state2[k]) for k in state1))

    def test_draws_the_figure_with_matplotlib(self):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.skipTest('matplotlib is not installed')
        out = self.root / 'figure' / 'result'
        code, _, err = self.run_degradation('--depths', 8, '--epochs', 1, '--out', out)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.with_suffix('.png').read_bytes()[:8], b'\x89PNG\r\n\x1a\n')

    def test_gradient_norms_block_by_block(self):
        # One norm per block, input side first; with the weights of the last block's first
        # conv scaled up, its gradient's norm changes and the others' order stays.
        torch.manual_seed(0)
        model = CifarResNet(2, 3)
        x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
        norms = degradation.gradient_norms(model, x, y, torch.nn.CrossEntropyLoss())
        self.assertEqual(len(norms), 6)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        self.assertAlmostEqual(norms[0], model.layer1.first_block.conv1.weight.grad.norm().item(),
                               places=5)
        self.assertAlmostEqual(norms[-1], model.layer3.blocks[0].conv1.weight.grad.norm().item(),
                               places=5)

    def test_bad_input_is_one_sentence(self):
        cases = [(('--depths', 20, 21), 'so 21 is not one of them'),
                 (('--depths', 2), 'so 2 is not one of them')]
        for argv, text in cases:
            code, _, err = self.run_degradation(*argv)
            self.assertEqual((code, err.count('\n')), (2, 1), err)
            self.assertIn(text, err)
        code, _, err = run_cli(degradation.main, '--data', self.root / 'nowhere')
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('does not exist', err)
        offline = OSError('network is unreachable')
        with mock.patch.object(torchvision.datasets.CIFAR10, 'download', side_effect=offline):
            code, _, err = run_cli(degradation.main, '--data-root', self.root / 'cifar')
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('cifar-10-python.tar.gz', err)


if __name__ == '__main__':
    unittest.main()
