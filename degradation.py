"""The article's first half, run: a deeper plain network trains worse, and shortcuts fix it.

The article says that stacking more layers makes a CNN worse because the gradient vanishes on
its way back to the first layers, and that shortcut connections, H(x) = F(x) + x, solve this.
This script trains the paper's CIFAR-10 networks (He et al., 2015, Section 4.2) at two depths,
each with its shortcuts and without them (its plain twin), with train.py's Trainer on the same
images, and prints their training and test error by epoch: the paper's Figure 6. It also
measures, at initialisation and after training, the gradient that reaches each block, to test
the stated cause. With matplotlib installed it draws both as a PNG.

    python degradation.py                        # 7,000 CIFAR-10 images, 5 epochs, 4 nets
    python degradation.py --data DIR             # an image folder, as train.py reads it
    python degradation.py --train-images 0 --epochs 30 --depths 20 32 44 56
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import budget
import config
import layers
import options
import saving
import speed
import train
from data import Data, Loaders, Split, channel_stats, decode_images, held_size, \
    list_image_folder, load_cifar10, make_loader, memory_shortfall, free_memory
from errors import UsageError
from resnet import CifarResNet, count_parameters

# The defaults finish in about 4 minutes on 2 CPU cores, and show both panels of Figure 6 on
# every seed tried; a larger lr or batch left the deeper ResNet behind in so few steps
# (RESULTS.md, "The article's first half").
DEPTHS = (20, 56)              # the depths compared: the paper's Figure 6 shows 20 to 56 (110)
TRAIN_IMAGES = 7_000           # a random subset of the training images; 0: all of them
TEST_IMAGES = 1_000            # a random subset of the test images; 0: all of them
EPOCHS = 5                     # passes over the training subset
IMAGE_SIZE = 32                # px fed to the nets: CIFAR-10's own size
BATCH_SIZE = 64                # images per step
LR = 0.025                     # peak lr (warm-up, then linear decay to 0, as train.py)
RECIPE = 'article+norm+lr+decay+smoothing+nesterov'  # train.py's fixed recipe less augment
OUT = 'runs/degradation'       # .md (the table), .json and .png (the figure) go here


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Train the paper\'s CIFAR-10 ResNets and their plain twins at each depth '
                    'and compare their training error (the paper\'s Figure 6).')
    p.add_argument('--data', metavar='DIR', help='ImageFolder tree DIR/train/<class>/*, '
                   'DIR/test/<class>/* (default: CIFAR-10 in --data-root)')
    p.add_argument('--data-root', default=config.DATA_ROOT, metavar='DIR',
                   help='where CIFAR-10 is downloaded or placed (default: %(default)s)')
    p.add_argument('--depths', type=options.positive(int), nargs='+', default=list(DEPTHS),
                   metavar='D', help='network depths, each 6n+2: 20, 32, 44, 56, 110, ... '
                                     '(default: %(default)s)')
    p.add_argument('--train-images', type=options.positive(int, allow_zero=True),
                   default=TRAIN_IMAGES, metavar='N',
                   help='train on a random N of the training images; 0: all (default: '
                        '%(default)s)')
    p.add_argument('--test-images', type=options.positive(int, allow_zero=True),
                   default=TEST_IMAGES, metavar='N',
                   help='test on a random N of the test images; 0: all (default: %(default)s)')
    p.add_argument('--epochs', type=options.positive(int), default=EPOCHS,
                   help='passes over the training images (default: %(default)s)')
    p.add_argument('--batch-size', type=options.positive(int), default=BATCH_SIZE,
                   help='images per step (default: %(default)s)')
    p.add_argument('--lr', type=options.positive(float), default=LR,
                   help='peak learning rate (default: %(default)s)')
    p.add_argument('--recipe', type=options.recipe, default=RECIPE,
                   help='as train.py\'s --recipe (default: %(default)s: the fixed recipe less '
                        'the augmentation, so that the training error measures how well each '
                        'net fits the training images)')
    p.add_argument('--seed', type=options.positive(int, allow_zero=True), default=config.SEED,
                   help='seeds the subsets, the weights and the batches (default: %(default)s)')
    p.add_argument('--out', default=OUT, metavar='PREFIX',
                   help='write PREFIX.md (the table), PREFIX.json and PREFIX.png (the figure) '
                        '(default: %(default)s)')
    p.add_argument('--workers', type=options.positive(int, allow_zero=True),
                   default=config.NUM_WORKERS,
                   help='processes decoding an image folder; 0: one per CPU core (default: '
                        '%(default)s)')
    options.add_device_argument(p)
    p.add_argument('--precision', choices=['auto', *speed.PRECISIONS], default=config.PRECISION,
                   help='as train.py\'s --precision (default: %(default)s)')
    return p.parse_args(argv)


def blocks_of(depth):
    """n, the number of blocks in each of the three stages, of a depth-6n+2 network."""
    if depth < 8 or (depth - 2) % 6:
        raise UsageError(f'--depths {depth}: the paper\'s CIFAR-10 networks have 6n+2 layers '
                         f'(20, 32, 44, 56, 110, ...), so {depth} is not one of them')
    return (depth - 2) // 6


def load_subsets(args, device):
    """A seeded random subset of the training and of the test images, as data.Data of uint8
    tensors."""
    g = torch.Generator().manual_seed(args.seed)

    def pick(n, wanted):
        return torch.randperm(n, generator=g)[:wanted or n].sort().values

    if not args.data:
        images = load_cifar10(args.data_root)
        train_i, test_i = pick(len(images.train.labels), args.train_images), \
            pick(len(images.test.labels), args.test_images)
        return Data(Split(*(t[train_i] for t in images.train)),
                      Split(*(t[test_i] for t in images.test)), images.classes)
    files = list_image_folder(args.data)
    train_i, test_i = pick(len(files.train), args.train_images), pick(len(files.test),
                                                                      args.test_images)
    size = held_size(files.train[0][0], IMAGE_SIZE)
    shortfall = memory_shortfall(len(train_i) + len(test_i), size, free_memory(device))
    if shortfall:
        raise UsageError(f'the images picked, {shortfall}; pass a smaller --train-images')
    workers = args.workers or os.cpu_count() or 1
    print(f'decoding {len(train_i) + len(test_i):,} of the images in {args.data} '
          f'({workers} processes)...', flush=True)

    def split(pairs, idx):
        picked = [pairs[i] for i in idx.tolist()]
        return Split(decode_images([f for f, _ in picked], size, workers),
                     torch.tensor([y for _, y in picked]))

    return Data(split(files.train, train_i), split(files.test, test_i), files.classes)


def gradient_norms(model, inputs, targets, criterion):
    """The norm of each block's first conv weight gradient, first block to last, for one batch
    in fp32: how much gradient reaches each depth of the network."""
    model.train()
    model.zero_grad(set_to_none=True)
    criterion(model(inputs).float(), targets).backward()
    norms = [b.conv1.weight.grad.norm().item() for b in model.modules()
             if isinstance(b, layers.BasicBlock)]
    model.zero_grad(set_to_none=True)
    return norms


def train_net(depth, plain, loaders, classes, args, device, amp_dtype, recipe):
    """Train one network with train.py's Trainer and recipe (its values: options.recipe_values),
    testing it after each epoch; return its record: the train and test error of each epoch,
    and the gradient norms before and after training."""
    torch.manual_seed(args.seed)  # the same initial weights for a net and its plain twin
    model = speed.prepare_model(CifarResNet(blocks_of(depth), len(classes), plain), device)
    optimizer = train.build_optimizer(model.parameters(), args.lr, recipe['momentum'],
                                      recipe['weight_decay'], recipe['nesterov'], device)
    trainer = train.Trainer(model, optimizer, train.build_criterion(recipe['label_smoothing']),
                            device, precision=amp_dtype)
    trainer.scheduler = budget.Schedule(optimizer, args.epochs * len(loaders.train),
                                        recipe['warmup'])
    loaders.train.set_epoch(0)  # epoch 0's first batch: the one the gradients are measured on
    probe = next(iter(loaders.train))
    record = {'net': f'{"plain" if plain else "ResNet"}-{depth}', 'depth': depth,
              'plain': plain, 'parameters': count_parameters(model),
              'gradients_at_init': gradient_norms(model, *probe, trainer.criterion)}
    trainer.train_step, _ = speed.prepare_step(trainer.train_step, model, optimizer,
                                               trainer.amp, loaders.train, 'resnet')
    print(f'{record["net"]}:', flush=True)
    rows, t0 = [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):  # the paper's Figure 6: train and test error
        loaders.train.set_epoch(epoch)
        train_loss, train_acc = trainer.epoch_train(loaders.train)
        test_loss, test_acc = trainer.epoch_valid(loaders.test)
        rows.append((train_acc, test_acc))
        print(f'epoch {epoch}/{args.epochs}  train loss {train_loss:.3f} acc {train_acc:5.2f}%  '
              f'test loss {test_loss:.3f} acc {test_acc:5.2f}%', flush=True)
    record.update(train_error=[round(100 - train, 2) for train, _ in rows],
                  test_error=[round(100 - test, 2) for _, test in rows],
                  seconds=round(time.perf_counter() - t0, 1))
    vars(trainer).pop('train_step', None)  # the eager step again, if a CUDA graph replaced it
    record['gradients_after'] = gradient_norms(model, *probe, trainer.criterion)
    return record


def table(records):
    """The results as a markdown table (README, "Why shortcuts work")."""
    rows = ['| net | parameters | train error by epoch (%) | test error (%) | gradient norm, '
            'first / last block: at init; after training |', '|---|---|---|---|---|']
    for r in records:
        g0, g1 = r['gradients_at_init'], r['gradients_after']
        rows.append(f'| {r["net"]} | {r["parameters"]:,} | '
                    f'{", ".join(f"{e:.1f}" for e in r["train_error"][:-1])}'
                    f'{", " if len(r["train_error"]) > 1 else ""}**{r["train_error"][-1]:.1f}** | '
                    f'{r["test_error"][-1]:.1f} | {g0[0]:.3g} / {g0[-1]:.3g}; '
                    f'{g1[0]:.3g} / {g1[-1]:.3g} |')
    return '\n'.join(rows)


def plot(records, path):
    """The paper's Figure 6 (plain nets left, ResNets middle: training error dashed, test
    error bold) and each block's gradient norm (right, log scale). False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colours = dict(zip(sorted({r['depth'] for r in records}), plt.cm.tab10.colors))
    for r in records:
        ax, c = axes[0 if r['plain'] else 1], colours[r['depth']]
        epochs = range(1, len(r['train_error']) + 1)
        ax.plot(epochs, r['train_error'], '--', color=c, linewidth=1)
        ax.plot(epochs, r['test_error'], '-', color=c, linewidth=2, label=r['net'])
    deepest = max(colours)
    for r in records:
        if r['depth'] == deepest:
            style = '-' if r['plain'] else '-.'
            blocks = range(1, len(r['gradients_at_init']) + 1)
            axes[2].semilogy(blocks, r['gradients_at_init'], style, color='k' if r['plain']
                             else 'tab:red', label=f'{r["net"]} at init')
            axes[2].semilogy(blocks, r['gradients_after'], style, color='k' if r['plain']
                             else 'tab:red', alpha=0.4, label=f'{r["net"]} trained')
    top = max(max(r['train_error'] + r['test_error']) for r in records)
    for ax, title in zip(axes[:2], ('plain networks', 'ResNets (with shortcuts)')):
        ax.set(title=title, xlabel='epoch', ylabel='error (%): train dashed, test bold',
               ylim=(0, min(100, top + 5)))
        ax.legend()
    axes[2].set(title='gradient reaching each block', xlabel='block (input side first)',
                ylabel='weight-gradient norm (log)')
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    saving.atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=72))
    plt.close(fig)
    return True


