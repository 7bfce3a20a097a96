"""ResNet18 as in the article's "ResNetの実装", plus ResNet34 and ResNet50, and the paper's
CIFAR-10 networks, ResNet20 to ResNet110. Each is built with its shortcuts, or without them
(plain=True): the paper's plain baselines. Run `python resnet.py` for a shape check and each
stage's output, parameters and multiply-adds (`--image-size 32` for train.py's size).

ResNet18/34/50 are torchvision's networks, layer for layer and parameter for parameter, in the
article's style and names (from_torchvision maps torchvision's weights onto them). The CIFAR-10
networks are those of the paper's Section 4.2 (6n+2 layers, option-A shortcuts):

    network     n   layers  parameters (10 classes)  the paper's Table 6
    ResNet20    3   20        269,722                0.27M
    ResNet32    5   32        464,154                0.46M
    ResNet44    7   44        658,586                0.66M
    ResNet56    9   56        853,018                0.85M
    ResNet110  18   110     1,727,962                1.7M
"""
import re

import torch
import torch.nn as nn

# Article: `from . import layers`, which fails when the file runs as a script.
import layers


class ResNet(nn.Module):
    """The ResNet skeleton: a stem, four stages of residual blocks, a pool and a classifier.

    small_input=True swaps the ImageNet stem (7x7/2 conv + max-pool, which shrinks a 32 px
    CIFAR image to 8 px before the first block) for a 3x3/1 conv and no pool. plain=True builds
    every block without its shortcut, the projections too: the paper's plain-18 and plain-34.
    """

    def __init__(self, block, num_blocks, num_classes, small_input=False, plain=False):
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f'num_blocks needs one count per stage (4), got {num_blocks}')
        # Article: conv1 had a bias. BatchNorm follows with its own shift, so bias=False.
        if small_input:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)

        e = block.expansion
        shortcut = None if plain else layers.projection
        # Article: every stage had stride 1; stages 2-4 must halve the feature map.
        self.layer1 = layers.ResidualLayer(num_blocks[0], 64, 64 * e, block, 1, shortcut)
        self.layer2 = layers.ResidualLayer(num_blocks[1], 64 * e, 128 * e, block, 2, shortcut)
        self.layer3 = layers.ResidualLayer(num_blocks[2], 128 * e, 256 * e, block, 2, shortcut)
        self.layer4 = layers.ResidualLayer(num_blocks[3], 256 * e, 512 * e, block, 2, shortcut)
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * e, num_classes)
        # Article: PyTorch's default init. Here torchvision's, the paper's He init (init_weights).
        init_weights(self)

    def forward(self, x):               # shapes for ResNet18 and a 224 px input
        out = self.conv1(x)             # (B, 64, 112, 112)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.maxpool(out)         # (B, 64, 56, 56)

        out = self.layer1(out)          # (B, 64, 56, 56)
        out = self.layer2(out)          # (B, 128, 28, 28)
        out = self.layer3(out)          # (B, 256, 14, 14)
        out = self.layer4(out)          # (B, 512, 7, 7)

        out = self.avg_pool(out)        # (B, 512, 1, 1)
        out = torch.flatten(out, 1)     # (B, 512). Article: out.view(out.size(0), -1), the same
        out = self.fc(out)              # (B, num_classes)
        return out


def init_weights(model):
    """torchvision's initialisation (the paper's He init): He (Kaiming) normal for the convs,
    each BatchNorm as the identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet18(ResNet):
    """ResNet18: BasicBlocks, 2 in each of the 4 stages."""
    # Article: ResNet18 held the whole body; here it is class ResNet above, which 34 and 50 share.

    def __init__(self, num_classes, small_input=False, plain=False):
        super().__init__(layers.BasicBlock, [2, 2, 2, 2], num_classes, small_input, plain)


class ResNet34(ResNet):
    """ResNet34: BasicBlocks, 3-4-6-3."""

    def __init__(self, num_classes, small_input=False, plain=False):
        super().__init__(layers.BasicBlock, [3, 4, 6, 3], num_classes, small_input, plain)


class ResNet50(ResNet):
    """ResNet50: Bottlenecks, 3-4-6-3."""
    # Article: it drew the bottleneck block but never built it, so it had no ResNet50.

    def __init__(self, num_classes, small_input=False, plain=False):
        super().__init__(layers.Bottleneck, [3, 4, 6, 3], num_classes, small_input, plain)


class CifarResNet(nn.Module):
    """The paper's CIFAR-10 ResNet (Section 4.2) of depth 6n+2: a 3x3 conv of 16 filters, three
    stages of n BasicBlocks at 16, 32 and 64 filters on 32, 16 and 8 px maps, a global average
    pool and the classifier. Where the width doubles, the shortcut is option A (zero padding),
    so plain=True (no shortcuts) keeps every parameter.
    """

    def __init__(self, n, num_classes, plain=False):
        super().__init__()
        shortcut = None if plain else layers.ZeroPadShortcut
        self.conv1 = layers.conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = layers.ResidualLayer(n, 16, 16, stride=1, shortcut=shortcut)
        self.layer2 = layers.ResidualLayer(n, 16, 32, stride=2, shortcut=shortcut)
        self.layer3 = layers.ResidualLayer(n, 32, 64, stride=2, shortcut=shortcut)
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x):                           # shapes for a 32 px input
        out = self.relu(self.bn1(self.conv1(x)))    # (B, 16, 32, 32)
        out = self.layer1(out)                      # (B, 16, 32, 32)
        out = self.layer2(out)                      # (B, 32, 16, 16)
        out = self.layer3(out)                      # (B, 64, 8, 8)
        out = self.avg_pool(out)                    # (B, 64, 1, 1)
        out = torch.flatten(out, 1)                 # (B, 64)
        return self.fc(out)                         # (B, num_classes)


class ResNet20(CifarResNet):
    """The paper's ResNet-20: n = 3."""

    def __init__(self, num_classes, plain=False):
        super().__init__(3, num_classes, plain)


