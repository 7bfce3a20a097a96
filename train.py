"""Train ResNet18 on CIFAR-10 (or your own photos): the article's "ResNetを用いた画像認識".

In the article's order: the Trainer, the builders, then its __main__ (data, model, optimizer,
loaders, the epochs), keeping the weights best on the validation images in weight.pth. Its bugs
are fixed, each marked `# Article:`. What is not the article's idea is one named call you may
skip: data.py (the data path), speed.py (speed only), saving.py (files), transfer.py (starting
from trained weights), budget.py (--minutes), options.py (the command line).
"""
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

START = time.monotonic()  # --minutes counts from here, before torch's seconds of importing

import torch
import torch.nn as nn

import config
import errors
import options
import resnet
import saving
import speed
from alexnet import AlexNet
from data import Loaders, Split, channel_stats, load_dataset, make_loader, split_valid


class Trainer:
    """The article's Trainer: epoch_train and epoch_valid run one epoch each and return the
    loss and the accuracy (%); params are the model's weights."""

    def __init__(self, model, optimizer, criterion, device='cpu', scheduler=None,
                 precision=None):
        # Article: it chose cuda itself when there was one; here train.py passes --device's.
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.criterion = criterion
        self.scheduler = scheduler  # Article: none (a constant lr); here stepped once per batch
        # Article: fp32 only. Mixed precision: autocast to bf16 or fp16 where the device is
        # faster in them (speed.choose_precision; None: fp32), with fp16's loss scaling.
        self.amp = speed.MixedPrecision(self.device, precision)
        # Article: nothing between the epochs' lines, and accuracy alone. Here a live progress
        # line on a terminal (none in a log), and the counts behind the accuracy, true class by
        # predicted class, of the last epoch_valid (its confusion matrix).
        self.progress = sys.stdout.isatty()
        self.confusion = None

    def train_step(self, inputs, targets):
        """One step of the article's loop: forward, loss, backward, SGD update. (On CUDA,
        train() puts a CUDA graph of this step in its place: speed.prepare_step.)"""
        self.optimizer.zero_grad(set_to_none=True)
        with self.amp.autocast():
            outputs = self.model(inputs)
            loss = self.criterion(outputs, targets)
        self.amp.scale(loss).backward()  # loss.backward(), the loss scaled up in fp16
        self.amp.step(self.optimizer)  # self.optimizer.step()
        self.amp.update()
        return loss, outputs

    def epoch_train(self, train_loader):
        self.model.train()
        # Article: a running sum of loss.item(). Here the losses and predictions stay on the
        # device and are summed once at the end: the host does not wait for the GPU each batch.
        losses, predictions, labels = [], [], []
        last_print = time.monotonic()

        for batch_idx, (inputs, targets) in enumerate(train_loader):
            inputs = inputs.to(self.device)  # no-op: train.py's loaders batch on the device
            targets = targets.to(self.device).long()
            loss, outputs = self.train_step(inputs, targets)
            if self.scheduler is not None:
                self.scheduler.step()

            losses.append(loss.detach())
            predictions.append(outputs.argmax(dim=1))
            labels.append(targets)
            if self.progress and time.monotonic() - last_print > 0.5:
                last_print = time.monotonic()
                print(f'\r  batch {batch_idx + 1}/{len(train_loader)}  loss {loss.item():.3f}',
                      end='', flush=True)
        if self.progress:
            print('\r' + ' ' * 40 + '\r', end='', flush=True)

        # The mean over samples. (The article's mean of batch means was right here only
        # because its train loader dropped the short last batch; this holds for any loader.)
        sizes = torch.tensor([len(t) for t in labels], dtype=torch.float, device=self.device)
        epoch_loss = (torch.stack(losses).float() * sizes).sum().item() / sizes.sum().item()
        correct = (torch.cat(predictions) == torch.cat(labels)).sum().item()
        return epoch_loss, 100 * correct / sizes.sum().item()

    @torch.no_grad()  # Article: autograd on in validation, storing every activation
    def epoch_valid(self, valid_loader):
        self.model.eval()
        epoch_loss = torch.zeros((), device=self.device)
        confusion = 0

        for inputs, targets in valid_loader:
            inputs = inputs.to(self.device)
            targets = targets.to(self.device).long()
            with self.amp.autocast():
                outputs = self.model(inputs)
            # Article: the mean of batch means, which weighs the short last batch's images more.
            # Here the loss in fp32 (the logits may be bf16 under autocast), summed over samples.
            epoch_loss += self.criterion(outputs.float(), targets) * targets.size(0)
            n = outputs.shape[1]
            confusion = confusion + torch.bincount(targets * n + outputs.argmax(dim=1),
                                                   minlength=n * n).view(n, n)

        self.confusion = confusion.cpu()
        total = self.confusion.sum().item()
        return epoch_loss.item() / total, 100 * self.confusion.diag().sum().item() / total

    @property
    def class_accuracy(self):
        """Per-class accuracy (%) of the last epoch_valid, from its confusion matrix."""
        return (100 * self.confusion.diag() / self.confusion.sum(dim=1).clamp_min(1)).tolist()

    @property
    def params(self):
        return self.model.state_dict()  # live tensors: copy before keeping (see train())


