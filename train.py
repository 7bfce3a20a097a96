"""Train ResNet18 on CIFAR-10 (or your own photos): the article's "ResNetを用いた画像認識", in its
order: the Trainer, the builders, the data, then train(), its __main__. Each departure is
marked `# Article:`. train.py says when; how lives in files of its own: options.py (the
settings), data.py and stream.py (the images), speed.py and graphs.py (speed only), budget.py
(the lr schedule, --minutes), saving.py (the files), transfer.py (trained weights to start
from), errors.py (what stops a run).
"""
import math
import sys
import time
from pathlib import Path

START = time.monotonic()  # --minutes counts from here, before torch's seconds of importing

import torch
import torch.nn as nn

import budget
import errors
import options
import resnet
import saving
import speed
from data import Loaders, load_dataset, make_loader


class Trainer:
    """The article's Trainer: epoch_train and epoch_valid run one epoch each and return the
    loss and the accuracy (%); params are the model's weights."""

    def __init__(self, model, optimizer, criterion, device='cpu', scheduler=None,
                 precision=None, flips=False):
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
        self.flips = flips  # Article: one look at each image in evaluation (logits())

    # Article: the loop's body was inline; as a method, a CUDA graph can stand in for it.
    def train_step(self, inputs, targets):
        """One step of the article's loop: forward, loss, backward, SGD update. (On CUDA,
        train() may put a CUDA graph of this step in its place: speed.prepare_step.)"""
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
        # Article: a running sum of loss.item(), which makes a GPU wait after every batch. Here
        # the losses and predictions stay on the device and are summed once at the end.
        losses, predictions, labels = [], [], []
        last_look = time.monotonic()

        for batch_idx, (inputs, targets) in enumerate(train_loader):
            inputs = inputs.to(self.device)  # no-op: train.py's loaders batch on the device
            targets = targets.to(self.device).long()
            loss, outputs = self.train_step(inputs, targets)
            if self.scheduler is not None:
                self.scheduler.step()

            losses.append(loss.detach())
            predictions.append(outputs.argmax(dim=1))
            labels.append(targets)
            if time.monotonic() - last_look > 2:  # a look every 2 s: the loss, the progress
                last_look = time.monotonic()
                self.look(loss.item(), f'batch {batch_idx + 1}/{len(train_loader)}')
        if self.progress:
            print('\r' + ' ' * 40 + '\r', end='', flush=True)

        # The mean over samples. (The article's mean of batch means was right here only
        # because its train loader dropped the short last batch; this holds for any loader.)
        sizes = torch.tensor([len(t) for t in labels], dtype=torch.float, device=self.device)
        epoch_loss = (torch.stack(losses).float() * sizes).sum().item() / sizes.sum().item()
        self.look(epoch_loss)
        correct = (torch.cat(predictions) == torch.cat(labels)).sum().item()
        return epoch_loss, 100 * correct / sizes.sum().item()

    def look(self, loss, where=None):
        """Article: none. Stop on a loss that is no longer a number (it never comes back);
        show the progress on a terminal."""
        if not math.isfinite(loss):
            raise FloatingPointError(loss)
        if where and self.progress:
            print(f'\r  {where}  loss {loss:.3f}', end='', flush=True)

    @torch.no_grad()  # Article: autograd on in validation, storing every activation
    def epoch_valid(self, valid_loader):
        self.model.eval()
        epoch_loss = torch.zeros((), device=self.device)
        confusion = 0

        for inputs, targets in valid_loader:
            inputs = inputs.to(self.device)
            targets = targets.to(self.device).long()
            with self.amp.autocast():
                outputs = logits(self.model, inputs, self.flips)
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


def logits(model, inputs, flips=False):
    """The model's scores for inputs; with flips, the mean of theirs and their mirror images'.
    Article: one look at each image."""
    outputs = model(inputs)
    return (outputs + model(inputs.flip(3))) / 2 if flips else outputs


# ----------------------------------------------------------------------------------------------
# The builders: model, optimizer, loss and lr schedule.

def build_model(name, num_classes, small_input=False, plain=False):
    # Article: ResNet18(10). Here any --model, with --small-input's stem or --plain's no shortcuts.
    if name == 'alexnet':
        from alexnet import AlexNet
        return AlexNet(in_channels=3, num_classes=num_classes)
    if name in resnet.CIFAR_RESNETS:
        return resnet.CIFAR_RESNETS[name](num_classes, plain=plain)
    return resnet.IMAGENET_RESNETS[name](num_classes, small_input=small_input, plain=plain)


