"""Tests of a training run: train.py end to end on a small generated image folder, on the CPU, and
what it is made of: its settings (options.py), the lr schedule and --minutes (budget.py), its
files (saving.py) and trained weights to start from (transfer.py).

Each of the article's bugs in the training script has a test here that fails on the article's
code (README, "The article's code, corrected"). No test touches the network, and nothing is
timed: where the clock matters, a fake one (test_helpers.FakeClock) stands in.
"""
import contextlib
import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
import unittest
import urllib.error
from pathlib import Path
from unittest import mock

import torch
import torch.hub
import torch.nn as nn
import torchvision

import budget
import config
import data
import options
import predict
import saving
import speed
import train
import transfer
from resnet import ResNet18, from_torchvision
from test_helpers import COLOURS, ColourFolderCase, EagerGraphedStep, FakeClock, image_reads, \
    in_a_folder, make_colour_folder, make_mini_cifar, offline_cifar10, run_cli, run_main, \
    run_script, the_epochs

CPU = torch.device('cpu')
AUTO = speed.choose_precision('auto', CPU)  # what --precision auto picks on this CPU
KEY = 'layer4.blocks.0.conv2.weight'  # a tensor that every epoch changes


def copy_of(params):
    return {k: v.detach().clone() for k, v in params.items()}


def weights(path):
    return torch.load(path, weights_only=True)


def rows(out):
    with open(Path(out).with_suffix('.csv')) as f:
        return list(csv.DictReader(f))


def in_epoch(n, then):
    """An epoch_train stand-in that calls then(trainer) before the real epoch n (then may raise
    what stops the run) and trains every other epoch as it is."""
    calls = []

    def epoch(real, trainer, loader):
        calls.append(1)
        if len(calls) == n:
            then(trainer)
        return real(trainer, loader)
    return epoch


def raise_(error):
    def then(trainer):
        raise error
    return then


