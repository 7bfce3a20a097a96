"""Saving and loading: the files a run writes beside --out, each replaced in one step.

weight.pth holds the best weights as a plain state_dict, as in the article; weight.json, their
WeightRecord, says what they are (model, classes, how to prepare an image, accuracy); weight.csv
and weight.png hold the history; weight.ckpt holds what --resume needs. Run keeps a training run's
files and stops it cleanly on Ctrl-C, a diverging loss or running out of memory.
"""
import csv
import io
import json
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple, Optional

import torch

import options
import speed
from errors import UsageError, out_of_memory


def atomic_write(path, write):
    """Call write(f) on a temporary file beside path, then rename it over path."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_torch(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_text(text, path):
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path):
    """The JSON object in path, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def history_csv(history):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]) if history else ['epoch'])
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def save_plot(history, path):
    """Loss and accuracy curves, when matplotlib happens to be installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [h['epoch'] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ('train', 'valid'):
        if history[0][f'{split}_acc'] is None:  # --valid-split 0: nothing was validated
            continue
        ax1.plot(epochs, [h[f'{split}_loss'] for h in history], label=split)
        ax2.plot(epochs, [h[f'{split}_acc'] for h in history], label=split)
    ax1.set(xlabel='epoch', ylabel='loss')
    ax2.set(xlabel='epoch', ylabel='accuracy (%)')
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)


# What must match for two runs' weights to be compared on their validation accuracy, and what
# a weight file must say for an image to be prepared for it.
SETUP = ('model', 'small_input', 'plain', 'image_size', 'data', 'classes', 'recipe',
         'valid_split')
NEEDED = ('model', 'classes', 'image_size', 'held_size', 'mean', 'std')


@dataclass
class WeightRecord:
    """What a weight file is: weight.json beside weight.pth. Its SETUP, how to prepare an image
    for it (held_size, image_size, mean, std), what training started from (random weights,
    torchvision's ImageNet weights or an --init file) and how good it is."""
    model: str
    classes: list
    image_size: int
    mean: list
    std: list
    small_input: bool = False
    plain: bool = False
    data: str = 'cifar10'
    recipe: str = 'fixed'
    valid_split: Optional[dict] = None  # {'fraction', 'seed'}
    held_size: Optional[int] = None  # the side images are held at (decoded), before any resize
    start: str = 'random'  # 'random', 'imagenet <weights>' or 'init <path>'
    freeze: bool = False  # only the fc trained
    run: Optional[str] = None  # which run wrote the weights: --resume knows its own by it
    epochs: Optional[int] = None
    precision: Optional[str] = None
    valid_acc: Optional[float] = None  # None: no validation (the last epoch was kept)
    best_epoch: int = 0
    test_acc: Optional[float] = None  # measured once, after the run chose these weights

    @classmethod
    def of_run(cls, args, classes, mean, std, held_size, precision, start):
        """The record of a training run's weights, before any epoch."""
        return cls(model=args.model, classes=list(classes), image_size=args.image_size,
                   mean=mean, std=std, small_input=args.small_input, plain=args.plain,
                   data=str(Path(args.data).resolve()) if args.data else 'cifar10',
                   recipe=args.recipe, valid_split={'fraction': args.valid_split,
                                                    'seed': args.seed},
                   held_size=held_size, start=start, freeze=args.freeze, epochs=args.epochs,
                   precision=speed.precision_name(precision))

    def setup(self):
        return {k: getattr(self, k) for k in SETUP}

    def write(self, path):
        save_text(json.dumps(asdict(self), indent=1), path)


def read_record(weights):
    """The WeightRecord of the weights at path `weights`, from the .json beside them; one
    sentence when it is missing, unreadable or does not say how to prepare an image."""
    path = Path(weights).with_suffix('.json')
    data = read_json(path)
    if data is None or not all(k in data for k in NEEDED):
        raise UsageError(f'{weights} has no readable {path.name} beside it, which says what the '
                         f'weights are and how to prepare an image (it is missing or '
                         f'unreadable); keep the one train.py wrote with them, or retrain')
    known = {f.name for f in fields(WeightRecord)}
    return WeightRecord(**{k: v for k, v in data.items() if k in known})


class Best(NamedTuple):
    """The best weights known: their validation accuracy (None without validation), their
    epoch, and a copy of them; params None: the weights already in --out, from an earlier run."""
    valid_acc: Optional[float]
    epoch: int
    params: Optional[dict]


class Diverged(Exception):
    """The training loss is no longer a number; `advice` says what to change."""

    def __init__(self, what, advice):
        super().__init__(what)
        self.advice = advice


def epoch_row(epoch, train_loss, train_acc, valid_loss, valid_acc, lr, seconds, img_per_s):
    """One epoch's line of weight.csv (valid_* None without validation)."""
    return {'epoch': epoch, 'train_loss': round(train_loss, 4), 'train_acc': round(train_acc, 2),
            'valid_loss': valid_loss and round(valid_loss, 4),
            'valid_acc': valid_acc and round(valid_acc, 2), 'lr': round(lr, 6),
            'seconds': round(seconds, 2), 'img_per_s': round(img_per_s)}


TIMINGS = ('loading data', 'recording CUDA graphs', 'training', 'evaluating', 'testing', 'saving')


def out_of_memory_advice(args, device='cpu'):
    """What ran out of memory, and what to pass: for --eval, its batches' size."""
    if args.eval:
        return (f'the {device} ran out of memory evaluating batches of '
                f'{options.eval_batch_size(args.batch_size)} images; pass a smaller --batch-size')
    return (f'the {device} ran out of memory for batches of {args.batch_size or "the default"} '
            f'images at {args.image_size or options.default_image_size(args)} px; pass a smaller '
            f'--batch-size or --image-size')


class Run:
    """A training run's files beside --out and its best weights; `with run:` guards the epochs.

    The best weights are the best known on the validation images: those already in --out (an
    earlier run of the same setup) or this run's, so a good weight.pth is replaced only by
    better weights. Files are written every --save-every seconds and after the last epoch. In
    `with run:`, Ctrl-C, Diverged or running out of memory ends the run: the best weights so far
    are written, one line says what happened, and run.exit_code is set.
    """

    def __init__(self, trainer, record, args, checkpoint=None, timings=None):
        self.trainer, self.record, self.args = trainer, record, args
        self.out = Path(args.out)
        self.json, self.ckpt = self.out.with_suffix('.json'), self.out.with_suffix('.ckpt')
        self.best, self.unsaved = None, False  # unsaved: best.params not yet written to out
        self.history, self.start, self.epoch = [], 1, 0
        self.timings = dict(timings or {})  # seconds spent, by what on
        self.exit_code, self.last_save = 0, time.monotonic()
        self.record.run = checkpoint['record']['run'] if checkpoint else uuid.uuid4().hex[:12]
        self.previous_run = None  # which run wrote the weights already in --out
        if checkpoint is not None:
            self._check_same_run(checkpoint)
        if self.out.exists():
            self._read_previous(resume=checkpoint is not None)
        if checkpoint is not None:
            self._resume(checkpoint)
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def _read_previous(self, resume):
        try:
            prev = read_record(self.out)
        except UsageError:
            raise UsageError(f'{self.out} already holds weights, but {self.json}, which says what '
                             f'they are and how good, is missing or unreadable; pass --out NEW.pth '
                             f'to write elsewhere, or move {self.out} away') from None
        if prev.setup() != self.record.setup():
            raise UsageError(f'{self.out} already holds weights of another setup; pass --out '
                             f'NEW.pth to write elsewhere, or move {self.out} away')
        acc, self.previous_run = prev.valid_acc, prev.run
        self.best = Best(acc, prev.best_epoch, None)
        self.record.test_acc = prev.test_acc  # of those weights, for the report
        if resume:
            return
        if acc is None:
            raise UsageError(f'{self.out} already holds weights of a run without validation '
                             f'images, and only the test set could tell whether this run does '
                             f'better; pass --out NEW.pth to write elsewhere, or move {self.out} '
                             f'away')
        print(f'{self.out} exists (valid accuracy {acc:.2f}%); this run replaces it only with '
              f'weights better on the validation images')

    def is_better(self, valid_acc):
        """Whether weights of this validation accuracy beat the best known (None: always)."""
        return self.best is None or valid_acc is None or valid_acc > self.best.valid_acc

    def keep(self, epoch, valid_acc, params):
        """The new best weights (a copy, not the live state_dict), written at the next save."""
        self.best, self.unsaved = Best(valid_acc, epoch, params), True
        self.record.test_acc = None  # not yet measured

    def end_epoch(self, row, train_seconds):
        """Add the epoch's row (epoch_row) to the history; write the files every --save-every
        seconds and after the last epoch."""
        self.history.append(row)
        self.timings['training'] = self.timings.get('training', 0.0) + train_seconds
        self.timings['evaluating'] = (self.timings.get('evaluating', 0.0) + row['seconds']
                                      - train_seconds)
        if row['epoch'] == self.args.epochs or \
                time.monotonic() - self.last_save >= self.args.save_every:
            self.save(with_checkpoint=True)
            self.last_save = time.monotonic()

    def record_test(self, test_acc, seconds):
        """The test accuracy of this run's best weights, measured once, into weight.json."""
        self.record.test_acc = test_acc
        self.timings['testing'] = seconds
        self.save()

    def save(self, with_checkpoint=False):
        """Write the best weights, if new, with weight.json; and the checkpoint, with the
        history as CSV and as a plot when the weights are this run's."""
        t = time.perf_counter()
        if self.unsaved:
            save_torch(self.best.params, self.out)
            self.unsaved = False
        if self.best is not None and self.best.params is not None:
            self.record.valid_acc, self.record.best_epoch = self.best.valid_acc, self.best.epoch
            self.record.write(self.json)
        if with_checkpoint and self.history:
            save_torch(self.checkpoint(), self.ckpt)
        if with_checkpoint and self.history and self.best and self.best.params is not None:
            # The history beside the weights is theirs: not written while an earlier run's stay.
            save_text(history_csv(self.history), self.out.with_suffix('.csv'))
            save_plot(self.history, self.out.with_suffix('.png'))
        self.timings['saving'] = self.timings.get('saving', 0.0) + time.perf_counter() - t

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            return False
        if issubclass(kind, KeyboardInterrupt):
            self._stop(f'interrupted in epoch {self.epoch}', 130)
        elif issubclass(kind, Diverged):
            self._stop(f'error: {error}', 1, error.advice)
        elif out_of_memory(error):
            advice = out_of_memory_advice(self.args, self.trainer.device.type)
            self._stop(f'error: in epoch {self.epoch}, {advice}', 1)
        else:
            return False
        return True  # handled: the run ends with exit_code

    def _stop(self, what, code, advice=None):
        """Write the best weights so far and say what happened, where they are and how to go
        on."""
        self.save()
        kept = (f'the best weights so far are in {self.out} (test them: python train.py --eval '
                f'{self.out})' if self.out.exists() else
                'no epoch had finished, so no weights were saved')
        if self.ckpt.exists():
            advice = (advice + '; then' if advice else 'to continue:') + \
                ' python train.py --resume with the same arguments'
        print(f'\n{what}; {kept}{"; " + advice if advice else ""}', file=sys.stderr)
        self.exit_code = code

    def report(self, class_accuracy, n_test):
        """The run's last lines: per-class test accuracy, where the time went, and what was
        measured and saved."""
        best, record = self.best, self.record
        chosen = (f'epoch {best.epoch}, chosen by its valid accuracy {best.valid_acc:.2f}%'
                  if best.valid_acc is not None else f'epoch {best.epoch}, the last: no validation')
        if best.params is not None:
            print(f'per-class test accuracy ({chosen}):')
            print_class_accuracy(record.classes, class_accuracy)
        # The rest of the wall time is start-up (imports, CUDA, the model and optimizer) and exit.
        print('seconds: ' + ', '.join(f'{name} {self.timings[name]:.1f}' for name in TIMINGS
                                      if name in self.timings))
        if best.params is None:
            tested = ('not measured' if record.test_acc is None else
                      f'test accuracy {record.test_acc:.2f}% measured then')
            print(f'done: no epoch beat the weights already in {self.out} ({chosen}, {tested}), '
                  f'which are kept; the test images were not looked at')
            return
        print(f'done: test accuracy {record.test_acc:.2f}% on the {n_test:,} test images, '
              f'measured once ({chosen}); saved to {self.out}')

    def checkpoint(self):
        """What --resume needs to go on after this epoch as if the run had never stopped."""
        trainer = self.trainer
        return {'model': trainer.model.state_dict(), 'optimizer': trainer.optimizer.state_dict(),
                'scheduler': trainer.scheduler.state_dict(), 'scaler': trainer.amp.state_dict(),
                'rng': rng_state(trainer.device), 'epoch': self.history[-1]['epoch'],
                'epochs': self.args.epochs, 'batch_size': self.args.batch_size,
                'record': asdict(self.record), 'history': self.history}

    def _check_same_run(self, ckpt):
        """Stop unless the checkpoint is of the run these arguments describe."""
        was, now, args = ckpt['record'], self.record, self.args
        same = ({k: was[k] for k in SETUP} == now.setup() and ckpt['epochs'] == args.epochs
                and ckpt['batch_size'] == args.batch_size and was['precision'] == now.precision
                and (was['start'], was['freeze']) == (now.start, now.freeze))
        if not same:
            raise UsageError(
                f'the checkpoint beside {self.out} is from another run (--epochs '
                f'{ckpt["epochs"]} --batch-size {ckpt["batch_size"]} --precision '
                f'{was["precision"]} --model {was["model"]}'
                f'{" --small-input" * was["small_input"]}{" --plain" * was["plain"]} '
                f'--image-size {was["image_size"]} --recipe {was["recipe"]} --valid-split '
                f'{was["valid_split"]["fraction"]} --seed {was["valid_split"]["seed"]}, starting '
                f'from {was["start"]}{", frozen" * was["freeze"]}); resume it with the same '
                f'arguments')

    def _resume(self, ckpt):
        """Load an interrupted run's checkpoint into the trainer: its history and next epoch."""
        trainer = self.trainer
        trainer.model.load_state_dict(ckpt['model'])
        load_optimizer_state(trainer.optimizer, ckpt['optimizer'])
        trainer.scheduler.load_state_dict(ckpt['scheduler'])
        trainer.amp.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt['rng'], trainer.device)
        if self.best is not None and self.previous_run == self.record.run:
            # The weights in --out are this run's best so far (perhaps of a later epoch than
            # the checkpoint's, written when it stopped): they stay its best, to be tested.
            self.best = self.best._replace(params=load_weights(self.out))
        self.history, self.start = ckpt['history'], ckpt['epoch'] + 1
        self.epoch = ckpt['epoch']
        if ckpt['epoch'] >= self.args.epochs:
            print(f'{self.ckpt}: that run already finished (epoch {self.args.epochs} of '
                  f'{self.args.epochs})')
        else:
            print(f'resuming from epoch {ckpt["epoch"]} of {self.args.epochs}')


