"""Train ResNet18 on CIFAR-10 (or on your own image folder) with the article's Trainer.

Mirrors the article's "ResNetを用いた画像認識": the same Trainer with epoch_train and
epoch_valid, then the article's __main__ (data, model, optimizer, epochs), saving the weights of
the epoch best on the validation images to weight.pth and measuring them once on the test set.
Its bugs are fixed, each marked `# Article:`. The data path is data.py, saving and loading
saving.py, and what is there only for speed speed.py.

    python train.py                          # ResNet18, CIFAR-10, 30 epochs
    python train.py --data DIR --epochs 5    # DIR/train/<class>/*, DIR/test/<class>/*
    python train.py --eval weight.pth        # test saved weights: accuracy, confusion, pictures
"""
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

import config
import options
import pictures
import resnet
import saving
import speed
from alexnet import AlexNet
from data import channel_stats, load_cifar10, load_image_folder, make_loader, split_valid, \
    subset
from errors import UsageError


class Trainer:
    """The article's Trainer: epoch_train and epoch_valid run one epoch each and return the
    loss and the accuracy (%); params are the model's weights."""

    def __init__(self, model, optimizer, criterion, device='cpu', scheduler=None,
                 amp_dtype=None):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.criterion = criterion
        self.scheduler = scheduler  # stepped once per batch
        self.amp_dtype = amp_dtype  # autocast to bf16 or fp16 (speed.choose_precision); None: fp32
        # fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=amp_dtype == torch.float16)
        self.progress = sys.stdout.isatty()  # a live progress line on a terminal, none in a log
        self.class_accuracy = None  # per-class accuracy (%) of the last epoch_valid
        self.confusion = None  # and its confusion matrix: counts, true class by predicted
        self.graphed_step = None  # a GraphedStep replaces train_step when set (CUDA only)
        self.autocast_cache = True  # off while a CUDA graph records: graphs cannot use it

    def _autocast(self):
        return speed.autocast(self.device, self.amp_dtype, self.autocast_cache)

    def train_step(self, inputs, targets):
        """One step of the article's loop: forward, loss, backward, SGD update. Returns the
        loss and the outputs."""
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            outputs = self.model(inputs)
            loss = self.criterion(outputs, targets)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, outputs

    def epoch_train(self, train_loader):
        self.model.train()
        # Per-batch losses and predictions stay on the device and are summed once at the end:
        # no per-batch .item() (the GPU never waits for the host) and one kernel a batch.
        losses, predictions, labels = [], [], []
        last_print = time.monotonic()

        step = self.graphed_step or self.train_step  # the article's step, or its CUDA graph
        for batch_idx, (inputs, targets) in enumerate(train_loader):
            inputs = inputs.to(self.device)  # no-ops for train.py's loaders, which batch there
            targets = targets.to(self.device).long()
            loss, outputs = step(inputs, targets)
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
        sizes = [len(t) for t in labels]
        total = sum(sizes)
        weights = torch.tensor(sizes, dtype=torch.float, device=self.device)
        epoch_loss = (torch.stack(losses).float() * weights).sum().item() / total
        correct = (torch.cat(predictions) == torch.cat(labels)).sum().item()
        return epoch_loss, 100 * correct / total

    @torch.no_grad()  # Article: autograd on in validation, storing every activation
    def epoch_valid(self, valid_loader):
        self.model.eval()
        epoch_loss = torch.zeros((), device=self.device)
        confusion = 0  # counts, true class by predicted class: (num_classes, num_classes)

        for inputs, targets in valid_loader:
            inputs = inputs.to(self.device)
            targets = targets.to(self.device).long()
            with self._autocast():
                outputs = self.model(inputs)
            # Article: the mean of batch means, which weighs the short last batch's images more.
            # Here the loss in fp32 (the logits may be bf16 under autocast), summed over samples.
            epoch_loss += self.criterion(outputs.float(), targets) * targets.size(0)
            n = outputs.shape[1]
            confusion = confusion + torch.bincount(targets * n + outputs.argmax(dim=1),
                                                   minlength=n * n).view(n, n)

        self.confusion = confusion.cpu()
        per_class = self.confusion.sum(dim=1)
        total = per_class.sum().item()
        self.class_accuracy = (100 * self.confusion.diag() / per_class.clamp_min(1)).tolist()
        return epoch_loss.item() / total, 100 * self.confusion.diag().sum().item() / total

    @property
    def params(self):
        return self.model.state_dict()  # live tensors: copy before keeping (see train())


# ----------------------------------------------------------------------------------------------
# Building the model, the optimizer and the schedule.

