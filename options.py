"""The command line of train.py: every option, with its default from config.py, the checks
that turn a bad combination into one sentence, and the run's settings, resolved once from them.
"""
import argparse
import collections
import math
import sys

import torch

import config
import resnet
import speed
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


def build_parser():
    p = argparse.ArgumentParser(
        allow_abbrev=False,  # --resume checks the options named, as written
        description='Train ResNet18 (or another model) on CIFAR-10 or an image folder.',
        epilog='The fixes a --recipe can add to the article\'s: ' + '; '.join(
            f'{name}: {what}' for name, what in FIXES.items()) + '.')
    p.add_argument('--data', metavar='DIR',
                   help='ImageFolder tree DIR/train/<class>/*, DIR/test/<class>/* '
                        f'(default: CIFAR-10, downloaded into {config.DATA_ROOT}); a folder of '
                        f'class folders alone gives some of each class\'s images as test images')
    p.add_argument('--stream', action='store_true',
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
                        f'{config.ALEXNET_IMAGE_SIZE} for alexnet)')
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
    p.add_argument('--small-input', action='store_true',
                   help='ResNet18/34/50 stem for small images: 3x3/1 conv, no max-pool')
    p.add_argument('--plain', action='store_true',
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
                        'own settings, to the end of its plan; with --epochs N, to N epochs in '
                        'all; with --minutes M, fitting what is left into M minutes')
    p.add_argument('--workers', type=positive(int, allow_zero=True),
                   default=config.NUM_WORKERS,
                   help='processes decoding an image folder; 0: one per CPU core '
                        '(default: %(default)s)')
    p.add_argument('--save-every', type=positive(float, allow_zero=True),
                   default=config.SAVE_EVERY, metavar='SECONDS',
                   help='seconds between writes of weights and checkpoint (default: %(default)s)')
    return p