def build_optimizer(params, lr, momentum, weight_decay, nesterov, device):
    # Article: torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=1e-4).
    # Here the recipe's values (options.py); on CUDA fused: one kernel updates every parameter.
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov, fused=True if device.type == 'cuda' else None)


def build_criterion(label_smoothing=0.0):
    # Article: nn.CrossEntropyLoss(). Label smoothing 0.1 aims at 91% for the right class of
    # 10, not 100%: the losses printed are not the article's cross-entropy.
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def build_schedule(trainer, loaders, s, since, checkpoint=None):
    """The lr of each step over the steps planned (budget.py): s.epochs epochs' worth, or those
    that fit in --minutes from `since` (a clock reading), timed on a few; resumed, the
    checkpoint's plan goes on."""
    # Article: a constant lr (s.warmup None).
    return budget.schedule(
        trainer.optimizer, s.epochs, s.warmup, s.min_warmup, len(loaders.train),
        checkpoint and checkpoint['scheduler'], s.minutes, since, lambda: budget.seconds_per_step(
            trainer.train_step, trainer.model, trainer.optimizer, trainer.amp, loaders.train,
            trainer.epoch_valid, next(iter(loaders.valid or loaders.test))),
        len(loaders.valid.labels) if loaders.valid else 0, len(loaders.test.labels))


# ----------------------------------------------------------------------------------------------
# The data and its loaders.

def load_data(folder, image_size, valid_split, seed, device, stream=False, workers=0):
    """CIFAR-10 or the image folder `folder`, decoded once (with --stream, in every epoch:
    stream.py), its validation images held out of its training images (data.Data.held_out)."""
    if stream:
        import stream as streaming
        return streaming.load_dataset(folder, image_size, workers).held_out(valid_split, seed)
    return load_dataset(folder, image_size, workers, device=device).held_out(valid_split, seed)


def build_loaders(data, s, device):
    # Article: PIL decoded and resized every image in every epoch. Here the loaders crop, flip
    # and normalise whole batches of images decoded once, on the device (data.py).
    make = make_loader
    if s.stream:
        import stream as streaming
        make = streaming.make_loader
    common = dict(mean=data.mean, std=data.std, image_size=s.image_size, device=device,
                  memory_format=speed.memory_format(device))
    train = make(*data.train, batch_size=s.batch_size, train=True, seed=s.seed,
                 augment=s.augment, **common)
    # Article: validation in batches of config.BATCH_SIZE; with no backward, larger ones fit.
    evaluation = dict(batch_size=s.eval_batch_size, train=False, **common)
    valid = make(*data.valid, **evaluation) if len(data.valid.labels) else None
    return Loaders(train, valid, make(*data.test, **evaluation))


# ----------------------------------------------------------------------------------------------
# The article's __main__.

