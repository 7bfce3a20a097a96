"""Tests of transfer.py: starting from torchvision's ImageNet weights (--pretrained, found in a
cache the test plants, never downloaded), from a weight.pth (--init), and --freeze."""
import json
import os
import unittest
import urllib.error
from pathlib import Path
from unittest import mock

import torch
import torch.hub
import torch.nn as nn
import torchvision

import config
import options
import predict
import train
import transfer
from resnet import ResNet18, from_torchvision
from test_helpers import ColourFolderCase, run_cli, run_main

CPU = torch.device('cpu')


def torchvision_resnet18(seed=0):
    """A torchvision-format ResNet18 state_dict (1000 classes) with recognisable weights."""
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=1000).state_dict()


class TransferTest(ColourFolderCase):

    def setUp(self):
        super().setUp()
        # No test downloads: torchvision's weights come from the cache each test plants.
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

    def test_pretrained_by_path_and_its_default_size(self):
        path = self.dir / 'resnet18-imagenet.pth'
        torch.save(torchvision_resnet18(), path)
        args = options.parse_args(['--pretrained', str(path)])
        self.assertEqual(args.pretrained, str(path))
        self.assertEqual(options.default_image_size(args), 224)
        self.assertEqual(options.default_image_size(options.parse_args([])), config.IMAGE_SIZE)
        self.assertEqual(options.parse_args(['--pretrained']).pretrained, 'imagenet')
        start = transfer.read_start(args.model, args.pretrained)
        new = transfer.load_start(ResNet18(3), start, ['a', 'b', 'c'])
        self.assertEqual(start.name, f'imagenet {path.resolve()}')
        self.assertEqual(new, {'fc.weight', 'fc.bias'})

    def test_a_path_that_is_not_torchvisions_file_is_one_sentence(self):
        ours = self.dir / 'ours.pth'
        torch.save(ResNet18(3).state_dict(), ours)  # this repository's names: for --init
        for path, text in ((self.dir / 'nowhere.pth', 'no file at'), (ours, f'--init {ours}')):
            code, _, err = self.train('--pretrained', path, out=self.dir / 'w.pth')
            self.assertEqual((code, err.count('\n')), (2, 1), err)
            self.assertIn(text, err)

    def test_offline_without_a_cached_file_is_one_sentence(self):
        code, out, err = self.train('--pretrained', out=self.dir / 'w.pth')
        self.assertEqual((code, err.count('\n')), (2, 1), err)
        self.assertNotIn('decoding', out)  # before the data is read
        self.assertIn(str(Path(torch.hub.get_dir(), 'checkpoints')), err)
        self.assertIn('--pretrained PATH', err)
        self.assertNotIn('Traceback', err)
        self.assertFalse((self.dir / 'w.pth').exists())

    def test_freeze_trains_the_fc_alone(self):
        torch.manual_seed(0)
        model = ResNet18(3)
        transfer.start_from(model, from_torchvision(torchvision_resnet18()), 'test')
        trainable = transfer.freeze_all_but_head(model)
        self.assertEqual(trainable, {'fc.weight', 'fc.bias'})
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = train.build_optimizer(model, 0.1, CPU, groups=transfer.parameter_groups(
            model, trainable, 0.1, config.PRETRAINED_LR_FACTOR))
        (group,) = optimizer.param_groups  # the fc alone, at the full lr
        self.assertEqual((len(group['params']), group['lr']), (2, 0.1))
        trainer = train.Trainer(model, optimizer, train.build_criterion())
        trainer.epoch_train([(torch.randn(8, 3, 8, 8), torch.arange(8) % 3)])
        for k, v in model.state_dict().items():
            changed = not torch.equal(v, before[k])
            # Frozen: the weights and the BatchNorm statistics; the new fc trains.
            self.assertEqual(changed, k.startswith('fc.'), k)

    def test_the_layers_that_came_with_the_weights_train_at_the_smaller_lr(self):
        model = ResNet18(3)
        new = transfer.start_from(model, from_torchvision(torchvision_resnet18()), 'test')
        optimizer = train.build_optimizer(model, 0.1, CPU, groups=transfer.parameter_groups(
            model, new, 0.1, 0.25))
        fresh, came = optimizer.param_groups
        self.assertEqual({id(p) for p in fresh['params']}, {id(model.fc.weight), id(model.fc.bias)})
        self.assertEqual(len(came['params']), len(list(model.parameters())) - 2)
        self.assertAlmostEqual(came['lr'], 0.1 * 0.25)
        scheduler = train.build_schedule(optimizer, 10)
        for _ in range(5):
            optimizer.step()
            scheduler.step()
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
        saved = torch.load(out, weights_only=True)
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

    def test_combinations_that_cannot_be(self):
        for argv, text in ((['--freeze'], 'pass --pretrained or --init'),
                           (['--pretrained', '--init', 'w.pth'], 'pick one'),
                           (['--pretrained', '--model', 'resnet20'], 'not for resnet20'),
                           (['--pretrained', '--small-input'], 'leave it out'),
                           (['--pretrained', '--plain'], 'leave it out')):
            code, _, err = self.train(*argv, out=self.dir / 'w.pth')
            self.assertEqual((code, err.count('\n')), (2, 1), (argv, err))
            self.assertIn(text, err)

    def test_frozen_batchnorm_keeps_its_statistics_in_training(self):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                              nn.Linear(4 * 6 * 6, 2))
        transfer.freeze_all_but_head(model)  # all but the last layer, '3'
        model.train()
        mean = model[1].running_mean.clone()
        model(torch.randn(4, 3, 8, 8))
        self.assertTrue(torch.equal(model[1].running_mean, mean))
        self.assertEqual(transfer.head_name(model), '3')


if __name__ == '__main__':
    unittest.main()
