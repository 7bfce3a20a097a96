"""Tests of the tools for after training: predict.py (your own images, --test), pictures.py
(Grad-CAM, the confusion matrix, the surest mistakes, the filters) and degradation.py (the
article's claims about depth and shortcuts, run)."""
import copy
import csv
import json
import re
import shutil
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import degradation
import options
import pictures
import predict
import train
from alexnet import AlexNet
from pictures import grad_cam
from resnet import CifarResNet, ResNet18, ResNet34
from test_helpers import COLOURS, make_colour_folder, offline_cifar10, run_cli, train_weights

CPU = torch.device('cpu')
PNG = b'\x89PNG\r\n\x1a\n'


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
        cases.append(((image, '--weights', other), 'does not fit the resnet34 (small input)'))
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
        self.assertIn('does not fit the resnet18 (small input) its weight.json names', err)

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
        with offline_cifar10():
            code, out, err = self.predict('--test', '--stream', '--workers', 1)
        self.assertEqual(code, 0, err)
        self.assertIn('streaming 30 images', out)

    def test_running_out_of_memory_is_one_sentence(self):
        # And an error that is not about memory stays a traceback.
        oom = torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        for error in oom, RuntimeError('other'):
            with mock.patch.object(train.Trainer, 'epoch_valid', side_effect=error):
                if error is not oom:
                    self.assertRaisesRegex(RuntimeError, 'other', self.predict, '--test')
                    continue
                code, _, err = self.predict('--test', '--batch-size', 64)
            self.assertEqual((code, err.strip().count('\n')), (1, 0), err)
            self.assertIn('the device ran out of memory for batches of 64 images; pass a smaller '
                          '--batch-size', err)


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
        code, out, err = run_cli(predict.main, folder, '--weights', self.weights, '--cam',
                                 out_dir, '--device', 'cpu')
        self.assertEqual(code, 0, err)
        written = sorted(p.name for p in out_dir.iterdir())
        self.assertEqual(written, sorted(f'{p.parent.name}_{p.stem}.cam.png'
                                         for p in folder.rglob('*.png')))
        self.assertIn(f'wrote 21 Grad-CAM pictures to {out_dir}', out)
        with Image.open(out_dir / written[0]) as im:
            self.assertEqual(im.size[0], 2 * pictures.TILE + 30)  # the photo, and the map on it


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
        with offline_cifar10(download=OSError('network is unreachable')):
            code, _, err = run_cli(degradation.main, '--data-root', self.root / 'cifar')
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('cifar-10-python.tar.gz', err)


if __name__ == '__main__':
    unittest.main()