class TrainTest(ColourFolderCase):
    """train.py end to end on a small generated image folder, on the CPU."""

    def setUp(self):
        super().setUp()
        self.out = self.dir / 'weight.pth'

    def train(self, *extra, out=None, model=('--small-input',)):
        # 8 px colour patches: the small-input stem, a low lr and 2 epochs of 3 steps learn
        # them on any seed tried.
        return run_main('--data', self.data, '--image-size', 8, *model, '--lr', 0.01,
                        '--batch-size', 16, '--epochs', 2, '--device', 'cpu', '--workers', 1,
                        '--out', out or self.out, *extra)

    def record(self, out=None):
        return json.loads((out or self.out).with_suffix('.json').read_text())

    def test_learns_colour_task_and_writes_its_files(self):
        argv = ['--data', self.data, '--image-size', 8, '--small-input', '--lr', 0.01,
                '--batch-size', 16, '--epochs', 2, '--device', 'cpu', '--workers', 1,
                '--out', self.out, '--save-every', 0]
        code, out, err = run_main(*argv)
        self.assertEqual(code, 0, err)
        # What speed.py changed on the CPU is said in the header.
        self.assertIn(f'resnet18 (small input), cpu, {speed.precision_name(AUTO)}, '
                      f'{speed.ONE_PIXEL_ROUTE}, 2 epochs of 3 batches of 16, peak lr 0.01', out)
        # The article printed {num_epochs}, undefined: NameError in the first epoch.
        self.assertRegex(out, r'\nepoch 1/2  train loss [\d.]+ acc +[\d.]+%  valid loss ')
        self.assertIn('50 train, 6 valid and 30 test images', out)
        self.assertRegex(out.strip().splitlines()[-1],
                         rf'^done in \d+ s: test accuracy \d+\.\d\d% on the 30 test images, '
                         rf'measured once \(epoch \d, chosen by its valid accuracy \d+\.\d\d%\); '
                         rf'saved to {self.out}$')
        record = self.record()
        self.assertGreater(record['test_acc'], 80)  # chance is 33%
        self.assertEqual((record['classes'], record['held_size'], len(record['mean'])),
                         (sorted(COLOURS), 8, 3))
        # weight.json records the settings the run resolved, once, from its command line.
        with contextlib.redirect_stdout(io.StringIO()):
            settings = options.settings(options.parse_args([str(a) for a in argv]), 50)
        self.assertEqual(record['args'], settings._asdict())
        self.assertEqual((record['steps'], settings.epochs, settings.lr), (6, 2, 0.01))
        # The article trained at a constant lr 0.001 with plain momentum, decay 1e-4 and no
        # label smoothing. Here the lr warms up to the peak --lr and decays to 0, with Nesterov
        # momentum, decay 5e-4 and label smoothing 0.1; the optimizer and the loss are built
        # from those values.
        self.assertEqual((settings.nesterov, settings.weight_decay, settings.label_smoothing,
                          settings.warmup), (True, 5e-4, 0.1, 0.2))
        schedule = budget.Schedule(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.01), 6,
                                   config.WARMUP)
        self.assertEqual([float(r['lr']) for r in rows(self.out)],
                         [round(0.01 * schedule.factor(3), 6), 0.0])
        group = train.build_optimizer(nn.Linear(2, 2).parameters(), settings.lr,
                                      settings.momentum, settings.weight_decay,
                                      settings.nesterov, CPU).param_groups[0]
        self.assertEqual((group['momentum'], group['nesterov'], group['weight_decay']),
                         (0.9, True, 5e-4))
        self.assertEqual(train.build_criterion(settings.label_smoothing).label_smoothing, 0.1)
        # A plain state_dict that the article's model loads as the article implies.
        ResNet18(3, small_input=True).load_state_dict(weights(self.out))
        self.assertEqual(len(rows(self.out)), 2)
        self.assertFalse(self.out.with_suffix('.ckpt').exists())  # a finished run needs none
        self.assertEqual(list(self.dir.glob('*.tmp')), [])

    def test_each_image_is_decoded_once_and_resized_on_the_device(self):
        # The article ran every image through PIL (Resize + ToTensor) in every epoch. Here each
        # file is read once (the 8 px images held at 8 px), and resized to 16 px by the loader.
        with image_reads() as opened:
            code, out, err = self.train('--image-size', 16)  # --workers 1: in this process
        self.assertEqual(code, 0, err)
        self.assertEqual(len(opened), sum(1 for _ in Path(self.data).rglob('*.png')) + 1)
        self.assertIn('held at 8 px, fed at 16 px', out)  # + 1 above: the size probe

    def test_best_weights_are_a_copy(self):
        # The article kept trainer.params (a live state_dict), so it saved the last epoch.
        accs, states = [60.0, 40.0], []

        def valid(real, trainer, loader):
            loss, acc = real(trainer, loader)
            states.append(copy_of(trainer.params))
            return loss, accs.pop(0) if accs else acc

        with the_epochs(valid_epoch=valid):
            code, out, err = self.train()
        self.assertEqual(code, 0, err)
        self.assertTrue(torch.equal(weights(self.out)[KEY], states[0][KEY]))
        self.assertFalse(torch.equal(weights(self.out)[KEY], states[1][KEY]))
        self.assertIn('(epoch 1, chosen by its valid accuracy 60.00%)', out)

    def test_the_validation_images_choose_and_the_test_images_are_measured_once(self):
        # Article: it validated on the test set and kept the epoch best there. Here the
        # validation images choose (epoch 2), though the test images would favour epoch 1, and
        # the test set is measured once, after the choice, on the weights chosen.
        accs, states = [70.0, 90.0, 80.0, 95.0], []

        def valid(real, trainer, loader):
            states.append(copy_of(trainer.params))
            return real(trainer, loader)[0], accs.pop(0)

        with the_epochs(valid_epoch=valid) as seen:
            code, out, err = self.train('--epochs', 3)
        self.assertEqual(code, 0, err)
        valids = [loader for name, loader in seen if name == 'epoch_valid']
        self.assertEqual(len(valids), 4)
        self.assertEqual({id(loader) for loader in valids[:3]}, {id(valids[0])})
        self.assertIsNot(valids[3], valids[0])
        self.assertEqual((len(valids[0].labels), len(valids[3].labels)), (6, 30))
        record = self.record()
        self.assertEqual((record['valid_acc'], record['best_epoch'], record['test_acc']),
                         (90.0, 2, 95.0))
        self.assertTrue(torch.equal(states[3][KEY], states[1][KEY]))  # tested: epoch 2's
        self.assertTrue(torch.equal(weights(self.out)[KEY], states[1][KEY]))
        self.assertIn('test accuracy 95.00% on the 30 test images, measured once (epoch 2, '
                      'chosen by its valid accuracy 90.00%)', out)

    def test_no_validation_keeps_the_last_epoch(self):
        last = []

        def train_epoch(real, trainer, loader):
            result = real(trainer, loader)
            last[:] = [copy_of(trainer.params)]
            return result

        with the_epochs(train_epoch=train_epoch):
            code, out, err = self.train('--valid-split', 0)
        self.assertEqual(code, 0, err)
        self.assertIn('56 train, 0 valid and 30 test images', out)
        self.assertIn('no validation', out)
        self.assertEqual((self.record()['valid_acc'], self.record()['best_epoch']), (None, 2))
        for k, v in weights(self.out).items():
            self.assertTrue(torch.equal(v, last[0][k]), k)

    def test_an_earlier_runs_weights_are_never_overwritten(self):
        code, _, err = self.train('--epochs', 1)
        self.assertEqual(code, 0, err)
        files = {p.name: p.read_bytes() for p in self.dir.iterdir()}
        code, out, err = self.train('--epochs', 1, '--model', 'resnet34')
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn(f'{self.out} already holds the weights of an earlier run', err)
        self.assertIn('--out NEW.pth', err)
        self.assertNotIn('decoding', out)  # before any work
        code, _, err = run_main('--resume', '--out', self.out)  # it finished: nothing to resume
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn(f'{self.out} is a finished run', err)
        self.assertEqual({p.name: p.read_bytes() for p in self.dir.iterdir()}, files)

    def test_starts_without_torchvision(self):
        # Importing torchvision costs about 3 s on 2 cores; train.py needs it for CIFAR-10 only.
        self.assertEqual(run_script('import train').strip(), '')
        # The extensions it lists instead are torchvision's ImageFolder's.
        self.assertEqual(set(data.IMG_EXTENSIONS),
                         set(torchvision.datasets.folder.IMG_EXTENSIONS))

    def test_cuda_graphs_are_recorded_once_on_a_full_train_batch(self):
        # On CUDA the whole step is recorded as a CUDA graph on a train batch (all are full),
        # and replayed for every batch; it must train as the plain step does. Here the graph's
        # CPU stand-in (EagerGraphedStep) is put where speed.prepare_step would put the graph.
        replays = []

        class Counted(EagerGraphedStep):
            def __call__(self, inputs, targets):
                replays.append(len(inputs))
                return super().__call__(inputs, targets)

        def on_cuda(step, model, optimizer, scaler, loader, name):
            return Counted(step, model, optimizer, scaler, *next(iter(loader))), 'a CUDA graph'

        graphed, plain = self.dir / 'graphed' / 'w.pth', self.dir / 'plain' / 'w.pth'
        with mock.patch.object(speed, 'prepare_step', on_cuda):
            code, out, err = self.train('--epochs', 1, '--valid-split', 0, out=graphed)
        self.assertEqual(code, 0, err)
        self.assertEqual(replays, [16, 16, 16])  # every train batch, through the graph
        self.assertIn('a CUDA graph, 1 epoch of 3 batches of 16', out)
        code, _, err = self.train('--epochs', 1, '--valid-split', 0, out=plain)
        self.assertEqual(code, 0, err)
        other = weights(graphed)
        for k, v in weights(plain).items():  # the lr is a float32 tensor in the graph
            self.assertTrue(torch.allclose(v.float(), other[k].float(), atol=1e-6), k)
        self.assertEqual(rows(plain)[0]['train_loss'], rows(graphed)[0]['train_loss'])

    def test_the_articles_recipe(self):
        # --recipe article: the article's training (lr 0.001, plain momentum, weight decay 1e-4,
        # no schedule, raw [0, 1] pixels, no augmentation, no label smoothing), on this network.
        code, out, err = run_main('--data', self.data, '--image-size', 8, '--small-input',
                                  '--batch-size', 16, '--epochs', 2, '--device', 'cpu',
                                  '--workers', 1, '--recipe', 'article', '--out', self.out)
        self.assertEqual(code, 0, err)
        self.assertIn('the recipe article, 2 epochs of 3 batches of 16, peak lr 0.001', out)
        record = self.record()
        self.assertEqual({k: record['args'][k] for k in ('momentum', 'nesterov', 'weight_decay',
                                                         'label_smoothing', 'warmup',
                                                         'normalise', 'augment')},
                         {'momentum': 0.9, 'nesterov': False, 'weight_decay': 1e-4,
                          'label_smoothing': 0.0, 'warmup': None, 'normalise': None,
                          'augment': False})
        self.assertEqual((record['mean'], record['std']), ([0.0] * 3, [1.0] * 3))
        self.assertEqual([float(r['lr']) for r in rows(self.out)], [0.001, 0.001])

    def test_the_sets_are_apart_and_fed_normalised(self):
        # The validation images are held out of the training images (the article validated on
        # the test images). The article fed raw [0, 1] pixels: what the run's loaders feed the
        # model, in training and evaluation, has per channel a mean near 0 and a std near 1,
        # with the mean and std of the images trained on (not the validation or test images');
        # and the test sees each test image once, in order, neither cropped nor flipped.
        with the_epochs() as seen:
            code, _, err = self.train('--epochs', 1)
        self.assertEqual(code, 0, err)
        (_, trained), (_, validated), (_, tested) = seen
        sets = [{bytes(x.flatten().tolist()) for x in loader.images}
                for loader in (trained, validated, tested)]
        self.assertEqual([len(s) for s in sets], [50, 6, 30])
        self.assertFalse(sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        for loader in trained, tested:
            x = torch.cat([x for x, _ in loader]).transpose(0, 1).flatten(1)  # (C, pixels)
            self.assertLess(x.mean(dim=1).abs().max().item(), 0.15)
            self.assertLess((x.std(dim=1) - 1).abs().max().item(), 0.15)
        files = data.list_image_folder(self.data)
        train_idx, _ = data.split_valid(torch.tensor([y for _, y in files.train]), 0.1, 0)
        train_x = data.decode_images([f for f, _ in files.train], 8, workers=1)[train_idx]
        record = self.record()
        self.assertEqual((record['mean'], record['std']), data.channel_stats(train_x))
        mean, std = (torch.tensor(record[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
        test_x = data.decode_images([f for f, _ in files.test], 8, workers=1)
        torch.testing.assert_close(torch.cat([x for x, _ in tested]), (test_x / 255 - mean) / std,
                                   rtol=0, atol=1e-5)

    def test_plain_nets_are_recorded(self):
        # --plain is part of what the weights are: weight.json records it, and predict.py
        # builds the plain net again. A plain CIFAR net has the residual net's very
        # parameters, so only what is recorded tells them apart.
        code, out, err = self.train('--plain', '--epochs', 1, model=('--model', 'resnet20'))
        self.assertEqual(code, 0, err)
        self.assertIn('resnet20 (plain), cpu', out)
        self.assertTrue(self.record()['args']['plain'])
        model, _ = predict.load_model(self.out, CPU)
        self.assertFalse(any(b.shortcut for b in model.modules() if hasattr(b, 'shortcut')))

    def test_a_folder_too_large_for_memory_is_one_sentence_and_streams(self):
        with mock.patch.object(data, 'free_memory', return_value=[('RAM', 2**30 + 100)]):
            code, out, err = self.train()
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('held at 8 px they need 0.0 GiB of RAM, and 1.0 GiB is free', err)
        self.assertIn('pass --stream', err)
        # With --stream, the images are decoded in every epoch instead (here in this process,
        # --workers 1), and the run trains and writes its files as ever.
        with image_reads() as opened:
            code, out, err = self.train('--stream')
        self.assertEqual(code, 0, err)
        self.assertIn(f'streaming 86 images from {self.data}, decoded in every epoch', out)
        # a probe, the 50 train images for their statistics, then 2 epochs of 3 batches of 16
        # and 2 validations, and one test
        self.assertEqual(len(opened), 1 + 50 + 2 * 48 + 2 * 6 + 30)
        self.assertGreater(self.record()['test_acc'], 80)

    def test_a_folder_of_class_folders_draws_its_own_test_images(self):
        # Your photos, a folder per class and no train/ or test/: a fifth of each class (drawn
        # the same way whatever --seed) are the test images, and --test finds them again. A
        # small folder (fewer images than a dozen default batches) takes the batch and lr of
        # options.settings (its epochs: OptionsTest).
        photos = self.dir / 'photos'
        for name in COLOURS:
            shutil.copytree(self.data / 'train' / name, photos / name)
        code, out, err = run_main('--data', photos, '--image-size', 8, '--small-input',
                                  '--epochs', 2, '--device', 'cpu', '--workers', 1, '--out',
                                  self.out, '--seed', 3)
        self.assertEqual(code, 0, err)
        self.assertIn('39 training images, a small folder: 2 epochs of 2 batches of 16', out)
        self.assertIn(f'2 epochs of 2 batches of 16, peak lr {config.LR * 16 / 256:g}', out)
        self.assertIn(f'{photos} has no train/ and test/ folders: 20% of each class\'s images, '
                      f'drawn at random, are the test images', out)
        self.assertIn('39 train, 5 valid and 12 test images', out)  # of 56: 4 a class tested
        record = self.record()
        self.assertEqual(record['test_split'], config.TEST_SPLIT)
        code, tested, err = run_cli(predict.main, '--test', '--weights', self.out, '--device',
                                    'cpu', '--workers', 1)
        self.assertEqual(code, 0, err)
        self.assertIn(f'test accuracy {record["test_acc"]:.2f}% on 12 images', tested)
        with contextlib.redirect_stdout(io.StringIO()):
            files = data.list_image_folder(photos)
        self.assertEqual(data.list_image_folder(photos, need_train=False).test, files.test)
        self.assertFalse({f for f, _ in files.train} & {f for f, _ in files.test})


class StopTest(ColourFolderCase):
    """What stops a run, what it keeps, and --resume."""

    def train(self, *extra, out):
        return run_main('--data', self.data, '--image-size', 8, '--small-input', '--lr', 0.01,
                        '--batch-size', 16, '--epochs', 2, '--device', 'cpu', '--workers', 1,
                        '--out', out, *extra)

    def stopped(self, out, epochs=2):
        """A run stopped by Ctrl-C in its second epoch, with a checkpoint after its first."""
        with the_epochs(train_epoch=in_epoch(2, raise_(KeyboardInterrupt))):
            code, _, err = self.train('--save-every', 0, '--epochs', epochs, out=out)
        self.assertEqual((code, err.strip().count('\n')), (130, 0), err)
        return err

    def test_resume_gives_the_same_result(self):
        # A run stopped by Ctrl-C in its second epoch and resumed ends as the run that was
        # never stopped. (Streamed images give the batches held ones give: test_data.)
        a, b = self.dir / 'a' / 'w.pth', self.dir / 'b' / 'w.pth'
        code, _, err = self.train('--valid-split', 0, out=a)
        self.assertEqual(code, 0, err)
        with the_epochs(train_epoch=in_epoch(2, raise_(KeyboardInterrupt))):
            code, _, err = self.train('--valid-split', 0, '--save-every', 0, out=b)
        self.assertEqual((code, err.strip().count('\n')), (130, 0), err)
        self.assertIn(f'interrupted in epoch 2; the best weights so far are in {b}; to go on: '
                      f'python train.py --resume --out {b}', err)
        self.assertTrue(b.is_file())  # the best weights so far are kept
        code, out, err = run_main('--resume', '--out', b, '--device', 'cpu', '--workers', 1)
        self.assertEqual(code, 0, err)
        self.assertIn('resuming after epoch 1', out)
        resumed = weights(b)
        for k, v in weights(a).items():
            self.assertTrue(torch.allclose(v.float(), resumed[k].float(), atol=1e-6), k)
        self.assertEqual([(r['train_loss'], r['lr']) for r in rows(a)],
                         [(r['train_loss'], r['lr']) for r in rows(b)])

    def test_resume_takes_the_runs_own_settings(self):
        # The checkpoint keeps the run's settings: --resume needs no others, takes those that
        # say how long and where it goes on, and refuses any other in one sentence.
        out = self.dir / 'w.pth'
        self.stopped(out, epochs=3)
        for argv in (['--model', 'resnet34'], ['--plain'], ['--lr=0.5']):
            code, _, err = run_main('--resume', '--out', out, *argv)
            self.assertEqual((code, err.count('\n')), (2, 1), err)
            self.assertIn(f'{argv[0].split("=")[0]} cannot change the run being resumed', err)
        code, out_text, err = run_main('--resume', '--out', out, '--workers', 2, '--epochs', 2)
        self.assertEqual(code, 0, err)
        self.assertIn('resuming after epoch 1', out_text)
        self.assertIn('\nepoch 2/2 ', out_text)  # 2 epochs in all now, not 3
        self.assertEqual(len(rows(out)), 2)
        self.assertEqual(json.loads(out.with_suffix('.json').read_text())['args']['epochs'], 2)

    def test_a_run_stopped_after_its_last_checkpoint_knows_its_own_best(self):
        # Ctrl-C writes the best weights so far, which can be of a later epoch than the last
        # checkpoint. Resumed, the run must take them as its best and test them at the end.
        # The checkpoint is written every --save-every 10 s, and the fake clock makes epoch 1
        # take 11 s and epoch 2 one: the checkpoint is epoch 1's, the best epoch 2's.
        accs = {3: 50.0, 6: 60.0}  # by the steps taken: 3 an epoch

        def scripted_valid(real, trainer, loader):
            loss, acc = real(trainer, loader)
            if len(loader.labels) == 6:  # the validation images, not the 30 test images
                acc = accs[trainer.scheduler.taken]
            return loss, acc

        def timed(real, trainer, loader):
            clock.now += (11, 1)[len(calls)] if len(calls) < 2 else 0
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real(trainer, loader)

        out, clock, calls = self.dir / 'w.pth', FakeClock(), []
        with clock, the_epochs(train_epoch=timed, valid_epoch=scripted_valid):
            code, _, err = self.train('--epochs', 3, '--save-every', 10, out=out)
        self.assertEqual(code, 130, err)
        self.assertEqual(torch.load(out.with_suffix('.ckpt'), weights_only=True)['epoch'], 1)
        self.assertEqual(json.loads(out.with_suffix('.json').read_text())['best_epoch'], 2)
        kept = weights(out)
        accs.update({6: 58.0, 9: 55.0})  # resumed, epochs 2 and 3 do worse than the kept best
        with the_epochs(valid_epoch=scripted_valid):
            code, text, err = run_main('--resume', '--out', out)
        self.assertEqual(code, 0, err)
        self.assertIn('(epoch 2, chosen by its valid accuracy 60.00%)', text.splitlines()[-1])
        for k, v in weights(out).items():  # the weights the Ctrl-C kept, tested
            self.assertTrue(torch.equal(v, kept[k]), k)

    def test_unreadable_checkpoint_stops_and_keeps_the_weights(self):
        out = self.dir / 'w.pth'
        self.stopped(out)
        ckpt, kept = out.with_suffix('.ckpt'), out.read_bytes()
        good = torch.load(ckpt, weights_only=True)
        earlier = {**good, 'scheduler': {'last_epoch': 3, 'lr_lambdas': [{}]}}  # LambdaLR's
        for bad, text in ((ckpt.read_bytes()[:2000], 'not a readable checkpoint'),
                          ({'model': {}}, 'not a readable checkpoint'),
                          (earlier, 'written by an earlier version of train.py')):
            if isinstance(bad, bytes):
                ckpt.write_bytes(bad)
            else:
                torch.save(bad, ckpt)
            code, out_text, err = run_main('--resume', '--out', out)
            self.assertEqual((code, err.count('\n')), (2, 1), err)
            self.assertIn(text, err)
            self.assertNotIn('decoding', out_text)  # it fails before reading the data
            self.assertEqual(out.read_bytes(), kept)
        ckpt.unlink()
        out.unlink()
        code, _, err = run_main('--resume', '--out', out)
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('nothing to resume: no checkpoint at', err)

    def test_a_checkpoint_from_another_device_keeps_this_devices_sgd(self):
        model = nn.Linear(3, 2)

        def sgd(device):
            return train.build_optimizer(model.parameters(), 0.1, 0.9, 5e-4, True, device)

        on_cpu = sgd(CPU)
        self.assertIsNone(on_cpu.defaults['fused'])  # PyTorch's default (foreach on CUDA)
        self.assertTrue(sgd(torch.device('cuda')).defaults['fused'])
        # A checkpoint written on CUDA (fused), resumed on the CPU: its momentum, the CPU's SGD.
        model(torch.randn(4, 3)).sum().backward()
        on_cpu.step()
        state = on_cpu.state_dict()
        state['param_groups'][0]['fused'] = True
        resumed = sgd(CPU)
        saving.resume({'model': model.state_dict(), 'optimizer': state, 'scaler': {},
                       'rng': saving.rng_state(CPU)}, model, resumed, speed.MixedPrecision(CPU),
                      CPU)
        self.assertIsNone(resumed.param_groups[0]['fused'])
        self.assertTrue(torch.equal(resumed.state[model.weight]['momentum_buffer'],
                                    on_cpu.state[model.weight]['momentum_buffer']))

    def test_nan_loss_stops_and_keeps_weights(self):
        # The weights become NaN at the start of epoch 2, as a diverging run's do: the loss is
        # no longer a number, the run stops, and epoch 1's weights are kept.
        def poison(trainer):
            with torch.no_grad():
                trainer.model.fc.weight.fill_(float('nan'))

        out = self.dir / 'w.pth'
        with the_epochs(train_epoch=in_epoch(2, poison)):
            code, _, err = self.train('--save-every', 1000, out=out)
        self.assertEqual((code, err.strip().count('\n')), (1, 0), err)
        self.assertIn('error: the loss became nan in epoch 2; try a lower --lr than 0.01; the '
                      f'best weights so far are in {out}; a new run needs its own --out', err)
        self.assertEqual(json.loads(out.with_suffix('.json').read_text())['best_epoch'], 1)
        ResNet18(3, small_input=True).load_state_dict(weights(out))

    def test_running_out_of_memory_keeps_the_weights_and_says_what_to_pass(self):
        # On a GPU: torch.cuda.OutOfMemoryError; on the CPU, a RuntimeError that says so.
        errors = (torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB'),
                  RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 48000000000 bytes. Error code 12"))
        self.assertTrue(train.errors.out_of_memory(errors[0]))
        for i, error in enumerate(errors[1:]):
            out = self.dir / str(i) / 'w.pth'
            with the_epochs(train_epoch=in_epoch(2, raise_(error))):
                code, _, err = self.train('--save-every', 0, out=out)
            self.assertEqual((code, err.strip().count('\n')), (1, 0), err)
            self.assertIn('error: in epoch 2, the cpu ran out of memory for batches of 16 images '
                          'at 8 px; pass a smaller --batch-size or --image-size', err)
            self.assertIn('best weights so far', err)
            ResNet18(3, small_input=True).load_state_dict(weights(out))
            self.assertEqual(torch.load(out.with_suffix('.ckpt'), weights_only=True)['epoch'], 1)
        # Apple's GPU says it in words of its own.
        self.assertTrue(train.errors.out_of_memory(RuntimeError(
            'MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: 1.00 GB)')))
        # Before the epochs too (the model moved to the device); an error that is not about
        # memory stays a traceback, and what was written stays.
        for error in errors[1], RuntimeError('other'):
            with mock.patch.object(speed, 'prepare_model', side_effect=error):
                if 'other' in str(error):
                    with self.assertRaisesRegex(RuntimeError, 'other'):
                        self.train(out=self.dir / 'other' / 'w.pth')
                    continue
                code, _, err = self.train(out=self.dir / 'early' / 'w.pth')
            self.assertEqual((code, err.strip().count('\n')), (1, 0), err)
            self.assertIn('error: before the first epoch, the cpu ran out of memory for batches '
                          'of 16 images at 8 px', err)
            self.assertIn('no epoch had finished, so nothing was saved', err)


class InputTest(unittest.TestCase):
    """Bad arguments and bad data: one sentence, exit code 2, no traceback."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.root = Path(tmp.name)

    def assertFails(self, argv, text):
        with in_a_folder(self.root), offline_cifar10():
            code, _, err = run_main('--out', self.root / 'w.pth', '--device', 'cpu',
                                    '--workers', 1, *argv)
        self.assertEqual(code, 2, err)
        self.assertIn(text, err)
        self.assertNotIn('Traceback', err)
        self.assertFalse((self.root / 'w.pth').exists())

    def test_bad_numbers_and_recipes(self):
        for flag in ('--epochs', '--batch-size', '--lr', '--minutes'):
            for value in ('0', '-1'):
                self.assertFails([flag, value], 'must be positive')
        self.assertFails(['--epochs', 'ten'], 'not a number')
        self.assertFails(['--recipe', 'article+dropout'], 'is not a recipe')

    def test_help_shows_every_default(self):
        with contextlib.redirect_stdout(io.StringIO()) as out, self.assertRaises(SystemExit):
            options.parse_args(['--help'])
        text = ' '.join(out.getvalue().split())
        self.assertIn('--precision {auto,fp32,bf16,fp16}', text)
        self.assertIn(f'(default: {config.PRECISION})', text)
        self.assertGreaterEqual(text.count('(default:'), 13)  # every option that has one

    def test_options_that_cannot_be(self):
        for argv, text in ((['--minutes', '5', '--epochs', '3'], 'pick one'),
                           (['--stream'], '--stream reads an image folder'),
                           (['--model', 'alexnet', '--image-size', '32'], 'at least 67 px'),
                           (['--model', 'alexnet', '--plain'], 'AlexNet has none to change'),
                           (['--model', 'alexnet', '--small-input'], 'AlexNet has none'),
                           (['--model', 'resnet20', '--small-input'], 'has that stem already'),
                           (['--model', 'resnet21'], 'invalid choice'),
                           (['--freeze'], 'pass --pretrained or --init'),
                           (['--pretrained', '--init', 'w.pth'], 'pick one'),
                           (['--pretrained', '--model', 'resnet20'], 'not for resnet20'),
                           (['--pretrained', '--small-input'], 'leave it out'),
                           (['--pretrained', '--plain'], 'leave it out'),
                           (['--resume', '--seed', '3'], '--seed cannot change the run'),
                           (['--resume'], 'nothing to resume')):
            with self.subTest(argv):
                self.assertFails(argv, text)

    @unittest.skipIf(torch.cuda.is_available(), 'this machine has a CUDA GPU')
    def test_cuda_asked_for_but_missing(self):
        self.assertFails(['--device', 'cuda'], 'sees no CUDA GPU')

    def test_missing_and_empty_data_folders(self):
        self.assertFails(['--data', self.root / 'nowhere'], 'does not exist')
        self.assertFails(['--data', self.root], 'has no class folders, and a classifier needs')
        (self.root / 'train' / 'cat').mkdir(parents=True)
        self.assertFails(['--data', self.root], 'has a train/ folder but no test/')
        (self.root / 'test' / 'cat').mkdir(parents=True)
        make_image = data.Image.new
        make_image('RGB', (8, 8)).save(self.root / 'train' / 'cat' / 'a.png')
        make_image('RGB', (8, 8)).save(self.root / 'test' / 'cat' / 'a.png')
        # One class "trains" a classifier that is always right: refused.
        self.assertFails(['--data', self.root], 'one class folder (cat), and a classifier needs '
                                                'at least two')
        (self.root / 'train' / 'dog').mkdir()
        (self.root / 'test' / 'dog').mkdir()
        self.assertFails(['--data', self.root], f"{Path(self.root, 'train', 'dog')} holds no")
        make_image('RGB', (8, 8)).save(self.root / 'train' / 'dog' / 'a.png')
        (self.root / 'test' / 'cat' / 'a.png').unlink()
        self.assertFails(['--data', self.root], f"{Path(self.root, 'test')} holds no images")

    def test_class_sets_differ_and_an_unreadable_image_is_named(self):
        data_dir = make_colour_folder(self.root / 'd', n_train=1, n_test=1)
        (data_dir / 'train' / 'red' / 'broken.png').write_bytes(b'not a png')
        self.assertFails(['--data', data_dir], 'broken.png is not a readable image')
        os.rename(data_dir / 'test', data_dir / 'val')  # no test/: val/ is used instead
        os.rename(data_dir / 'val' / 'red', data_dir / 'val' / 'orange')
        self.assertFails(['--data', data_dir], "only in train: ['red'], only in test: ['orange']")

    def test_cifar10_path_trains_and_offline_says_what_to_do(self):
        # The default data, on a miniature CIFAR-10 in torchvision's format in ./data (the real
        # one is downloaded there); offline and without it, one sentence names the file.
        self.assertFails([], 'cifar-10-python.tar.gz')
        make_mini_cifar(self.root / 'data')
        with in_a_folder(self.root), offline_cifar10(download=None):
            code, out, err = run_main('--epochs', 1, '--batch-size', 25, '--out', 'w.pth',
                                      '--device', 'cpu')
        self.assertEqual(code, 0, err)
        self.assertIn('40 train, 10 valid and 10 test images, 10 classes', out)
        self.assertEqual(json.loads((self.root / 'w.json').read_text())['data'], 'cifar10')

    def test_the_first_download_of_cifar10_does_not_count(self):
        # --minutes counts from the start, but for the first download of CIFAR-10: its seconds.
        def download(dataset):  # the miniature appears, as the real one would
            if not Path(dataset.root, 'cifar-10-batches-py').is_dir():
                make_mini_cifar(dataset.root)
        with offline_cifar10(download=download):
            fetched = data.load_cifar10(self.root)
            there = data.load_cifar10(self.root)
        self.assertGreater(fetched.download_seconds, 0)
        self.assertEqual(there.download_seconds, 0)


class OptionsTest(unittest.TestCase):
    """The run's settings: resolved once from the command line and the data's size."""

    def settings(self, *argv, n_train=50_000):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            s = options.settings(options.parse_args(list(argv)), n_train)
        self.note = out.getvalue()
        return s

    def test_recipe_names(self):
        self.assertEqual(options.parse_args([]).recipe, 'fixed')
        for text, recipe, fixes in (
                ('article', 'article', set()),
                ('article+augment+norm', 'article+norm+augment', {'norm', 'augment'}),
                ('article+nesterov+norm+augment+lr+decay+smoothing', 'fixed',
                 set(options.FIXES))):
            args = options.parse_args(['--recipe', text])
            self.assertEqual((args.recipe, options.fixes_of(args.recipe)), (recipe, fixes))
        for recipe, lr in (('article+norm', config.ARTICLE_LR), ('article+lr', config.LR)):
            self.assertEqual(self.settings('--recipe', recipe).lr, lr)
        # Each fix switches one thing: here weight decay alone, then Nesterov alone.
        for recipe, nesterov, decay in (('article+decay', False, config.WEIGHT_DECAY),
                                        ('article+nesterov', True, config.ARTICLE_WEIGHT_DECAY)):
            s = self.settings('--recipe', recipe)
            self.assertEqual((s.nesterov, s.weight_decay, s.label_smoothing, s.warmup),
                             (nesterov, decay, 0.0, None))

    def test_defaults_come_from_one_table(self):
        # --batch-size, --lr and --epochs left out take the model's row of
        # config.TRAIN_DEFAULTS and config.NUM_EPOCHS; an explicit value always wins.
        args = options.parse_args([])
        self.assertEqual((args.batch_size, args.lr, args.epochs), (None, None, None))
        s = self.settings()
        self.assertEqual((s.batch_size, s.lr, s.epochs, s.eval_batch_size),
                         (config.BATCH_SIZE, config.LR, config.NUM_EPOCHS,
                          config.EVAL_BATCH_SIZE))
        self.assertEqual(self.note, '')
        for argv, (batch, lr) in ((('--model', 'alexnet'), (128, 0.02)),
                                  (('--model', 'resnet50'), (128, config.LR)),
                                  (('--model', 'resnet34'), (512, config.LR)),
                                  (('--small-input',), (256, config.LR)),
                                  (('--model', 'resnet56'), (128, 0.1))):
            self.assertEqual(self.settings(*argv)[5:7], (batch, lr), argv)
        s = self.settings('--model', 'alexnet', '--batch-size', '64', '--lr', '0.01', '--epochs',
                          '3')
        self.assertEqual((s.batch_size, s.lr, s.epochs, s.eval_batch_size), (64, 0.01, 3, 128))
        self.assertEqual({k.split()[0] for k in config.TRAIN_DEFAULTS}, set(options.MODELS))
        # A folder of a few hundred images: a dozen batches an epoch, the lr scaled with the
        # batch, more epochs, and a line that says so; what is given stays as given.
        s = self.settings(n_train=450)
        self.assertEqual((s.batch_size, s.lr, s.epochs), (32, config.LR * 32 / config.BATCH_SIZE,
                                                          config.SMALL_FOLDER_EPOCHS))
        self.assertIn(f'450 training images, a small folder: {config.SMALL_FOLDER_EPOCHS} '
                      f'epochs of 14 batches of 32', self.note)
        self.assertEqual(self.settings(n_train=100).batch_size, 16)  # never below 16
        s = self.settings('--batch-size', '512', '--epochs', '5', n_train=450)
        self.assertEqual((s.batch_size, s.lr, s.epochs), (512, config.LR, 5))
        self.assertEqual(self.settings('--lr', '0.05', n_train=450)[5:7], (32, 0.05))
        self.assertEqual(self.settings('--init', 'w.pth', '--freeze', n_train=450)[5:7],
                         (32, config.LR))  # the fc alone: the row's lr, unscaled
        self.assertIsNone(self.settings('--minutes', '2', n_train=450).epochs)  # the budget's
        self.assertIn('a small folder: the epochs that fit of 14 batches of 32', self.note)

    def test_each_model_is_fed_at_its_own_size_unless_told(self):
        # The article's first model needs 67 px at least; --pretrained, what ImageNet's weights
        # learned at; the others, CIFAR's own 32 px.
        for argv, size in (([], config.IMAGE_SIZE), (['--model', 'alexnet'], 67),
                           (['--model', 'alexnet', '--image-size', '96'], 96),
                           (['--pretrained'], 224)):
            self.assertEqual(options.parse_args(argv).image_size, size, argv)
        from alexnet import AlexNet
        self.assertEqual(config.ALEXNET_IMAGE_SIZE, AlexNet.MIN_INPUT_SIZE)

    def test_the_header_says_what_is_planned(self):
        s = self.settings('--model', 'resnet20', '--minutes', '5')
        self.assertEqual(options.header(s, 'cpu', 'fp32', 'eager', 351, 96),
                         'resnet20, cpu, fp32, eager, 96 batches of 128 (0.27 of an epoch) '
                         'planned in 5 min, peak lr 0.1')
        self.assertIn('957 batches of 128 (2.7 epochs) planned in 5 min',
                      options.header(s, 'cpu', 'fp32', 'eager', 351, 957))
        s = self.settings('--recipe', 'article', '--init', 'w.pth', '--freeze')
        self.assertEqual(options.header(s, 'cuda', 'bf16', 'a CUDA graph', 87, 2610),
                         'resnet18 (weights of w.pth, frozen but the fc), cuda, bf16, a CUDA '
                         'graph, the recipe article, 30 epochs of 87 batches of 512, peak lr '
                         '0.001')


class ScheduleTest(unittest.TestCase):
    """budget.Schedule: the lr of each step, and the plan's end."""

    def schedule(self, total, warmup=config.WARMUP, min_warmup=0, lr=1.0):
        return budget.Schedule(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=lr), total,
                               warmup, min_warmup)

    def test_lr_schedule_warms_up_then_decays_to_zero(self):
        # The article used a constant lr of 0.001 (warmup None). The first step's lr is set.
        f = self.schedule(100)
        self.assertAlmostEqual(f.optimizer.param_groups[0]['lr'], 1 / 20)
        self.assertAlmostEqual(f.factor(0), 1 / 20)
        self.assertAlmostEqual(f.factor(19), 1.0)
        self.assertAlmostEqual(f.factor(60), 0.5)
        self.assertAlmostEqual(f.factor(100), 0.0)
        self.assertEqual(max(f.factor(s) for s in range(100)), 1.0)
        self.assertEqual({self.schedule(10, warmup=None).factor(s) for s in range(12)}, {1.0})
        for _ in range(100):
            f.step()
        self.assertEqual((f.optimizer.param_groups[0]['lr'], f.steps_left()), (0.0, 0))

    def test_the_plan_moves_and_the_lr_goes_on_from_where_it_is(self):
        f = self.schedule(100)
        for _ in range(60):
            f.step()
        before = f.optimizer.param_groups[0]['lr']
        f.refit(80)  # fewer steps: from 0.5 now to 0 at step 80
        self.assertAlmostEqual(f.factor(60), before)
        self.assertAlmostEqual(f.factor(70), before / 2)
        self.assertEqual(f.factor(80), 0.0)
        f.refit(50)  # not before the steps taken
        self.assertEqual(f.total, 60)
        # In the warm-up, an end too soon for the peak stops the rise sooner, at its pace.
        g = self.schedule(100)
        for _ in range(10):
            g.step()
        g.refit(30)
        self.assertAlmostEqual(g.factor(9), 10 / 20)
        self.assertAlmostEqual(g.factor(14), 15 / 20)
        self.assertEqual(max(g.factor(s) for s in range(30)), 15 / 20)
        self.assertEqual(g.factor(30), 0.0)

    def test_a_short_run_of_alexnet_rises_slowly_and_peaks_lower(self):
        # Without BatchNorm, AlexNet diverged when a short budget's warm-up (20% of its steps)
        # took it to its peak lr in a few dozen steps. It never rises faster than to the peak
        # in config.MIN_WARMUP_STEPS['alexnet'] steps; a run too short for that peaks lower.
        rise = config.MIN_WARMUP_STEPS['alexnet']
        s = options.settings(options.parse_args(['--model', 'alexnet']), 45_000)
        self.assertEqual(s.min_warmup, rise)
        short, long = self.schedule(rise, min_warmup=rise), self.schedule(10 * rise,
                                                                          min_warmup=rise)
        for f in short, long:
            pace = max(f.factor(i + 1) - f.factor(i) for i in range(f.warmup - 1))
            self.assertLessEqual(pace, 1 / rise + 1e-9)
        self.assertAlmostEqual(max(short.factor(i) for i in range(rise)), 0.5)
        self.assertAlmostEqual(max(long.factor(i) for i in range(10 * rise)), 1.0)
        self.assertEqual(self.schedule(100).warmup, 20)  # a ResNet: 20% of the steps

    def test_an_epoch_ends_where_the_plan_ends(self):
        images = torch.zeros(40, 3, 4, 4, dtype=torch.uint8)
        loader = data.TensorLoader(images, torch.zeros(40, dtype=torch.long), 4, [0] * 3,
                                   [1] * 3, 4, train=True)
        f = self.schedule(25)
        self.assertIs(f.epoch(loader), loader)  # a whole epoch
        for _ in range(20):
            f.step()
        epoch = f.epoch(loader)
        self.assertEqual(len(epoch), 5)
        taken = 0
        for _ in epoch:
            f.step()
            taken += 1
            if taken == 2:
                f.refit(23)  # the end moves within the epoch
        self.assertEqual((taken, f.steps_left(), f.optimizer.param_groups[0]['lr']), (3, 0, 0.0))


class BudgetTest(unittest.TestCase):
    """--minutes: the plan made from a few timed steps, and followed within each epoch. The
    clock is a fake one that each simulated step moves."""

    def budget(self, clock, minutes=1, per_epoch=100, step=0.5):
        plan = budget.Budget(minutes, train.START, per_epoch, n_valid=64, n_test=128)
        total = plan.first_plan(step, per_image=0.4 * step / 32)
        optimizer = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0)
        return plan, budget.Schedule(optimizer, total, config.WARMUP, budget=plan)

    def test_the_first_plan_fits_the_timed_steps(self):
        with FakeClock(now=10):  # 10 s gone in starting and reading the data
            plan, f = self.budget(None)
        # Steps of 0.5 s (of 32 images), each with its share of a validation of 64 images at
        # 0.4 of a trained one each (0.4 s), the epoch under way's in full; after them 128 test
        # images and the exit, with 3% of the minute kept back.
        after = 0.4 + 128 * 0.4 * 0.5 / 32 + budget.EXIT_SECONDS
        self.assertEqual(f.total, int((60 - 10 - after - budget.MARGIN * 60) / (0.5 + 0.4 / 100)))
        self.assertEqual(f.total, 89)

    def test_the_plan_is_corrected_within_an_epoch(self):
        # The steps turn out slower than timed (0.6 s, not 0.5): the plan shrinks while the
        # first epoch goes on; then faster (0.3 s): it grows, by the steps that fit, not by
        # whole epochs; and the lr reaches 0 at the last step, before the deadline.
        with FakeClock(now=10) as clock:
            plan, f = self.budget(clock, per_epoch=1000)
            first, totals = f.total, []
            for pace, steps in ((0.6, 40), (0.3, 60)):
                for _ in range(steps):
                    clock.now += pace
                    f.step()
                totals.append(f.total)
            self.assertLess(totals[0], first)
            self.assertGreater(totals[1], totals[0])
            self.assertLess(totals[1] - totals[0], 1000)  # an epoch is 1000 steps
            while f.steps_left() > 0:
                clock.now += 0.3
                f.step()
            self.assertEqual(f.optimizer.param_groups[0]['lr'], 0.0)
            after = 0.4 + 128 * plan.per_image + budget.EXIT_SECONDS  # validation, test, exit
            self.assertLessEqual(clock.now + after, 60)
            self.assertGreaterEqual(clock.now + after, 0.9 * 60)

    def test_a_resumed_minutes_run_ends_its_plan_or_fits_the_rest_into_new_minutes(self):
        # The README: --resume goes on to the plan's end; with --minutes M, what is left is
        # fitted into M minutes from now. Both keep the steps already taken and the lr's place.
        def made(state=None, minutes=1, now=10):
            with FakeClock(now=now):
                opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0)
                return budget.schedule(opt, None, config.WARMUP, 0, 100, state, minutes,
                                       train.START, lambda: (0.5, 0.4 * 0.5 / 32), 64, 128)
        first = made()
        for _ in range(30):
            first.step()
        state, lr = first.state_dict(), first.optimizer.param_groups[0]['lr']
        again = made(state, minutes=None)
        self.assertEqual((again.total, again.steps_left()), (first.total, first.total - 30))
        self.assertAlmostEqual(again.optimizer.param_groups[0]['lr'], lr)
        later = made(state, minutes=1, now=10)  # a new minute from where `first` began
        self.assertEqual((later.taken, later.total), (30, 30 + first.total))
        self.assertAlmostEqual(later.optimizer.param_groups[0]['lr'], lr)  # no jump on refit

    def test_the_plan_does_not_jitter(self):
        # Steps that take a little more or less than timed (3%, a few steps at a time) leave
        # the plan as it is.
        with FakeClock(now=10) as clock:
            plan, f = self.budget(clock)
            first = f.total
            for i in range(60):
                clock.now += 0.485 if i // 3 % 2 else 0.515
                f.step()
            self.assertEqual(f.total, first)

    def test_a_validation_between_epochs_is_timed_and_planned_for(self):
        with FakeClock(now=10) as clock:
            plan, f = self.budget(clock, per_epoch=10, step=0.2)
            for i in range(30):
                clock.now += 0.2 + (3.0 if i in (10, 20) else 0)  # the validations: 3 s each
                f.step()
            self.assertAlmostEqual(plan.per_image, 3.0 / 64)  # an image evaluated
            epochs_left = math.ceil(f.steps_left() / 10)
            self.assertLessEqual(clock.now + f.steps_left() * 0.2 + epochs_left * 3.0
                                 + 128 * plan.per_image + budget.EXIT_SECONDS, 60)

    def test_the_time_left_a_run_prints(self):
        # Under --minutes, the seconds to its deadline; else the epochs left, each as long as
        # the mean so far (MinutesTest runs it).
        with FakeClock(now=10) as clock:
            _, f = self.budget(clock)
            clock.now = 41.5
            self.assertEqual(f.seconds_left(100, 7.0), 60 - 41.5)
        optimizer = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0)
        self.assertEqual(budget.Schedule(optimizer, 250, 0.2).seconds_left(100, 7.0), 3 * 7.0)

    def test_too_short_a_budget_is_one_sentence(self):
        # A plan shorter than an epoch trains what fits; one without a step is refused.
        with FakeClock(now=9):
            _, f = self.budget(None, minutes=0.25, per_epoch=10)
            self.assertEqual(f.total, 4)  # 15 s - 9 - 3.2 (validation, test, exit) - 0.45: 4
            with self.assertRaises(budget.UsageError) as caught:
                self.budget(None, minutes=0.2, per_epoch=10)
        self.assertEqual(str(caught.exception),
                         '--minutes 0.2 is too short to train: starting took 9 s, and a step, a '
                         'validation and the test would take about 4 s more; give --minutes 0.3 '
                         'or more')

    def test_timing_steps_puts_everything_back(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5),
                              nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        optimizer = train.build_optimizer(model.parameters(), 0.1, 0.9, 5e-4, True, CPU)
        trainer = train.Trainer(model, optimizer, train.build_criterion())
        batches = [(torch.randn(4, 3, 8, 8), torch.arange(4) % 3)]  # one, used again and again
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        step, image = budget.seconds_per_step(trainer.train_step, model, trainer.optimizer,
                                              trainer.amp, batches, trainer.epoch_valid,
                                              batches[0], steps=2)
        self.assertGreater(min(step, image), 0)
        for k, v in model.state_dict().items():
            self.assertTrue(torch.equal(v, before[k]), k)
        self.assertEqual(len(trainer.optimizer.state), 0)  # no momentum yet, as before
        self.assertTrue(torch.equal(torch.get_rng_state(), rng))


class MinutesTest(ColourFolderCase):
    """--minutes and the time left, end to end."""

    def train(self, *extra):
        return run_main('--data', self.data, '--image-size', 8, '--small-input', '--lr', 0.01,
                        '--batch-size', 16, '--device', 'cpu', '--workers', 1, '--out',
                        self.dir / 'w.pth', *extra)

    def test_a_run_says_when_it_will_end(self):
        self.assertEqual([train.in_words(s) for s in (0.3, 40, 89, 95, 1080, -2)],
                         ['1 s', '40 s', '89 s', '2 min', '18 min', '0 s'])
        # An ordinary run: the epochs left, each as long as the mean so far (the fake clock
        # makes each epoch 5 s).
        clock = FakeClock()

        def five_seconds(real, trainer, loader):
            clock.now += 5
            return real(trainer, loader)

        with clock, the_epochs(train_epoch=five_seconds):
            code, out, err = self.train('--epochs', 3)
        self.assertEqual(code, 0, err)
        lines = [line for line in out.splitlines() if line.startswith('epoch ')]
        self.assertEqual([line.rsplit('img/s', 1)[1] for line in lines],
                         ['  about 10 s left', '  about 5 s left', ''])

    def test_the_lr_reaches_0_where_the_steps_that_fit_end(self):
        # A minute that passes 20 times faster than the real one: the steps are timed, planned,
        # followed, and the last one's lr is 0; the time left comes from the deadline.
        with FakeClock(speed=20):
            code, out, err = self.train('--minutes', 1)
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r'batches of 16 \(.+\) planned in 1 min, peak lr 0.01')
        last = rows(self.dir / 'w.pth')[-1]
        record = json.loads((self.dir / 'w.json').read_text())
        self.assertEqual((float(last['lr']), record['args']['minutes'], record['args']['epochs']),
                         (0.0, 1.0, None))
        self.assertGreater(record['steps'], 0)
        self.assertRegex(out, r'img/s  about \d+ s left\n')