def build_model(name, num_classes, small_input=False, plain=False):
    if name == 'alexnet':
        return AlexNet(in_channels=3, num_classes=num_classes)
    if name in resnet.CIFAR_RESNETS:
        return resnet.CIFAR_RESNETS[name](num_classes, plain=plain)
    return resnet.IMAGENET_RESNETS[name](num_classes, small_input=small_input, plain=plain)


def build_optimizer(model, lr, device, fixes=options.FIXES):
    """SGD with Nesterov momentum and weight decay (config.py); the article's recipe has plain
    momentum and a smaller decay. On CUDA, PyTorch's fused SGD: one kernel updates every
    parameter, where its default (foreach) launches several a step, each also costing the host
    time between two CUDA-graph replays. The update is the same."""
    decay = config.WEIGHT_DECAY if 'decay' in fixes else config.ARTICLE_WEIGHT_DECAY
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=config.MOMENTUM,
                           nesterov='nesterov' in fixes, weight_decay=decay,
                           fused=True if device.type == 'cuda' else None)  # None: the default


def build_criterion(fixes=options.FIXES):
    """The loss of training, and of every evaluation, so that --eval reports the valid loss the
    training log printed: cross-entropy with label smoothing (config.py)."""
    smoothing = config.LABEL_SMOOTHING if 'smoothing' in fixes else 0.0
    return nn.CrossEntropyLoss(label_smoothing=smoothing)


def build_schedule(optimizer, total_steps, fixes=options.FIXES):
    """The lr factor of each step: warm-up, then linear decay to 0 (the article: constant)."""
    factor = warmup_linear(total_steps, config.WARMUP) if 'lr' in fixes else constant
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_linear(total_steps, warmup):
    """lr factor: linear rise over the first `warmup` fraction of steps, then linear to 0."""
    peak = max(1, round(total_steps * warmup))

    def factor(step):
        if step < peak:
            return (step + 1) / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))
    return factor


def constant(step):
    return 1.0


def setup_of(args, classes):
    """What must match for two runs' weights to be compared, or for a run to be resumed."""
    data = str(Path(args.data).resolve()) if args.data else 'cifar10'
    return {'model': args.model, 'small_input': args.small_input, 'plain': args.plain,
            'image_size': args.image_size, 'data': data, 'classes': list(classes),
            'recipe': args.recipe,
            'valid_split': {'fraction': args.valid_split, 'seed': args.seed}}


def load_data(data_dir, args, image_size, device, need_train=True):
    """(train images, train labels, test images, test labels, classes) of an image folder or,
    with no data_dir, of CIFAR-10. Images are uint8 tensors, or data.ImageFiles to stream."""
    if data_dir:
        return load_image_folder(data_dir, image_size, args.workers, need_train, device,
                                 args.stream)
    return load_cifar10(args.data_root)


def print_class_accuracy(classes, accuracy):
    width = max(len(c) for c in classes)
    for name, acc in zip(classes, accuracy):
        print(f'  {name:<{width}}  {acc:6.2f}%')


def evaluate(args, device):
    """--eval PATH: test accuracy and per-class accuracy of saved weights. What weight.json
    says they are (model, image size, data, mean and std) wins over the defaults."""
    path = Path(args.eval)
    amp_dtype = speed.choose_precision(args.precision, device)
    state = saving.load_weights(path)
    meta = saving.read_json(path.with_suffix('.json')) or {}
    model_name = meta.get('model', args.model)
    if model_name not in options.MODELS:
        raise UsageError(f'{path.with_suffix(".json")} names an unknown model {model_name!r}')
    small_input = meta.get('small_input', args.small_input)
    plain = meta.get('plain', args.plain)
    image_size = meta.get('image_size', args.image_size)
    data_dir = args.data or (meta.get('data') if meta.get('data') != 'cifar10' else None)
    if not args.data and data_dir and not Path(data_dir).is_dir():
        raise UsageError(f'{path} was trained on {data_dir}, which is not there any more; '
                         f'pass --data DIR with its test images')
    # The mean and std of the training images: from weight.json, or else from the images.
    have_stats = 'mean' in meta and 'std' in meta
    train_x, _, test_x, test_y, classes = load_data(data_dir, args, image_size, device,
                                                    need_train=not have_stats)
    if 'classes' in meta and meta['classes'] != list(classes):
        raise UsageError(f'{path} was trained on the classes {meta["classes"]}, '
                         f'but the data has {list(classes)}')
    mean, std = (meta['mean'], meta['std']) if have_stats else channel_stats(train_x)

    model = build_model(model_name, len(classes), small_input, plain)
    what = model_name + ' --small-input' * small_input + ' --plain' * plain
    saving.load_into(model, state, path, what)
    criterion = build_criterion(options.fixes_of(meta.get('recipe', 'fixed')))
    trainer = Trainer(speed.prepare_model(model, device), None, criterion, device,
                      amp_dtype=amp_dtype)
    loader = make_loader(test_x, test_y, eval_batch_size(args), mean, std, image_size, False,
                         device, args.workers, memory_format=speed.memory_format(device))
    loss, acc = trainer.epoch_valid(loader)
    print('per-class accuracy:')
    print_class_accuracy(classes, trainer.class_accuracy)
    print('confusion matrix, in images (rows: the true class; columns: the predicted class):')
    print('\n'.join(pictures.confusion_text(trainer.confusion, classes)))
    recorded = meta.get('test_acc')
    print(f'{path}: test accuracy {acc:.2f}% on {len(test_x):,} images ({what}, '
          f'{image_size} px, loss {loss:.3f})' +
          (f'; the run measured {recorded:.2f}%' if recorded is not None else ''))
    for line in pictures.write_eval_files(path, trainer, loader, classes, test_x, test_y):
        print(line)
    return 0


