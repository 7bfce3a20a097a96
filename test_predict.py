"""Tests for predict.py: train on a small generated colour folder, then classify its images."""
import json
import re
import shutil
import tempfile
import unittest
from pathlib import Path

from unittest import mock

import torch
import torchvision

import data
import predict
import train
from resnet import ResNet34
from test_helpers import COLOURS, make_colour_folder, run_cli, train_weights

CPU = torch.device('cpu')


def run_predict(*argv):
    return run_cli(predict.main, *argv)


class PredictTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        root = Path(cls.tmp.name)
        # 12 px images held at 12 px and fed at 16: predict must resize as evaluation does.
        cls.data = make_colour_folder(root / 'colours', size=12)
        cls.weights = train_weights(cls.data, root / 'weight.pth', image_size=16, epochs=2)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def predict(self, *argv):
        return run_predict(*argv, '--weights', self.weights, '--device', 'cpu')

    def test_accuracy_on_the_test_images_equals_tests(self):
        code, out, err = self.predict(self.data / 'test')
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(len(lines), 3 * 10)
        hits = [Path(line.split('  ')[0]).parent.name == line.split('  ')[1].split()[0]
                for line in lines]
        code, out, err = self.predict('--test', '--workers', 1)
        self.assertEqual(code, 0, err)
        tested = float(re.search(r'test accuracy ([\d.]+)%', out).group(1))
        self.assertEqual(f'{100 * sum(hits) / len(hits):.2f}', f'{tested:.2f}')
        self.assertGreater(tested, 80)
        # --test reproduces what the run measured, on the data folder weight.json names.
        measured = json.loads(self.weights.with_suffix('.json').read_text())['test_acc']
        self.assertIn(f'test accuracy {measured:.2f}% on 30 images', out)
        self.assertIn(f'the run measured {measured:.2f}%', out)
        self.assertIn(f'from {self.data.resolve()}', out)

    def test_one_image_of_each_class(self):
        files = [self.data / 'test' / name / '000.png' for name in COLOURS]
        code, out, err = self.predict(*files, '--topk', 5)
        self.assertEqual(code, 0, err)
        for file, line, name in zip(files, out.splitlines(), COLOURS):
            path, *top = line.split('  ')
            self.assertEqual(path, str(file))
            self.assertEqual(len(top), 3)  # --topk 5, but there are 3 classes
            classes = [t.split()[0] for t in top]
            probs = [float(t.split()[1].rstrip('%')) for t in top]
            self.assertEqual(classes[0], name)
            self.assertEqual(sorted(classes), sorted(COLOURS))
            self.assertAlmostEqual(sum(probs), 100, delta=0.2)  # a softmax over the classes
            self.assertEqual(probs, sorted(probs, reverse=True))

    def test_each_image_is_prepared_as_evaluation_prepares_it(self):
        # Read at the size the training images were held at (12 px), resized on the device to
        # the size the network was fed (16 px), normalised with the training images' mean and
        # std: what evaluation gives the model, tensor for tensor, read in this process or in
        # worker processes.
        model, record = predict.load_model(self.weights, CPU)
        seen = []
        model.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
        files = predict.image_files([self.data / 'test'])
        for workers in (1, 2):
            self.assertEqual(len(list(predict.probabilities(files, model, record, CPU, None,
                                                            workers))), 30)
        test = data.list_image_folder(self.data).test
        self.assertEqual(files, [f for f, _ in test])
        evaluation = data.make_loader(data.decode_images(files, 12, workers=1),
                                      torch.tensor([y for _, y in test]), batch_size=64,
                                      mean=record['mean'], std=record['std'], image_size=16,
                                      train=False, device=CPU)
        self.assertEqual(len(seen), 2)
        for fed in seen:
            self.assertTrue(torch.equal(fed, next(iter(evaluation))[0]))

    def test_errors_are_one_sentence(self):
        tmp = Path(tempfile.mkdtemp(dir=self.tmp.name))
        image = self.data / 'test' / 'red' / '000.png'
        cases = [((image, '--weights', tmp / 'missing.pth'), 'no weight file'),
                 ((tmp / 'nowhere.png', '--weights', self.weights), 'neither an image'),
                 ((Path(tempfile.mkdtemp(dir=tmp)), '--weights', self.weights),
                  'holds no images')]
        no_json = tmp / 'no_json.pth'
        shutil.copy(self.weights, no_json)
        cases.append(((image, '--weights', no_json), 'no readable no_json.json'))
        other = tmp / 'other.pth'
        shutil.copy(self.weights, other)
        meta = json.loads(self.weights.with_suffix('.json').read_text())
        other.with_suffix('.json').write_text(json.dumps(
            {**meta, 'args': {**meta['args'], 'model': 'resnet34'}}))
        cases.append(((image, '--weights', other), 'does not fit the resnet34 --small-input'))
        broken = tmp / 'broken.jpg'
        broken.write_bytes(b'not a jpeg')
        cases.append(((image, broken, '--weights', self.weights),
                      'broken.jpg is not a readable image'))
        cases.append(((), 'name the images'))
        for argv, text in cases:
            code, _, err = run_predict(*argv, '--device', 'cpu')
            self.assertEqual((code, err.count('\n')), (2, 1), err)
            self.assertIn(text, err)

    def test_bad_weight_files_are_one_sentence(self):
        tmp = Path(tempfile.mkdtemp(dir=self.tmp.name))
        corrupt = tmp / 'corrupt.pth'
        corrupt.write_bytes(self.weights.read_bytes()[:1000])
        other = tmp / 'other.pth'
        torch.save(ResNet34(3).state_dict(), other)  # no .json: what they are is unknown
        for path, text in ((tmp / 'missing.pth', 'no weight file'),
                           (corrupt, 'not a readable weight file'),
                           (other, 'has no readable other.json')):
            code, _, err = run_predict('--test', '--weights', path, '--device', 'cpu')
            self.assertEqual((code, err.count('\n')), (2, 1), err)
            self.assertIn(text, err)
        shutil.copy(self.weights.with_suffix('.json'), other.with_suffix('.json'))  # resnet18's
        code, _, err = run_predict('--test', '--weights', other, '--device', 'cpu')
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('does not fit the resnet18 --small-input its weight.json names', err)

    def test_test_reads_the_data_the_weights_were_trained_on(self):
        tmp = Path(tempfile.mkdtemp(dir=self.tmp.name))
        moved = tmp / 'weight.pth'
        shutil.copy(self.weights, moved)
        meta = json.loads(self.weights.with_suffix('.json').read_text())
        moved.with_suffix('.json').write_text(json.dumps({**meta, 'data': str(tmp / 'moved')}))
        code, _, err = run_predict('--test', '--weights', moved, '--device', 'cpu')
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('which is not there any more; pass --data DIR', err)
        # --data with other classes: the weights' fc scores the classes weight.json names.
        other = Path(shutil.copytree(self.data, tmp / 'other'))
        for split in ('train', 'test'):
            (other / split / 'red').rename(other / split / 'pink')
        code, _, err = run_predict('--test', '--weights', moved, '--data', other, '--device', 'cpu')
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn("was trained on the classes ['blue', 'green', 'red']", err)
        # CIFAR-10 is never fetched for weights of an image folder; streaming reads alike.
        with mock.patch.object(torchvision.datasets.CIFAR10, 'download',
                               side_effect=AssertionError('tried CIFAR-10')):
            code, out, err = self.predict('--test', '--stream', '--workers', 1)
        self.assertEqual(code, 0, err)
        self.assertIn('streaming 30 images', out)

    def test_running_out_of_memory_is_one_sentence(self):
        oom = torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        with mock.patch.object(train.Trainer, 'epoch_valid', side_effect=oom):
            code, _, err = self.predict('--test', '--batch-size', 64)
        self.assertEqual((code, err.count('\n')), (1, 1), err)
        self.assertIn('ran out of memory for batches of 64 images; pass a smaller --batch-size',
                      err)
        with mock.patch.object(train.Trainer, 'epoch_valid', side_effect=RuntimeError('other')), \
                self.assertRaisesRegex(RuntimeError, 'other'):
            self.predict('--test')


if __name__ == '__main__':
    unittest.main()