def parse_args(argv=None):
    """The command line, checked (one sentence for what cannot be), with the image size that
    is fed where --image-size is left out: what torchvision's weights learned at, for
    --pretrained; the smallest AlexNet takes; else config.IMAGE_SIZE."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    check_args(args, argv)
    if args.image_size is None:
        args.image_size = config.PRETRAINED_IMAGE_SIZE if args.pretrained else \
            config.ALEXNET_IMAGE_SIZE if args.model == 'alexnet' else config.IMAGE_SIZE
    return args


# What --resume takes beside the run's own settings: how long, and where and how it runs.
RESUME_TAKES = ('--resume', '--out', '--minutes', '--epochs', '--device', '--workers')


def check_args(args, argv=()):
    """One sentence for a combination of arguments that cannot be."""
    other = sorted({a.split('=')[0] for a in argv if a.startswith('--')} - set(RESUME_TAKES))
    small = args.image_size and args.image_size < config.ALEXNET_IMAGE_SIZE
    for wrong, sentence in (
            (args.resume and other,
             f'{" ".join(other[:1])} cannot change the run being resumed, which goes on with '
             f'its own settings; leave it out (--resume takes {", ".join(RESUME_TAKES[1:])})'),
            (args.pretrained and args.init, '--pretrained starts from ImageNet\'s weights and '
                                            '--init from a file of yours; pick one'),
            (args.freeze and not (args.pretrained or args.init),
             '--freeze keeps the weights a run starts from, and random weights are not worth '
             'keeping; pass --pretrained or --init too'),
            (args.pretrained and args.model not in resnet.IMAGENET_RESNETS,
             f'torchvision has ImageNet weights for {", ".join(resnet.IMAGENET_RESNETS)}, not '
             f'for {args.model}'),
            (args.pretrained and (args.small_input or args.plain),
             f'{"--small-input" if args.small_input else "--plain"} changes the network that '
             f'the ImageNet weights were trained as; leave it out'),
            (args.model == 'alexnet' and (args.small_input or args.plain),
             ('--small-input changes the ResNet stem' if args.small_input else
              '--plain removes the ResNet\'s shortcuts') + '; AlexNet has none to change'),
            (args.model == 'alexnet' and small,
             f'--image-size {args.image_size} is too small for AlexNet, which needs at least '
             f'{config.ALEXNET_IMAGE_SIZE} px; leave it out, or pass '
             f'{config.ALEXNET_IMAGE_SIZE} or more'),
            (args.model in resnet.CIFAR_RESNETS and args.small_input,
             f'--small-input swaps the ImageNet stem for a 3x3 conv, and {args.model}, a '
             f'CIFAR-10 network, has that stem already; leave it out'),
            (args.minutes and args.epochs, '--minutes plans the epochs that fit in the time, '
                                           'and --epochs names them; pick one'),
            (args.stream and not args.data, '--stream reads an image folder (--data DIR) batch '
                                            'by batch; CIFAR-10 is small enough to hold in '
                                            'memory: leave it out')):
        if wrong:
            raise UsageError(sentence)


# Everything a run is: the command line's options, and what the model's row of
# config.TRAIN_DEFAULTS, the data's size and --recipe make of them (settings()). weight.json
# records them, and --resume goes on with them. epochs is None where --minutes plans the steps;
# warmup is the share of the steps the lr rises over (None: constant), min_warmup the fewest;
# normalise is 'train' (the training images' mean and std), 'imagenet' or None; flips averages
# each evaluated image's scores with its mirror image's.
Settings = collections.namedtuple('Settings', [
    'data', 'stream', 'valid_split', 'epochs', 'minutes', 'batch_size', 'lr', 'recipe',
    'image_size', 'pretrained', 'init', 'freeze', 'model', 'small_input', 'plain', 'device',
    'precision', 'seed', 'out', 'resume', 'workers', 'save_every', 'eval_batch_size',
    'momentum', 'weight_decay', 'nesterov', 'label_smoothing', 'warmup', 'min_warmup',
    'normalise', 'augment', 'flips'])


def settings(args, n_train):
    """The run's Settings from the command line (or a resumed run's), once the data's size is
    known. --batch-size, --lr and --epochs left out take the model's row of
    config.TRAIN_DEFAULTS and config.NUM_EPOCHS (the article's lr for a recipe without the lr
    fix). A folder with fewer training images than a dozen of the row's batches is small: its
    batch is the largest power of 2 that gives a dozen steps an epoch (at least 16), its lr is
    scaled with the batch (not for --freeze: the fc alone takes the row's), it trains
    config.SMALL_FOLDER_EPOCHS epochs, and a line says so."""
    recipe = recipe_values(args.recipe)
    row_batch, row_lr = config.TRAIN_DEFAULTS[args.model + ' --small-input' * args.small_input]
    row_lr = row_lr if recipe['warmup'] is not None else config.ARTICLE_LR
    batch_size, lr = args.batch_size or row_batch, args.lr or row_lr
    # A resumed run's epochs are its plan's, unless --epochs is given.
    epochs = args.epochs or (None if args.minutes or args.resume else config.NUM_EPOCHS)
    if n_train < 12 * row_batch:
        if args.batch_size is None:
            batch_size = max(16, 2 ** int(math.log2(max(1, n_train // 12))))
            lr = args.lr or (row_lr if args.freeze else row_lr * batch_size / row_batch)
        epochs = args.epochs or (None if args.minutes or args.resume else
                                 config.SMALL_FOLDER_EPOCHS)
        print(f'{n_train} training images, a small folder: '
              f'{f"{epochs} epochs" if epochs else "the epochs that fit"} of '
              f'{max(1, n_train // batch_size)} batches of {batch_size}, at lr {lr:g}')
    given = {k: v for k, v in vars(args).items() if k in Settings._fields}
    return Settings(**{**given, **recipe, 'batch_size': batch_size, 'lr': lr, 'epochs': epochs,
                       'eval_batch_size': min(config.EVAL_BATCH_SIZE, 2 * batch_size),
                       'min_warmup': config.MIN_WARMUP_STEPS.get(args.model, 0),
                       'flips': config.FLIPS,
                       # what torchvision's weights were trained with, whatever the recipe
                       'normalise': 'imagenet' if args.pretrained else recipe['normalise']})


def recipe_values(name):
    """What the recipe `name` sets (FIXES): the optimizer's momentum, weight decay and
    Nesterov, the loss's label smoothing, the lr's warm-up share (None: constant), the
    normalisation and the augmentation."""
    fixes = fixes_of(name)
    return dict(momentum=config.MOMENTUM,
                weight_decay=config.WEIGHT_DECAY if 'decay' in fixes else
                config.ARTICLE_WEIGHT_DECAY,
                nesterov='nesterov' in fixes,
                label_smoothing=config.LABEL_SMOOTHING if 'smoothing' in fixes else 0.0,
                warmup=config.WARMUP if 'lr' in fixes else None,
                normalise='train' if 'norm' in fixes else None, augment='augment' in fixes)


def resumed(args, saved):
    """--resume: the stopped run's settings (`saved`, its checkpoint's), with what RESUME_TAKES
    from the command line: --epochs and --minutes where given."""
    return argparse.Namespace(**{**saved, 'resume': True, 'out': args.out, 'device': args.device,
                                 'workers': args.workers, 'minutes': args.minutes,
                                 'epochs': args.epochs or (None if args.minutes
                                                           else saved['epochs'])})


def header(s, device, precision, how, per_epoch, steps):
    """The run's first line: the network, where and how it trains, and for how long."""
    recipe = f', the recipe {s.recipe}' if s.recipe != 'fixed' else ''
    epochs = math.ceil(steps / per_epoch)
    length = (f'{epochs} epoch{"s" * (epochs > 1)} of {per_epoch} '
              f'batch{"es" * (per_epoch > 1)} of {s.batch_size}')
    if s.minutes:
        share = f'{steps / per_epoch:.2f} of an epoch' if steps < per_epoch else \
            f'{steps / per_epoch:.1f} epochs'
        length = f'{steps} batches of {s.batch_size} ({share}) planned in {s.minutes:g} min'
    return (f'{describe(s.model, s.small_input, s.plain, s.pretrained, s.init, s.freeze)}, '
            f'{device}, {precision}, {how}{recipe}, {length}, peak lr {s.lr:g}')


def describe(model, small_input=False, plain=False, pretrained=None, init=None, freeze=False):
    """'resnet18', 'resnet18 (small input)', 'resnet18 (ImageNet's weights, frozen but the
    fc)': the network and where it started, for the log."""
    kinds = [k for k, on in (('small input', small_input), ('plain', plain),
                             ('ImageNet\'s weights', pretrained), (f'weights of {init}', init),
                             ('frozen but the fc', freeze)) if on]
    return model + (f' ({", ".join(kinds)})' if kinds else '')