# ----------------------------------------------------------------------------------------------
# The builders: model, optimizer, loss and lr schedule.

def build_model(name, num_classes, small_input=False, plain=False):
    # Article: ResNet18(10). Here any --model, with --small-input's stem or --plain's no shortcuts.
    if name == 'alexnet':
        return AlexNet(in_channels=3, num_classes=num_classes)
    if name in resnet.CIFAR_RESNETS:
        return resnet.CIFAR_RESNETS[name](num_classes, plain=plain)
    return resnet.IMAGENET_RESNETS[name](num_classes, small_input=small_input, plain=plain)


def build_optimizer(model, lr, device, fixes=options.FIXES, groups=None):
    """SGD with Nesterov momentum and weight decay (config.py); the article's recipe has plain
    momentum and a smaller decay. On CUDA, fused: one kernel updates every parameter. `groups`
    (transfer.parameter_groups) give the layers that came with trained weights a smaller lr."""
    decay = config.WEIGHT_DECAY if 'decay' in fixes else config.ARTICLE_WEIGHT_DECAY
    return torch.optim.SGD(model.parameters() if groups is None else groups, lr=lr,
                           momentum=config.MOMENTUM, nesterov='nesterov' in fixes,
                           weight_decay=decay,
                           fused=True if device.type == 'cuda' else None)  # None: the default


def build_criterion(fixes=options.FIXES):
    """Cross-entropy, for training and every evaluation."""
    # Article: plain cross-entropy. Label smoothing (config.py) aims at 90% for the right class.
    smoothing = config.LABEL_SMOOTHING if 'smoothing' in fixes else 0.0
    return nn.CrossEntropyLoss(label_smoothing=smoothing)


def build_schedule(optimizer, total_steps, fixes=options.FIXES):
    """The lr factor of each step: warm-up, then linear decay to 0 (WarmupLinear)."""
    # Article: a constant lr (warmup None).
    factor = WarmupLinear(total_steps, config.WARMUP if 'lr' in fixes else None)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class WarmupLinear:
    """lr factor: a linear rise over the first `warmup` fraction of total_steps, then linear to
    0 at total_steps; 1 throughout for warmup None. (--minutes sets total_steps as it plans; the
    checkpoint keeps it.)"""

    def __init__(self, total_steps, warmup):
        self.total_steps, self.warmup = total_steps, warmup

    def __call__(self, step):
        if self.warmup is None:
            return 1.0
        peak = max(1, round(self.total_steps * self.warmup))
        if step < peak:
            return (step + 1) / peak
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - peak))


# ----------------------------------------------------------------------------------------------
# The article's __main__: data, model, optimizer, loaders, the epochs.

