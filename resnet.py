"""ResNet18 as in the article's "ResNetの実装", plus ResNet34 and ResNet50.

The same networks as torchvision's resnet18/34/50 (layer for layer, parameter for parameter),
written in the article's style. Run `python resnet.py` for a shape check.
"""
import torch
import torch.nn as nn

# The article wrote `from . import layers`, which fails when the file runs as a script.
import layers


class ResNet(nn.Module):
    """The ResNet skeleton: a stem, four stages of residual blocks, a pool and a classifier.

    small_input=True swaps the ImageNet stem (7x7/2 conv + max-pool, which shrinks a 32 px
    CIFAR image to 8 px before the first block) for a 3x3/1 conv and no pool.
    """

    def __init__(self, block, num_blocks, num_classes, small_input=False):
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f'num_blocks needs one count per stage (4), got {num_blocks}')
        if small_input:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)

        e = block.expansion
        # The article gave every stage stride 1; stages 2-4 must halve the feature map.
        self.layer1 = layers.ResidualLayer(num_blocks[0], 64, 64 * e, block, stride=1)
        self.layer2 = layers.ResidualLayer(num_blocks[1], 64 * e, 128 * e, block, stride=2)
        self.layer3 = layers.ResidualLayer(num_blocks[2], 128 * e, 256 * e, block, stride=2)
        self.layer4 = layers.ResidualLayer(num_blocks[3], 256 * e, 512 * e, block, stride=2)
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * e, num_classes)

        # torchvision's initialisation: He (Kaiming) normal for convs, BN as the identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

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
        out = torch.flatten(out, 1)     # (B, 512)
        out = self.fc(out)              # (B, num_classes)
        return out


class ResNet18(ResNet):
    """ResNet18: BasicBlocks, 2 in each of the 4 stages."""

    def __init__(self, num_classes, small_input=False):
        super().__init__(layers.BasicBlock, [2, 2, 2, 2], num_classes, small_input)


class ResNet34(ResNet):
    """ResNet34: BasicBlocks, 3-4-6-3."""

    def __init__(self, num_classes, small_input=False):
        super().__init__(layers.BasicBlock, [3, 4, 6, 3], num_classes, small_input)


class ResNet50(ResNet):
    """ResNet50: Bottlenecks, 3-4-6-3."""

    def __init__(self, num_classes, small_input=False):
        super().__init__(layers.Bottleneck, [3, 4, 6, 3], num_classes, small_input)


def count_parameters(model):
    """Number of learnable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == '__main__':
    inputs = torch.zeros((16, 3, 224, 224))
    model = ResNet18(num_classes=10)
    model.eval()
    with torch.no_grad():
        outputs = model(inputs)
    # The article's comment said 227 here while its code printed the 224 case.
    print(f'{list(inputs.shape)} -> {list(outputs.shape)}')
    print(f'ResNet18: {count_parameters(model):,} parameters')