def eval_batch_size(args):
    """Evaluation keeps no activations for a backward, so it takes larger batches; at most
    twice --batch-size, so that a smaller --batch-size also helps when memory runs out."""
    return min(config.EVAL_BATCH_SIZE, 2 * args.batch_size)


def out_of_memory_advice(args, device):
    if args.eval:  # the image size is the one weight.json records
        return (f'the {device.type} ran out of memory evaluating batches of '
                f'{eval_batch_size(args)} images; pass a smaller --batch-size')
    return (f'the {device.type} ran out of memory for batches of {args.batch_size} images at '
            f'{args.image_size} px; pass a smaller --batch-size or --image-size')


def plural(n, one, many):
    """'1 epoch' or '30 epochs'."""
    return f'{n} {one if n == 1 else many}'


# ----------------------------------------------------------------------------------------------
# Training: the article's __main__, in named steps.

def train(args, device):
    """The data, the model, the optimizer and the Trainer, then the epochs (fit)."""
    out = Path(args.out)
    # A checkpoint to resume is read before the data, so that a bad one fails fast.
    ckpt = saving.load_checkpoint(out.with_suffix('.ckpt')) if args.resume else None
    amp_dtype = speed.choose_precision(args.precision, device)
    precision = speed.precision_name(amp_dtype)
    t0 = time.perf_counter()
    train_x, train_y, test_x, test_y, classes = load_data(args.data, args, args.image_size, device)
    # Article: it validated on the test set and kept the epoch best there, so the accuracy it
    # reported was chosen on the images it was measured on. Validation images, held out of the
    # training images, choose here; the test images are measured once, at the end.
    train_idx, valid_idx = split_valid(train_y, args.valid_split, args.seed)
    valid_x, valid_y = subset(train_x, valid_idx), train_y[valid_idx]
    train_x, train_y = subset(train_x, train_idx), train_y[train_idx]
    fixes = options.fixes_of(args.recipe)
    # Article: raw [0, 1] pixels, and no augmentation. The fixes normalise with the training
    # images' statistics, and crop and flip each training image anew each epoch (the loader).
    mean, std = (channel_stats(train_x, workers=args.workers or os.cpu_count() or 1)
                 if 'norm' in fixes else ([0.0] * 3, [1.0] * 3))
    timings = {'loading data': time.perf_counter() - t0}
    print(f'{len(train_x):,} train, {len(valid_x):,} valid and {len(test_x):,} test images, '
          f'{len(classes)} classes, '
          f'held at {train_x.shape[-1]} px, fed at {args.image_size} px; '
          f'mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]} '
          f'({timings["loading data"]:.1f} s)')
    info = {'mean': mean, 'std': std, 'held_size': train_x.shape[-1], 'epochs': args.epochs,
            'precision': precision}  # also in weight.json: how predict.py prepares an image
    setup = setup_of(args, classes)
    if ckpt:
        saving.check_same_run(ckpt, args, setup, precision)
    files = saving.RunFiles(out, setup, info, args.resume)

    torch.manual_seed(args.seed)
    model = build_model(args.model, len(classes), args.small_input, args.plain)
    model = speed.prepare_model(model, device)
    # Article: plain SGD at lr 0.001 with no schedule (README, "What the recipe buys").
    optimizer = build_optimizer(model, args.lr, device, fixes)
    # Article: PIL decoded and resized every image in every epoch. Here each is decoded once,
    # and the loaders crop, flip and normalise whole batches on the device (data.py).
    common = dict(device=device, workers=args.workers, memory_format=speed.memory_format(device))
    train_loader = make_loader(train_x, train_y, args.batch_size, mean, std, args.image_size,
                               True, seed=args.seed, augment='augment' in fixes, **common)
    valid_loader, test_loader = (
        make_loader(x, y, eval_batch_size(args), mean, std, args.image_size, False, **common)
        if len(x) else None for x, y in ((valid_x, valid_y), (test_x, test_y)))
    scheduler = build_schedule(optimizer, args.epochs * len(train_loader), fixes)
    trainer = Trainer(model, optimizer, build_criterion(fixes), device, scheduler, amp_dtype)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # time cuDNN's algorithms once per shape

    history, start = saving.resume(trainer, ckpt, args, files) if ckpt else ([], 1)
    if start > args.epochs:
        return 0
    launch = ''
    if speed.use_cuda_graphs(args, device):
        t0 = time.perf_counter()
        launch = ', ' + speed.record_graphs(trainer, train_loader, args.graph_whole_step)
        timings['recording CUDA graphs'] = time.perf_counter() - t0
    recipe = '' if args.recipe == 'fixed' else f', the recipe {args.recipe}'
    print(f'{describe(args)}, {device.type}, {precision}{launch}{recipe}, '
          f'{plural(args.epochs, "epoch", "epochs")} of '
          f'{plural(len(train_loader), "batch", "batches")} of '
          f'{args.batch_size}, peak lr {args.lr}')
    out.parent.mkdir(parents=True, exist_ok=True)
    return fit(trainer, (train_loader, valid_loader, test_loader), args, files, history, start,
               timings)


