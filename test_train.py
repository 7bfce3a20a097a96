"""Tests for train.py (and saving.py) end to end, on a small generated image folder, on the CPU.

Each of the article's bugs in the training script has a test here that fails on the article's
code (README, "The article's code, corrected"). No test touches the network.
"""
import contextlib
import copy
import csv
import io
import json
import math
import os
import shutil
import tempfile
import unittest
import urllib.error
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torchvision
from PIL import Image

import config
import data
import options
import saving
import speed
import train
from resnet import ResNet18, ResNet34, count_parameters
from test_helpers import COLOURS, ColourFolderCase, EagerGraphedStep, make_colour_folder, \
    run_main, run_script

CPU = torch.device('cpu')
AUTO = speed.choose_precision('auto', CPU)  # what --precision auto picks on this CPU


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

    def test_learns_colour_task_and_writes_its_files(self):
        route = mock.patch.object(speed, 'route_one_pixel_convs',
                                  side_effect=speed.route_one_pixel_convs)
        with route as routed:
            code, out, err = self.train()
        self.assertEqual(code, 0, err)
        routed.assert_called_once()  # the CPU route of speed.py, put on the plain model
        precision = speed.precision_name(AUTO)
        # What speed.py changed on the CPU is said in the header.
        self.assertIn(f'resnet18 (small input), cpu, {precision}, {speed.ONE_PIXEL_ROUTE}, '
                      f'2 epochs', out)
        # The article printed {num_epochs}, undefined: NameError in the first epoch.
        self.assertIn('epoch 1/2', out)
        meta = json.loads(self.out.with_suffix('.json').read_text())
        self.assertGreater(meta['test_acc'], 80)  # chance is 33%
        self.assertIn('50 train, 6 valid and 30 test images', out)
        last = out.strip().splitlines()[-1]
        self.assertRegex(last, r'test accuracy \d+\.\d\d% on the 30 test images, measured '
                               r'once \(epoch \d, chosen by its valid accuracy \d+\.\d\d%\)')
        self.assertIn(str(self.out), last)
        self.assertIn('per-class test accuracy', out)
        self.assertRegex(out, r'\nseconds: loading data [\d.]+, training [\d.]+, '
                              r'evaluating [\d.]+, testing [\d.]+, saving [\d.]+\n')
        # A plain state_dict that the article's model loads as the article implies.
        model = ResNet18(3, small_input=True)
        model.load_state_dict(torch.load(self.out, weights_only=True))
        self.assertEqual(meta['classes'], sorted(COLOURS))
        self.assertEqual(len(meta['mean']), 3)
        self.assertEqual(meta['precision'], precision)
        self.assertEqual(self.out.with_suffix('.csv').read_text().count('\n'), 3)
        self.assertTrue(self.out.with_suffix('.ckpt').is_file())
        self.assertEqual(list(self.dir.glob('*.tmp')), [])

    def test_each_image_is_decoded_once_and_resized_on_the_device(self):
        # The article ran every image through PIL (Resize + ToTensor) in every epoch. Here each
        # file is read once (the 8 px images held at 8 px), and resized to 16 px by the loader.
        real_open = Image.open
        with mock.patch.object(Image, 'open', side_effect=real_open) as opened:
            code, out, err = self.train('--image-size', 16)  # --workers 1: in this process
        self.assertEqual(code, 0, err)
        n_images = sum(1 for _ in Path(self.data).rglob('*.png'))
        self.assertEqual(opened.call_count, n_images + 1)  # + 1: the size probe
        self.assertIn('held at 8 px, fed at 16 px', out)
        self.assertNotIn('streaming', out)

    def test_best_weights_are_a_copy(self):
        # The article kept trainer.params (a live state_dict), so it saved the last epoch.
        accs = iter([60.0, 40.0])
        states = []
        real_valid = train.Trainer.epoch_valid

        def fake_valid(trainer, loader):
            loss, acc = real_valid(trainer, loader)
            if len(loader.labels) == 30:  # the test, after the epochs
                return loss, acc
            states.append({k: v.clone() for k, v in trainer.params.items()})
            return loss, next(accs)

        with mock.patch.object(train.Trainer, 'epoch_valid', fake_valid):
            code, out, err = self.train()
        self.assertEqual(code, 0, err)
        saved = torch.load(self.out, weights_only=True)
        key = 'layer4.blocks.0.conv2.weight'
        self.assertTrue(torch.equal(saved[key], states[0][key]))
        self.assertFalse(torch.equal(saved[key], states[1][key]))
        self.assertIn('(epoch 1, chosen by its valid accuracy 60.00%)', out)

    def test_the_validation_images_choose_and_the_test_images_are_measured_once(self):
        # Article: it validated on the test set and kept the epoch best there. Here the
        # validation images choose (epoch 2), though the test images favour epoch 1, and the
        # test set is measured once, after the choice, on the weights chosen.
        n_valid, n_test = 6, 30
        accs = {n_valid: [70.0, 90.0, 80.0], n_test: [95.0, 60.0, 85.0]}
        seen, states = [], []
        real_valid = train.Trainer.epoch_valid

        def fake_valid(trainer, loader):
            n = len(loader.labels)
            seen.append(n)
            states.append({k: v.clone() for k, v in trainer.params.items()})
            loss, acc = real_valid(trainer, loader)
            return (loss, accs[n].pop(0)) if accs[n] else (loss, acc)

        with mock.patch.object(train.Trainer, 'epoch_valid', fake_valid):
            code, out, err = self.train('--epochs', 3)
        self.assertEqual(code, 0, err)
        self.assertEqual(seen, [n_valid] * 3 + [n_test])
        meta = json.loads(self.out.with_suffix('.json').read_text())
        self.assertEqual((meta['valid_acc'], meta['best_epoch']), (90.0, 2))
        self.assertEqual(meta['valid_split'], {'fraction': 0.1, 'seed': 0})
        key = 'layer4.blocks.0.conv2.weight'
        self.assertTrue(torch.equal(states[-1][key], states[1][key]))  # tested: epoch 2's
        self.assertTrue(torch.equal(torch.load(self.out, weights_only=True)[key], states[1][key]))
        self.assertIn(f'test accuracy {meta["test_acc"]:.2f}% on the 30 test images, measured '
                      f'once (epoch 2, chosen by its valid accuracy 90.00%)', out)

    def test_validation_images_are_held_out_of_the_training_images(self):
        loaders = []
        real_make = train.make_loader

        def make(images, labels, *args, **kwargs):
            loaders.append(images)
            return real_make(images, labels, *args, **kwargs)

        with mock.patch.object(train, 'make_loader', make):
            code, out, err = self.train('--epochs', 1)
        self.assertEqual(code, 0, err)
        rows = [{bytes(x.flatten().tolist()) for x in images} for images in loaders]
        trained, validated, tested = rows
        self.assertEqual((len(trained), len(validated), len(tested)), (50, 6, 30))
        self.assertFalse(trained & validated or trained & tested or validated & tested)

    def test_no_validation_keeps_the_last_epoch(self):
        code, out, err = self.train('--valid-split', 0)
        self.assertEqual(code, 0, err)
        self.assertIn('56 train, 0 valid and 30 test images', out)
        self.assertIn('no validation', out)
        meta = json.loads(self.out.with_suffix('.json').read_text())
        self.assertEqual((meta['valid_acc'], meta['best_epoch']), (None, 2))
        last = torch.load(self.out.with_suffix('.ckpt'), weights_only=True)['model']
        for k, v in torch.load(self.out, weights_only=True).items():
            self.assertTrue(torch.equal(v, last[k]), k)
        # Nothing but the test set could say whether another such run does better.
        before = self.out.read_bytes()
        code, _, err = self.train('--valid-split', 0)
        self.assertEqual((code, err.count('\n')), (2, 1))
        self.assertIn('without validation images', err)
        self.assertEqual(self.out.read_bytes(), before)

    def test_starts_without_torchvision(self):
        # Importing torchvision costs about 3 s on 2 cores; train.py needs it for CIFAR-10 only.
        self.assertEqual(run_script('import train').strip(), '')
        # The extensions it lists instead are torchvision's ImageFolder's.
        self.assertEqual(set(data.IMG_EXTENSIONS),
                         set(torchvision.datasets.folder.IMG_EXTENSIONS))

    def test_cuda_graphs_are_recorded_once_on_a_full_train_batch(self):
        # CUDA graphs hold fixed input buffers, so the sample must be a train batch (all are
        # full), recorded in train mode: the graphs replay only in the mode they were made in.
        # With --no-graph-whole-step, the model's graphs (graph_model, a no-op stand-in here:
        # that run trains plainly)...
        calls = []

        def record(model, sample, amp_dtype):
            calls.append((model.training, tuple(sample.shape), amp_dtype))

        with mock.patch.object(speed, 'use_cuda_graphs', return_value=True), \
                mock.patch.object(speed, 'graph_model', side_effect=record):
            code, out, err = self.train('--epochs', 1, '--no-graph-whole-step',
                                        out=self.dir / 'plain' / 'weight.pth')
        self.assertEqual(code, 0, err)
        self.assertEqual(calls, [(True, (16, 3, 8, 8), AUTO)])
        self.assertIn(f'cpu, {speed.precision_name(AUTO)}, {speed.ONE_PIXEL_ROUTE}, the model as '
                      f'CUDA graphs, 1 epoch of 3 batches of 16', out)
        self.assertRegex(out, r'seconds: loading data [\d.]+, recording CUDA graphs [\d.]+, ')

        # ... or, by default, the whole step (GraphedStep's CPU stand-in), which must train as
        # that plain run did.
        replays = []

        class Counted(EagerGraphedStep):
            def __call__(self, inputs, targets):
                replays.append(len(inputs))
                return super().__call__(inputs, targets)

        with mock.patch.object(speed, 'use_cuda_graphs', return_value=True), \
                mock.patch.object(speed, 'graph_model', side_effect=AssertionError), \
                mock.patch.object(speed, 'GraphedStep', Counted):
            code, out, err = self.train('--epochs', 1, out=self.dir / 'step' / 'weight.pth')
        self.assertEqual(code, 0, err)
        self.assertEqual(replays, [16, 16, 16])  # every train batch, through the graph
        self.assertIn(f'cpu, {speed.precision_name(AUTO)}, {speed.ONE_PIXEL_ROUTE}, the whole step '
                      f'as a CUDA graph, 1 epoch of 3 batches of 16', out)
        self.assertRegex(out, r'seconds: loading data [\d.]+, recording CUDA graphs [\d.]+, ')
        plain = torch.load(self.dir / 'plain' / 'weight.ckpt', weights_only=True)
        step = torch.load(self.dir / 'step' / 'weight.ckpt', weights_only=True)
        for k, v in plain['model'].items():  # the lr is a float32 tensor in the graph
            self.assertTrue(torch.allclose(v.float(), step['model'][k].float(), atol=1e-6), k)
        self.assertEqual(plain['history'][0]['train_loss'], step['history'][0]['train_loss'])
        self.assertIsInstance(step['optimizer']['param_groups'][0]['lr'], float)

    def test_a_small_folder_trains_with_its_own_defaults(self):
        # 50 training images, fewer than a dozen default batches: the batch, lr and epochs of
        # options.train_defaults reach the run (its epochs made 2 here, to be quick).
        with mock.patch.object(config, 'SMALL_FOLDER_EPOCHS', 2):
            code, out, err = run_main('--data', self.data, '--image-size', 8, '--small-input',
                                      '--device', 'cpu', '--workers', 1, '--out', self.out)
        self.assertEqual(code, 0, err)
        self.assertIn('50 training images, a small folder: 2 epochs of 3 batches of 16', out)
        self.assertIn(f'2 epochs of 3 batches of 16, peak lr {config.LR * 16 / 256}', out)
        self.assertEqual(json.loads(self.out.with_suffix('.json').read_text())['epochs'], 2)

    def test_the_articles_recipe(self):
        # --recipe article: the article's training (lr 0.001, plain momentum, weight decay 1e-4,
        # no schedule, raw [0, 1] pixels, no augmentation, no label smoothing), on this network.
        built = {}
        real_optimizer, real_criterion = train.build_optimizer, train.build_criterion

        def optimizer(*args):
            built['optimizer'] = real_optimizer(*args)
            return built['optimizer']

        def criterion(*args):
            built['criterion'] = real_criterion(*args)
            return built['criterion']

        with mock.patch.object(train, 'build_optimizer', optimizer), \
                mock.patch.object(train, 'build_criterion', criterion):
            code, out, err = run_main(
                '--data', self.data, '--image-size', 8, '--small-input', '--batch-size', 16,
                '--epochs', 2, '--device', 'cpu', '--workers', 1, '--recipe', 'article',
                '--out', self.out)
        self.assertEqual(code, 0, err)
        self.assertIn('the recipe article, 2 epochs of 3 batches of 16, peak lr 0.001', out)
        group = built['optimizer'].param_groups[0]
        self.assertEqual((group['momentum'], group['nesterov'], group['weight_decay']),
                         (0.9, False, 1e-4))
        self.assertEqual(built['criterion'].label_smoothing, 0.0)
        meta = json.loads(self.out.with_suffix('.json').read_text())
        self.assertEqual((meta['recipe'], meta['mean'], meta['std']),
                         ('article', [0.0] * 3, [1.0] * 3))
        with open(self.out.with_suffix('.csv')) as f:
            self.assertEqual([float(r['lr']) for r in csv.DictReader(f)], [0.001, 0.001])
        # Weights of another recipe are another setup: the fixed recipe leaves them alone.
        before = self.out.read_bytes()
        code, _, err = self.train()
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('another setup', err)
        self.assertEqual(self.out.read_bytes(), before)

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
            args = options.parse_args(['--recipe', recipe])
            self.assertEqual(options.train_defaults(args, 50_000).lr, lr)
        # Each fix switches one thing: here weight decay alone, then Nesterov alone.
        model = nn.Linear(2, 2)
        for fixes, nesterov, decay in (({'decay'}, False, config.WEIGHT_DECAY),
                                       ({'nesterov'}, True, config.ARTICLE_WEIGHT_DECAY)):
            group = train.build_optimizer(model, 0.1, CPU, fixes).param_groups[0]
            self.assertEqual((group['nesterov'], group['weight_decay']), (nesterov, decay))
            self.assertEqual(train.build_criterion(fixes).label_smoothing, 0.0)

    def test_every_model_offered_is_built(self):
        # Each --model builds a network that classifies an image into the 3 classes, with and
        # without --plain where it is a ResNet; the CIFAR nets are the paper's, by depth.
        self.assertEqual(set(options.MODELS), {'alexnet', 'resnet18', 'resnet34', 'resnet50',
                                               'resnet20', 'resnet32', 'resnet44', 'resnet56',
                                               'resnet110'})
        for name in options.MODELS:
            for plain in (False, True) if name != 'alexnet' else (False,):
                with self.subTest(name, plain=plain):
                    args = options.parse_args(['--model', name] + ['--plain'] * plain)
                    model = train.build_model(args.model, 3, plain=args.plain).eval()
                    size = 67 if name == 'alexnet' else 32
                    with torch.no_grad():
                        self.assertEqual(model(torch.zeros(2, 3, size, size)).shape, (2, 3))
                    shortcuts = {b.shortcut for b in model.modules() if hasattr(b, 'shortcut')}
                    self.assertEqual(shortcuts, set() if name == 'alexnet' else {not plain})
        self.assertEqual(count_parameters(train.build_model('resnet56', 10)), 853_018)

    def test_defaults_come_from_one_table(self):
        # --batch-size, --lr and --epochs left out take the model's row of
        # config.TRAIN_DEFAULTS and config.NUM_EPOCHS, which the parser does not rewrite; an
        # explicit value always wins.
        def defaults(*argv, n_train=50_000):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                got = options.train_defaults(options.parse_args(list(argv)), n_train)
            self.note = out.getvalue()
            return got

        args = options.parse_args([])
        self.assertEqual((args.batch_size, args.lr, args.epochs), (None, None, None))
        self.assertEqual(defaults(), (config.BATCH_SIZE, config.LR, config.NUM_EPOCHS))
        self.assertEqual(self.note, '')
        self.assertEqual(defaults()[:2], (config.BATCH_SIZE, config.LR))
        self.assertEqual(defaults('--model', 'alexnet')[:2], (128, 0.02))  # RESULTS.md
        self.assertEqual(defaults('--model', 'resnet50')[:2], (128, config.LR))
        self.assertEqual(defaults('--model', 'resnet50', '--small-input')[:2], (128, config.LR))
        self.assertEqual(defaults('--model', 'resnet34')[:2], (512, config.LR))
        self.assertEqual(defaults('--small-input')[:2], (256, config.LR))
        for name in ('resnet20', 'resnet56', 'resnet110'):  # the paper's CIFAR-10 nets
            self.assertEqual(defaults('--model', name)[:2], (128, 0.1))
        self.assertEqual(defaults('--model', 'alexnet', '--batch-size', '64', '--lr', '0.01',
                                  '--epochs', '3'), (64, 0.01, 3))
        self.assertEqual({k.split()[0] for k in config.TRAIN_DEFAULTS}, set(options.MODELS))
        # A folder of a few hundred images: a dozen batches an epoch, the lr scaled with the
        # batch, more epochs, and a line that says so; what is given stays as given.
        self.assertEqual(defaults(n_train=450), (32, config.LR * 32 / config.BATCH_SIZE,
                                                 config.SMALL_FOLDER_EPOCHS))
        self.assertIn(f'450 training images, a small folder: {config.SMALL_FOLDER_EPOCHS} '
                      f'epochs of 14 batches of 32', self.note)
        self.assertEqual(defaults(n_train=100)[0], 16)  # never below 16
        self.assertEqual(defaults('--batch-size', '512', '--epochs', '5', n_train=450),
                         (512, config.LR, 5))
        self.assertEqual(defaults('--lr', '0.05', n_train=450)[:2], (32, 0.05))
        self.assertEqual(defaults('--init', 'w.pth', '--freeze', n_train=450)[:2],
                         (32, config.LR))  # the fc alone: the row's lr, unscaled
        # On CUDA the whole step is graphed unless --no-graph-whole-step, and --no-cuda-graphs
        # alone turns every graph off, the whole step's too, with no complaint.
        self.assertIsNone(options.parse_args([]).graph_whole_step)  # config.GRAPH_WHOLE_STEP
        self.assertFalse(options.parse_args(['--no-graph-whole-step']).graph_whole_step)
        args = options.parse_args(['--no-cuda-graphs'])
        self.assertFalse(speed.use_cuda_graphs(args, torch.device('cuda')))
        options.check_args(args)

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

    def test_resume_gives_the_same_result(self):
        # Held in memory, and streamed (--stream), a run stopped by Ctrl-C in its second epoch
        # and resumed ends as the run that was never stopped.
        for stream in ([], ['--stream']):
            with self.subTest(stream=stream):
                self.check_resume(stream, self.dir / ('stream' if stream else 'memory'))

    def check_resume(self, extra, folder):
        code, _, err = self.train('--save-every', 0, *extra, out=folder / 'a' / 'weight.pth')
        self.assertEqual(code, 0, err)
        calls = []
        real_train = train.Trainer.epoch_train

        def interrupted(trainer, loader):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real_train(trainer, loader)

        b = folder / 'b' / 'weight.pth'
        with mock.patch.object(train.Trainer, 'epoch_train', interrupted):
            code, _, err = self.train('--save-every', 0, *extra, out=b)
        self.assertEqual(code, 130)
        self.assertIn('--resume', err)
        self.assertTrue(b.is_file())  # the best weights so far are kept
        code, out, err = self.train('--save-every', 0, '--resume', *extra, out=b)
        self.assertEqual(code, 0, err)
        self.assertIn('resuming from epoch 1', out)
        self.assertEqual('streaming' in out, bool(extra))
        done_a = torch.load(folder / 'a' / 'weight.ckpt', weights_only=True)
        done_b = torch.load(b.with_suffix('.ckpt'), weights_only=True)
        for k, v in done_a['model'].items():
            self.assertTrue(torch.allclose(v.float(), done_b['model'][k].float(), atol=1e-6), k)
        self.assertEqual(done_a['history'][-1]['valid_acc'], done_b['history'][-1]['valid_acc'])

    def test_a_run_stopped_after_its_last_checkpoint_knows_its_own_best(self):
        # Ctrl-C writes the best weights so far, which can be of a later epoch than the last
        # checkpoint. Resumed, the run must take them as its own (recorded in weight.json as
        # this run's), not as an earlier run's to beat, and test them at the end.
        real_valid = train.Trainer.epoch_valid
        valid = {1: 50.0, 2: 60.0, 3: 55.0}  # epoch 2 is the best on the validation images

        def scripted_valid(trainer, loader):
            loss, acc = real_valid(trainer, loader)
            if len(loader.labels) == 6:  # the validation images; 3 steps an epoch
                acc = valid[trainer.scheduler.last_epoch // 3]
            return loss, acc

        scripted = mock.patch.object(train.Trainer, 'epoch_valid', scripted_valid)
        scripted.start()
        self.addCleanup(scripted.stop)
        a = self.dir / 'a' / 'weight.pth'
        code, _, err = self.train('--epochs', 3, out=a)
        self.assertEqual(code, 0, err)
        done = json.loads(a.with_suffix('.json').read_text())
        self.assertEqual(done['best_epoch'], 2)
        # Weights of an earlier run, as good as epoch 1 on the validation images.
        b = self.dir / 'b' / 'weight.pth'
        b.parent.mkdir()
        shutil.copy(a, b)
        b.with_suffix('.json').write_text(json.dumps(
            {**done, 'valid_acc': valid[1], 'best_epoch': 1, 'run': 'earlier'}))
        real_end, real_train, calls = saving.Run.end_epoch, train.Trainer.epoch_train, []

        def checkpoint_after_epoch_1_only(run, row, *args):
            run.args.save_every = 0 if row['epoch'] == 1 else 1e9
            return real_end(run, row, *args)

        def stopped_in_epoch_3(trainer, loader):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real_train(trainer, loader)

        with mock.patch.object(saving.Run, 'end_epoch', checkpoint_after_epoch_1_only), \
                mock.patch.object(train.Trainer, 'epoch_train', stopped_in_epoch_3):
            code, _, err = self.train('--epochs', 3, out=b)
        self.assertEqual(code, 130, err)
        self.assertEqual(torch.load(b.with_suffix('.ckpt'), weights_only=True)['epoch'], 1)
        self.assertEqual(json.loads(b.with_suffix('.json').read_text())['best_epoch'], 2)
        code, out, err = self.train('--epochs', 3, '--resume', out=b)
        self.assertEqual(code, 0, err)
        self.assertIn('done: test accuracy', out.splitlines()[-1])
        resumed = json.loads(b.with_suffix('.json').read_text())
        for key in ('valid_acc', 'best_epoch', 'test_acc'):
            self.assertEqual(resumed[key], done[key], key)

    def test_unreadable_checkpoint_or_metadata_stops_and_keeps_the_weights(self):
        code, _, err = self.train('--epochs', 1)
        self.assertEqual(code, 0, err)
        ckpt, meta = self.out.with_suffix('.ckpt'), self.out.with_suffix('.json')
        weights = self.out.read_bytes()
        good_ckpt = ckpt.read_bytes()
        code, out, err = self.train('--epochs', 1, '--resume')
        self.assertEqual(code, 0, err)
        self.assertIn('already finished (epoch 1 of 1)', out)
        code, _, err = self.train('--resume')  # 2 epochs: not the run the checkpoint is from
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertRegex(err, r'another run \(--epochs 1 --batch-size 16 --precision \w+ '
                              r'--model resnet18 --small-input')
        other = 'fp32' if AUTO else 'bf16'  # resumed in another precision: another run too
        code, _, err = self.train('--epochs', 1, '--resume', '--precision', other)
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('another run', err)
        # A truncated checkpoint, and one that is a readable file of something else.
        for bad in (good_ckpt[:2000], None):
            if bad is None:
                torch.save({'model': {}}, ckpt)
            else:
                ckpt.write_bytes(bad)
            code, out, err = self.train('--resume')
            self.assertEqual((code, err.count('\n')), (2, 1), err)
            self.assertIn('not a readable checkpoint', err)
            self.assertNotIn('decoding', out)  # it fails before reading the data
            self.assertEqual(self.out.read_bytes(), weights)
        # Weights whose .json is gone: what they are is unknown, so they are not touched.
        ckpt.write_bytes(good_ckpt)
        meta.unlink()
        code, _, err = self.train()
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('missing or unreadable', err)
        self.assertEqual(self.out.read_bytes(), weights)

    def test_sgd_is_fused_on_cuda_and_resume_keeps_the_devices_choice(self):
        model = nn.Linear(3, 2)
        on_cpu = train.build_optimizer(model, 0.1, torch.device('cpu'))
        self.assertIsNone(on_cpu.defaults['fused'])  # PyTorch's default (foreach on CUDA)
        self.assertTrue(train.build_optimizer(model, 0.1, torch.device('cuda')).defaults['fused'])
        self.assertEqual({k: on_cpu.defaults[k] for k in ('momentum', 'nesterov', 'weight_decay')},
                         {'momentum': config.MOMENTUM, 'nesterov': True,
                          'weight_decay': config.WEIGHT_DECAY})
        # A checkpoint written on CUDA (fused), resumed on the CPU: its momentum, the CPU's SGD.
        model(torch.randn(4, 3)).sum().backward()
        on_cpu.step()
        state = on_cpu.state_dict()
        state['param_groups'][0]['fused'] = True
        resumed = train.build_optimizer(model, 0.1, torch.device('cpu'))
        saving.load_optimizer_state(resumed, copy.deepcopy(state))
        self.assertIsNone(resumed.param_groups[0]['fused'])
        self.assertTrue(torch.equal(resumed.state[model.weight]['momentum_buffer'],
                                    on_cpu.state[model.weight]['momentum_buffer']))
        plain = train.build_optimizer(model, 0.1, torch.device('cpu'))
        plain.load_state_dict(copy.deepcopy(state))
        self.assertTrue(plain.param_groups[0]['fused'])  # what the helper undoes

    def test_nan_loss_stops_and_keeps_weights(self):
        results = iter([None, (float('nan'), 0.0)])
        real_train = train.Trainer.epoch_train

        def nan_in_epoch_2(trainer, loader):
            r = next(results)
            return real_train(trainer, loader) if r is None else r

        with mock.patch.object(train.Trainer, 'epoch_train', nan_in_epoch_2):
            code, _, err = self.train()
        self.assertEqual(code, 1)
        self.assertIn('lower --lr', err)
        self.assertEqual(json.loads(self.out.with_suffix('.json').read_text())['best_epoch'], 1)
        ResNet18(3, small_input=True).load_state_dict(torch.load(self.out, weights_only=True))

    def test_eval_round_trip_and_bad_weight_files(self):
        code, _, err = self.train()
        self.assertEqual(code, 0, err)
        measured = json.loads(self.out.with_suffix('.json').read_text())['test_acc']
        code, out, err = run_main('--eval', self.out, '--data', self.data, '--device', 'cpu',
                                  '--workers', 1)
        self.assertEqual(code, 0, err)
        self.assertIn(f'test accuracy {measured:.2f}% on 30 images', out)
        self.assertIn(f'the run measured {measured:.2f}%', out)
        self.assertIn('per-class accuracy', out)

        code, _, err = run_main('--eval', self.dir / 'missing.pth', '--data', self.data)
        self.assertEqual((code, err.count('\n')), (2, 1))
        self.assertIn('no weight file', err)

        corrupt = self.dir / 'corrupt.pth'
        corrupt.write_bytes(self.out.read_bytes()[:1000])
        code, _, err = run_main('--eval', corrupt, '--data', self.data)
        self.assertEqual((code, err.count('\n')), (2, 1))
        self.assertIn('not a readable weight file', err)

        other = self.dir / 'other.pth'
        torch.save(ResNet34(3).state_dict(), other)  # no .json: what they are is unknown
        code, _, err = run_main('--eval', other, '--data', self.data)
        self.assertEqual((code, err.count('\n')), (2, 1))
        self.assertIn('has no readable other.json', err)
        shutil.copy(self.out.with_suffix('.json'), other.with_suffix('.json'))  # a resnet18's
        code, _, err = run_main('--eval', other, '--data', self.data)
        self.assertEqual((code, err.count('\n')), (2, 1))
        self.assertIn('does not fit the resnet18 --small-input its weight.json names', err)

    def test_better_weights_are_not_replaced(self):
        code, _, err = self.train()
        self.assertEqual(code, 0, err)
        meta_path = self.out.with_suffix('.json')
        meta = json.loads(meta_path.read_text())
        meta['valid_acc'] = 100.0
        meta_path.write_text(json.dumps(meta))
        before, history = self.out.read_bytes(), self.out.with_suffix('.csv').read_text()
        code, out, err = self.train()
        self.assertEqual(code, 0, err)
        self.assertEqual(self.out.read_bytes(), before)
        self.assertEqual(self.out.with_suffix('.csv').read_text(), history)  # still theirs
        self.assertIn('kept', out.splitlines()[-1])
        self.assertIn('were not looked at', out.splitlines()[-1])  # nothing new to measure
        self.assertEqual(json.loads(meta_path.read_text()), meta)
        # The validation accuracy decides, never the test accuracy.
        meta.update(valid_acc=0.0, test_acc=100.0)
        meta_path.write_text(json.dumps(meta))
        code, out, err = self.train()
        self.assertEqual(code, 0, err)
        self.assertIn('saved to', out.splitlines()[-1])
        replaced = json.loads(meta_path.read_text())
        self.assertGreater(replaced['valid_acc'], 0.0)
        self.assertIn(f'test accuracy {replaced["test_acc"]:.2f}%', out.splitlines()[-1])
        # Weights of another setup are not compared; the run refuses to touch them.
        code, _, err = self.train('--model', 'resnet34')
        self.assertEqual((code, err.count('\n')), (2, 1))
        self.assertEqual(self.out.read_bytes(), before)

    def test_lr_schedule_warms_up_then_decays_to_zero(self):
        # The article used a constant lr of 0.001.
        f = train.warmup_linear(100, 0.2)
        self.assertAlmostEqual(f(0), 1 / 20)
        self.assertAlmostEqual(f(19), 1.0)
        self.assertAlmostEqual(f(60), 0.5)
        self.assertAlmostEqual(f(100), 0.0)
        self.assertEqual(max(f(s) for s in range(100)), 1.0)

    def test_the_fixed_recipe_trains_as_it_says(self):
        # The article trained at a constant lr 0.001 with plain momentum, decay 1e-4 and no
        # label smoothing. By default, each step's lr follows the warm-up and linear decay to
        # 0 from the peak --lr, with Nesterov momentum, decay 5e-4 and label smoothing 0.1.
        seen, built = [], {}
        real_step, real_criterion = train.Trainer.train_step, train.build_criterion

        def step(trainer, inputs, targets):
            group = trainer.optimizer.param_groups[0]
            seen.append((group['lr'], group['nesterov'], group['weight_decay']))
            return real_step(trainer, inputs, targets)

        def criterion(*args):
            built['criterion'] = real_criterion(*args)
            return built['criterion']

        with mock.patch.object(train.Trainer, 'train_step', step), \
                mock.patch.object(train, 'build_criterion', criterion):
            code, _, err = self.train()  # --lr 0.01, 2 epochs of 3 steps
        self.assertEqual(code, 0, err)
        factor = train.warmup_linear(6, config.WARMUP)
        self.assertEqual([round(lr, 9) for lr, _, _ in seen],
                         [round(0.01 * factor(i), 9) for i in range(6)])
        self.assertEqual({(n, d) for _, n, d in seen}, {(True, 5e-4)})
        self.assertEqual(built['criterion'].label_smoothing, 0.1)
        self.assertEqual(train.build_criterion().label_smoothing, 0.1)

    def test_inputs_are_normalised_end_to_end(self):
        # The article fed raw [0, 1] pixels. What the model sees, in training and evaluation,
        # has per channel a mean near 0 and a std near 1 (over the whole epoch).
        fed = {True: [], False: []}
        real_build = train.build_model

        def build(*args):
            model = real_build(*args)
            model.register_forward_pre_hook(lambda m, i: fed[m.training].append(i[0].detach()))
            return model

        with mock.patch.object(train, 'build_model', build):
            code, _, err = self.train('--epochs', 1)
        self.assertEqual(code, 0, err)
        for training, batches in fed.items():
            x = torch.cat(batches).float().transpose(0, 1).flatten(1)  # (C, all pixels)
            self.assertLess(x.mean(dim=1).abs().max().item(), 0.15, training)
            self.assertLess((x.std(dim=1) - 1).abs().max().item(), 0.15, training)
        # With the mean and std of the images trained on (not the validation or test images');
        # and the test sees each test image once, in order, neither cropped nor flipped.
        train_files, labels, test_files, _, _ = data.list_image_folder(self.data)
        train_idx, _ = data.split_valid(torch.tensor(labels), 0.1, 0)
        train_x = data.decode_images(train_files, 8, workers=1)[train_idx]
        meta = json.loads(self.out.with_suffix('.json').read_text())
        self.assertEqual((meta['mean'], meta['std']), data.channel_stats(train_x))
        mean, std = (torch.tensor(meta[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
        test_x = data.decode_images(test_files, 8, workers=1)
        torch.testing.assert_close(torch.cat(fed[False])[-len(test_x):],
                                   (test_x / 255 - mean) / std, rtol=0, atol=1e-5)

    def test_trainer_takes_the_articles_dataloader(self):
        # The article's loop moves each batch to the device and makes the targets long, so any
        # DataLoader works: here int32 labels, which cross_entropy refuses as they are.
        torch.manual_seed(0)
        dataset = torch.utils.data.TensorDataset(torch.randn(12, 3, 8, 8),
                                                 torch.arange(12, dtype=torch.int32) % 3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True,
                                             drop_last=True)
        model = ResNet18(3, small_input=True)
        trainer = train.Trainer(model, train.build_optimizer(model, 0.01, CPU),
                                train.build_criterion(), CPU)
        moved = []
        real_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            moved.append(args[:1])
            return real_to(tensor, *args, **kwargs)

        with mock.patch.object(torch.Tensor, 'to', to):
            loss, acc = trainer.epoch_train(loader)
            valid_loss, _ = trainer.epoch_valid(loader)
        self.assertTrue(math.isfinite(loss) and math.isfinite(valid_loss))
        self.assertGreaterEqual(moved.count((CPU,)), 2 * 2 * len(loader))  # inputs, targets

    def test_running_out_of_memory_keeps_the_weights_and_says_what_to_pass(self):
        # On a GPU: torch.cuda.OutOfMemoryError; on the CPU, a RuntimeError that says so.
        errors = (torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB'),
                  RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 48000000000 bytes. Error code 12"))
        real_train = train.Trainer.epoch_train
        for i, error in enumerate(errors):
            calls = []

            def second_epoch_fails(trainer, loader):
                calls.append(1)
                if len(calls) == 2:
                    raise error
                return real_train(trainer, loader)

            out = self.dir / str(i) / 'weight.pth'
            with mock.patch.object(train.Trainer, 'epoch_train', second_epoch_fails):
                code, _, err = self.train('--save-every', 0, out=out)
            self.assertEqual((code, err.strip().count('\n')), (1, 0), err)
            self.assertIn('ran out of memory for batches of 16 images at 8 px; pass a smaller '
                          '--batch-size or --image-size', err)
            self.assertIn('best weights so far', err)
            self.assertNotIn('Traceback', err)
            ResNet18(3, small_input=True).load_state_dict(torch.load(out, weights_only=True))
            self.assertEqual(torch.load(out.with_suffix('.ckpt'), weights_only=True)['epoch'], 1)
        # In evaluation too; and an error that is not about memory stays a traceback.
        with mock.patch.object(train.Trainer, 'epoch_valid', side_effect=errors[0]):
            code, _, err = run_main('--eval', out, '--device', 'cpu', '--batch-size', 64)
        self.assertEqual((code, err.count('\n')), (1, 1), err)
        self.assertIn('ran out of memory evaluating batches of 128 images; pass a smaller '
                      '--batch-size', err)
        with mock.patch.object(train.Trainer, 'epoch_valid', side_effect=RuntimeError('other')), \
                self.assertRaisesRegex(RuntimeError, 'other'):
            run_main('--eval', out, '--device', 'cpu')

    def test_eval_reads_the_data_folder_the_weights_were_trained_on(self):
        code, _, err = self.train('--epochs', 1)
        self.assertEqual(code, 0, err)
        with mock.patch.object(torchvision.datasets.CIFAR10, 'download',
                               side_effect=AssertionError('tried CIFAR-10')):
            code, out, err = run_main('--eval', self.out, '--device', 'cpu', '--workers', 1)
        self.assertEqual(code, 0, err)
        self.assertIn(f'from {Path(self.data).resolve()}', out)
        self.assertIn('test accuracy', out)
        meta = json.loads(self.out.with_suffix('.json').read_text())
        meta['data'] = str(self.dir / 'moved')
        self.out.with_suffix('.json').write_text(json.dumps(meta))
        code, _, err = run_main('--eval', self.out, '--device', 'cpu')
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('which is not there any more; pass --data DIR', err)
        # --data with other classes: the weights' fc scores the classes weight.json names.
        other = Path(shutil.copytree(self.data, self.dir / 'other'))
        for split in ('train', 'test'):
            (other / split / 'red').rename(other / split / 'pink')
        code, _, err = run_main('--eval', self.out, '--data', other, '--device', 'cpu')
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn("was trained on the classes ['blue', 'green', 'red']", err)

    def test_plain_nets_are_recorded_and_rebuilt(self):
        # --plain is part of the setup: weight.json and the checkpoint record it, and --eval,
        # --resume and predict.py build the plain net again. A plain CIFAR net has the
        # residual net's very parameters, so only what is recorded tells them apart.
        import predict
        resnet20 = ('--model', 'resnet20')
        code, out, err = self.train('--plain', '--epochs', 1, out=self.dir / 'plain.pth',
                                    model=resnet20)
        self.assertEqual(code, 0, err)
        self.assertIn('resnet20 (plain), cpu', out)
        self.assertTrue(json.loads((self.dir / 'plain.json').read_text())['plain'])
        built = []
        real_build = train.build_model
        with mock.patch.object(train, 'build_model',
                               side_effect=lambda *a: built.append(a) or real_build(*a)):
            code, out, err = run_main('--eval', self.dir / 'plain.pth', '--device', 'cpu',
                                      '--workers', 1)
            self.assertEqual(code, 0, err)
            model, _ = predict.load_model(self.dir / 'plain.pth', CPU)
        self.assertEqual(built, [('resnet20', 3, False, True)] * 2)
        self.assertIn('(resnet20 --plain, 8 px', out)
        self.assertFalse(any(b.shortcut for b in model.modules() if hasattr(b, 'shortcut')))
        code, _, err = self.train('--epochs', 1, '--resume', out=self.dir / 'plain.pth',
                                  model=resnet20)
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('--model resnet20 --plain', err)

    def test_a_folder_that_does_not_fit_is_streamed(self):
        # Too little memory to hold the images: they are decoded in every epoch instead (here
        # in this process, --workers 1), and the run trains and writes its files as ever.
        real_open = Image.open
        with mock.patch.object(data, 'available_ram', return_value=2**30 + 100), \
                mock.patch.object(Image, 'open', side_effect=real_open) as opened:
            code, out, err = self.train()
        self.assertEqual(code, 0, err)
        first = out.splitlines()[0]
        self.assertIn(f'streaming 86 images from {self.data}: held at 8 px they need 0.0 GiB of '
                      f'RAM, and 1.0 GiB is free', first)
        n_train, n_valid, n_test = 50, 6, 30
        # a probe, the 50 train images for their statistics, then 2 epochs of 3 batches of 16
        # and 2 validations, and one test
        self.assertEqual(opened.call_count, 1 + n_train + 2 * 48 + 2 * n_valid + n_test)
        self.assertGreater(json.loads(self.out.with_suffix('.json').read_text())['test_acc'], 80)
        self.assertTrue(self.out.with_suffix('.ckpt').is_file())


class TrainInputTest(unittest.TestCase):
    """Bad arguments and bad data: one sentence, exit code 2, no traceback."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)
        # No test downloads: a test that reached CIFAR-10's download by mistake fails here.
        no_download = mock.patch.object(torchvision.datasets.CIFAR10, 'download',
                                        side_effect=AssertionError('a test tried to download'))
        no_download.start()
        self.addCleanup(no_download.stop)

    def tearDown(self):
        self.tmp.cleanup()

    def assertFails(self, argv, text):
        code, _, err = run_main('--out', self.root / 'w.pth', '--device', 'cpu', '--workers', 1,
                                '--data-root', self.root, *argv)
        self.assertEqual(code, 2, err)
        self.assertIn(text, err)
        self.assertNotIn('Traceback', err)
        self.assertFalse((self.root / 'w.pth').exists())

    def test_bad_recipe(self):
        self.assertFails(['--recipe', 'article+dropout'], 'is not a recipe')

    def test_bad_numbers(self):
        for flag in ('--epochs', '--batch-size', '--lr'):
            for value in ('0', '-1'):
                self.assertFails([flag, value], 'must be positive')
        self.assertFails(['--epochs', 'ten'], 'not a number')

    def test_help_shows_every_default(self):
        with contextlib.redirect_stdout(io.StringIO()) as out, self.assertRaises(SystemExit):
            options.parse_args(['--help'])
        text = ' '.join(out.getvalue().split())
        self.assertIn('--precision {auto,fp32,bf16,fp16}', text)
        self.assertIn(f'(default: {config.PRECISION})', text)
        self.assertGreaterEqual(text.count('(default:'), 14)  # every option that has one

    def test_precision_the_device_cannot_do(self):
        # One sentence before any data is read, and no file written.
        data_dir = make_colour_folder(self.root / 'd', n_train=1, n_test=1)
        with mock.patch.object(speed, 'autocast_works', return_value=False):
            self.assertFails(['--precision', 'fp16', '--data', data_dir],
                             '--precision fp16: this torch build cannot compute in fp16 on cpu')

    def test_contradicting_options(self):
        self.assertFails(['--graph-whole-step', '--no-cuda-graphs'], 'pick one')

    def test_image_too_small_for_alexnet(self):
        self.assertFails(['--model', 'alexnet', '--image-size', '32'], 'at least 67 px')

    def test_options_a_model_does_not_have(self):
        self.assertFails(['--model', 'alexnet', '--plain'], 'AlexNet has none to change')
        self.assertFails(['--model', 'alexnet', '--small-input'], 'AlexNet has none to change')
        self.assertFails(['--model', 'resnet20', '--small-input'], 'has that stem already')
        self.assertFails(['--model', 'resnet21'], 'invalid choice')

    def test_missing_and_empty_data_folders(self):
        self.assertFails(['--data', self.root / 'nowhere'], 'does not exist')
        self.assertFails(['--data', self.root], 'needs a train/')
        (self.root / 'train').mkdir()
        (self.root / 'test').mkdir()
        self.assertFails(['--data', self.root], 'no class folders')
        (self.root / 'train' / 'cat').mkdir()
        (self.root / 'test' / 'cat').mkdir()
        Image.new('RGB', (8, 8)).save(self.root / 'train' / 'cat' / 'a.png')
        Image.new('RGB', (8, 8)).save(self.root / 'test' / 'cat' / 'a.png')
        # One class "trains" a classifier that is always right: refused.
        self.assertFails(['--data', self.root], 'one class folder (cat), and a classifier needs '
                                                'at least two')
        (self.root / 'train' / 'dog').mkdir()
        (self.root / 'test' / 'dog').mkdir()
        self.assertFails(['--data', self.root], f"{Path(self.root, 'train', 'dog')} holds no")
        Image.new('RGB', (8, 8)).save(self.root / 'train' / 'dog' / 'a.png')
        (self.root / 'test' / 'cat' / 'a.png').unlink()
        self.assertFails(['--data', self.root], f"{Path(self.root, 'test')} holds no images")

    def test_class_sets_differ(self):
        data = make_colour_folder(self.root / 'd', n_train=1, n_test=1)
        os.rename(data / 'test', data / 'val')  # no test/: val/ is used instead
        os.rename(data / 'val' / 'red', data / 'val' / 'orange')
        self.assertFails(['--data', data], "only in train: ['red'], only in test: ['orange']")

    def test_unreadable_image_is_named(self):
        data = make_colour_folder(self.root / 'd', n_train=1, n_test=1)
        (data / 'train' / 'red' / 'broken.png').write_bytes(b'not a png')
        self.assertFails(['--data', data], 'broken.png is not a readable image')

    def test_cifar10_path_trains(self):
        # The default data path, on a miniature CIFAR-10 in torchvision's format (the real one
        # is downloaded; its checksums cannot match this one, so that check is skipped).
        import pickle
        folder = self.root / 'cifar-10-batches-py'
        folder.mkdir()
        g = torch.Generator().manual_seed(0)
        for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
            labels = [i % 10 for i in range(10)]
            data = torch.randint(0, 256, (10, 3072), generator=g, dtype=torch.uint8).numpy()
            with open(folder / name, 'wb') as f:
                pickle.dump({'data': data, 'labels': labels}, f)
        with open(folder / 'batches.meta', 'wb') as f:
            pickle.dump({'label_names': [f'class{i}' for i in range(10)]}, f)
        with mock.patch('torchvision.datasets.cifar.check_integrity', return_value=True), \
                mock.patch.object(torchvision.datasets.CIFAR10, 'download'):
            code, out, err = run_main('--data-root', self.root, '--epochs', 1, '--batch-size', 25,
                                      '--out', self.root / 'w.pth', '--device', 'cpu')
        self.assertEqual(code, 0, err)
        self.assertIn('40 train, 10 valid and 10 test images, 10 classes', out)
        self.assertEqual(json.loads((self.root / 'w.json').read_text())['data'], 'cifar10')

    def test_offline_download_says_what_to_do(self):
        offline = urllib.error.URLError('network is unreachable')
        with mock.patch.object(torchvision.datasets.CIFAR10, 'download', side_effect=offline):
            self.assertFails([], 'cifar-10-python.tar.gz')

    @unittest.skipIf(torch.cuda.is_available(), 'this machine has a CUDA GPU')
    def test_cuda_asked_for_but_missing(self):
        self.assertFails(['--device', 'cuda'], 'sees no CUDA GPU')

    def test_resume_without_checkpoint(self):
        self.assertFails(['--resume'], 'nothing to resume')