def main(argv=None):
    args = parse_args(argv)
    try:
        for depth in args.depths:
            blocks_of(depth)
        device = options.pick_device(args.device)
        amp_dtype = speed.choose_precision(args.precision, device)
        images = load_subsets(args, device)
        recipe = options.recipe_values(args.recipe)
        train_x, train_y = images.train
        mean, std = channel_stats(train_x) if recipe['normalise'] else ([0.0] * 3, [1.0] * 3)
        common = dict(mean=mean, std=std, image_size=IMAGE_SIZE, device=device,
                      memory_format=speed.memory_format(device))
        loaders = Loaders(make_loader(train_x, train_y, batch_size=args.batch_size, train=True,
                                      seed=args.seed, augment=recipe['augment'], **common), None,
                          make_loader(*images.test, batch_size=2 * args.batch_size,
                                      train=False, **common))
        print(f'{len(train_y):,} train and {len(images.test.labels):,} test images, '
              f'{len(images.classes)} classes; {device.type}, {speed.precision_name(amp_dtype)}, '
              f'{args.epochs} epochs of {len(loaders.train)} batches of {args.batch_size}, peak '
              f'lr {args.lr}', flush=True)
        records = [train_net(depth, plain, loaders, images.classes, args, device, amp_dtype,
                             recipe) for plain in (True, False) for depth in sorted(args.depths)]
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except FloatingPointError as e:  # Trainer.epoch_train's
        print(f'error: the loss became {e}; try a lower --lr than {args.lr}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('\ninterrupted; nothing was written', file=sys.stderr)
        return 130
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = table(records)
    print(text)
    saving.save_text(text + '\n', out.with_suffix('.md'))
    saving.save_text(json.dumps({'args': vars(args), 'records': records}, indent=1),
                     out.with_suffix('.json'))
    if plot(records, out.with_suffix('.png')):
        print(f'wrote {out.with_suffix(".md")}, {out.with_suffix(".json")} and '
              f'{out.with_suffix(".png")}')
    else:
        print(f'wrote {out.with_suffix(".md")} and {out.with_suffix(".json")}; matplotlib is not '
              f'installed, so no figure was drawn (pip install matplotlib draws one)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
