"""Train ResNet18 on CIFAR-10 (or your own image folder): the article's "ResNetを用いた画像認識".

In the article's order: the Trainer, the builders, then its __main__ (data, model, optimizer,
loaders, epochs), keeping the weights best on the validation images in weight.pth. Its bugs are
fixed, each marked `# Article:`. What is not the article's idea is one named call you may skip:
data.py (the data path), speed.py (speed only), saving.py (files, resume, stopping cleanly),
transfer.py (starting from trained weights), options.py (the command line), errors.py.
`python train.py --eval weight.pth` tests saved weights (predict.evaluate).
"""
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import config
import errors
import options
import resnet
import saving
import speed
import transfer
from alexnet import AlexNet
from data import Data, Loaders, Split, channel_stats, load_dataset, make_loader, split_valid, \
    subset


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
        self.progress = sys.stdout.isatty()  # a live progress line on a terminal, none in a log
        self.confusion = None  # of the last epoch_valid: counts, true class by predicted class

    def train_step(self, inputs, targets):
        """One step of the article's loop: forward, loss, backward, SGD update. (On CUDA,
        speed.record_graphs puts a CUDA graph of this step in its place.)"""
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
        return self.model.state_dict()  # live tensors: copy before keeping (see fit())


# ----------------------------------------------------------------------------------------------
# The builders: model, optimizer, loss and lr schedule.

def build_model(name, num_classes, small_input=False, plain=False):
    if name == 'alexnet':
        return AlexNet(in_channels=3, num_classes=num_classes)
    if name in resnet.CIFAR_RESNETS:
        return resnet.CIFAR_RESNETS[name](num_classes, plain=plain)
    return resnet.IMAGENET_RESNETS[name](num_classes, small_input=small_input, plain=plain)


def build_optimizer(model, lr, device, fixes=options.FIXES, new=None):
    """SGD with Nesterov momentum and weight decay (config.py); the article's recipe has plain
    momentum and a smaller decay. On CUDA, fused: one kernel updates every parameter. With
    `new`, the names of the parameters that did not come with trained weights: the others
    train at a smaller lr, or not at all when frozen (transfer.parameter_groups)."""
    decay = config.WEIGHT_DECAY if 'decay' in fixes else config.ARTICLE_WEIGHT_DECAY
    params = model.parameters() if new is None else transfer.parameter_groups(model, new, lr)
    return torch.optim.SGD(params, lr=lr, momentum=config.MOMENTUM,
                           nesterov='nesterov' in fixes, weight_decay=decay,
                           fused=True if device.type == 'cuda' else None)  # None: the default


def build_criterion(fixes=options.FIXES):
    """Cross-entropy with label smoothing (config.py), for training and every evaluation."""
    smoothing = config.LABEL_SMOOTHING if 'smoothing' in fixes else 0.0
    return nn.CrossEntropyLoss(label_smoothing=smoothing)


def build_schedule(optimizer, total_steps, fixes=options.FIXES):
    """The lr factor of each step: warm-up, then linear decay to 0 (the article: constant)."""
    factor = warmup_linear(total_steps, config.WARMUP) if 'lr' in fixes else lambda step: 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_linear(total_steps, warmup):
    """lr factor: linear rise over the first `warmup` fraction of steps, then linear to 0."""
    peak = max(1, round(total_steps * warmup))

    def factor(step):
        if step < peak:
            return (step + 1) / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))
    return factor


# ----------------------------------------------------------------------------------------------
# The article's __main__: data, model, optimizer, loaders, the epochs.

