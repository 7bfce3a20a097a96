"""The command line of train.py: every option, with its default from config.py, and the checks
that turn a bad combination into one sentence.
"""
import argparse
import math

import config
import speed
from alexnet import AlexNet
from data import UsageError


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


# The fixes --recipe adds to the article's recipe, in the order "What each fix buys" adds them:
# per-channel normalisation; random crop and flip; peak lr 0.2 with warm-up and decay to 0 and
# weight decay 5e-4; label smoothing 0.1 and Nesterov momentum. 'fixed' is all four.
FIXES = ('norm', 'augment', 'schedule', 'smoothing')


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


def build_parser():
    p = argparse.ArgumentParser(
        description='Train ResNet18 (or another model) on CIFAR-10 or an image folder.')
    p.add_argument('--data', default=config.DATA_DIR, metavar='DIR',
                   help='ImageFolder tree DIR/train/<class>/*, DIR/test/<class>/* '
                        '(default: CIFAR-10, downloaded into --data-root)')
    p.add_argument('--data-root', default=config.DATA_ROOT, metavar='DIR',
                   help='where CIFAR-10 is downloaded or placed (default: %(default)s)')
    p.add_argument('--epochs', type=positive(int), default=config.NUM_EPOCHS,
                   help='passes over the training set (default: %(default)s)')
    p.add_argument('--batch-size', type=positive(int), default=None,
                   help=f'images per step (default: {config.BATCH_SIZE}; '
                        f'{config.SMALL_INPUT_BATCH_SIZE} with --small-input; '
                        f'{config.ALEXNET_BATCH_SIZE} for alexnet, {config.RESNET50_BATCH_SIZE} '
                        f'for resnet50)')
    p.add_argument('--lr', type=positive(float), default=None,
                   help=f'peak learning rate (default: {config.LR}; {config.ALEXNET_LR} for '
                        f'alexnet; {config.ARTICLE_LR} for the article\'s recipe)')
    p.add_argument('--recipe', type=recipe, default=config.RECIPE,
                   help='how to train: fixed (this repository\'s recipe), article (the '
                        'article\'s: SGD lr 0.001, no schedule, no normalisation, no '
                        'augmentation), or article plus some of the fixes, as in '
                        f'article+norm+augment (fixes: {", ".join(FIXES)}; default: %(default)s)')
    p.add_argument('--image-size', type=positive(int), default=config.IMAGE_SIZE, metavar='PX',
                   help='side of the square images fed to the model (default: %(default)s)')
    p.add_argument('--model', choices=config.MODELS, default=config.MODEL,
                   help='network to train (default: %(default)s)')
    p.add_argument('--small-input', action='store_true', default=config.SMALL_INPUT,
                   help='ResNet stem for small images: 3x3/1 conv, no max-pool')
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default=config.DEVICE,
                   help='auto picks cuda, then mps, then cpu (default: %(default)s)')
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
                   help='continue the interrupted run whose checkpoint is beside --out')
    p.add_argument('--eval', metavar='PATH', help='test saved weights and train nothing')
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
    args = build_parser().parse_args(argv)
    # Defaults that depend on other arguments; an explicit value always wins.
    if args.batch_size is None and args.model == 'alexnet':
        args.batch_size = config.ALEXNET_BATCH_SIZE
    elif args.batch_size is None and args.model == 'resnet50':
        args.batch_size = config.RESNET50_BATCH_SIZE
    elif args.batch_size is None:
        args.batch_size = config.SMALL_INPUT_BATCH_SIZE if args.small_input else config.BATCH_SIZE
    if args.graph_whole_step is None:
        args.graph_whole_step = config.GRAPH_WHOLE_STEP and args.cuda_graphs
    if args.lr is None and 'schedule' not in fixes_of(args.recipe):
        args.lr = config.ARTICLE_LR
    elif args.lr is None:
        args.lr = config.ALEXNET_LR if args.model == 'alexnet' else config.LR
    return args


def check_args(args):
    if args.model == 'alexnet':
        if args.small_input:
            raise UsageError('--small-input changes the ResNet stem; AlexNet has no such option')
        if args.image_size < AlexNet.MIN_INPUT_SIZE:
            raise UsageError(f'--image-size {args.image_size} is too small for AlexNet, which '
                             f'needs at least {AlexNet.MIN_INPUT_SIZE} px; '
                             f'try --image-size {AlexNet.MIN_INPUT_SIZE} or more')
    if args.resume and args.eval:
        raise UsageError('--resume continues training and --eval trains nothing; pick one')
    if args.graph_whole_step and not args.cuda_graphs:
        raise UsageError('--graph-whole-step records a CUDA graph and --no-cuda-graphs turns '
                         'them off; pick one')
