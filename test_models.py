"""The tests: python -m unittest test_models runs every test file (see load_tests below).

This file tests the models: alexnet.py, layers.py and resnet.py, each against the article's bugs
and against torchvision. Each of the article's bugs has a test that fails on the article's code
(README, "The article's code, corrected"). Everything runs on the CPU, on data the tests make, with
no network.
"""
import math
import unittest

import torch
import torch.nn as nn
import torchvision

import config
import layers
import options
import resnet
import train
from alexnet import AlexNet
from resnet import ResNet18, ResNet34, ResNet50, count_parameters
from test_helpers import HERE, run_script

# The other test files; `python -m unittest test_models` runs them too.
TEST_FILES = ('test_data', 'test_train', 'test_speed', 'test_tools', 'test_docs')


def load_tests(loader, tests, pattern):
    """Add TEST_FILES' tests when this file is named on the command line; discovery
    (`python -m unittest`, which passes a pattern) finds those files itself."""
    if pattern is None:
        for name in TEST_FILES:
            tests.addTests(loader.loadTestsFromName(name))
    return tests


class TestFilesTest(unittest.TestCase):

    def test_every_test_file_is_run(self):
        found = {p.stem for p in HERE.glob('test_*.py')} - {'test_models', 'test_helpers'}
        self.assertEqual(found, set(TEST_FILES))


class EveryModelTest(unittest.TestCase):

    def test_every_model_offered_is_built(self):
        # Each --model builds a network that classifies an image into the 3 classes, with and
        # without --plain where it is a ResNet; the CIFAR nets are the paper's, by depth.
        self.assertEqual(set(options.MODELS), {'alexnet', 'resnet18', 'resnet34', 'resnet50',
                                               'resnet20', 'resnet32', 'resnet44', 'resnet56',
                                               'resnet110'})
        for name in options.MODELS:
            for plain in (False, True) if name != 'alexnet' else (False,):
                with self.subTest(name, plain=plain):
                    model = train.build_model(name, 3, plain=plain).eval()
                    size = options.parse_args(['--model', name]).image_size  # AlexNet: 67 px
                    with torch.no_grad():
                        self.assertEqual(model(torch.zeros(2, 3, size, size)).shape, (2, 3))
                    shortcuts = {b.shortcut for b in model.modules() if hasattr(b, 'shortcut')}
                    self.assertEqual(shortcuts, set() if name == 'alexnet' else {not plain})
        self.assertEqual(count_parameters(train.build_model('resnet56', 10)), 853_018)
        self.assertEqual(config.ALEXNET_IMAGE_SIZE, AlexNet.MIN_INPUT_SIZE)


def blocks_per_stage(model):
    return [1 + len(s.blocks) for s in (model.layer1, model.layer2, model.layer3, model.layer4)]


def blocks(model):
    return [m for m in model.modules() if isinstance(m, (layers.BasicBlock, layers.Bottleneck))]


class TorchvisionEquivalence:
    """Mixin: the model equals torchvision's (parameter shapes, order and outputs), and
    torchvision's weights load into it through resnet.from_torchvision."""
    ours = None
    theirs = None
    size = 64

    def test_same_parameter_shapes_in_order(self):
        ours, theirs = self.ours(10), self.theirs(num_classes=10)
        self.assertEqual([p.shape for p in ours.parameters()],
                         [p.shape for p in theirs.parameters()])

    def test_same_outputs_with_torchvision_weights(self):
        # A state_dict of torchvision's network (made here, weights=None; ImageNet's load the
        # same way), renamed by from_torchvision, loads strictly and gives the same outputs.
        torch.manual_seed(0)
        # float64, so that only a real difference, not rounding, can exceed the tolerance.
        ours = self.ours(10).double().eval()
        theirs = self.theirs(weights=None, num_classes=10).double().eval()
        # Non-trivial BN statistics, so a mix-up of running mean and var would show.
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        ours.load_state_dict(resnet.from_torchvision(theirs.state_dict()))
        x = torch.randn(2, 3, self.size, self.size, dtype=torch.double)
        with torch.no_grad():
            diff = (ours(x) - theirs(x)).abs().max().item()
        self.assertLess(diff, 1e-10)

    def test_plain_twin_has_no_shortcuts_and_no_projections(self):
        # The paper's plain-18/34 (and a plain 50): the same layers, less the projections.
        residual, plain = self.ours(10), self.ours(10, plain=True)
        self.assertTrue(all(b.shortcut for b in blocks(residual)))
        self.assertFalse(any(b.shortcut or b.downsample is not None for b in blocks(plain)))
        projections = sum(count_parameters(b.downsample) for b in blocks(residual)
                          if b.downsample is not None)
        self.assertEqual(count_parameters(plain), count_parameters(residual) - projections)


class AlexNetTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.model = AlexNet(3, 10).eval()  # 58M parameters: built once, for the tests that read it

    def test_parameter_count(self):
        self.assertEqual(count_parameters(self.model), 58_322_314)

    def test_output_shape_224_and_227(self):
        model = self.model
        with torch.no_grad():
            for size in (224, 227):
                self.assertEqual(model(torch.zeros(2, 3, size, size)).shape, (2, 10))

    def test_has_relu_and_dropout(self):
        # Article bug: no non-linearity at all.
        model = self.model
        self.assertEqual(sum(isinstance(m, nn.ReLU) for m in model.modules()), 7)
        self.assertEqual([m.p for m in model.modules() if isinstance(m, nn.Dropout)], [0.5, 0.5])

    def test_returns_logits_not_softmax(self):
        # Article bug: nn.Softmax(dim=0), across the batch, before CrossEntropyLoss.
        model = self.model
        self.assertFalse(any(isinstance(m, nn.Softmax) for m in model.modules()))
        with torch.no_grad():
            out = model(torch.randn(4, 3, 67, 67))
        self.assertFalse(torch.allclose(out.sum(dim=0), torch.ones(10), atol=1e-3))
        self.assertFalse(torch.allclose(out.sum(dim=1), torch.ones(4), atol=1e-3))

    def test_he_initialisation(self):
        # Departure from the article (PyTorch's default init): He init for the ReLUs.
        model = self.model
        for layer in (model.conv1, model.conv2, model.fc_layers[1], model.fc_layers[4]):
            fan_in = layer.weight[0].numel()
            self.assertAlmostEqual(layer.weight.std().item(), math.sqrt(2 / fan_in),
                                   delta=0.03 * math.sqrt(2 / fan_in))
            self.assertTrue(torch.all(layer.bias == 0))

    def test_he_initialisation_learns_where_the_default_stalls(self):
        # Four SGD steps on generated colour patches (the class is the colour): with the
        # default init the signal dies out through the eight layers and the loss stays at
        # ln 3; with He init it moves, and falls.
        g = torch.Generator().manual_seed(0)
        colours = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
        labels = torch.arange(12) % 3
        x = colours[labels][:, :, None, None] + 0.2 * torch.randn(12, 3, 67, 67, generator=g)

        def losses(default_init):
            torch.manual_seed(0)
            model = AlexNet(3, 3).eval()  # eval: no dropout, the same steps for both
            if default_init:
                for m in model.modules():
                    if isinstance(m, (nn.Conv2d, nn.Linear)):
                        m.reset_parameters()  # PyTorch's default, as in the article
            optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
            out = []
            for _ in range(4):
                loss = nn.functional.cross_entropy(model(x), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                out.append(loss.item())
            return out

        he, default = losses(False), losses(True)
        self.assertLess(max(abs(v - math.log(3)) for v in default), 0.01)
        self.assertLess(he[-1], he[0] - 0.5)

    def test_small_input_gets_clear_error(self):
        model = self.model
        with torch.no_grad():
            self.assertEqual(model(torch.zeros(1, 3, 67, 67)).shape, (1, 10))
            with self.assertRaisesRegex(ValueError, 'at least 67'):
                model(torch.zeros(1, 3, 32, 32))

    def test_script_prints_shape(self):
        out = run_script('alexnet.py')
        self.assertIn('[16, 3, 227, 227] -> [16, 10]', out)
        self.assertIn('58,322,314', out)


class LayersTest(unittest.TestCase):

    def test_convs_have_no_bias(self):
        # Article bug: bias=True before BatchNorm, in conv3x3, conv1x1 and the stem's conv1.
        self.assertIsNone(layers.conv3x3(8, 8).bias)
        self.assertIsNone(layers.conv1x1(8, 8).bias)
        for small_input in (False, True):
            self.assertIsNone(ResNet18(10, small_input=small_input).conv1.bias)

    def test_residual_layer_builds_num_blocks(self):
        # Article bug: first_block plus num_blocks more, so 3 blocks for num_blocks=2.
        for n in (1, 2, 3):
            layer = layers.ResidualLayer(n, 16, 16)
            self.assertEqual(1 + len(layer.blocks), n)

    def test_projection_exactly_when_shape_changes(self):
        # Article bug: the projection had stride 1 and no stage ever downsampled.
        self.assertIsNone(layers.ResidualLayer(2, 16, 16).first_block.downsample)
        for stride, out_ch in ((2, 16), (1, 32), (2, 32)):
            proj = layers.ResidualLayer(2, 16, out_ch, stride=stride).first_block.downsample
            self.assertIsNotNone(proj)
            self.assertEqual(proj[0].stride, (stride, stride))
            self.assertIsInstance(proj[1], nn.BatchNorm2d)
        for block in layers.ResidualLayer(3, 16, 32, stride=2).blocks:
            self.assertIsNone(block.downsample)

    def test_stride_halves_the_feature_map(self):
        layer = layers.ResidualLayer(2, 16, 32, stride=2)
        self.assertEqual(layer(torch.zeros(2, 16, 8, 8)).shape, (2, 32, 4, 4))

    def test_zero_pad_shortcut(self):
        # Option A: every other pixel, and the new channels all zero; no parameters.
        x = torch.randn(2, 16, 8, 8)
        shortcut = layers.ZeroPadShortcut(16, 32, stride=2)
        out = shortcut(x)
        self.assertEqual(out.shape, (2, 32, 4, 4))
        self.assertTrue(torch.equal(out[:, :16], x[:, :, ::2, ::2]))
        self.assertTrue(torch.equal(out[:, 16:], torch.zeros(2, 16, 4, 4)))
        self.assertEqual(list(shortcut.parameters()), [])
        layer = layers.ResidualLayer(2, 16, 32, stride=2, shortcut=layers.ZeroPadShortcut)
        self.assertIsInstance(layer.first_block.downsample, layers.ZeroPadShortcut)
        self.assertEqual(layer(x).shape, (2, 32, 4, 4))

    def test_plain_block_is_the_residual_block_less_its_shortcut(self):
        # With the same weights, H(x) = relu(F(x) + x) for the residual block and relu(F(x))
        # for the plain one: F(x) is the same, and the outputs differ by the shortcut alone.
        torch.manual_seed(0)
        for block, args in ((layers.BasicBlock, (8, 8)), (layers.Bottleneck, (8, 8))):
            residual = block(*args).eval()
            plain = block(*args, shortcut=False).eval()
            plain.load_state_dict(residual.state_dict())
            x = torch.randn(2, 8, 6, 6)
            inner = {}
            for name, b in (('residual', residual), ('plain', plain)):
                last_bn = b.bn3 if block is layers.Bottleneck else b.bn2
                last_bn.register_forward_hook(lambda m, i, o, n=name: inner.update({n: o.clone()}))
            with torch.no_grad():
                r, p = residual(x), plain(x)
            torch.testing.assert_close(inner['residual'], inner['plain'], rtol=0, atol=0)
            torch.testing.assert_close(r, torch.relu(inner['residual'] + x), rtol=0, atol=0)
            torch.testing.assert_close(p, torch.relu(inner['plain']), rtol=0, atol=0)
            self.assertFalse(torch.equal(r, p))

    def test_bottleneck(self):
        layer = layers.ResidualLayer(3, 64, 256, block=layers.Bottleneck)
        first = layer.first_block
        self.assertEqual([first.conv1.kernel_size, first.conv2.kernel_size,
                          first.conv3.kernel_size], [(1, 1), (3, 3), (1, 1)])
        self.assertEqual(first.conv2.out_channels, 64)  # width = out_channels / expansion
        self.assertEqual(layer(torch.zeros(1, 64, 8, 8)).shape, (1, 256, 8, 8))
        down = layers.ResidualLayer(1, 256, 512, block=layers.Bottleneck, stride=2)
        self.assertEqual(down.first_block.conv2.stride, (2, 2))
        self.assertEqual(down(torch.zeros(1, 256, 8, 8)).shape, (1, 512, 4, 4))


class ResNet18Test(TorchvisionEquivalence, unittest.TestCase):
    ours = ResNet18
    theirs = staticmethod(torchvision.models.resnet18)
    size = 224

    def test_parameter_count(self):
        self.assertEqual(count_parameters(ResNet18(10)), 11_181_642)
        self.assertEqual(count_parameters(ResNet18(10, small_input=True)), 11_173_962)

    def test_two_blocks_per_stage(self):
        self.assertEqual(blocks_per_stage(ResNet18(10)), [2, 2, 2, 2])

    def test_feature_maps_halve_each_stage(self):
        model = ResNet18(10).eval()
        sizes = []
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
        with torch.no_grad():
            model(torch.zeros(1, 3, 224, 224))
        self.assertEqual(sizes, [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)])

    def test_output_shapes(self):
        model = ResNet18(10).eval()
        with torch.no_grad():
            for size in (32, 224, 227):
                self.assertEqual(model(torch.zeros(2, 3, size, size)).shape, (2, 10))

    def test_torchvision_initialisation(self):
        torch.manual_seed(0)
        model = ResNet18(10)
        w = model.layer3.first_block.conv1.weight  # 256 out, 3x3: fan_out = 256 * 9
        self.assertAlmostEqual(w.std().item(), math.sqrt(2 / (256 * 9)), delta=0.002)
        self.assertAlmostEqual(model.conv1.weight.std().item(), math.sqrt(2 / (64 * 49)),
                               delta=0.005)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                self.assertTrue(torch.all(m.weight == 1) and torch.all(m.bias == 0))

    def test_backward_reaches_conv1(self):
        model = ResNet18(10)
        loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
        loss.backward()
        self.assertGreater(model.conv1.weight.grad.abs().sum().item(), 0)

    def test_small_input_stem(self):
        model = ResNet18(10, small_input=True).eval()
        self.assertEqual((model.conv1.kernel_size, model.conv1.stride), ((3, 3), (1, 1)))
        self.assertIsInstance(model.maxpool, nn.Identity)
        sizes = []
        model.layer1.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
        with torch.no_grad():
            self.assertEqual(model(torch.zeros(2, 3, 32, 32)).shape, (2, 10))
        self.assertEqual(sizes, [32])

    def test_script_runs_and_prints_shape(self):
        # Article bug: `from . import layers` fails under `python resnet.py`.
        out = run_script('resnet.py')
        self.assertIn('[16, 3, 224, 224] -> [16, 10]', out)
        self.assertRegex(out, r'\n  layer4 \[512, 7, 7\] +8,393,728 +411,041,792\n')
        self.assertRegex(out, r'\n  total +11,181,642 +1,813,566,464\n')

    def test_stage_table(self):
        model = ResNet18(10)
        rows = {name: row for name, *row in resnet.stage_table(model, 224)}
        self.assertEqual(list(rows), ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'pool',
                                      'fc'])
        self.assertEqual(sum(r[1] for r in rows.values()), count_parameters(model))
        # The stem's 7x7 conv: 64 filters of 3x7x7 at each of 112x112 positions.
        self.assertEqual(rows['stem'][2], 64 * 3 * 49 * 112 * 112)
        self.assertEqual(rows['fc'], [[10], 5_130, 5_120])
        total = sum(r[2] for r in rows.values())
        self.assertLess(abs(total - 1.8e9) / 1.8e9, 0.01)  # the paper's Table 1: 1.8 x 10^9
        # At train.py's 32 px, the ImageNet stem leaves layer4 a 1x1 map.
        shapes = {name: shape for name, shape, *_ in resnet.stage_table(model, 32)}
        self.assertEqual((shapes['layer3'], shapes['layer4']), ([256, 2, 2], [512, 1, 1]))


