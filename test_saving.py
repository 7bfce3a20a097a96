"""Tests of saving.py's file handling: files replaced in one step, the optional plot, and the
random state a checkpoint keeps. (Run, the files of a training run, is tested end to end in
test_train.)"""
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch

import saving

CPU = torch.device('cpu')


class SavingTest(unittest.TestCase):

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = Path(tmp.name)

    def test_atomic_save_keeps_the_old_file(self):
        path = self.dir / 'w.pth'
        saving.save_torch({'a': torch.ones(3)}, path)

        def broken_save(obj, f):
            f.write(b'half a file')
            raise OSError('disk full')

        with mock.patch.object(torch, 'save', broken_save):
            with self.assertRaises(OSError):
                saving.save_torch({'a': torch.zeros(3)}, path)
        self.assertTrue(torch.equal(torch.load(path, weights_only=True)['a'], torch.ones(3)))
        self.assertEqual([p.name for p in self.dir.iterdir()], ['w.pth'])

    def test_plot_is_optional(self):
        history = [{'epoch': e, 'train_loss': 1 / e, 'train_acc': 50 + e, 'valid_loss': 1 / e,
                    'valid_acc': 40 + e} for e in (1, 2, 3)]
        with mock.patch.dict(sys.modules, {'matplotlib': None}):  # not installed
            saving.save_plot(history, self.dir / 'none.png')
        self.assertFalse((self.dir / 'none.png').exists())
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.skipTest('matplotlib is not installed')
        saving.save_plot(history, self.dir / 'plot.png')
        self.assertEqual((self.dir / 'plot.png').read_bytes()[:8], b'\x89PNG\r\n\x1a\n')

    def test_checkpoint_keeps_the_training_devices_random_state(self):
        # Dropout (AlexNet's) draws from the generator of the device it trains on, so a resumed
        # CUDA run goes on from the GPU's state as well as the CPU's. (Mocked: no GPU here.)
        cuda, gpu_state = torch.device('cuda'), torch.tensor([7, 8, 9], dtype=torch.uint8)
        with mock.patch.object(torch.cuda, 'get_rng_state', return_value=gpu_state), \
                mock.patch.object(torch.cuda, 'set_rng_state') as set_gpu:
            state = saving.rng_state(cuda)
            expected = torch.rand(3)
            saving.set_rng_state(state, cuda)
        set_gpu.assert_called_once_with(gpu_state, cuda)
        self.assertTrue(torch.equal(torch.rand(3), expected))  # the CPU's state too
        self.assertEqual(set(saving.rng_state(CPU)), {'cpu'})


if __name__ == '__main__':
    unittest.main()
