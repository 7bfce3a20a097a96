"""Start from trained weights instead of random ones: the way to learn from a few hundred photos.

--pretrained takes torchvision's ImageNet weights for ResNet18/34/50 (through torchvision's
weights API, which downloads once and caches under TORCH_HOME), or such a file by path; --init
takes any weight.pth of the same model, such as this repository's CIFAR-10 weights. The
network's last layer (its head: the fc) is new when the classes differ. --freeze trains the
head alone, on the features of the frozen network; without it every layer trains, those that
came with the weights at a smaller lr (config.PRETRAINED_LR_FACTOR).
"""
import re
from pathlib import Path
from typing import NamedTuple, Optional

import torch.nn as nn

import config
import resnet
import saving
from errors import UsageError


def head_name(model):
    """The name of the model's last nn.Linear, the layer that scores the classes ('fc')."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def imagenet_weights(model_name, path=None):
    """torchvision's ImageNet state_dict for model_name, with this repository's names: from
    the file at path, or through torchvision's weights API (downloaded once, then cached)."""
    if path is not None:
        if not path.is_file():
            raise UsageError(f'no file at {path}: --pretrained PATH takes torchvision\'s ImageNet '
                             f'weights file (for {model_name}, the one --pretrained downloads)')
        state = saving.load_weights(path)
        if not any(re.match(r'layer\d\.\d+\.', k) for k in state):
            raise UsageError(f'{path} is not in torchvision\'s format (it looks like a weight.pth '
                             f'of this repository); start from it with --init {path}')
        return resnet.from_torchvision(state)
    import torchvision  # here: only --pretrained needs it
    weights = torchvision.models.get_model_weights(model_name).DEFAULT
    try:
        state = weights.get_state_dict(progress=True)
    except Exception as e:  # offline, refused, truncated download, ...
        import torch.hub
        cache = Path(torch.hub.get_dir()) / 'checkpoints'
        raise UsageError(
            f'could not get torchvision\'s {weights} ({type(e).__name__}); without internet, '
            f'fetch {weights.url} on another machine and put it in {cache} (where torchvision '
            f'looks; set TORCH_HOME to move it), or pass its path: --pretrained PATH') from None
    return resnet.from_torchvision(state)


def start_from(model, state, source, same_classes=False):
    """Load `state` into model: every tensor strictly, except the head's when the classes
    differ (or its shape does), which stays new. Returns the head's parameter names when new,
    else an empty set."""
    head = head_name(model)
    own = model.state_dict()
    new = {k for k in own if k.startswith(head + '.')}
    if same_classes and all(k in state and state[k].shape == own[k].shape for k in new):
        new = set()
    state = {k: v for k, v in state.items() if k not in new}
    if set(state) != set(own) - new or any(v.shape != own[k].shape for k, v in state.items()):
        raise UsageError(f'{source} does not fit this --model: its tensors have other names or '
                         f'shapes; pass the --model (and --small-input) it was trained with')
    model.load_state_dict(state, strict=False)  # strict but for the new head, checked above
    return new


class Start(NamedTuple):
    """Where a run starts: its name for weight.json ('random', 'imagenet ...', 'init PATH'),
    the state_dict (None: random weights) and, for --init, the classes it was trained on."""
    name: str
    state: Optional[dict] = None
    classes: Optional[list] = None


def read_start(args):
    """The weights --pretrained or --init name, read before the data so that a missing file
    or a failed download stops the run at once."""
    if args.pretrained:
        path = None if args.pretrained == 'imagenet' else Path(args.pretrained)
        return Start(f'imagenet {path.resolve()}' if path else f'imagenet {args.model}',
                     imagenet_weights(args.model, path))
    if args.init:
        path = Path(args.init)
        state = saving.load_weights(path)
        was = saving.read_json(path.with_suffix('.json')) or {}
        if was.get('model', args.model) != args.model:
            raise UsageError(f'{path} holds a {was["model"]}; pass --model {was["model"]}')
        return Start(f'init {path.resolve()}', state, was.get('classes'))
    return Start('random')


def load_start(model, start, classes):
    """Load the Start into model; return the names of its new parameters (every name for
    random weights; the head's for ImageNet's weights or another set of classes)."""
    if start.state is None:
        return {name for name, _ in model.named_parameters()}
    same = start.name.startswith('init') and start.classes in (None, list(classes))
    return start_from(model, start.state, f'the weights of {start.name}', same_classes=same)


def freeze(model):
    """Train the head alone (head_name): the other parameters get no gradient, and the
    BatchNorm layers among them keep the statistics they came with (eval mode in training).
    Returns the names of the head's parameters, the ones that train."""
    head = head_name(model) + '.'
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(head)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and \
                not any(p.requires_grad for p in m.parameters()):
            m.register_forward_pre_hook(keep_statistics)
    return {name for name, p in model.named_parameters() if p.requires_grad}


def keep_statistics(module, inputs):
    module.train(False)  # a frozen BatchNorm normalises with its stored mean and variance


def parameter_groups(model, new, lr):
    """The optimizer's groups: the new parameters at lr, those that came with the weights at
    lr * config.PRETRAINED_LR_FACTOR (left out when frozen); an empty group is left out."""
    came, fresh = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fresh if name in new else came).append(p)
    groups = [{'params': fresh, 'lr': lr}, {'params': came, 'lr': lr * config.PRETRAINED_LR_FACTOR}]
    return [g for g in groups if g['params']]
