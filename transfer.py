"""Start from trained weights instead of random ones: the way to learn from a few hundred photos.

--pretrained takes torchvision's ImageNet weights for ResNet18/34/50 (downloaded once into
TORCH_HOME's cache), or such a file by path; --init takes a weight.pth of the same model. The
last layer (the head, fc) is new when the classes differ. --freeze trains the head alone; without
it every layer trains, those that came with the weights at a smaller lr (config.py's factors).
"""
import json
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
    the file at path, or from the cache under TORCH_HOME, where it is downloaded the first time
    (as torchvision's weights API does: the same file, its hash checked)."""
    if path is None:
        import torch.hub
        import torchvision  # here: only --pretrained needs it
        url = torchvision.models.get_model_weights(model_name).DEFAULT.url
        path = Path(torch.hub.get_dir(), 'checkpoints', url.rsplit('/', 1)[1])
        if not path.is_file():
            download(url, path)
    elif not path.is_file():
        raise UsageError(f'no file at {path}: --pretrained PATH takes torchvision\'s ImageNet '
                         f'weights file (for {model_name}, the one --pretrained downloads)')
    state = saving.load_weights(path)
    if not any(re.match(r'layer\d\.\d+\.', k) for k in state):
        raise UsageError(f'{path} is not in torchvision\'s format (it looks like a weight.pth '
                         f'of this repository); start from it with --init {path}')
    return resnet.from_torchvision(state)


def download(url, path):
    import torch.hub
    print(f'downloading {url} to {path}', flush=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, path, torch.hub.HASH_REGEX.search(path.name)[1])
    except Exception as e:  # offline, refused, truncated download, ...
        raise UsageError(
            f'could not download {url} ({type(e).__name__}); without internet, fetch it on '
            f'another machine and put it in {path.parent} (where torchvision looks; set '
            f'TORCH_HOME to move it), or pass its path: --pretrained PATH') from None


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
    """Where a run starts: its name for weight.json ('imagenet ...', 'init PATH'), the
    state_dict, for --init the classes it was trained on, and the lr factor of the layers that
    come with the weights."""
    name: str
    state: dict
    lr_factor: float
    classes: Optional[list] = None

    def load(self, model, classes, freeze, lr):
        """Load these weights into model, and with `freeze`, freeze all but its head; return
        the optimizer's parameter groups (parameter_groups)."""
        new = load_start(model, self, classes)
        return parameter_groups(model, freeze_all_but_head(model) if freeze else new, lr,
                                self.lr_factor)


def read_start(model_name, pretrained=None, init=None):
    """The weights --pretrained or --init name, read before the data so that a missing file
    or a failed download stops the run at once."""
    if pretrained:
        path = None if pretrained == 'imagenet' else Path(pretrained)
        return Start(f'imagenet {path.resolve()}' if path else f'imagenet {model_name}',
                     imagenet_weights(model_name, path), config.PRETRAINED_LR_FACTOR)
    if init:
        path = Path(init)
        state = saving.load_weights(path)
        try:  # the weight.json train.py wrote beside them, if it is there
            was = json.loads(path.with_suffix('.json').read_text())
        except (OSError, ValueError):
            was = {}
        model = was.get('args', {}).get('model', model_name)
        if model != model_name:
            raise UsageError(f'{path} holds a {model}; pass --model {model}')
        return Start(f'init {path.resolve()}', state, config.INIT_LR_FACTOR, was.get('classes'))
    raise ValueError('read_start needs pretrained or init')


def load_start(model, start, classes):
    """Load the Start's weights into model; return the names of its new parameters: the
    head's for ImageNet's weights or another set of classes, else none."""
    same = start.classes is not None and list(start.classes) == list(classes)
    return start_from(model, start.state, f'the weights of {start.name}', same_classes=same)


def freeze_all_but_head(model):
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


def parameter_groups(model, new, lr, factor):
    """The optimizer's groups: the new parameters at lr, those that came with the weights at
    lr * factor (left out when frozen); an empty group is left out."""
    came, fresh = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fresh if name in new else came).append(p)
    groups = [{'params': fresh, 'lr': lr}, {'params': came, 'lr': lr * factor}]
    return [g for g in groups if g['params']]
