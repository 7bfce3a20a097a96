"""Tests for predict.py: train on a small generated colour folder, then classify its images."""
import json
import re
import shutil
import tempfile
import unittest
from pathlib import Path

from unittest import mock

import torch

import data
import predict
import speed
from test_helpers import COLOURS, make_colour_folder, run_cli, run_main, train_weights


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

    def test_accuracy_on_the_test_images_equals_evals(self):
        code, out, err = self.predict(self.data / 'test')
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(len(lines), 3 * 10)
        hits = [Path(line.split('  ')[0]).parent.name == line.split('  ')[1].split()[0]
                for line in lines]
        code, out, err = run_main('--eval', self.weights, '--data', self.data, '--device', 'cpu',
                                  '--workers', 1)
        self.assertEqual(code, 0, err)
        evaluated = float(re.search(r'test accuracy ([\d.]+)%', out).group(1))
        self.assertEqual(f'{100 * sum(hits) / len(hits):.2f}', f'{evaluated:.2f}')
        self.assertGreater(evaluated, 80)

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
        # std: what evaluation gives the model, tensor for tensor.
        cpu = torch.device('cpu')
        model, meta = predict.load_model(self.weights, cpu)
        seen = []
        model.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
        files = predict.image_files([self.data / 'test'])
        self.assertEqual(len(list(predict.probabilities(files, model, meta, cpu, None))), 30)
        _, _, test_files, test_y, _ = data.list_image_folder(self.data)
        self.assertEqual(files, test_files)
        evaluation = data.make_loader(data.decode_images(test_files, 12, workers=1),
                                      torch.tensor(test_y), batch_size=64, mean=meta.mean,
                                      std=meta.std, image_size=16, train=False, device=cpu)
        self.assertTrue(torch.equal(torch.cat(seen), next(iter(evaluation))[0]))

    def test_images_that_do_not_fit_are_streamed(self):
        # The same probabilities whether the images are decoded at once or, when they would
        # not fit in memory, batch by batch in worker processes.
        model, meta = predict.load_model(self.weights, torch.device('cpu'))
        files = predict.image_files([self.data / 'test'])
        amp = speed.choose_precision('auto', torch.device('cpu'))
        whole = list(predict.probabilities(files, model, meta, torch.device('cpu'), amp))
        with mock.patch.object(data, 'available_ram', return_value=2**30 + 100), \
                mock.patch.object(predict, 'decode_images', side_effect=AssertionError):
            streamed = list(predict.probabilities(files, model, meta, torch.device('cpu'), amp,
                                                  workers=2))
        self.assertEqual(len(whole), 30)
        for a, b in zip(whole, streamed):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

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
        other.with_suffix('.json').write_text(json.dumps({**meta, 'model': 'resnet34'}))
        cases.append(((image, '--weights', other), 'does not fit the resnet34 --small-input'))
        broken = tmp / 'broken.jpg'
        broken.write_bytes(b'not a jpeg')
        cases.append(((image, broken, '--weights', self.weights),
                      'broken.jpg is not a readable image'))
        for argv, text in cases:
            code, _, err = run_predict(*argv, '--device', 'cpu')
            self.assertEqual((code, err.count('\n')), (2, 1), err)
            self.assertIn(text, err)


if __name__ == '__main__':
    unittest.main()