def load_data(args, device):
    """CIFAR-10, or the image folder --data; the validation images held out of the training
    images; the mean and std of the training images."""
    t0 = time.perf_counter()
    train_x, train_y, test_x, test_y, classes = load_dataset(
        args.data, args.data_root, args.image_size, args.workers, device=device, stream=args.stream)
    # Article: it validated on the test set and kept the epoch best there, so the accuracy it
    # reported was chosen on the images it was measured on. Validation images, held out of the
    # training images, choose here; the test images are measured once, at the end.
    train_idx, valid_idx = split_valid(train_y, args.valid_split, args.seed)
    train = Split(subset(train_x, train_idx), train_y[train_idx])
    valid = Split(subset(train_x, valid_idx), train_y[valid_idx])
    # Article: raw [0, 1] pixels, and no augmentation. The fixes normalise with the training
    # images' statistics (ImageNet's for its weights), and crop and flip each training image
    # anew each epoch (the loader).
    if args.pretrained:  # what torchvision's weights were trained with, whatever the recipe
        mean, std = config.IMAGENET_MEAN, config.IMAGENET_STD
    elif 'norm' in options.fixes_of(args.recipe):
        mean, std = channel_stats(train.images, workers=args.workers or os.cpu_count() or 1)
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    print(f'{len(train.labels):,} train, {len(valid.labels):,} valid and {len(test_y):,} test '
          f'images, {len(classes)} classes, held at {train.images.shape[-1]} px, fed at '
          f'{args.image_size} px; mean {[round(m, 4) for m in mean]}, std '
          f'{[round(s, 4) for s in std]} ({time.perf_counter() - t0:.1f} s)')
    return Data(train, valid, Split(test_x, test_y), classes, mean, std)


def build_loaders(data, args, device):
    # Article: PIL decoded and resized every image in every epoch. Here each is decoded once,
    # and the loaders crop, flip and normalise whole batches on the device (data.py).
    common = dict(mean=data.mean, std=data.std, image_size=args.image_size, device=device,
                  workers=args.workers, memory_format=speed.memory_format(device))
    train = make_loader(*data.train, batch_size=args.batch_size, train=True, seed=args.seed,
                        augment='augment' in options.fixes_of(args.recipe), **common)
    eval_batch = options.eval_batch_size(args.batch_size)
    valid, test = (make_loader(*split, batch_size=eval_batch, train=False, **common)
                   if len(split.labels) else None for split in (data.valid, data.test))
    return Loaders(train, valid, test)


def train(args, device):
    """The article's __main__: the data, the model, the optimizer, the loaders and the
    Trainer, then the epochs (fit) and the one look at the test set (test_once).
    Article: the model came first; here the data does, as the classes and the batch size
    come from it. --image-size, --batch-size and --lr left out are set here (options.py)."""
    checkpoint = saving.load_checkpoint(Path(args.out).with_suffix('.ckpt')) \
        if args.resume else None  # read first, so that a bad one fails fast
    start = transfer.read_start(args)  # --pretrained or --init: read first too
    precision = speed.choose_precision(args.precision, device)
    args.image_size = args.image_size or options.default_image_size(args)  # 224: --pretrained
    t0 = time.perf_counter()
    data = load_data(args, device)
    timings = {'loading data': time.perf_counter() - t0}
    args.batch_size, args.lr, args.epochs = options.train_defaults(args, len(data.train.labels))
    fixes = options.fixes_of(args.recipe)

    torch.manual_seed(args.seed)
    model = build_model(args.model, len(data.classes), args.small_input, args.plain)
    new = transfer.load_start(model, start, data.classes)  # random, ImageNet's or --init
    if args.freeze:
        new = transfer.freeze(model)  # the fc alone trains, at the full lr
    model = speed.prepare_model(model, device)  # on the device; on the CPU, OnePixelConv2d
    # Article: SGD (momentum 0.9, weight decay 1e-4) at a constant lr of 0.001 (README, "What
    # the recipe buys").
    optimizer = build_optimizer(model, args.lr, device, fixes, new)
    loaders = build_loaders(data, args, device)
    scheduler = build_schedule(optimizer, args.epochs * len(loaders.train), fixes)
    trainer = Trainer(model, optimizer, build_criterion(fixes), device, scheduler, precision)
    record = saving.WeightRecord.of_run(args, data.classes, data.mean, data.std,
                                        data.train.images.shape[-1], precision, start.name)
    # Article: torch.save once, after the last epoch. Run writes weight.pth (and weight.json,
    # the record) as the run goes, checks the weights already there, and resumes --resume.
    run = saving.Run(trainer, record, args, checkpoint, timings)
    if run.start > args.epochs:
        return 0
    how = speed.prepare_trainer(trainer, loaders.train, args, run.timings)  # CUDA graphs, ...
    print_header(args, device, run.record.precision, how, len(loaders.train))
    with run:
        fit(trainer, loaders, args, run)
        test_once(trainer, loaders.test, run)
        run.report(trainer.class_accuracy, len(loaders.test.labels))
    return run.exit_code


