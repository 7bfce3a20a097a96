"""ResNet's building blocks: conv3x3, conv1x1, BasicBlock, Bottleneck and ResidualLayer, and the
two shortcuts that match a block's changed shape: a projection or zero padding.

Mirrors the article's "ResNetの実装" section, with plain nn layers as the article and torchvision
use. Each departure from the article is marked `# Article:` at the spot and listed in the README.
Every block can be built without its shortcut (shortcut=False): the paper's plain network.
"""
import torch.nn as nn
import torch.nn.functional as F


def conv3x3(in_channels, out_channels, stride=1, groups=1, dilation=1):
    """3x3 convolution with padding."""
    # Article: bias=True. BatchNorm follows with its own shift, so bias=False.
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride,
                     padding=dilation, groups=groups, bias=False, dilation=dilation)


def conv1x1(in_channels, out_channels, stride=1):
    """1x1 convolution."""
    # Article: bias=True, as in conv3x3.
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """The building block (left of the paper's Figure 5): two 3x3 convs and a shortcut."""

    expansion = 1  # out_channels / the width of the 3x3 convs

    def __init__(self, in_channels, out_channels, stride=1, downsample=None, shortcut=True):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)  # the stride sits here
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample
        self.shortcut = shortcut  # Article: no such argument; False: the plain block, H(x) = F(x)

    def forward(self, x):
        identity_x = x  # hold input for shortcut connection

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity_x = self.downsample(x)

        if self.shortcut:
            out += identity_x  # shortcut connection: H(x) = F(x) + x
        return self.relu(out)


class Bottleneck(nn.Module):
    """The bottleneck building block (right of Figure 5): 1x1 reduce, 3x3, 1x1 expand.

    The article names this block but never builds it (marked in ResNet50); as in torchvision
    ("ResNet v1.5"), the stride sits on the 3x3 conv.
    """

    expansion = 4  # out_channels / the width of the 3x3 conv

    def __init__(self, in_channels, out_channels, stride=1, downsample=None, shortcut=True):
        super().__init__()
        width = out_channels // self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.shortcut = shortcut  # False: the plain block, H(x) = F(x)

    def forward(self, x):
        identity_x = x

        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))

        if self.downsample is not None:
            identity_x = self.downsample(x)

        if self.shortcut:
            out += identity_x
        return self.relu(out)


def projection(in_channels, out_channels, stride):
    """The shortcut of a block that changes shape, as the article and torchvision build it: a
    1x1 conv (strided) and BatchNorm. The paper's option B."""
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class ZeroPadShortcut(nn.Module):
    """The paper's option A, for its CIFAR-10 networks: an identity shortcut that keeps every
    `stride`-th pixel and appends zero channels up to out_channels. It has no parameters, so a
    residual net has exactly the parameters of its plain twin."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]             # (B, C_in, H / s, W / s)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))  # (B, C_out, H / s, W / s)

    def extra_repr(self):
        return f'stride={self.stride}, extra_channels={self.extra_channels}'


class ResidualLayer(nn.Module):
    """One stage of ResNet: num_blocks blocks, the first of which may downsample.

    out_channels is what the stage outputs: 64..512 for BasicBlock, 256..2048 for Bottleneck.
    shortcut builds the first block's shortcut where the shape changes: projection (the
    article's) or ZeroPadShortcut (the paper's CIFAR nets); None builds the plain stage, whose
    blocks have no shortcut at all.
    """

    # Article: no stride or shortcut arguments (every stage stride 1, always a projection)
    def __init__(self, num_blocks, in_channels, out_channels, block=BasicBlock, stride=1,
                 shortcut=projection):
        super().__init__()
        downsample = None
        # Article: the projection only when the channels changed, and always with
        # stride 1, so no stage ever halved the feature map. It is needed exactly when the
        # shortcut's shape differs from the block's output: a stride or a channel change.
        if shortcut is not None and (stride != 1 or in_channels != out_channels):
            downsample = shortcut(in_channels, out_channels, stride)
        residual = shortcut is not None
        self.first_block = block(in_channels, out_channels, stride, downsample=downsample,
                                 shortcut=residual)
        # Article: num_blocks more blocks here, so every stage had num_blocks + 1.
        self.blocks = nn.ModuleList(block(out_channels, out_channels, shortcut=residual)
                                    for _ in range(num_blocks - 1))

    def forward(self, x):
        out = self.first_block(x)
        for block in self.blocks:
            out = block(out)
        return out