class ResNet32(CifarResNet):
    """The paper's ResNet-32: n = 5."""

    def __init__(self, num_classes, plain=False):
        super().__init__(5, num_classes, plain)


class ResNet44(CifarResNet):
    """The paper's ResNet-44: n = 7."""

    def __init__(self, num_classes, plain=False):
        super().__init__(7, num_classes, plain)


class ResNet56(CifarResNet):
    """The paper's ResNet-56: n = 9."""

    def __init__(self, num_classes, plain=False):
        super().__init__(9, num_classes, plain)


class ResNet110(CifarResNet):
    """The paper's ResNet-110: n = 18."""

    def __init__(self, num_classes, plain=False):
        super().__init__(18, num_classes, plain)


# The networks train.py --model offers (with AlexNet), by name.
IMAGENET_RESNETS = {'resnet18': ResNet18, 'resnet34': ResNet34, 'resnet50': ResNet50}
CIFAR_RESNETS = {'resnet20': ResNet20, 'resnet32': ResNet32, 'resnet44': ResNet44,
                 'resnet56': ResNet56, 'resnet110': ResNet110}


def from_torchvision(state_dict):
    """torchvision's resnet18/34/50 state_dict with this file's names, for load_state_dict.

    torchvision numbers a stage's blocks (layer1.0, layer1.1, ...); the article names the first
    one and lists the rest (layer1.first_block, layer1.blocks.0, ...). Every other name is the
    same.
    """
    def rename(key):
        m = re.match(r'(layer\d)\.(\d+)\.(.*)', key)
        if m is None:
            return key
        stage, index, rest = m.group(1), int(m.group(2)), m.group(3)
        block = 'first_block' if index == 0 else f'blocks.{index - 1}'
        return f'{stage}.{block}.{rest}'
    return {rename(k): v for k, v in state_dict.items()}


def count_parameters(model):
    """Number of learnable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stages(model):
    """(name, modules) of a ResNet's stages, in the order the forward runs them: the stem, the
    residual stages, the pool and the classifier."""
    stem = [model.conv1, model.bn1, model.relu] + [model.maxpool] * hasattr(model, 'maxpool')
    residual = [n for n in ('layer1', 'layer2', 'layer3', 'layer4') if hasattr(model, n)]
    return [('stem', stem), *((n, [getattr(model, n)]) for n in residual),
            ('pool', [model.avg_pool, nn.Flatten()]), ('fc', [model.fc])]


def stage_table(model, image_size):
    """Rows (stage, output shape of one image, parameters, multiply-adds of one image): the
    convs' and the fc's multiply-adds, which are nearly all of a ResNet's work."""
    def count(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            macs[0] += out[0].numel() * m.in_channels // m.groups * m.weight[0, 0].numel()
        elif isinstance(m, nn.Linear):
            macs[0] += m.in_features * m.out_features

    rows, x = [], torch.zeros(1, 3, image_size, image_size)
    model.eval()
    with torch.no_grad():
        for name, modules in stages(model):
            macs = [0]
            hooks = [m.register_forward_hook(count) for mod in modules for m in mod.modules()]
            for mod in modules:
                x = mod(x)
            for h in hooks:
                h.remove()
            params = sum(p.numel() for mod in modules for p in mod.parameters())
            rows.append((name, list(x.shape[1:]), params, macs[0]))
    return rows


def print_stage_table(model, image_size):
    rows = stage_table(model, image_size)
    print(f'{type(model).__name__} at {image_size} px, stage by stage, for one image:')
    print(f'  {"stage":<7}{"output":<17}{"parameters":>12}{"multiply-adds":>16}')
    for name, shape, params, macs in rows:
        print(f'  {name:<7}{str(shape):<17}{params:>12,}{macs:>16,}')
    print(f'  {"total":<24}{sum(r[2] for r in rows):>12,}{sum(r[3] for r in rows):>16,}')


if __name__ == '__main__':
    import argparse
    p = argparse.ArgumentParser(description='Shape check of ResNet18, stage by stage.')
    p.add_argument('--image-size', type=int, default=224, metavar='PX',
                   help='side of the square input (default: %(default)s; train.py feeds 32)')
    size = p.parse_args().image_size
    inputs = torch.zeros((16, 3, size, size))
    model = ResNet18(num_classes=10)
    model.eval()
    with torch.no_grad():
        outputs = model(inputs)
    # Article: it fed 227 px here, while the comment on its print line said 224.
    print(f'{list(inputs.shape)} -> {list(outputs.shape)}')
    print_stage_table(model, size)
    for name, net in CIFAR_RESNETS.items():  # the paper's Table 6, to check against
        print(f'{net.__name__}: {count_parameters(net(10)):,} parameters, the same without its '
              f'shortcuts, which add no parameters (option A: zero-padded identity)')