def describe(args):
    """'resnet18', 'resnet18 (small input)', 'resnet56 (plain)': the network, for the log."""
    kinds = [k for k, on in (('small input', args.small_input), ('plain', args.plain)) if on]
    return args.model + (f' ({", ".join(kinds)})' if kinds else '')


class Best(NamedTuple):
    """This run's chosen epoch: its validation accuracy (None without validation), its number
    and a copy of its weights."""
    valid_acc: Optional[float]
    epoch: int
    params: dict


def fit(trainer, loaders, args, files, history, start, timings):
    """The article's epoch loop: train, validate, keep the best weights, print a line; then
    measure the chosen weights once on the test set. The files are written every --save-every
    seconds and at the end; Ctrl-C, a NaN loss or running out of memory stops the run and
    keeps the best weights so far."""
    train_loader, valid_loader, test_loader = loaders
    timings.update({'training': 0.0, 'evaluating': 0.0})
    best = Best(files.valid_acc, files.best_epoch, saving.load_weights(files.out)) \
        if files.improved else None  # resumed: what the epochs before chose
    epoch, last_save = start - 1, time.monotonic()
    try:
        for epoch in range(start, args.epochs + 1):
            t0 = time.perf_counter()
            train_loader.set_epoch(epoch)
            train_loss, train_acc = trainer.epoch_train(train_loader)
            train_time = time.perf_counter() - t0
            timings['training'] += train_time
            if not math.isfinite(train_loss):
                return stop(files, f'the loss became {train_loss} in epoch {epoch}', 1,
                            f'try a lower --lr than {args.lr}')
            valid_loss, valid_acc = (trainer.epoch_valid(valid_loader) if valid_loader
                                     else (None, None))  # --valid-split 0: the last epoch wins
            seconds = time.perf_counter() - t0
            timings['evaluating'] += seconds - train_time

            if best is None or valid_acc is None or valid_acc > best.valid_acc:
                # Article: it kept `trainer.params`, a live view of the weights, so the "best"
                # weights it saved were the last epoch's. Copy them.
                best = Best(valid_acc, epoch,
                            {k: v.detach().clone() for k, v in trainer.params.items()})
                files.offer(best.params, valid_acc, epoch)
            history.append(epoch_record(epoch, train_loss, train_acc, valid_loss, valid_acc,
                                        trainer, seconds, len(train_loader) * args.batch_size
                                        / train_time))
            print_epoch(history[-1], args.epochs)
            if epoch == args.epochs or time.monotonic() - last_save >= args.save_every:
                files.save(saving.checkpoint(trainer, epoch, args, files, history))
                last_save = time.monotonic()
        t0 = time.perf_counter()
        test_acc = test_once(trainer, test_loader, best, files)
        timings['testing'] = time.perf_counter() - t0
    except KeyboardInterrupt:
        return stop(files, f'interrupted in epoch {epoch}', 130)
    except Exception as e:
        if not out_of_memory(e):
            raise
        return stop(files, f'in epoch {epoch}, {out_of_memory_advice(args, trainer.device)}', 1)
    report(files, best, trainer.class_accuracy, test_acc, len(test_loader.labels),
           {**timings, 'saving': files.seconds})
    return 0


