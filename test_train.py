"""Tests for train.py end to end, on a small generated image folder, on the CPU.

Each of the article's bugs in the training script has a test here that fails on the article's
code (README, "The article's code, corrected"). No test touches the network.
"""
import contextlib
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
import graphs
import options
import saving
import speed
import train
from resnet import ResNet18, count_parameters
from test_helpers import COLOURS, ColourFolderCase, EagerGraphedStep, make_colour_folder, \
    make_mini_cifar, run_main, run_script

CPU = torch.device('cpu')
AUTO = speed.choose_precision('auto', CPU)  # what --precision auto picks on this CPU


@contextlib.contextmanager
def loaders_of_the_run():
    """The Loaders that train.py builds, in a list, so that a fake can tell them apart."""
    built, real = [], train.build_loaders

    def build(*args):
        built.append(real(*args))
        return built[-1]

    with mock.patch.object(train, 'build_loaders', build):
        yield built


def fake_epochs(method, fake):
    """Patch Trainer.method with fake(real, trainer, loader), which may call the real one."""
    real = getattr(train.Trainer, method)
    return mock.patch.object(train.Trainer, method,
                             lambda trainer, loader: fake(real, trainer, loader))


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
        code, out, err = self.train()
        self.assertEqual(code, 0, err)
        # What speed.py changed on the CPU is said in the header.
        self.assertIn(f'resnet18 (small input), cpu, {speed.precision_name(AUTO)}, '
                      f'{speed.ONE_PIXEL_ROUTE}, 2 epochs', out)
        # The article printed {num_epochs}, undefined: NameError in the first epoch.
        self.assertRegex(out, r'\nepoch 1/2  train loss [\d.]+ acc +[\d.]+%  valid loss ')
        self.assertIn('50 train, 6 valid and 30 test images', out)
        self.assertRegex(out.strip().splitlines()[-1],
                         rf'test accuracy \d+\.\d\d% on the 30 test images, measured once \(epoch '
                         rf'\d, chosen by its valid accuracy \d+\.\d\d%\); saved to {self.out}$')
        self.assertRegex(out, r'\nseconds: loading data [\d.]+, training [\d.]+, evaluating '
                              r'[\d.]+, testing [\d.]+; in all, from the start, [\d.]+\n')
        record = self.record()
        self.assertGreater(record['test_acc'], 80)  # chance is 33%
        self.assertEqual((record['classes'], record['held_size'], len(record['mean'])),
                         (sorted(COLOURS), 8, 3))
        self.assertEqual(record['args'], {**vars(options.parse_args([])), **options.given([
            '--data', str(self.data), '--image-size', '8', '--small-input', '--lr', '0.01',
            '--batch-size', '16', '--epochs', '2', '--device', 'cpu', '--workers', '1', '--out',
            str(self.out)])})
        self.assertEqual(record['steps'], 6)
        # A plain state_dict that the article's model loads as the article implies.
        ResNet18(3, small_input=True).load_state_dict(torch.load(self.out, weights_only=True))
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

    def test_best_weights_are_a_copy(self):
        # The article kept trainer.params (a live state_dict), so it saved the last epoch.
        accs, states = iter([60.0, 40.0]), []

        def valid(real, trainer, loader):
            loss, acc = real(trainer, loader)
            if loader is not built[0].valid:
                return loss, acc
            states.append({k: v.clone() for k, v in trainer.params.items()})
            return loss, next(accs)

        with loaders_of_the_run() as built, fake_epochs('epoch_valid', valid):
            code, out, err = self.train()
        self.assertEqual(code, 0, err)
        key = 'layer4.blocks.0.conv2.weight'
        saved = torch.load(self.out, weights_only=True)[key]
        self.assertTrue(torch.equal(saved, states[0][key]))
        self.assertFalse(torch.equal(saved, states[1][key]))
        self.assertIn('(epoch 1, chosen by its valid accuracy 60.00%)', out)

    def test_the_validation_images_choose_and_the_test_images_are_measured_once(self):
        # Article: it validated on the test set and kept the epoch best there. Here the
        # validation images choose (epoch 2), though the test images favour epoch 1, and the
        # test set is measured once, after the choice, on the weights chosen.
        scripted = {'valid': [70.0, 90.0, 80.0], 'test': [95.0, 60.0, 85.0]}
        seen, states = [], []

        def valid(real, trainer, loader):
            name = 'valid' if loader is built[0].valid else 'test'
            seen.append(name)
            states.append({k: v.clone() for k, v in trainer.params.items()})
            loss, acc = real(trainer, loader)
            return loss, scripted[name].pop(0)

        with loaders_of_the_run() as built, fake_epochs('epoch_valid', valid):
            code, out, err = self.train('--epochs', 3)
        self.assertEqual(code, 0, err)
        self.assertEqual(seen, ['valid'] * 3 + ['test'])
        self.assertEqual(len(built[0].valid.labels), 6)  # held out of the training images
        record = self.record()
        self.assertEqual((record['valid_acc'], record['best_epoch'], record['test_acc']),
                         (90.0, 2, 95.0))
        key = 'layer4.blocks.0.conv2.weight'
        self.assertTrue(torch.equal(states[-1][key], states[1][key]))  # tested: epoch 2's
        self.assertTrue(torch.equal(torch.load(self.out, weights_only=True)[key], states[1][key]))
        self.assertIn('test accuracy 95.00% on the 30 test images, measured once (epoch 2, '
                      'chosen by its valid accuracy 90.00%)', out)

    def test_validation_images_are_held_out_of_the_training_images(self):
        with loaders_of_the_run() as built:
            code, out, err = self.train('--epochs', 1)
        self.assertEqual(code, 0, err)
        sets = [{bytes(x.flatten().tolist()) for x in loader.images} for loader in built[0]]
        trained, validated, tested = sets
        self.assertEqual((len(trained), len(validated), len(tested)), (50, 6, 30))
        self.assertFalse(trained & validated or trained & tested or validated & tested)

    def test_no_validation_keeps_the_last_epoch(self):
        code, out, err = self.train('--valid-split', 0)
        self.assertEqual(code, 0, err)
        self.assertIn('56 train, 0 valid and 30 test images', out)
        self.assertIn('no validation', out)
        self.assertEqual((self.record()['valid_acc'], self.record()['best_epoch']), (None, 2))
        last = torch.load(self.out.with_suffix('.ckpt'), weights_only=True)['model']
        for k, v in torch.load(self.out, weights_only=True).items():
            self.assertTrue(torch.equal(v, last[k]), k)

    def test_an_earlier_runs_weights_are_never_overwritten(self):
        code, _, err = self.train('--epochs', 1)
        self.assertEqual(code, 0, err)
        files = {p.name: p.read_bytes() for p in self.dir.iterdir()}
        code, out, err = self.train('--epochs', 1, '--model', 'resnet34')
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn(f'{self.out} already holds the weights of an earlier run', err)
        self.assertIn('--out NEW.pth', err)
        self.assertIn('--resume', err)
        self.assertNotIn('decoding', out)  # before any work
        self.assertEqual({p.name: p.read_bytes() for p in self.dir.iterdir()}, files)

    def test_starts_without_torchvision(self):
        # Importing torchvision costs about 3 s on 2 cores; train.py needs it for CIFAR-10 only.
        self.assertEqual(run_script('import train').strip(), '')
        # The extensions it lists instead are torchvision's ImageFolder's.
        self.assertEqual(set(data.IMG_EXTENSIONS),
                         set(torchvision.datasets.folder.IMG_EXTENSIONS))

    def test_cuda_graphs_are_recorded_once_on_a_full_train_batch(self):
        # On CUDA the whole step is recorded as a CUDA graph on a train batch (all are full),
        # in train mode, and replayed for every batch; it must train as the plain step does.
        # (graphs.record_graphs, with GraphedStep's CPU stand-in: EagerGraphedStep.)
        replays = []

        class Counted(EagerGraphedStep):
            def __call__(self, inputs, targets):
                replays.append(len(inputs))
                return super().__call__(inputs, targets)

        def on_cuda(step, model, optimizer, scaler, loader, name, graphed, whole_step):
            self.assertEqual((name, graphed, whole_step), ('resnet18', True, None))
            return graphs.record_graphs(step, model, optimizer, scaler, loader, whole_step)[0], \
                'the whole step as a CUDA graph', 0.5

        with mock.patch.object(speed, 'prepare_step', on_cuda), \
                mock.patch.object(graphs, 'GraphedStep', Counted):
            code, out, err = self.train('--epochs', 1, out=self.dir / 'step' / 'weight.pth')
        self.assertEqual(code, 0, err)
        self.assertEqual(replays, [16, 16, 16])  # every train batch, through the graph
        self.assertIn('the whole step as a CUDA graph, 1 epoch of 3 batches of 16', out)
        self.assertRegex(out, r'seconds: loading data [\d.]+, recording CUDA graphs 0.5, ')
        code, _, err = self.train('--epochs', 1, out=self.dir / 'plain' / 'weight.pth')
        self.assertEqual(code, 0, err)
        plain = torch.load(self.dir / 'plain' / 'weight.ckpt', weights_only=True)
        step = torch.load(self.dir / 'step' / 'weight.ckpt', weights_only=True)
        for k, v in plain['model'].items():  # the lr is a float32 tensor in the graph
            self.assertTrue(torch.allclose(v.float(), step['model'][k].float(), atol=1e-6), k)
        self.assertEqual(plain['history'][0]['train_loss'], step['history'][0]['train_loss'])

    def test_a_small_folder_trains_with_its_own_defaults(self):
        # 50 training images, fewer than a dozen default batches: the batch, lr and epochs of
        # options.train_defaults reach the run (its epochs made 2 here, to be quick).
        with mock.patch.object(config, 'SMALL_FOLDER_EPOCHS', 2):
            code, out, err = run_main('--data', self.data, '--image-size', 8, '--small-input',
                                      '--device', 'cpu', '--workers', 1, '--out', self.out)
        self.assertEqual(code, 0, err)
        self.assertIn('50 training images, a small folder: 2 epochs of 3 batches of 16', out)
        self.assertIn(f'2 epochs of 3 batches of 16, peak lr {config.LR * 16 / 256}', out)
        self.assertEqual(self.record()['args']['epochs'], 2)

    def test_the_articles_recipe(self):
        # --recipe article: the article's training (lr 0.001, plain momentum, weight decay 1e-4,
        # no schedule, raw [0, 1] pixels, no augmentation, no label smoothing), on this network.
        built = {}
        real_optimizer, real_criterion = train.build_optimizer, train.build_criterion
        with mock.patch.object(train, 'build_optimizer', side_effect=lambda *a: built.setdefault(
                'optimizer', real_optimizer(*a))), \
                mock.patch.object(train, 'build_criterion', side_effect=lambda *a: built.setdefault(
                    'criterion', real_criterion(*a))):
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
        record = self.record()
        self.assertEqual((record['args']['recipe'], record['mean'], record['std']),
                         ('article', [0.0] * 3, [1.0] * 3))
        with open(self.out.with_suffix('.csv')) as f:
            self.assertEqual([float(r['lr']) for r in csv.DictReader(f)], [0.001, 0.001])

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
            self.assertEqual(options.train_defaults(args, 50_000)[1], lr)
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
                    size = options.default_image_size(args)  # AlexNet: its smallest, 67 px
                    with torch.no_grad():
                        self.assertEqual(model(torch.zeros(2, 3, size, size)).shape, (2, 3))
                    shortcuts = {b.shortcut for b in model.modules() if hasattr(b, 'shortcut')}
                    self.assertEqual(shortcuts, set() if name == 'alexnet' else {not plain})
        self.assertEqual(count_parameters(train.build_model('resnet56', 10)), 853_018)

    def test_alexnet_is_fed_at_its_own_size_unless_told(self):
        # The article's first model needs 67 px at least; left out, --image-size is that.
        for argv, size in (([], 67), (['--image-size', '96'], 96)):
            args = options.parse_args(['--model', 'alexnet', *argv])
            options.check_args(args)
            self.assertEqual(args.image_size or options.default_image_size(args), size)
        self.assertEqual(options.default_image_size(options.parse_args([])), config.IMAGE_SIZE)

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
        defaults('--minutes', '2', n_train=450)  # the epochs are the budget's
        self.assertIn('a small folder: the epochs that fit of 14 batches of 32', self.note)

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
        # A run stopped by Ctrl-C in its second epoch and resumed ends as the run that was
        # never stopped. (Streamed images give the batches held ones give: test_stream.)
        code, _, err = self.train('--save-every', 0, out=self.dir / 'a' / 'weight.pth')
        self.assertEqual(code, 0, err)
        calls = []

        def interrupted(real, trainer, loader):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(trainer, loader)

        b = self.dir / 'b' / 'weight.pth'
        with fake_epochs('epoch_train', interrupted):
            code, _, err = self.train('--save-every', 0, out=b)
        self.assertEqual((code, err.strip().count('\n')), (130, 0), err)
        self.assertIn('interrupted in epoch 2; the best weights so far are in', err)
        self.assertIn(f'python train.py --resume --out {b}', err)
        self.assertTrue(b.is_file())  # the best weights so far are kept
        code, out, err = run_main('--resume', '--out', b, '--device', 'cpu', '--workers', 1)
        self.assertEqual(code, 0, err)
        self.assertIn('resuming from epoch 1', out)
        done_a = torch.load(self.dir / 'a' / 'weight.ckpt', weights_only=True)
        done_b = torch.load(b.with_suffix('.ckpt'), weights_only=True)
        for k, v in done_a['model'].items():
            self.assertTrue(torch.allclose(v.float(), done_b['model'][k].float(), atol=1e-6), k)
        self.assertEqual(done_a['history'][-1]['valid_acc'], done_b['history'][-1]['valid_acc'])

    def test_resume_takes_the_runs_own_arguments(self):
        # The checkpoint keeps the run's arguments: --resume needs no others, takes those that
        # say how it goes on (the device, --workers, ...), and refuses one that contradicts it.
        code, _, err = self.train('--epochs', 1, '--save-every', 0)
        self.assertEqual(code, 0, err)
        for argv, text in ((['--epochs', '3'], '--epochs 3 contradicts the run being resumed '
                                               '(--epochs 1)'),
                           (['--model', 'resnet34'], '--model resnet34 contradicts'),
                           (['--plain'], '--plain True contradicts')):
            code, _, err = run_main('--resume', '--out', self.out, *argv)
            self.assertEqual((code, err.count('\n')), (2, 1), err)
            self.assertIn(text, err)
        code, out, err = run_main('--resume', '--out', self.out, '--workers', 2, '--epochs', 1)
        self.assertEqual((code, out.strip()), (0, f'{self.dir / "weight.ckpt"}: that run '
                                                    f'already finished (1 epochs)'), err)

    def test_a_run_stopped_after_its_last_checkpoint_knows_its_own_best(self):
        # Ctrl-C writes the best weights so far, which can be of a later epoch than the last
        # checkpoint. Resumed, the run must take them as its best and test them at the end.
        valid_accs = {1: 50.0, 2: 60.0, 3: 55.0}  # epoch 2 is the best on the validation images

        def scripted(real, trainer, loader):
            loss, acc = real(trainer, loader)
            if loader is built[-1].valid:
                acc = valid_accs[trainer.scheduler.last_epoch // 3]  # 3 steps an epoch
            return loss, acc

        with loaders_of_the_run() as built, fake_epochs('epoch_valid', scripted):
            a = self.dir / 'a' / 'weight.pth'
            code, _, err = self.train('--epochs', 3, out=a)
            self.assertEqual(code, 0, err)
            done = self.record(a)
            self.assertEqual(done['best_epoch'], 2)
            real_save, calls = train.save, []

            def checkpoint_after_epoch_1_only(out, record, best, trainer=None, history=None,
                                              args=None):
                if not history or history[-1]['epoch'] == 1:  # the timer fires once
                    real_save(out, record, best, trainer, history, args)

            def stopped_in_epoch_3(real, trainer, loader):
                calls.append(1)
                if len(calls) == 3:
                    raise KeyboardInterrupt
                return real(trainer, loader)

            b = self.dir / 'b' / 'weight.pth'
            with mock.patch.object(train, 'save', checkpoint_after_epoch_1_only), \
                    fake_epochs('epoch_train', stopped_in_epoch_3):
                code, _, err = self.train('--epochs', 3, '--save-every', 0, out=b)
            self.assertEqual(code, 130, err)
            self.assertEqual(torch.load(b.with_suffix('.ckpt'), weights_only=True)['epoch'], 1)
            self.assertEqual(self.record(b)['best_epoch'], 2)
            code, out, err = run_main('--resume', '--out', b)
        self.assertEqual(code, 0, err)
        self.assertIn('done: test accuracy', out.splitlines()[-1])
        resumed = self.record(b)
        for key in ('valid_acc', 'best_epoch', 'test_acc'):
            self.assertEqual(resumed[key], done[key], key)

    def test_unreadable_checkpoint_stops_and_keeps_the_weights(self):
        code, _, err = self.train('--epochs', 1)
        self.assertEqual(code, 0, err)
        ckpt, weights = self.out.with_suffix('.ckpt'), self.out.read_bytes()
        good = ckpt.read_bytes()
        # A truncated checkpoint, and one that is a readable file of something else.
        for bad in (good[:2000], None):
            if bad is None:
                torch.save({'model': {}}, ckpt)
            else:
                ckpt.write_bytes(bad)
            code, out, err = run_main('--resume', '--out', self.out)
            self.assertEqual((code, err.count('\n')), (2, 1), err)
            self.assertIn('not a readable checkpoint', err)
            self.assertNotIn('decoding', out)  # it fails before reading the data
            self.assertEqual(self.out.read_bytes(), weights)
        ckpt.unlink()
        code, _, err = run_main('--resume', '--out', self.out)
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('nothing to resume: no checkpoint at', err)

    def test_a_checkpoint_from_another_device_keeps_this_devices_sgd(self):
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
        scheduler = train.build_schedule(resumed, 10)
        saving.resume({'model': model.state_dict(), 'optimizer': state,
                       'scheduler': scheduler.state_dict(), 'scaler': {},
                       'rng': saving.rng_state(CPU)}, model, resumed, scheduler,
                      speed.MixedPrecision(CPU), CPU)
        self.assertIsNone(resumed.param_groups[0]['fused'])
        self.assertTrue(torch.equal(resumed.state[model.weight]['momentum_buffer'],
                                    on_cpu.state[model.weight]['momentum_buffer']))

    def test_nan_loss_stops_and_keeps_weights(self):
        results = iter([None, (float('nan'), 0.0)])

        def nan_in_epoch_2(real, trainer, loader):
            r = next(results)
            return real(trainer, loader) if r is None else r

        with fake_epochs('epoch_train', nan_in_epoch_2):
            code, _, err = self.train('--save-every', 1000)
        self.assertEqual((code, err.strip().count('\n')), (1, 0), err)
        self.assertIn('error: the loss became nan in epoch 2; try a lower --lr than 0.01; the '
                      'best weights so far are in', err)
        self.assertIn('a new run needs its own --out', err)
        self.assertEqual(self.record()['best_epoch'], 1)
        ResNet18(3, small_input=True).load_state_dict(torch.load(self.out, weights_only=True))

    def test_running_out_of_memory_keeps_the_weights_and_says_what_to_pass(self):
        # On a GPU: torch.cuda.OutOfMemoryError; on the CPU, a RuntimeError that says so.
        errors = (torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB'),
                  RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 48000000000 bytes. Error code 12"))
        for i, error in enumerate(errors):
            calls = []

            def second_epoch_fails(real, trainer, loader):
                calls.append(1)
                if len(calls) == 2:
                    raise error
                return real(trainer, loader)

            out = self.dir / str(i) / 'weight.pth'
            with fake_epochs('epoch_train', second_epoch_fails):
                code, _, err = self.train('--save-every', 0, out=out)
            self.assertEqual((code, err.strip().count('\n')), (1, 0), err)
            self.assertIn('error: in epoch 2, the cpu ran out of memory for batches of 16 images '
                          'at 8 px; pass a smaller --batch-size or --image-size', err)
            self.assertIn('best weights so far', err)
            ResNet18(3, small_input=True).load_state_dict(torch.load(out, weights_only=True))
            self.assertEqual(torch.load(out.with_suffix('.ckpt'), weights_only=True)['epoch'], 1)
        # Apple's GPU says it in words of its own.
        self.assertTrue(train.errors.out_of_memory(RuntimeError(
            'MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: 1.00 GB)')))
        # Before the epochs too; and an error that is not about memory stays a traceback.
        with mock.patch.object(train, 'build_loaders', side_effect=errors[1]):
            code, _, err = self.train(out=self.dir / 'early' / 'weight.pth')
        self.assertEqual((code, err.count('\n')), (1, 1), err)
        self.assertIn('ran out of memory for batches of 16 images at 8 px', err)
        with mock.patch.object(train, 'build_loaders', side_effect=RuntimeError('other')), \
                self.assertRaisesRegex(RuntimeError, 'other'):
            self.train(out=self.dir / 'other' / 'weight.pth')

    def test_lr_schedule_warms_up_then_decays_to_zero(self):
        # The article used a constant lr of 0.001.
        f = train.WarmupLinear(100, 0.2)
        self.assertAlmostEqual(f(0), 1 / 20)
        self.assertAlmostEqual(f(19), 1.0)
        self.assertAlmostEqual(f(60), 0.5)
        self.assertAlmostEqual(f(100), 0.0)
        self.assertEqual(max(f(s) for s in range(100)), 1.0)
        f.total_steps = 50  # a plan of fewer steps: it ends at 0 sooner
        self.assertAlmostEqual(f(50), 0.0)

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

        with mock.patch.object(train.Trainer, 'train_step', step), \
                mock.patch.object(train, 'build_criterion', side_effect=lambda *a: built.setdefault(
                    'criterion', real_criterion(*a))):
            code, _, err = self.train()  # --lr 0.01, 2 epochs of 3 steps
        self.assertEqual(code, 0, err)
        factor = train.WarmupLinear(6, config.WARMUP)
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
        files = data.list_image_folder(self.data)
        train_idx, _ = data.split_valid(torch.tensor([y for _, y in files.train]), 0.1, 0)
        train_x = data.decode_images([f for f, _ in files.train], 8, workers=1)[train_idx]
        record = self.record()
        self.assertEqual((record['mean'], record['std']), data.channel_stats(train_x))
        mean, std = (torch.tensor(record[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
        test_x = data.decode_images([f for f, _ in files.test], 8, workers=1)
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

    def test_plain_nets_are_recorded(self):
        # --plain is part of what the weights are: weight.json records it, and predict.py
        # builds the plain net again. A plain CIFAR net has the residual net's very
        # parameters, so only what is recorded tells them apart.
        import predict
        code, out, err = self.train('--plain', '--epochs', 1, model=('--model', 'resnet20'))
        self.assertEqual(code, 0, err)
        self.assertIn('resnet20 (plain), cpu', out)
        self.assertTrue(self.record()['args']['plain'])
        model, _ = predict.load_model(self.out, CPU)
        self.assertFalse(any(b.shortcut for b in model.modules() if hasattr(b, 'shortcut')))

    def test_a_folder_too_large_for_memory_is_one_sentence_and_streams(self):
        with mock.patch.object(data, 'available_ram', return_value=2**30 + 100):
            code, out, err = self.train()
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertIn('held at 8 px they need 0.0 GiB of RAM, and 1.0 GiB is free', err)
        self.assertIn('pass --stream', err)
        # With --stream, the images are decoded in every epoch instead (here in this process,
        # --workers 1), and the run trains and writes its files as ever.
        real_open = Image.open
        with mock.patch.object(Image, 'open', side_effect=real_open) as opened:
            code, out, err = self.train('--stream')
        self.assertEqual(code, 0, err)
        self.assertIn(f'streaming 86 images from {self.data}, decoded in every epoch', out)
        # a probe, the 50 train images for their statistics, then 2 epochs of 3 batches of 16
        # and 2 validations, and one test
        self.assertEqual(opened.call_count, 1 + 50 + 2 * 48 + 2 * 6 + 30)
        self.assertGreater(self.record()['test_acc'], 80)

    def test_a_folder_of_class_folders_draws_its_own_test_images(self):
        # Your photos, a folder per class and no train/ or test/: a fifth of each class (drawn
        # the same way whatever --seed) are the test images, and --test finds them again.
        photos = self.dir / 'photos'
        for name in COLOURS:
            shutil.copytree(self.data / 'train' / name, photos / name)
        code, out, err = run_main('--data', photos, '--image-size', 8, '--small-input', '--lr',
                                  0.01, '--batch-size', 16, '--epochs', 2, '--device', 'cpu',
                                  '--workers', 1, '--out', self.out, '--seed', 3)
        self.assertEqual(code, 0, err)
        self.assertIn(f'{photos} has no train/ and test/ folders: 20% of each class\'s images, '
                      f'drawn at random, are the test images', out)
        self.assertIn('39 train, 5 valid and 12 test images', out)  # of 56: 4 a class tested
        record = self.record()
        self.assertEqual(record['test_split'], config.TEST_SPLIT)
        code, tested, err = run_cli_predict('--test', '--weights', self.out, '--device', 'cpu',
                                            '--workers', 1)
        self.assertEqual(code, 0, err)
        self.assertIn(f'test accuracy {record["test_acc"]:.2f}% on 12 images', tested)
        with contextlib.redirect_stdout(io.StringIO()):
            files = data.list_image_folder(photos)
        self.assertEqual(data.list_image_folder(photos, need_train=False).test, files.test)
        self.assertFalse({f for f, _ in files.train} & {f for f, _ in files.test})


def run_cli_predict(*argv):
    import predict
    from test_helpers import run_cli
    return run_cli(predict.main, *argv)


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
        for flag in ('--epochs', '--batch-size', '--lr', '--minutes'):
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
        self.assertFails(['--minutes', '5', '--epochs', '3'], 'pick one')
        self.assertFails(['--stream'], '--stream reads an image folder')

    def test_image_too_small_for_alexnet(self):
        self.assertFails(['--model', 'alexnet', '--image-size', '32'], 'at least 67 px')

    def test_options_a_model_does_not_have(self):
        self.assertFails(['--model', 'alexnet', '--plain'], 'AlexNet has none to change')
        self.assertFails(['--model', 'alexnet', '--small-input'], 'AlexNet has none to change')
        self.assertFails(['--model', 'resnet20', '--small-input'], 'has that stem already')
        self.assertFails(['--model', 'resnet21'], 'invalid choice')

    def test_missing_and_empty_data_folders(self):
        self.assertFails(['--data', self.root / 'nowhere'], 'does not exist')
        self.assertFails(['--data', self.root], 'has no class folders, and a classifier needs')
        (self.root / 'train' / 'cat').mkdir(parents=True)
        self.assertFails(['--data', self.root], 'has a train/ folder but no test/')
        (self.root / 'test' / 'cat').mkdir(parents=True)
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
        data_dir = make_colour_folder(self.root / 'd', n_train=1, n_test=1)
        os.rename(data_dir / 'test', data_dir / 'val')  # no test/: val/ is used instead
        os.rename(data_dir / 'val' / 'red', data_dir / 'val' / 'orange')
        self.assertFails(['--data', data_dir], "only in train: ['red'], only in test: ['orange']")

    def test_unreadable_image_is_named(self):
        data_dir = make_colour_folder(self.root / 'd', n_train=1, n_test=1)
        (data_dir / 'train' / 'red' / 'broken.png').write_bytes(b'not a png')
        self.assertFails(['--data', data_dir], 'broken.png is not a readable image')

    def test_cifar10_path_trains(self):
        # The default data path, on a miniature CIFAR-10 in torchvision's format (the real one
        # is downloaded; its checksums cannot match this one, so that check is skipped).
        make_mini_cifar(self.root)
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


if __name__ == '__main__':
    unittest.main()