def load_data(args, fixes, device):
    """CIFAR-10, or the image folder --data; the validation images held out of the training
    images; the mean and std of the training images."""
    t0 = time.perf_counter()
    if args.stream:  # a folder too large for memory: decoded batch by batch, every epoch
        import stream
        dataset = stream.load_dataset(args.data, args.image_size, args.workers)
    else:
        dataset = load_dataset(args.data, args.data_root, args.image_size, args.workers,
                               device=device)
    # Article: it validated on the test set and kept the epoch best there, so the accuracy it
    # reported was chosen on the images it was measured on. Validation images, held out of the
    # training images, choose here; the test images are measured once, at the end.
    images, labels = dataset.train
    train_idx, valid_idx = split_valid(labels, args.valid_split, args.seed)
    train, valid = (Split(images[i], labels[i]) for i in (train_idx, valid_idx))
    # Article: raw [0, 1] pixels, and no augmentation. The fixes normalise with the training
    # images' statistics (ImageNet's for its weights), and crop and flip each training image
    # anew each epoch (the loader).
    if args.pretrained:  # what torchvision's weights were trained with, whatever the recipe
        mean, std = config.IMAGENET_MEAN, config.IMAGENET_STD
    elif 'norm' in fixes:
        mean, std = channel_stats(train.images)
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    print(f'{len(train.labels):,} train, {len(valid.labels):,} valid and '
          f'{len(dataset.test.labels):,} test images, {len(dataset.classes)} classes, held at '
          f'{train.images.shape[-1]} px, fed at {args.image_size} px; mean '
          f'{[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]} '
          f'({time.perf_counter() - t0:.1f} s)')
    return dataset._replace(train=train, valid=valid, mean=mean, std=std)


def build_loaders(data, args, fixes, device):
    # Article: PIL decoded and resized every image in every epoch. Here each is decoded once,
    # and the loaders crop, flip and normalise whole batches on the device (data.py).
    make = make_loader
    if args.stream:  # the images decoded anew in every epoch: stream.py
        import stream
        make = stream.make_loader
    common = dict(mean=data.mean, std=data.std, image_size=args.image_size, device=device,
                  memory_format=speed.memory_format(device))
    train = make(*data.train, batch_size=args.batch_size, train=True, seed=args.seed,
                 augment='augment' in fixes, **common)
    # Article: validation in batches of config.BATCH_SIZE. Without a backward to keep
    # activations for, larger ones fit (options.eval_batch_size).
    evaluation = dict(batch_size=options.eval_batch_size(args.batch_size), train=False, **common)
    valid = make(*data.valid, **evaluation) if len(data.valid.labels) else None
    return Loaders(train, valid, make(*data.test, **evaluation))


def weight_record(args, data, precision, start):
    """weight.json: the run's arguments, and what predict.py needs to prepare an image for the
    weights (the classes, the held size, the mean and std); the run adds its accuracies."""
    return {'args': vars(args),  # live: the epochs that --minutes plans are recorded as well
            'classes': data.classes, 'held_size': data.train.images.shape[-1],
            'mean': data.mean, 'std': data.std, 'test_split': data.test_split,
            'data': str(Path(args.data).resolve()) if args.data else 'cifar10',
            'start': start.name if start else 'random',
            'precision': speed.precision_name(precision)}


class Best(NamedTuple):
    """The best weights so far: their validation accuracy (None without validation images:
    then the last epoch's), their epoch, and a copy of them."""
    valid_acc: Optional[float]
    epoch: int
    params: dict