def epoch_record(epoch, train_loss, train_acc, valid_loss, valid_acc, trainer, seconds,
                 img_per_s):
    """One epoch's line of weight.csv (valid_* empty without validation)."""
    return {'epoch': epoch, 'train_loss': round(train_loss, 4), 'train_acc': round(train_acc, 2),
            'valid_loss': valid_loss and round(valid_loss, 4),
            'valid_acc': valid_acc and round(valid_acc, 2),
            'lr': round(trainer.optimizer.param_groups[0]['lr'], 6),
            'seconds': round(seconds, 2), 'img_per_s': round(img_per_s)}


def test_once(trainer, test_loader, best, files):
    """The test accuracy of the weights the run chose, the one look at the test set; recorded
    in weight.json when they are the weights kept there."""
    trainer.model.load_state_dict(best.params)
    _, test_acc = trainer.epoch_valid(test_loader)
    if files.improved:
        files.record_test(test_acc)
    return test_acc


def stop(files, what, code, advice=None):
    """End the run early: write the best weights so far, say what happened and where they are
    (and how to go on), and return the exit code."""
    files.save()
    kept = (f'the best weights so far are in {files.out} (test them: python train.py --eval '
            f'{files.out})' if files.out.exists() else
            'no epoch had finished, so no weights were saved')
    if files.ckpt.exists():
        advice = (advice + '; then' if advice else 'to continue:') + \
            ' python train.py --resume with the same arguments'
    print(f'\n{"error: " * (code != 130)}{what}; {kept}{"; " + advice if advice else ""}',
          file=sys.stderr)
    return code


def out_of_memory(e):
    """Whether e is torch running out of memory: on a GPU (torch.cuda.OutOfMemoryError), on
    Apple's mps or in the CPU's allocator (a RuntimeError that says so)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or isinstance(e, RuntimeError) and any(
        s in str(e) for s in ('out of memory', "can't allocate memory", 'not enough memory'))


def print_epoch(h, epochs):
    # Article: it printed {num_epochs}, a name it never defined: NameError in epoch 1.
    valid = (f'valid loss {h["valid_loss"]:.3f} acc {h["valid_acc"]:5.2f}%'
             if h['valid_acc'] is not None else 'no validation')
    print(f'epoch {h["epoch"]:>{len(str(epochs))}}/{epochs}  '
          f'train loss {h["train_loss"]:.3f} acc {h["train_acc"]:5.2f}%  {valid}  '
          f'lr {h["lr"]:.4f}  {h["seconds"]:5.1f}s  {h["img_per_s"]:,} img/s', flush=True)


def report(files, best, class_accuracy, test_acc, n_test, timings):
    """The run's last lines: per-class test accuracy, where the time went, and what was
    measured and saved."""
    chosen = (f'epoch {best.epoch}, chosen by its valid accuracy {best.valid_acc:.2f}%'
              if best.valid_acc is not None else f'epoch {best.epoch}, the last: no validation')
    print(f'per-class test accuracy ({chosen}):')
    print_class_accuracy(files.setup['classes'], class_accuracy)
    # The rest of the wall time is start-up (imports, CUDA, the model and optimizer) and exit.
    print('seconds: ' + ', '.join(f'{name} {s:.1f}' for name, s in timings.items()))
    measured = f'test accuracy {test_acc:.2f}% on the {n_test:,} test images, measured once'
    if files.improved:
        print(f'done: {measured} ({chosen}); saved to {files.out}')
    else:
        print(f'done: {measured} ({chosen}); it did not beat the valid accuracy '
              f'{files.valid_acc:.2f}% (epoch {files.best_epoch}) of the weights already in '
              f'{files.out}, which are kept')


def main(argv=None):
    args = options.parse_args(argv)
    device = torch.device('cpu')
    try:
        torch.set_float32_matmul_precision('high')  # TF32 on Ampere and later; no-op on CPU
        options.check_args(args)
        device = options.pick_device(args.device)
        if args.eval:
            return evaluate(args, device)
        return train(args, device)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while loading data: nothing written yet
        print('\ninterrupted before training started; nothing was written', file=sys.stderr)
        return 130
    except Exception as e:  # while loading, recording CUDA graphs or evaluating
        if not out_of_memory(e):
            raise
        print(f'error: {out_of_memory_advice(args, device)}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
