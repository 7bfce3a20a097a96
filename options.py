"""The command line of train.py: every option, with its default from config.py, and the checks
that turn a bad combination into one sentence.
"""
import argparse
import math

import torch

import config
import resnet
import speed
from alexnet import AlexNet
from errors import UsageError

MODELS = ('alexnet', *resnet.IMAGENET_RESNETS, *resnet.CIFAR_RESNETS)  # what --model offers
DEVICES = ('auto', 'cpu', 'cuda', 'mps')

# The fixes --recipe adds to the article's recipe, in the order "What each fix buys" adds them.
# 'fixed' is all of them.
FIXES = {
    'norm': "normalise each channel by the training images' mean and std (the article: raw "
            "[0, 1] pixels)",
    'augment': 'random crop (reflect-padded) and horizontal flip (the article: none)',
    'lr': f'a peak lr of {config.LR}, reached by a warm-up and decayed linearly to 0 (the '
          f'article: a constant {config.ARTICLE_LR})',
    'decay': f'weight decay {config.WEIGHT_DECAY} (the article: {config.ARTICLE_WEIGHT_DECAY})',
    'smoothing': f'label smoothing {config.LABEL_SMOOTHING} (the article: none)',
    'nesterov': 'Nesterov momentum (the article: plain momentum)',
}