def train(args, given, device):
    """The article's __main__: the data, the model, the optimizer, the loaders and the Trainer,
    then the epochs and the one look at the test set. Article: the model came first; here the
    data does, as the classes and the batch size come from it. `given`: the options on the
    command line (options.given), which --resume checks against the run's own."""
    out = Path(args.out)
    if args.resume:  # the stopped run's own arguments, from its checkpoint (read first)
        checkpoint = saving.load_checkpoint(out.with_suffix('.ckpt'))
        args = options.resumed(args, given, checkpoint['args'])
        if checkpoint['epoch'] >= args.epochs:
            print(f'{out.with_suffix(".ckpt")}: that run already finished ({args.epochs} epochs)')
            return 0
    else:
        checkpoint = saving.claim(out)  # None; an earlier run's weights stay untouched
    fixes = options.fixes_of(args.recipe)  # the recipe, parsed once
    start = None  # random weights, as in the article
    if args.pretrained or args.init:  # or trained ones (transfer.py), read first too
        import transfer
        start = transfer.read_start(args.model, args.pretrained, args.init)
    precision = speed.choose_precision(args.precision, device)
    # Article: Resize((224, 224)). Here CIFAR's own 32 px (config.IMAGE_SIZE); 224 for ImageNet's
    # weights (--pretrained), 67 for AlexNet.
    args.image_size = args.image_size or options.default_image_size(args)
    downloads = not args.data and not Path(args.data_root, 'cifar-10-batches-py').is_dir()
    t0 = time.perf_counter()
    data = load_data(args, fixes, device)
    seconds = {'loading data': time.perf_counter() - t0}
    args.batch_size, args.lr, args.epochs = options.train_defaults(args, len(data.train.labels))

    torch.manual_seed(args.seed)  # Article: unseeded
    model = build_model(args.model, len(data.classes), args.small_input, args.plain)
    # The trained weights, loaded (with --freeze, all but the fc frozen); None: random ones.
    groups = transfer.load(model, start, data.classes, args.freeze, args.lr) if start else None
    model = speed.prepare_model(model, device)  # on the device; on the CPU, OnePixelConv2d
    # Article: SGD (momentum 0.9, weight decay 1e-4) at a constant lr of 0.001 (README, "What
    # the recipe buys"). The layers that came with trained weights train at a smaller lr.
    optimizer = build_optimizer(model, args.lr, device, fixes, groups)
    loaders = build_loaders(data, args, fixes, device)
    trainer = Trainer(model, optimizer, build_criterion(fixes), device, precision=precision)
    # The schedule comes last: --minutes times training steps first, to know its length.
    clock, steps = None, args.epochs * len(loaders.train)
    if args.minutes and not checkpoint:  # the steps that fit in the minutes (budget.py)
        clock, steps = plan(trainer, loaders, args, seconds['loading data'],
                            START + seconds['loading data'] * downloads)
    trainer.scheduler = build_schedule(optimizer, steps, fixes)
    record, history, best, first = weight_record(args, data, precision, start), [], None, 1
    if checkpoint:  # Article: none. Here a stopped run goes on as if it had never stopped.
        history, best, first = resume(checkpoint, trainer, args, out)
    step, how, seconds['recording CUDA graphs'] = speed.prepare_step(
        trainer.train_step, model, optimizer, trainer.amp, loaders.train, args.model,
        args.cuda_graphs, args.graph_whole_step)  # on CUDA, graphs; on the CPU, the route
    trainer.train_step = step  # on CUDA, the step replayed as a CUDA graph
    print_header(args, device, precision, how, len(loaders.train))

    # Article: this loop, then torch.save(best_params) once. Here the best weights (a copy) and
    # weight.json, the epochs and the checkpoint are written every --save-every seconds and at
    # the end. Ctrl-C, a NaN loss or running out of memory write the best weights so far and
    # weight.json, and end the run; --resume goes on from the last checkpoint.
    last_save = time.monotonic()
    try:
        for row in fit(trainer, loaders, first, args):  # until args.epochs, read each epoch
            history.append(row)
            if best is None or row['valid_acc'] is None or row['valid_acc'] > best.valid_acc:
                # Article: it kept `trainer.params`, a live view of the weights, so the "best"
                # weights it saved were the last epoch's. Copy them.
                best = Best(row['valid_acc'], row['epoch'],
                            {k: v.detach().clone() for k, v in trainer.params.items()})
            if clock:  # plan again from the epochs so far; the lr schedule follows
                steps = clock.replan(trainer.scheduler.last_epoch, steps)
                trainer.scheduler.lr_lambdas[0].total_steps = steps
                args.epochs = math.ceil(steps / clock.per_epoch)
            if row['epoch'] == args.epochs or time.monotonic() - last_save >= args.save_every:
                save(out, record, best, trainer, history, args)
                last_save = time.monotonic()
        # The one look at the test set, at the weights the validation images chose.
        seconds.update(training=sum(r['train_seconds'] for r in history),
                       evaluating=sum(r['valid_seconds'] for r in history))
        t0 = time.perf_counter()
        model.load_state_dict(best.params)
        _, record['test_acc'] = trainer.epoch_valid(loaders.test)
        seconds['testing'] = time.perf_counter() - t0
    except (KeyboardInterrupt, FloatingPointError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not errors.out_of_memory(e):
            raise
        save(out, record, best)  # the best weights so far
        epoch = history[-1]['epoch'] + 1 if history else first
        print(f'\n{stopped(e, args, device, out, epoch)}', file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    save(out, record, best)
    report(record, best, seconds, trainer.class_accuracy, len(data.test.labels), out)
    return 0


def plan(trainer, loaders, args, data_seconds, start):
    """--minutes: the training steps that fit in the minutes from `start`, timed on a few
    (budget.py), and the epochs that hold them. Returns the budget and the steps."""
    import budget
    clock = budget.Budget(args.minutes, start, len(loaders.train))
    steps = clock.first_plan(budget.seconds_per_step(trainer.train_step, trainer.model,
                                                     trainer.optimizer, trainer.amp,
                                                     loaders.train), args.batch_size,
                             len(loaders.valid.labels) if loaders.valid else 0,
                             len(loaders.test.labels), data_seconds)
    args.epochs = math.ceil(steps / clock.per_epoch)
    return clock, steps


def resume(checkpoint, trainer, args, out):
    """The checkpoint's states put back into the run, and its epochs so far; the best weights
    it kept (this run's, as --out is its alone); and the epoch to go on from."""
    saving.resume(checkpoint, trainer.model, trainer.optimizer, trainer.scheduler, trainer.amp,
                  trainer.device)
    first = checkpoint['epoch'] + 1
    best = None
    if out.exists():
        kept = saving.read_record(out)
        best = Best(kept['valid_acc'], kept['best_epoch'], saving.load_weights(out))
    print(f'resuming from epoch {first - 1} of {args.epochs}')
    return checkpoint['history'], best, first


def print_header(args, device, precision, how, batches):
    """The network, where and how it trains, and for how long."""
    recipe = f', the recipe {args.recipe}' if args.recipe != 'fixed' else ''
    length = (f'{args.epochs} epoch{"s" * (args.epochs > 1)} of {batches} '
              f'batch{"es" * (batches > 1)} of {args.batch_size}')
    if args.minutes:
        length = f'about {length} in {args.minutes:g} min'
    print(f'{options.describe(args)}, {device.type}, {speed.precision_name(precision)}, {how}'
          f'{recipe}, {length}, peak lr {args.lr}')


def fit(trainer, loaders, first, args):
    """The article's epoch loop: train and validate each epoch from `first` to args.epochs
    (read before each epoch: --minutes plans again), print it, and yield its row."""
    epoch, spent = first, []
    while epoch <= args.epochs:
        t0 = time.perf_counter()
        # The steps planned and not yet taken: with --minutes, the last epoch may end early.
        loaders.train.limit = trainer.scheduler.lr_lambdas[0].total_steps - \
            trainer.scheduler.last_epoch
        loaders.train.set_epoch(epoch)
        train_loss, train_acc = trainer.epoch_train(loaders.train)
        t1 = time.perf_counter()
        if not math.isfinite(train_loss):
            raise FloatingPointError(train_loss)  # no longer a number
        valid_loss, valid_acc = (trainer.epoch_valid(loaders.valid) if loaders.valid
                                 else (None, None))  # --valid-split 0: the last epoch is kept
        t2 = time.perf_counter()
        spent.append(t2 - t0)
        row = {'epoch': epoch, 'train_loss': round(train_loss, 4),
               'train_acc': round(train_acc, 2), 'valid_loss': valid_loss and round(valid_loss, 4),
               'valid_acc': valid_acc and round(valid_acc, 2),
               'lr': round(trainer.optimizer.param_groups[0]['lr'], 6),
               'train_seconds': round(t1 - t0, 2), 'valid_seconds': round(t2 - t1, 2),
               'img_per_s': round(len(loaders.train) * loaders.train.batch_size / (t1 - t0))}
        print_epoch(row, args.epochs, (args.epochs - epoch) * sum(spent) / len(spent))
        yield row
        epoch += 1


def print_epoch(row, epochs, left):
    # Article: three lines an epoch, the first with {num_epochs}, a name it never defined:
    # NameError in epoch 1. Here one line, with the time the run has left.
    valid = (f'valid loss {row["valid_loss"]:.3f} acc {row["valid_acc"]:5.2f}%'
             if row['valid_acc'] is not None else 'no validation')
    left = f'  about {in_words(left)} left' if row['epoch'] < epochs else ''
    print(f'epoch {row["epoch"]:>{len(str(epochs))}}/{epochs}  '
          f'train loss {row["train_loss"]:.3f} acc {row["train_acc"]:5.2f}%  {valid}  '
          f'lr {row["lr"]:.4f}  {row["train_seconds"] + row["valid_seconds"]:5.1f}s  '
          f'{row["img_per_s"]:,} img/s{left}', flush=True)


def in_words(seconds):
    return f'{seconds / 60:.0f} min' if seconds >= 90 else f'{math.ceil(seconds)} s'


def save(out, record, best, trainer=None, history=None, args=None):
    """Write the best weights (if new since the last save) and weight.json; after an epoch,
    with `history`, the checkpoint and the epochs (weight.csv, weight.png) too."""
    if best is None:
        return
    if record.get('best_epoch') != best.epoch:
        saving.save_torch(best.params, out)
    record.update(valid_acc=best.valid_acc, best_epoch=best.epoch)
    if history:
        record['steps'] = trainer.scheduler.last_epoch  # the training steps taken
        saving.save_checkpoint(out.with_suffix('.ckpt'), history[-1]['epoch'], vars(args),
                               history, trainer.model, trainer.optimizer, trainer.scheduler,
                               trainer.amp, trainer.device)
        saving.save_history(history, out)
    saving.save_text(json.dumps(record, indent=1), out.with_suffix('.json'))


def stopped(e, args, device, out, epoch):
    """What stopped the run in `epoch` (after the last: in the test), what was kept and how to
    go on: one sentence."""
    kept = 'the best weights so far are in ' + str(out) if out.exists() else \
        'no epoch had finished, so nothing was saved'
    if not isinstance(e, KeyboardInterrupt):
        if isinstance(e, FloatingPointError):
            what = f'the loss became {e} in epoch {epoch}; try a lower --lr than {args.lr}'
        else:
            what = f'in epoch {epoch}, {out_of_memory_advice(args, device.type)}'
        return f'error: {what}; {kept}' + ('; a new run needs its own --out' * out.exists())
    if epoch > args.epochs:
        return (f'interrupted in the test; {kept}; to test them: python predict.py --test '
                f'--weights {out}')
    then = f'; to go on: python train.py --resume --out {out}'
    return f'interrupted in epoch {epoch}; {kept}' + then * out.with_suffix('.ckpt').exists()


def report(record, best, seconds, class_accuracy, n_test, out):
    """The run's last lines: per-class test accuracy, where the time went, what was kept."""
    chosen = (f'epoch {best.epoch}, chosen by its valid accuracy {best.valid_acc:.2f}%'
              if best.valid_acc is not None else f'epoch {best.epoch}, the last: no validation')
    print(f'per-class test accuracy ({chosen}):')
    print_class_accuracy(record['classes'], class_accuracy)
    print('seconds: ' + ', '.join(f'{name} {s:.1f}' for name, s in seconds.items() if s) +
          f'; in all, from the start, {time.monotonic() - START:.1f}')
    print(f'done: test accuracy {record["test_acc"]:.2f}% on the {n_test:,} test images, '
          f'measured once ({chosen}); saved to {out}')


def print_class_accuracy(classes, accuracy):
    width = max(len(c) for c in classes)
    for name, acc in zip(classes, accuracy):
        print(f'  {name:<{width}}  {acc:6.2f}%')


def out_of_memory_advice(args, device='cpu'):
    """What ran out of memory, and what to pass."""
    return (f'the {device} ran out of memory for batches of {args.batch_size or "the default"} '
            f'images at {args.image_size or options.default_image_size(args)} px; pass a '
            f'smaller --batch-size or --image-size')


def main(argv=None):
    args = options.parse_args(argv)
    # Article: full fp32. TF32 matrix products on GPUs from Ampere on (no effect on the CPU).
    torch.set_float32_matmul_precision('high')

    def run():
        options.check_args(args)
        given = options.given(argv) if args.resume else {}  # what --resume checks
        return train(args, given, options.pick_device(args.device))

    # A bad argument, Ctrl-C before the epochs or running out of memory: one sentence.
    return errors.guarded(run, lambda: out_of_memory_advice(
        args, options.pick_device(args.device).type))


if __name__ == '__main__':
    sys.exit(main())