def print_class_accuracy(classes, accuracy):
    width = max(len(c) for c in classes)
    for name, acc in zip(classes, accuracy):
        print(f'  {name:<{width}}  {acc:6.2f}%')


def load_weights(path):
    """A state_dict from path, with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f'no weight file at {path}; train one with python train.py first')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UsageError(f'{path} is not a readable weight file ({type(e).__name__}); it may be '
                         f'truncated or not a state_dict: retrain, or pick another file') from None
    if not isinstance(state, dict):
        raise UsageError(f'{path} holds a {type(state).__name__}, not a state_dict')
    return state


CHECKPOINT_KEYS = ('model', 'optimizer', 'scheduler', 'scaler', 'rng', 'epoch', 'epochs',
                   'batch_size', 'record', 'history')


def load_checkpoint(path):
    """The resume checkpoint at path (train() writes it), with a clear error for a missing,
    unreadable or incomplete file."""
    if not path.is_file():
        raise UsageError(f'nothing to resume: no checkpoint at {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # truncated, or not a file torch.save wrote
        ckpt = None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
        raise UsageError(f'{path} is not a readable checkpoint of train.py (it may be truncated); '
                         f'run again without --resume to start over (the best weights beside it '
                         f'are replaced only by better ones)')
    return ckpt


def load_into(model, state, path, what,
              advice='pass the --model (and --small-input) it was trained with'):
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UsageError(f'{path} does not fit {what}: its tensors have other names or shapes; '
                         f'{advice}') from None


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict(state), but keeping the optimizer's own implementation (fused
    or not): a checkpoint written on another device carries that device's."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group['fused'] = optimizer.defaults['fused']
        group['foreach'] = optimizer.defaults['foreach']


def rng_state(device):
    """The random number generators' states that training draws from (dropout, for one): the
    CPU's, and the GPU's or the Apple GPU's where it trains there."""
    state = {'cpu': torch.get_rng_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    elif device.type == 'mps':
        state['mps'] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state['cpu'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)
    elif device.type == 'mps' and 'mps' in state:
        torch.mps.set_rng_state(state['mps'])