class ResNet34Test(TorchvisionEquivalence, unittest.TestCase):
    ours = ResNet34
    theirs = staticmethod(torchvision.models.resnet34)

    def test_parameter_count_and_blocks(self):
        model = ResNet34(10)
        self.assertEqual(count_parameters(model), 21_289_802)
        self.assertEqual(blocks_per_stage(model), [3, 4, 6, 3])


class ResNet50Test(TorchvisionEquivalence, unittest.TestCase):
    ours = ResNet50
    theirs = staticmethod(torchvision.models.resnet50)
    size = 32  # layer4 at 1x1

    def test_parameter_count_and_blocks(self):
        model = ResNet50(10)
        self.assertEqual(count_parameters(model), 23_528_522)
        self.assertIsInstance(model.layer1.first_block, layers.Bottleneck)
        self.assertEqual(blocks_per_stage(model), [3, 4, 6, 3])


class CifarResNetTest(unittest.TestCase):
    """The paper's CIFAR-10 networks (Section 4.2) and their plain twins."""

    # The paper's Table 6 rounds these to 0.27M, 0.46M, 0.66M, 0.85M and 1.7M.
    PARAMETERS = {'resnet20': 269_722, 'resnet32': 464_154, 'resnet44': 658_586,
                  'resnet56': 853_018, 'resnet110': 1_727_962}

    def test_parameter_counts_as_in_table_6(self):
        self.assertEqual(set(resnet.CIFAR_RESNETS), set(self.PARAMETERS))
        for name, net in resnet.CIFAR_RESNETS.items():
            with self.subTest(name):
                self.assertEqual(count_parameters(net(10)), self.PARAMETERS[name])
                self.assertEqual(count_parameters(net(10, plain=True)), self.PARAMETERS[name])

    def test_6n_plus_2_layers_at_16_32_64_filters(self):
        for name, net in resnet.CIFAR_RESNETS.items():
            model = net(10)
            weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            self.assertEqual(len(weighted), int(name[len('resnet'):]), name)
        model = resnet.ResNet20(10).eval()
        sizes = []
        for stage in (model.layer1, model.layer2, model.layer3):
            stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
        with torch.no_grad():
            self.assertEqual(model(torch.zeros(2, 3, 32, 32)).shape, (2, 10))
        self.assertEqual(sizes, [(16, 32, 32), (32, 16, 16), (64, 8, 8)])
        self.assertIsNone(model.conv1.bias)

    def test_option_a_shortcuts_and_a_plain_twin_without_any(self):
        residual, plain = resnet.ResNet20(10), resnet.ResNet20(10, plain=True)
        downsamples = [b.downsample for b in blocks(residual) if b.downsample is not None]
        self.assertEqual(len(downsamples), 2)  # into stages 2 and 3
        self.assertTrue(all(isinstance(d, layers.ZeroPadShortcut) for d in downsamples))
        self.assertTrue(all(b.shortcut for b in blocks(residual)))
        self.assertFalse(any(b.shortcut or b.downsample for b in blocks(plain)))
        self.assertEqual(list(residual.state_dict()), list(plain.state_dict()))