def print_header(args, device, precision, how, batches):
    """The network, where and how it trains, and for how long."""
    recipe = f', the recipe {args.recipe}' if args.recipe != 'fixed' else ''
    print(f'{options.describe(args)}, {device.type}, {precision}, {how}{recipe}, '
          f'{args.epochs} epoch{"s" * (args.epochs > 1)} of {batches} batch{"es" * (batches > 1)} '
          f'of {args.batch_size}, peak lr {args.lr}')


def fit(trainer, loaders, args, run):
    """The article's epoch loop: train, validate, keep the best weights (a copy), print."""
    for epoch in range(run.start, args.epochs + 1):
        run.epoch = epoch
        t0 = time.perf_counter()
        loaders.train.set_epoch(epoch)
        train_loss, train_acc = trainer.epoch_train(loaders.train)
        train_seconds = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            raise saving.Diverged(f'the loss became {train_loss} in epoch {epoch}',
                                  f'try a lower --lr than {args.lr}')
        valid_loss, valid_acc = (trainer.epoch_valid(loaders.valid) if loaders.valid
                                 else (None, None))  # --valid-split 0: the last epoch is kept
        if run.is_better(valid_acc):
            # Article: it kept `trainer.params`, a live view of the weights, so the "best"
            # weights it saved were the last epoch's. Copy them.
            run.keep(epoch, valid_acc, {k: v.detach().clone() for k, v in trainer.params.items()})
        row = saving.epoch_row(epoch, train_loss, train_acc, valid_loss, valid_acc,
                               trainer.optimizer.param_groups[0]['lr'], time.perf_counter() - t0,
                               len(loaders.train) * args.batch_size / train_seconds)
        print_epoch(row, args.epochs)
        run.end_epoch(row, train_seconds)


def print_epoch(row, epochs):
    # Article: three lines an epoch, the first with {num_epochs}, a name it never defined:
    # NameError in epoch 1. Here one line.
    valid = (f'valid loss {row["valid_loss"]:.3f} acc {row["valid_acc"]:5.2f}%'
             if row['valid_acc'] is not None else 'no validation')
    print(f'epoch {row["epoch"]:>{len(str(epochs))}}/{epochs}  '
          f'train loss {row["train_loss"]:.3f} acc {row["train_acc"]:5.2f}%  {valid}  '
          f'lr {row["lr"]:.4f}  {row["seconds"]:5.1f}s  {row["img_per_s"]:,} img/s', flush=True)


def test_once(trainer, test_loader, run):
    """The one look at the test set, at the weights this run chose (if it beat --out's)."""
    if run.best.params is None:
        return
    t0 = time.perf_counter()
    trainer.model.load_state_dict(run.best.params)
    _, test_acc = trainer.epoch_valid(test_loader)
    run.record_test(test_acc, time.perf_counter() - t0)


def main(argv=None):
    args = options.parse_args(argv)
    return errors.guarded(lambda: run_command(args), lambda: saving.out_of_memory_advice(
        args, options.pick_device(args.device).type))  # one sentence, not a traceback


def run_command(args):
    torch.set_float32_matmul_precision('high')  # TF32 on Ampere and later; no-op on CPU
    options.check_args(args)
    device = options.pick_device(args.device)
    if args.eval:
        import predict  # testing saved weights lives with loading them
        return predict.evaluate(args, device)
    return train(args, device)


if __name__ == '__main__':
    sys.exit(main())