def positive(kind, allow_zero=False):
    """An argparse type: a number of `kind` above 0 (or 0 and above, with allow_zero)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
        if not (value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(
                f'must be {"0 or more" if allow_zero else "positive"}, got {text}')
        return value
    return parse


def fraction(text):
    """An argparse type: a number from 0 up to, not including, 1."""
    value = positive(float, allow_zero=True)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f'must be below 1 (a fraction), got {text}')
    return value


def recipe(text):
    """An argparse type: 'fixed', 'article' or 'article+FIX+...', written canonically."""
    parts = text.split('+')
    if text == 'fixed' or set(parts[1:]) == set(FIXES) and parts[0] == 'article':
        return 'fixed'
    if parts[0] != 'article' or not set(parts[1:]) <= set(FIXES):
        raise argparse.ArgumentTypeError(
            f'{text!r} is not a recipe: use fixed, article, or article plus fixes, as in '
            f'article+norm+augment (fixes: {", ".join(FIXES)})')
    return '+'.join(['article'] + [f for f in FIXES if f in parts])


def fixes_of(recipe):
    """The set of FIXES a canonical recipe name applies."""
    return set(FIXES) if recipe == 'fixed' else set(recipe.split('+')[1:])


def add_device_argument(parser):
    parser.add_argument('--device', choices=DEVICES, default=config.DEVICE,
                        help='auto picks cuda, then mps, then cpu (default: %(default)s)')


def pick_device(name):
    """The torch.device --device names; auto picks cuda, then mps, then cpu."""
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        if torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise UsageError('--device cuda was asked for, but torch sees no CUDA GPU here; '
                         'use --device auto or cpu')
    if name == 'mps' and not torch.backends.mps.is_available():
        raise UsageError('--device mps was asked for, but torch sees no Apple GPU here; '
                         'use --device auto or cpu')
    return torch.device(name)


def train_defaults(args, n_train):
    """--batch-size, --lr and --epochs, or where left out, the model's row of
    config.TRAIN_DEFAULTS and config.NUM_EPOCHS (the article's lr for a recipe without the lr
    fix; with --minutes, the epochs are planned later). A folder with fewer training images
    than a dozen of the row's batches is small: its batch is the largest power of 2 that gives
    a dozen steps an epoch (at least 16), its lr is scaled with the batch (not for --freeze:
    the fc alone takes the row's), it trains config.SMALL_FOLDER_EPOCHS epochs, and a line
    says so."""
    row_batch, row_lr = config.TRAIN_DEFAULTS[args.model + ' --small-input' * args.small_input]
    if 'lr' not in fixes_of(args.recipe):
        row_lr = config.ARTICLE_LR
    batch_size, lr = args.batch_size or row_batch, args.lr or row_lr
    if n_train >= 12 * row_batch:
        return batch_size, lr, args.epochs or config.NUM_EPOCHS
    if args.batch_size is None:
        batch_size = max(16, 2 ** int(math.log2(max(1, n_train // 12))))
        if args.lr is None and not args.freeze:
            lr = row_lr * batch_size / row_batch
    epochs = args.epochs or config.SMALL_FOLDER_EPOCHS
    print(f'{n_train} training images, a small folder: '
          f'{f"{epochs} epochs" if not args.minutes else "the epochs that fit"} of '
          f'{max(1, n_train // batch_size)} batches of {batch_size}, at lr {lr:g}')
    return batch_size, lr, epochs


def eval_batch_size(batch_size=None):
    """Evaluation keeps no activations for a backward, so it takes larger batches; at most
    twice --batch-size, so that a smaller --batch-size also helps when memory runs out."""
    return min(config.EVAL_BATCH_SIZE, 2 * batch_size) if batch_size else config.EVAL_BATCH_SIZE


def build_parser():
    p = argparse.ArgumentParser(
        description='Train ResNet18 (or another model) on CIFAR-10 or an image folder.',
        epilog='The fixes a --recipe can add to the article\'s: ' + '; '.join(
            f'{name}: {what}' for name, what in FIXES.items()) + '.')
    p.add_argument('--data', default=config.DATA_DIR, metavar='DIR',
                   help='ImageFolder tree DIR/train/<class>/*, DIR/test/<class>/* '
                        '(default: CIFAR-10, downloaded into --data-root); a folder of class '
                        'folders alone gives some of each class\'s images as test images')
    p.add_argument('--data-root', default=config.DATA_ROOT, metavar='DIR',
                   help='where CIFAR-10 is downloaded or placed (default: %(default)s)')
    p.add_argument('--stream', action='store_true', default=config.STREAM,
                   help='decode the image folder in worker processes in every epoch instead '
                        'of holding it in memory: for a folder too large for it')
    p.add_argument('--valid-split', type=fraction, default=config.VALID_SPLIT,
                   metavar='FRACTION',
                   help='fraction of each class\'s training images held out (drawn with --seed) '
                        'to choose the best epoch; the test images choose nothing and are '
                        'measured once, at the end; 0: no validation, the last epoch is kept '
                        '(default: %(default)s)')
    p.add_argument('--epochs', type=positive(int), default=None,
                   help=f'passes over the training set (default: {config.NUM_EPOCHS}; '
                        f'{config.SMALL_FOLDER_EPOCHS} for a small folder)')
    p.add_argument('--minutes', type=positive(float), default=None, metavar='M',
                   help='end within M minutes, from start to the last line (the first download of '
                        'CIFAR-10 aside): train the epochs that fit, with the lr schedule ending '
                        'at 0 when they end; instead of --epochs')
    p.add_argument('--batch-size', type=positive(int), default=None,
                   help=f'images per step (default: per model, config.TRAIN_DEFAULTS: '
                        f'{", ".join(f"{k} {v[0]}" for k, v in config.TRAIN_DEFAULTS.items())}; '
                        f'smaller for a small folder)')
    p.add_argument('--lr', type=positive(float), default=None,
                   help=f'peak learning rate (default: per model, config.TRAIN_DEFAULTS: '
                        f'{", ".join(f"{k} {v[1]}" for k, v in config.TRAIN_DEFAULTS.items())}; '
                        f'{config.ARTICLE_LR} for a recipe without the lr fix)')
    p.add_argument('--recipe', type=recipe, default=config.RECIPE,
                   help='how to train: fixed (this repository\'s recipe), article (the '
                        'article\'s: SGD lr 0.001, no schedule, no normalisation, no '
                        'augmentation), or article plus some of the fixes, as in '
                        f'article+norm+augment (fixes: {", ".join(FIXES)}; default: %(default)s)')
    p.add_argument('--image-size', type=positive(int), default=None, metavar='PX',
                   help=f'side of the square images fed to the model (default: '
                        f'{config.IMAGE_SIZE}; {config.PRETRAINED_IMAGE_SIZE} with --pretrained, '
                        f'{AlexNet.MIN_INPUT_SIZE} for alexnet)')
    p.add_argument('--pretrained', nargs='?', const='imagenet', metavar='PATH',
                   help='start from torchvision\'s ImageNet weights (resnet18, resnet34, '
                        'resnet50; downloaded once and cached under TORCH_HOME), or from such '
                        'a file at PATH; the images are fed at 224 px with ImageNet\'s mean '
                        'and std, and the fc is new')
    p.add_argument('--init', metavar='PATH',
                   help='start from a weight.pth of the same --model (the fc is new when its '
                        'classes differ)')
    p.add_argument('--freeze', action='store_true',
                   help='with --pretrained or --init: train the new fc alone, on the features '
                        'of the frozen network (without it, every layer trains, those that '
                        f'came with the weights at a fraction of the lr: '
                        f'{config.PRETRAINED_LR_FACTOR} for ImageNet\'s, {config.INIT_LR_FACTOR} '
                        f'for --init\'s)')
    p.add_argument('--model', choices=MODELS, default=config.MODEL, metavar='MODEL',
                   help=f'network to train: {", ".join(MODELS)} (default: %(default)s)')
    p.add_argument('--small-input', action='store_true', default=config.SMALL_INPUT,
                   help='ResNet18/34/50 stem for small images: 3x3/1 conv, no max-pool')
    p.add_argument('--plain', action='store_true', default=config.PLAIN,
                   help='build the ResNet without its shortcuts: the paper\'s plain network')
    add_device_argument(p)
    p.add_argument('--precision', choices=['auto', *speed.PRECISIONS], default=config.PRECISION,
                   help='number format of the forward and backward; auto: bf16 on CUDA GPUs '
                        'and CPUs that compute it natively, fp16 on older GPUs, else fp32 '
                        '(default: %(default)s)')
    p.add_argument('--seed', type=positive(int, allow_zero=True), default=config.SEED,
                   help='seeds weights, shuffling and augmentation (default: %(default)s)')
    p.add_argument('--out', default=config.OUT_PATH, metavar='PATH',
                   help='best weights; .json, .csv, .png and .ckpt go beside it '
                        '(default: %(default)s)')
    p.add_argument('--resume', action='store_true',
                   help='go on with the stopped run whose checkpoint is beside --out, with its '
                        'own arguments')
    p.add_argument('--workers', type=positive(int, allow_zero=True),
                   default=config.NUM_WORKERS,
                   help='processes decoding an image folder; 0: one per CPU core '
                        '(default: %(default)s)')
    p.add_argument('--no-cuda-graphs', dest='cuda_graphs', action='store_false',
                   default=config.CUDA_GRAPHS,
                   help='on CUDA, launch the ResNet\'s kernels one by one instead of replaying '
                        'them as a CUDA graph (slower at small image sizes)')
    p.add_argument('--graph-whole-step', action=argparse.BooleanOptionalAction, default=None,
                   help='on CUDA, record the whole training step (forward, loss, backward, '
                        'SGD update) as one CUDA graph; --no-graph-whole-step records the '
                        'model\'s forward and backward alone (default: '
                        f'{"whole step" if config.GRAPH_WHOLE_STEP else "model alone"})')
    p.add_argument('--save-every', type=positive(float, allow_zero=True),
                   default=config.SAVE_EVERY, metavar='SECONDS',
                   help='seconds between writes of weights and checkpoint (default: %(default)s)')
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def default_image_size(args):
    """The size fed to the model when --image-size is left out: what torchvision's weights
    learned at, for --pretrained; the smallest AlexNet takes; else config.IMAGE_SIZE."""
    if args.pretrained:
        return config.PRETRAINED_IMAGE_SIZE
    return AlexNet.MIN_INPUT_SIZE if args.model == 'alexnet' else config.IMAGE_SIZE


def check_args(args):
    """One sentence for a combination of arguments that cannot be."""
    if args.pretrained and args.init:
        raise UsageError('--pretrained starts from ImageNet\'s weights and --init from a file '
                         'of yours; pick one')
    if args.freeze and not (args.pretrained or args.init):
        raise UsageError('--freeze keeps the weights a run starts from, and random weights are '
                         'not worth keeping; pass --pretrained or --init too')
    if args.pretrained and args.model not in resnet.IMAGENET_RESNETS:
        raise UsageError(f'torchvision has ImageNet weights for '
                         f'{", ".join(resnet.IMAGENET_RESNETS)}, not for {args.model}')
    if args.pretrained and (args.small_input or args.plain):
        raise UsageError(f'{"--small-input" if args.small_input else "--plain"} changes the '
                         f'network that the ImageNet weights were trained as; leave it out')
    if args.model == 'alexnet':
        if args.small_input or args.plain:
            flag = '--small-input changes the ResNet stem' if args.small_input else \
                '--plain removes the ResNet\'s shortcuts'
            raise UsageError(f'{flag}; AlexNet has none to change')
        if args.image_size and args.image_size < AlexNet.MIN_INPUT_SIZE:
            raise UsageError(f'--image-size {args.image_size} is too small for AlexNet, which '
                             f'needs at least {AlexNet.MIN_INPUT_SIZE} px; leave it out, or pass '
                             f'{AlexNet.MIN_INPUT_SIZE} or more')
    if args.model in resnet.CIFAR_RESNETS and args.small_input:
        raise UsageError(f'--small-input swaps the ImageNet stem for a 3x3 conv, and '
                         f'{args.model}, a CIFAR-10 network, has that stem already; leave it out')
    if args.minutes and args.epochs:
        raise UsageError('--minutes plans the epochs that fit in the time, and --epochs names '
                         'them; pick one')
    if args.stream and not args.data:
        raise UsageError('--stream reads an image folder (--data DIR) batch by batch; CIFAR-10 '
                         'is small enough to hold in memory: leave it out')
    if args.graph_whole_step and not args.cuda_graphs:
        raise UsageError('--graph-whole-step records a CUDA graph and --no-cuda-graphs turns '
                         'them off; pick one')


# How a resumed run goes on, not what it computes: these may differ from the checkpoint's.
FREE_ON_RESUME = ('resume', 'out', 'device', 'workers', 'save_every', 'cuda_graphs',
                  'graph_whole_step')


def given(argv=None):
    """The options argv names, with their values: those left out are not there. (A namespace
    that has an attribute already does not get the option's default.)"""
    p, unset = build_parser(), object()
    names = argparse.Namespace(**dict.fromkeys(vars(p.parse_args([])), unset))
    return {k: v for k, v in vars(p.parse_args(argv, names)).items() if v is not unset}


def resumed(args, given, saved):
    """--resume: the checkpoint's own arguments (saved), but FREE_ON_RESUME's from args; one
    sentence for an argument given that contradicts the checkpoint's."""
    for key, value in given.items():
        if key not in FREE_ON_RESUME and value != saved.get(key):
            flag = '--' + key.replace('_', '-')
            raise UsageError(f'{flag} {value} contradicts the run being resumed ({flag} '
                             f'{saved.get(key)}); leave it out: --resume goes on with the run\'s '
                             f'own arguments')
    return argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in FREE_ON_RESUME}})


def describe(args):
    """'resnet18', 'resnet18 (small input)', 'resnet18 (ImageNet's weights, frozen but the
    fc)': the network and where it started, for the log."""
    kinds = [k for k, on in (('small input', args.small_input), ('plain', args.plain),
                             ('ImageNet\'s weights', args.pretrained),
                             (f'weights of {args.init}', args.init),
                             ('frozen but the fc', args.freeze)) if on]
    return args.model + (f' ({", ".join(kinds)})' if kinds else '')
