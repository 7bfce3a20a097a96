"""Tests for gradcam.py and pictures.py: Grad-CAM against a hand computation and on a task whose
evidence sits in a known place; the confusion matrix, mistakes and filters of predict.py
--test; --cam."""
import csv
import json
import re
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import options
import pictures
import predict
import train
from alexnet import AlexNet
from gradcam import grad_cam
from resnet import ResNet18
from test_helpers import make_colour_folder, run_cli, train_weights

PNG = b'\x89PNG\r\n\x1a\n'


def tiny_net():
    """Two 3x3 convs at full resolution, a global average pool and a 2-way fc."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))


def squares(n, g, size=16, side=4):
    """Grey noise with a red (class 0) or blue (class 1) square at a random place: (images,
    labels, the squares' top-left corners)."""
    x = 0.5 + 0.1 * torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    corners = torch.randint(0, size - side + 1, (n, 2), generator=g)
    for img, label, (r, c) in zip(x, labels.tolist(), corners.tolist()):
        img[:, r:r + side, c:c + side] = torch.tensor([0.9, 0.1, 0.1] if label == 0
                                                      else [0.1, 0.1, 0.9]).view(3, 1, 1)
    return x, labels, corners


class GradCamTest(unittest.TestCase):

    def test_equals_a_cam_computed_by_hand(self):
        torch.manual_seed(0)
        model = tiny_net()
        x, targets = torch.randn(3, 3, 10, 10), torch.tensor([0, 1, 1])
        cam = grad_cam(model, x, targets, layer=model[2])
        # By hand: the second conv's output, the gradient of each target logit with respect to
        # it, channel weights = the gradient's spatial mean; ReLU of the weighted sum; enlarged
        # to the input (here the same size) and divided by its maximum.
        maps = model[:3](x)
        logits = model[3:](maps)
        grads, = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), maps)
        by_hand = F.relu((grads.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1))
        by_hand = by_hand / by_hand.amax(dim=(1, 2), keepdim=True)
        self.assertEqual(cam.shape, (3, 10, 10))
        torch.testing.assert_close(cam, by_hand.detach(), rtol=1e-5, atol=1e-6)
        self.assertTrue(model.training)  # put back as it was

    def test_the_default_layer_is_the_deepest_map_larger_than_1x1(self):
        torch.manual_seed(0)
        model = ResNet18(10).eval()
        for size, deepest, shallower in ((32, model.layer3, model.layer2),
                                         (64, model.layer4, model.layer3)):
            x = torch.randn(2, 3, size, size)
            targets = model(x).argmax(dim=1)
            cam = grad_cam(model, x, targets)
            self.assertEqual(cam.shape, (2, size, size))
            self.assertTrue(0 <= cam.min() and cam.max() <= 1)
            torch.testing.assert_close(cam, grad_cam(model, x, targets, layer=deepest))
            self.assertFalse(torch.allclose(cam, grad_cam(model, x, targets, layer=shallower)))

    def test_every_model_offered_gets_a_map(self):
        torch.manual_seed(0)
        for name in options.MODELS:
            with self.subTest(name):
                model = train.build_model(name, 10).eval()
                size = AlexNet.MIN_INPUT_SIZE if name == 'alexnet' else 32
                x = torch.randn(2, 3, size, size)
                targets = model(x).argmax(dim=1)
                cam = grad_cam(model, x, targets)
                self.assertEqual(cam.shape, (2, size, size))
                self.assertTrue(torch.isfinite(cam).all() and 0 <= cam.min() and cam.max() <= 1)
        # At 67 px AlexNet's last convs end at 1x1, and its adaptive pool only repeats that
        # value 6x6: the map comes from the last pool before them, 3x3.
        model = train.build_model('alexnet', 10).eval()
        x = torch.randn(2, 3, AlexNet.MIN_INPUT_SIZE, AlexNet.MIN_INPUT_SIZE)
        targets = model(x).argmax(dim=1)
        torch.testing.assert_close(grad_cam(model, x, targets),
                                   grad_cam(model, x, targets, layer=model.maxpool2))
        self.assertFalse(torch.allclose(grad_cam(model, x, targets),
                                        grad_cam(model, x, targets, layer=model.avg_pool)))

    def test_it_finds_the_evidence(self):
        # The class is the colour of a small square at a random place on grey noise: after a
        # short training, the map's peak lies on the square for most test images.
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = tiny_net()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(60):
            x, y, _ = squares(32, g)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        x, y, corners = squares(50, g)
        self.assertGreater((model(x).argmax(1) == y).float().mean().item(), 0.9)
        cam = grad_cam(model, x, y, layer=model[2])
        peaks = cam.flatten(1).argmax(dim=1)
        rows, cols = peaks // 16, peaks % 16
        on = ((rows >= corners[:, 0] - 1) & (rows <= corners[:, 0] + 4)
              & (cols >= corners[:, 1] - 1) & (cols <= corners[:, 1] + 4))
        self.assertGreater(on.float().mean().item(), 0.8)