class SavingTest(unittest.TestCase):
    """saving.py's files: replaced in one step, the optional plot, and the random state a
    checkpoint keeps."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = Path(tmp.name)

    def test_atomic_save_keeps_the_old_file(self):
        path = self.dir / 'w.pth'
        saving.save_torch({'a': torch.ones(3)}, path)

        def broken_save(obj, f):  # a disk that fills up halfway
            f.write(b'half a file')
            raise OSError('disk full')

        with mock.patch.object(torch, 'save', broken_save), self.assertRaises(OSError):
            saving.save_torch({'a': torch.zeros(3)}, path)
        self.assertTrue(torch.equal(weights(path)['a'], torch.ones(3)))
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
        # CUDA run goes on from the GPU's state as well as the CPU's. (No GPU here: its two
        # calls stand in.)
        cuda, gpu_state = torch.device('cuda'), torch.tensor([7, 8, 9], dtype=torch.uint8)
        with mock.patch.object(torch.cuda, 'get_rng_state', return_value=gpu_state), \
                mock.patch.object(torch.cuda, 'set_rng_state') as set_gpu:
            state = saving.rng_state(cuda)
            expected = torch.rand(3)
            saving.set_rng_state(state, cuda)
        set_gpu.assert_called_once_with(gpu_state, cuda)
        self.assertTrue(torch.equal(torch.rand(3), expected))  # the CPU's state too
        self.assertEqual(set(saving.rng_state(CPU)), {'cpu'})


def torchvision_resnet18(seed=0):
    """A torchvision-format ResNet18 state_dict (1000 classes) with recognisable weights."""
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=1000).state_dict()


class TransferTest(ColourFolderCase):
    """Starting from torchvision's ImageNet weights (--pretrained, found in a cache the test
    plants, never downloaded), from a weight.pth (--init), and --freeze."""

    def setUp(self):
        super().setUp()
        no_network = mock.patch.object(torch.hub, 'download_url_to_file',
                                       side_effect=urllib.error.URLError('no network'))
        no_network.start()
        self.addCleanup(no_network.stop)
        home = mock.patch.dict(os.environ, {'TORCH_HOME': str(self.dir / 'torch')})
        home.start()
        self.addCleanup(home.stop)

    def plant_cache(self, state):
        """Save state where torchvision's weights API looks for ResNet18's ImageNet file."""
        url = torchvision.models.ResNet18_Weights.DEFAULT.url
        path = Path(torch.hub.get_dir(), 'checkpoints', url.rsplit('/', 1)[1])
        path.parent.mkdir(parents=True)
        torch.save(state, path)
        return path

    def train(self, *extra, out):
        return run_main('--data', self.data, '--image-size', 8, '--batch-size', 16, '--epochs', 1,
                        '--device', 'cpu', '--workers', 1, '--out', out, *extra)

    def test_pretrained_weights_are_found_in_torchvisions_cache_and_mapped(self):
        state = torchvision_resnet18()
        self.assertTrue(str(self.plant_cache(state)).startswith(str(self.dir / 'torch')))
        model = ResNet18(3)
        new = transfer.start_from(model, transfer.imagenet_weights('resnet18'), 'cache')
        self.assertEqual(new, {'fc.weight', 'fc.bias'})
        mapped = from_torchvision(state)
        for k, v in model.state_dict().items():
            if not k.startswith('fc.'):
                self.assertTrue(torch.equal(v, mapped[k]), k)  # every other tensor, strictly
        self.assertEqual(tuple(model.fc.weight.shape), (3, 512))  # a new fc for 3 classes
        # And end to end: fed as the weights were trained (ImageNet's mean and std, the
        # ImageNet stem), recorded in weight.json, and predict.py's loading works unchanged.
        out = self.dir / 'weight.pth'
        code, stdout, err = self.train('--pretrained', out=out)
        self.assertEqual(code, 0, err)
        self.assertIn("resnet18 (ImageNet's weights)", stdout)
        record = json.loads(out.with_suffix('.json').read_text())
        self.assertEqual((record['start'], record['args']['freeze'],
                          record['args']['small_input']), ('imagenet resnet18', False, False))
        self.assertEqual((record['mean'], record['std']),
                         (config.IMAGENET_MEAN, config.IMAGENET_STD))
        code, _, err = run_cli(predict.main, '--test', '--weights', out, '--device', 'cpu',
                               '--workers', 1)
        self.assertEqual(code, 0, err)

    def test_pretrained_by_path(self):
        path = self.dir / 'resnet18-imagenet.pth'
        torch.save(torchvision_resnet18(), path)
        args = options.parse_args(['--pretrained', str(path)])
        self.assertEqual((args.pretrained, args.image_size), (str(path), 224))
        self.assertEqual(options.parse_args(['--pretrained']).pretrained, 'imagenet')
        start = transfer.read_start(args.model, args.pretrained)
        new = transfer.load_start(ResNet18(3), start, ['a', 'b', 'c'])
        self.assertEqual(start.name, f'imagenet {path.resolve()}')
        self.assertEqual(new, {'fc.weight', 'fc.bias'})
        # A path that is not there, or not torchvision's file: one sentence, before the data.
        ours = self.dir / 'ours.pth'
        torch.save(ResNet18(3).state_dict(), ours)  # this repository's names: for --init
        for path, text in ((self.dir / 'nowhere.pth', 'no file at'), (ours, f'--init {ours}'),
                           ('imagenet', str(Path(torch.hub.get_dir(), 'checkpoints')))):
            code, out, err = self.train(*(['--pretrained', path] if path != 'imagenet' else
                                          ['--pretrained']), out=self.dir / 'w.pth')
            self.assertEqual((code, err.count('\n')), (2, 1), err)
            self.assertIn(text, err)
            self.assertNotIn('decoding', out)
        self.assertIn('--pretrained PATH', err)  # offline: where the file goes, or its path
        self.assertFalse((self.dir / 'w.pth').exists())

    def test_freeze_trains_the_fc_alone(self):
        torch.manual_seed(0)
        model = ResNet18(3)
        transfer.start_from(model, from_torchvision(torchvision_resnet18()), 'test')
        trainable = transfer.freeze_all_but_head(model)
        self.assertEqual(trainable, {'fc.weight', 'fc.bias'})
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = train.build_optimizer(transfer.parameter_groups(
            model, trainable, 0.1, config.PRETRAINED_LR_FACTOR), 0.1, 0.9, 5e-4, True, CPU)
        (group,) = optimizer.param_groups  # the fc alone, at the full lr
        self.assertEqual((len(group['params']), group['lr']), (2, 0.1))
        trainer = train.Trainer(model, optimizer, train.build_criterion())
        trainer.epoch_train([(torch.randn(8, 3, 8, 8), torch.arange(8) % 3)])
        for k, v in model.state_dict().items():
            changed = not torch.equal(v, before[k])
            # Frozen: the weights and the BatchNorm statistics; the new fc trains.
            self.assertEqual(changed, k.startswith('fc.'), k)
        # A frozen BatchNorm keeps its statistics in training (eval mode there).
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                              nn.Linear(4 * 6 * 6, 2))
        transfer.freeze_all_but_head(model)  # all but the last layer, '3'
        model.train()
        mean = model[1].running_mean.clone()
        model(torch.randn(4, 3, 8, 8))
        self.assertTrue(torch.equal(model[1].running_mean, mean))
        self.assertEqual(transfer.head_name(model), '3')

    def test_the_layers_that_came_with_the_weights_train_at_the_smaller_lr(self):
        model = ResNet18(3)
        new = transfer.start_from(model, from_torchvision(torchvision_resnet18()), 'test')
        optimizer = train.build_optimizer(transfer.parameter_groups(model, new, 0.1, 0.25),
                                          0.1, 0.9, 5e-4, True, CPU)
        fresh, came = optimizer.param_groups
        self.assertEqual({id(p) for p in fresh['params']}, {id(model.fc.weight), id(model.fc.bias)})
        self.assertEqual(len(came['params']), len(list(model.parameters())) - 2)
        self.assertAlmostEqual(came['lr'], 0.1 * 0.25)
        schedule = budget.Schedule(optimizer, 10, config.WARMUP)
        for _ in range(5):
            optimizer.step()
            schedule.step()
        self.assertAlmostEqual(came['lr'] / fresh['lr'], 0.25)
        # Nothing new (--init with the same classes): one group, no empty one.
        (group,) = transfer.parameter_groups(model, set(), 0.1, 0.25)
        self.assertEqual((len(group['params']), group['lr']), (len(list(model.parameters())),
                                                               0.1 * 0.25))
        # Each start brings its own factor (config.py).
        path = self.dir / 'imagenet.pth'
        torch.save(torchvision_resnet18(), path)
        self.assertEqual(transfer.read_start('resnet18', pretrained=str(path)).lr_factor,
                         config.PRETRAINED_LR_FACTOR)

    def test_init_replaces_the_fc_for_other_classes_and_keeps_it_for_the_same(self):
        out = self.dir / 'first.pth'
        code, _, err = self.train('--small-input', out=out)
        self.assertEqual(code, 0, err)
        saved = weights(out)
        for classes, kept in ((['blue', 'green', 'red'], True), (['cat', 'dog', 'fox'], False)):
            torch.manual_seed(1)
            model = ResNet18(3, small_input=True)
            start = transfer.read_start('resnet18', init=str(out))
            new = transfer.load_start(model, start, classes)
            self.assertEqual((start.name, start.lr_factor), (f'init {out.resolve()}',
                                                             config.INIT_LR_FACTOR))
            self.assertEqual(new, set() if kept else {'fc.weight', 'fc.bias'})
            self.assertEqual(torch.equal(model.fc.weight, saved['fc.weight']), kept)
            self.assertTrue(torch.equal(model.conv1.weight, saved['conv1.weight']))
        # End to end, and recorded; another model's file is one sentence.
        second = self.dir / 'second.pth'
        code, stdout, err = self.train('--small-input', '--init', out, '--freeze', out=second)
        self.assertEqual(code, 0, err)
        self.assertIn('frozen but the fc', stdout)
        record = json.loads(second.with_suffix('.json').read_text())
        self.assertEqual((record['start'], record['args']['freeze']),
                         (f'init {out.resolve()}', True))
        code, _, err = self.train('--model', 'resnet34', '--small-input', '--init', out,
                                  out=self.dir / 'third.pth')
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('holds a resnet18; pass --model resnet18', err)


class TrainerTest(unittest.TestCase):
    """The article's Trainer, alone."""

    def test_flips_average_each_image_with_its_mirror_image(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
        x = torch.randn(5, 3, 4, 4)
        torch.testing.assert_close(train.logits(model, x, flips=True),
                                   (model(x) + model(x.flip(3))) / 2)
        torch.testing.assert_close(train.logits(model, x), model(x))
        labels = torch.arange(5) % 3
        trainer = train.Trainer(model, None, nn.CrossEntropyLoss(), flips=True)
        loss, _ = trainer.epoch_valid([(x, labels)])
        self.assertAlmostEqual(loss, nn.functional.cross_entropy(
            (model(x) + model(x.flip(3))) / 2, labels).item(), places=5)

    def test_validation_runs_without_autograd(self):
        model = ResNet18(3)
        seen = []
        model.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
        trainer = train.Trainer(model, None, nn.CrossEntropyLoss())
        images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
        loader = data.TensorLoader(images, torch.arange(8) % 3, 4, [0.5] * 3, [0.25] * 3, 16,
                                   train=False)
        loss, acc = trainer.epoch_valid(loader)
        self.assertEqual(seen, [False, False])
        self.assertTrue(math.isfinite(loss) and 0 <= acc <= 100)
        self.assertEqual(len(trainer.class_accuracy), 3)

    def test_valid_loss_is_the_mean_over_samples(self):
        # The article divided the sum of batch means by the number of batches, which weights
        # the images of a short last batch more.
        torch.manual_seed(0)
        model = ResNet18(3, small_input=True).eval()
        trainer = train.Trainer(model, None, nn.CrossEntropyLoss())
        images = torch.randint(0, 256, (9, 3, 8, 8), dtype=torch.uint8)
        labels = torch.arange(9) % 3
        loader = data.TensorLoader(images, labels, 4, [0.5] * 3, [0.25] * 3, 8, train=False)
        loss, _ = trainer.epoch_valid(loader)  # batches of 4, 4 and 1
        with torch.no_grad():
            inputs = torch.cat([x for x, _ in loader])
            expected = nn.functional.cross_entropy(model(inputs), labels).item()
        self.assertAlmostEqual(loss, expected, places=5)

    def test_train_loss_and_accuracy_are_over_samples(self):
        # Over samples for any loader. (Not an article bug: its train loader dropped the short
        # last batch, so its mean of batch means was right there.)
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

    def test_trainer_takes_the_articles_dataloader(self):
        # The article's loop makes the targets long, so any DataLoader works: here int32
        # labels, which cross_entropy refuses as they are.
        torch.manual_seed(0)
        dataset = torch.utils.data.TensorDataset(torch.randn(12, 3, 8, 8),
                                                 torch.arange(12, dtype=torch.int32) % 3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True,
                                             drop_last=True)
        model = ResNet18(3, small_input=True)
        optimizer = train.build_optimizer(model.parameters(), 0.01, 0.9, 5e-4, True, CPU)
        trainer = train.Trainer(model, optimizer, train.build_criterion(), CPU)
        loss, acc = trainer.epoch_train(loader)
        valid_loss, _ = trainer.epoch_valid(loader)
        self.assertTrue(math.isfinite(loss) and math.isfinite(valid_loss))


if __name__ == '__main__':
    unittest.main()