def train(args):
    """The data, the model, the optimizer, the loaders and the Trainer, then the epochs and the
    one look at the test set; returns the exit code."""
    out, device = Path(args.out), options.pick_device(args.device)
    checkpoint = saving.begin(out, args.resume)  # a new run's --out, or the run to go on with
    if checkpoint:
        args = options.resumed(args, checkpoint['args'])
    s, run = args, saving.Run(out)  # s: the run's settings, once resolved
    try:
        start = read_start(args)  # weights to start from: read first, so a bad file stops at once
        precision = speed.choose_precision(args.precision, device)
        t0 = time.perf_counter()
        # Article: model, optimizer, criterion and Trainer, then CIFAR-10 at Resize((224, 224)),
        # validated on its test split. Here the data first, at 32 px (config.IMAGE_SIZE): a
        # small folder's batch, lr and epochs come from it. Its validation images are held out.
        data = load_data(args.data, args.image_size, args.valid_split, args.seed, device,
                         args.stream, args.workers)
        s = options.settings(args, len(data.train.labels))
        data = data.normalised(s.normalise)  # Article: raw [0, 1] pixels (data.py)
        print(data.summary(s.image_size, time.perf_counter() - t0))

        torch.manual_seed(s.seed)  # Article: unseeded
        model = build_model(s.model, len(data.classes), s.small_input, s.plain)
        params = start.load(model, data.classes, s.freeze, s.lr) if start else \
            model.parameters()  # groups: the new fc, the rest at a smaller lr; --freeze: the fc
        model = speed.prepare_model(model, device)  # on the device; on the CPU, OnePixelConv2d
        optimizer = build_optimizer(params, s.lr, s.momentum, s.weight_decay, s.nesterov, device)
        loaders = build_loaders(data, s, device)
        trainer = Trainer(model, optimizer, build_criterion(s.label_smoothing), device,
                          precision=precision, flips=s.flips)
        # --minutes times a few steps first, to know the plan's length; that clears the
        # optimizer's state, so a resumed run's states are put back after (run.begin).
        trainer.scheduler = build_schedule(trainer, loaders, s, START + data.download_seconds,
                                           checkpoint)
        run.begin(saving.record(s, data, speed.precision_name(precision), start), checkpoint,
                  model, optimizer, trainer.amp, device)
        # On CUDA, the step replayed as a CUDA graph (a ResNet's); elsewhere it stays.
        trainer.train_step, how = speed.prepare_step(trainer.train_step, model, optimizer,
                                                     trainer.amp, loaders.train, s.model)
        print(options.header(s, device.type, run.record['precision'], how,
                             len(loaders.train), trainer.scheduler.total))
        fit(trainer, loaders, run, s.save_every)
        model.load_state_dict(run.best.params)  # the one test, of the weights validation chose
        _, run.record['test_acc'] = trainer.epoch_valid(loaders.test)
    except (KeyboardInterrupt, FloatingPointError, RuntimeError) as e:
        run.save()  # the best weights so far, if any (the epochs: the last checkpoint's)
        return errors.stopped(e, run.where, out, device.type, s.batch_size, s.image_size, s.lr)
    run.save()
    run.report(trainer.class_accuracy, START)
    return 0


def read_start(args):
    """The weights --pretrained or --init name (transfer.py); None: random, as in the article."""
    if args.pretrained or args.init:
        import transfer
        return transfer.read_start(args.model, args.pretrained, args.init)


def fit(trainer, loaders, run, save_every):
    """The article's loop: train and validate an epoch at a time while the plan has steps left
    (the last epoch may end early), keep a copy of the best weights, and save now and then."""
    schedule, last_save, spent = trainer.scheduler, time.monotonic(), []
    while schedule.steps_left() > 0:  # Article: for epoch in range(1, 1 + config.NUM_EPOCHS)
        t0 = time.perf_counter()
        run.epoch += 1
        run.where = f'in epoch {run.epoch}'
        loaders.train.set_epoch(run.epoch)
        train_loss, train_acc = trainer.epoch_train(schedule.epoch(loaders.train))
        t1 = time.perf_counter()
        valid_loss, valid_acc = (trainer.epoch_valid(loaders.valid) if loaders.valid
                                 else (None, None))  # --valid-split 0: the last epoch is kept
        spent.append(time.perf_counter() - t0)
        row = run.add_epoch(train_loss, train_acc, valid_loss, valid_acc,
                            trainer.optimizer.param_groups[0]['lr'], t1 - t0, spent[-1] - (t1 - t0),
                            schedule.taken, loaders.train.batch_size)
        if run.best is None or valid_acc is None or valid_acc > run.best.valid_acc:
            # Article: it kept `trainer.params`, a live view of the weights, so the "best"
            # weights it would have saved were the last epoch's. Copy them.
            run.best = saving.Best(valid_acc, run.epoch,
                                   {k: v.detach().clone() for k, v in trainer.params.items()})
        print_epoch(row, math.ceil(schedule.total / len(loaders.train)),  # the last may end early
                    schedule.seconds_left(len(loaders.train), sum(spent) / len(spent)))
        # Article: torch.save(best_params, 'weight.pth') once, after the epochs. Here the best
        # weights and the checkpoint every --save-every seconds, for Ctrl-C and --resume.
        if time.monotonic() - last_save >= save_every and schedule.steps_left() > 0:
            run.save(trainer.model, trainer.optimizer, schedule, trainer.amp, trainer.device)
            last_save = time.monotonic()
    run.end_epochs()


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
    return f'{seconds / 60:.0f} min' if seconds >= 90 else f'{max(0, math.ceil(seconds))} s'


def main(argv=None):
    # Article: fp32 matrix products. TF32 ones on GPUs from Ampere on (none on the CPU).
    torch.set_float32_matmul_precision('high')
    # A problem the user can fix (an argument, the data, a file): one sentence.
    return errors.guarded(lambda: train(options.parse_args(argv)))


if __name__ == '__main__':
    sys.exit(main())