class ConfusionTest(unittest.TestCase):
    """The confusion matrix of epoch_valid, and the mistakes picked to draw."""

    def test_the_confusion_matrix_counts_true_class_by_predicted_class(self):
        logits = torch.eye(3)[[0, 1, 1, 2, 0, 0]]  # predicted 0, 1, 1, 2, 0, 0
        labels = torch.tensor([0, 0, 1, 2, 2, 2])
        trainer = train.Trainer(nn.Identity(), None, nn.CrossEntropyLoss())
        _, acc = trainer.epoch_valid([(logits[:4], labels[:4]), (logits[4:], labels[4:])])
        self.assertEqual(trainer.confusion.tolist(), [[1, 1, 0], [0, 1, 0], [2, 0, 1]])
        self.assertAlmostEqual(acc, 50.0)
        for got, want in zip(trainer.class_accuracy, [50.0, 100.0, 100 / 3]):
            self.assertAlmostEqual(got, want, places=4)

    def test_the_mistakes_are_the_surest_wrong_answers(self):
        logits = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.0, 3.0], [2.0, 0.0], [0.0, 9.0]])
        labels = torch.tensor([0, 0, 0, 1, 1])  # wrong: 1 (0.73), 2 (0.95) and 3 (0.88)

        idx, predicted, confidence = pictures.most_confident_mistakes(logits.softmax(dim=1),
                                                                      labels)
        self.assertEqual(idx.tolist(), [2, 3, 1])
        self.assertEqual(predicted.tolist(), [1, 0, 1])
        torch.testing.assert_close(confidence, logits[[2, 3, 1]].softmax(dim=1).amax(dim=1))


class PicturesTest(unittest.TestCase):
    """predict.py --test's confusion matrix, mistakes and filters, and --cam, on a small
    colour folder."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        root = Path(cls.tmp.name)
        cls.data = make_colour_folder(root / 'colours', n_train=18, n_test=7)
        cls.weights = train_weights(cls.data, root / 'w.pth', image_size=8, epochs=1)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_test_prints_and_writes_the_confusion_matrix_and_pictures(self):
        with mock.patch.dict(sys.modules, {'matplotlib': None}):  # not needed: PIL draws
            code, out, err = run_cli(predict.main, '--test', '--weights', self.weights,
                                     '--device', 'cpu', '--workers', 1)
        self.assertEqual(code, 0, err)
        acc = float(re.search(r'test accuracy (\d+\.\d+)%', out).group(1))
        with open(self.weights.with_suffix('.confusion.csv'), newline='') as f:
            rows = list(csv.reader(f))
        classes = json.loads(self.weights.with_suffix('.json').read_text())['classes']
        self.assertEqual(rows[0][1:], classes)
        self.assertEqual([r[0] for r in rows[1:]], classes)
        matrix = torch.tensor([[int(n) for n in r[1:]] for r in rows[1:]])
        self.assertEqual(matrix.sum(dim=1).tolist(), [7, 7, 7])  # test images a class
        self.assertAlmostEqual(100 * matrix.diag().sum().item() / matrix.sum().item(), acc,
                               places=2)
        for name, row in zip(classes, matrix.tolist()):  # printed as well
            self.assertRegex(out, rf'\n  {name} +' + ' +'.join(map(str, row)) + '\n')
        stem = self.weights.with_suffix('')
        for name in ('confusion.png', 'filters.png'):
            self.assertEqual(Path(f'{stem}.{name}').read_bytes()[:8], PNG, name)
        mistakes = Path(f'{stem}.mistakes.png')
        self.assertEqual(mistakes.exists(), matrix.sum() > matrix.diag().sum())
        with Image.open(Path(f'{stem}.filters.png')) as im:
            self.assertGreater(im.width, 16 * 24)  # 64 filters, 16 a row

    def test_cam_writes_one_picture_per_image(self):
        out_dir = Path(self.tmp.name, 'cams')
        folder = Path(self.data, 'test')  # red/000.png, blue/000.png, ...: the same names
        with mock.patch.object(pictures, 'cam_picture', side_effect=pictures.cam_picture) as drawn:
            code, out, err = run_cli(predict.main, folder, '--weights', self.weights, '--cam',
                                     out_dir, '--device', 'cpu')
        self.assertEqual(code, 0, err)
        # Each picture is captioned with its image's folder (here the class) and name.
        self.assertEqual(sorted(call.args[3] for call in drawn.call_args_list),
                         sorted(f'{p.parent.name}/{p.name}' for p in folder.rglob('*.png')))
        written = sorted(p.name for p in out_dir.iterdir())
        self.assertEqual(written, sorted(f'{p.parent.name}_{p.stem}.cam.png'
                                         for p in folder.rglob('*.png')))
        self.assertIn(f'wrote 21 Grad-CAM pictures to {out_dir}', out)
        with Image.open(out_dir / written[0]) as im:
            self.assertEqual(im.size[0], 2 * pictures.TILE + 30)  # the photo, and the map on it


if __name__ == '__main__':
    unittest.main()
