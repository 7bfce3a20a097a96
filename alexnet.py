"""AlexNet, the article's warm-up model ("PyTorchによる簡単なCNNとResNetの実装").

The article's layer sizes (convs 96-256-384-384-256, fc 9216-4096-4096), with the ReLUs and the
dropout of the original paper, and logits out. Run `python alexnet.py` for a shape check.
"""
import torch
import torch.nn as nn


class AlexNet(nn.Module):
    # The smallest input whose feature map survives conv1 (11/4) and three 3/2 max-pools.
    MIN_INPUT_SIZE = 67

    def __init__(self, in_channels, num_classes):
        super().__init__()
        # Article: no non-linearity at all, so each stretch between pools was one linear map.
        # ReLU follows every conv and hidden fc, as in the paper.
        self.conv1 = nn.Conv2d(in_channels=in_channels, out_channels=96,
                               kernel_size=11, stride=4)
        self.relu1 = nn.ReLU(inplace=True)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.conv2 = nn.Conv2d(in_channels=96, out_channels=256,
                               kernel_size=5, stride=1, padding=2)
        self.relu2 = nn.ReLU(inplace=True)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.conv_layers = nn.Sequential(
            nn.Conv2d(in_channels=256, out_channels=384, kernel_size=3, stride=1, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels=384, out_channels=384, kernel_size=3, stride=1, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels=384, out_channels=256, kernel_size=3, stride=1, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        # Article: no pool here, so only 227 px fit the fc. As in torchvision: 227 px gives 6x6
        # here, 224 px 5x5; the pool makes both (and more) fit fc's 9216 = 256 * 6 * 6 inputs.
        self.avg_pool = nn.AdaptiveAvgPool2d((6, 6))
        self.fc_layers = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(in_features=9216, out_features=4096),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(in_features=4096, out_features=4096),
            nn.ReLU(inplace=True),
            nn.Linear(in_features=4096, out_features=num_classes),
        )
        # Article: it ended with nn.Softmax(dim=0), a softmax across the batch. Any softmax
        # here is wrong for training: nn.CrossEntropyLoss wants logits. forward returns logits.

        # Article: PyTorch's default init. Here He (Kaiming) init for ReLU: with no BatchNorm,
        # the default shrinks the signal through the eight layers, and the first epochs are
        # spent at chance.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
                nn.init.zeros_(m.bias)

    def forward(self, x):                       # shapes for a 227 px input
        if x.shape[-1] < self.MIN_INPUT_SIZE or x.shape[-2] < self.MIN_INPUT_SIZE:
            raise ValueError(f'AlexNet needs inputs of at least {self.MIN_INPUT_SIZE}x'
                             f'{self.MIN_INPUT_SIZE} px, got {tuple(x.shape[-2:])}')
        x = self.maxpool1(self.relu1(self.conv1(x)))    # (B, 96, 27, 27)
        x = self.maxpool2(self.relu2(self.conv2(x)))    # (B, 256, 13, 13)
        x = self.conv_layers(x)                         # (B, 256, 6, 6)
        x = self.avg_pool(x)                            # (B, 256, 6, 6)
        x = torch.flatten(x, 1)                         # (B, 9216). Article: x.view(...), the same
        return self.fc_layers(x)                        # (B, num_classes) logits


if __name__ == '__main__':
    inputs = torch.zeros((16, 3, 227, 227))
    model = AlexNet(in_channels=3, num_classes=10)
    model.eval()
    with torch.no_grad():
        outputs = model(inputs)                  # [16, 3, 227, 227] -> [16, 10]
    probs = outputs.softmax(dim=1)               # probabilities: over the classes, not the batch
    print(f'{list(inputs.shape)} -> {list(outputs.shape)}')
    print(f'AlexNet: {sum(p.numel() for p in model.parameters()):,} parameters')
    print(f'softmax(dim=1) rows sum to {probs.sum(dim=1)[0].item():.3f}')
