"""The tests: python -m unittest test_models runs every test file (see load_tests below).

This file tests the models: alexnet.py, layers.py and resnet.py, each against the article's bugs
and against torchvision. Each of the article's bugs has a test that fails on the article's code
(README, "What the article got wrong"). Everything runs on the CPU, on data the tests make, with
no network.
"""
import math
import unittest

import torch
import torch.nn as nn
import torchvision

import layers
from alexnet import AlexNet
from resnet import ResNet18, ResNet34, ResNet50, count_parameters
from test_helpers import HERE, copy_weights, run_script

# The other test files; `python -m unittest test_models` runs them too.
TEST_FILES = ('test_data', 'test_speed', 'test_train', 'test_predict', 'test_benchmark',
              'test_docs')


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


def blocks_per_stage(model):
    return [1 + len(s.blocks) for s in (model.layer1, model.layer2, model.layer3, model.layer4)]


class TorchvisionEquivalence:
    """Mixin: the model equals torchvision's (parameter shapes, order and outputs)."""
    ours = None
    theirs = None
    size = 64

    def test_same_parameter_shapes_in_order(self):
        ours, theirs = self.ours(10), self.theirs(num_classes=10)
        self.assertEqual([p.shape for p in ours.parameters()],
                         [p.shape for p in theirs.parameters()])

    def test_same_outputs_with_torchvision_weights(self):
        torch.manual_seed(0)
        # float64, so that only a real difference, not rounding, can exceed the tolerance.
        ours = self.ours(10).double().eval()
        theirs = self.theirs(num_classes=10).double().eval()
        # Non-trivial BN statistics, so a mix-up of running mean and var would show.
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        copy_weights(theirs, ours)
        x = torch.randn(2, 3, self.size, self.size, dtype=torch.double)
        with torch.no_grad():
            diff = (ours(x) - theirs(x)).abs().max().item()
        self.assertLess(diff, 1e-10)


class AlexNetTest(unittest.TestCase):

    def test_parameter_count(self):
        self.assertEqual(count_parameters(AlexNet(3, 10)), 58_322_314)

    def test_output_shape_224_and_227(self):
        model = AlexNet(3, 10).eval()
        with torch.no_grad():
            for size in (224, 227):
                self.assertEqual(model(torch.zeros(2, 3, size, size)).shape, (2, 10))

    def test_has_relu_and_dropout(self):
        # Article bug: no non-linearity at all.
        model = AlexNet(3, 10)
        self.assertEqual(sum(isinstance(m, nn.ReLU) for m in model.modules()), 7)
        self.assertEqual(sum(isinstance(m, nn.Dropout) for m in model.modules()), 2)

    def test_returns_logits_not_softmax(self):
        # Article bug: nn.Softmax(dim=0), across the batch, before CrossEntropyLoss.
        torch.manual_seed(0)
        model = AlexNet(3, 10).eval()
        self.assertFalse(any(isinstance(m, nn.Softmax) for m in model.modules()))
        with torch.no_grad():
            out = model(torch.randn(4, 3, 67, 67))
        self.assertFalse(torch.allclose(out.sum(dim=0), torch.ones(10), atol=1e-3))
        self.assertFalse(torch.allclose(out.sum(dim=1), torch.ones(4), atol=1e-3))

    def test_he_initialisation(self):
        # Departure from the article (PyTorch's default init): He init for the ReLUs.
        torch.manual_seed(0)
        model = AlexNet(3, 10)
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
        model = AlexNet(3, 10).eval()
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
        self.assertIsNone(layers.conv3x3(8, 8).bias)
        self.assertIsNone(layers.conv1x1(8, 8).bias)

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
        self.assertIn('11,181,642', out)


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
