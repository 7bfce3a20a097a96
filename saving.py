"""Saving and loading: the files a run writes beside --out, each replaced in one step.

weight.pth holds the best weights as a plain state_dict, as in the article; weight.json says what
they are (the run's settings, the classes, how to prepare an image) and how good; weight.csv
and weight.png hold the epochs; weight.ckpt holds what --resume needs. One run writes one --out:
weights already there are never overwritten.
"""
import collections
import json
import os
import time
from pathlib import Path

import torch

from errors import UsageError


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


def begin(out, resume=False):
    """Where a run starts: a new one claims --out (its folder is made; one sentence, before any
    work, where weights are there already), and returns None; --resume returns the checkpoint
    beside --out."""
    out = Path(out)
    if resume and not out.with_suffix('.ckpt').exists() and out.exists():
        raise UsageError(f'{out} is a finished run, and nothing is left to resume; a new run '
                         f'needs its own --out')
    if resume:
        return load_checkpoint(out.with_suffix('.ckpt'))
    if out.exists():
        raise UsageError(f'{out} already holds the weights of an earlier run, and a run never '
                         f'overwrites them: pass --out NEW.pth to train anew beside them, or '
                         f'--resume to go on with that run if it was stopped')
    out.parent.mkdir(parents=True, exist_ok=True)
    return None


def record(settings, data, precision, start=None):
    """weight.json: the run's settings, and what predict.py needs to prepare an image for the
    weights (the classes, the held size, the mean and std); the run adds its accuracies."""
    return {'args': settings._asdict(), 'classes': data.classes,
            'held_size': data.train.images.shape[-1], 'mean': data.mean, 'std': data.std,
            'test_images': len(data.test.labels),
            'test_split': data.test_split,
            'data': str(Path(settings.data).resolve()) if settings.data else 'cifar10',
            'start': start.name if start else 'random', 'precision': precision}


# The best weights so far: their validation accuracy (None without validation images: then
# the last epoch's), their epoch, and a copy of them.
Best = collections.namedtuple('Best', 'valid_acc epoch params')


class Run:
    """The files of a run beside `out`, and what goes into them: weight.json's record, the
    epochs so far (history), the best weights so far, the epoch and the steps taken."""

    def __init__(self, out):
        self.out, self.record, self.history, self.best = Path(out), None, [], None
        self.epoch = self.steps = 0
        self.where = 'before the first epoch'  # for what stops the run

    def begin(self, record, checkpoint=None, *states):
        """Start with weight.json's record; resumed, from the checkpoint: its states (model,
        optimizer, scaler, device) put back, its epochs, and the best weights it kept."""
        self.record = record
        if checkpoint:
            resume(checkpoint, *states)
            self.history, self.epoch = checkpoint['history'], checkpoint['epoch']
            self.steps = checkpoint['scheduler']['taken']
            if self.out.exists():  # this run's: --out is its alone
                kept = read_record(self.out)
                self.best = Best(kept['valid_acc'], kept['best_epoch'], load_weights(self.out))
            print(f'resuming after epoch {self.epoch}')

    def add_epoch(self, train_loss, train_acc, valid_loss, valid_acc, lr, train_seconds,
                  valid_seconds, steps, batch_size):
        """The epoch's row of weight.csv, after `steps` training steps in all of `batch_size`
        images (valid_acc None: no validation images)."""
        self.history.append(dict(
            epoch=self.epoch, train_loss=round(train_loss, 4), train_acc=round(train_acc, 2),
            valid_loss=valid_loss and round(valid_loss, 4),
            valid_acc=valid_acc and round(valid_acc, 2), lr=round(lr, 6),
            train_seconds=round(train_seconds, 2), valid_seconds=round(valid_seconds, 2),
            img_per_s=round((steps - self.steps) * batch_size / train_seconds)))
        self.steps = steps
        return self.history[-1]

    def save(self, model=None, optimizer=None, schedule=None, scaler=None, device=None):
        """Write the best weights (if new since the last save) and weight.json; after an
        epoch, given the states, the checkpoint and the epochs (weight.csv, weight.png) too."""
        if self.best is None:
            return
        if self.record.get('best_epoch') != self.best.epoch:
            save_torch(self.best.params, self.out)
        self.record.update(valid_acc=self.best.valid_acc, best_epoch=self.best.epoch,
                           steps=self.steps)
        if model is not None:
            save_torch({'epoch': self.epoch, 'args': self.record['args'],
                        'history': self.history, 'model': model.state_dict(),
                        'optimizer': optimizer.state_dict(), 'scheduler': schedule.state_dict(),
                        'scaler': scaler.state_dict(), 'rng': rng_state(device)},
                       self.out.with_suffix('.ckpt'))
            save_history(self.history, self.out)
        save_text(json.dumps(self.record, indent=1), self.out.with_suffix('.json'))

    def report(self, class_accuracy, start):
        """The run's last lines: per-class test accuracy, then what was kept, and the seconds
        since `start` (a time.monotonic() reading)."""
        best = self.best
        chosen = f'epoch {best.epoch}, ' + (f'chosen by its valid accuracy {best.valid_acc:.2f}%'
                                            if best.valid_acc is not None else
                                            'the last: no validation')
        print(f'per-class test accuracy ({chosen}):')
        print_class_accuracy(self.record['classes'], class_accuracy)
        print(f'done in {time.monotonic() - start:.0f} s: test accuracy '
              f'{self.record["test_acc"]:.2f}% on the {self.record["test_images"]:,} test '
              f'images, measured once ({chosen}); saved to {self.out}')

    def end_epochs(self):
        """The epochs are done: their files; the checkpoint goes, as nothing is left to resume."""
        self.where = 'in the test'
        save_history(self.history, self.out)
        self.save()
        self.out.with_suffix('.ckpt').unlink(missing_ok=True)


def print_class_accuracy(classes, accuracy):
    for name, acc in zip(classes, accuracy):
        print(f'  {name:<{max(map(len, classes))}}  {acc:6.2f}%')


def read_record(weights):
    """weight.json of the weights at path `weights` (record()), as a dict; one sentence when it
    is missing, unreadable or does not say how to prepare an image."""
    path = Path(weights).with_suffix('.json')
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not all(k in record for k in (
            'args', 'classes', 'held_size', 'mean', 'std')):  # to prepare an image for them
        raise UsageError(f'{weights} has no readable {path.name} beside it, which says what the '
                         f'weights are and how to prepare an image (it is missing or '
                         f'unreadable); keep the one train.py wrote with them, or retrain')
    return record


def save_history(history, out):
    """The epochs' rows as weight.csv (a value that is None left empty), and as curves in
    weight.png where matplotlib is."""
    rows = [list(history[0])] + [['' if v is None else v for v in h.values()] for h in history]
    save_text(''.join(','.join(map(str, row)) + '\n' for row in rows), Path(out).with_suffix('.csv'))
    save_plot(history, Path(out).with_suffix('.png'))


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


def load_into(model, state, path, what,
              advice='pass the --model (and --small-input) it was trained with'):
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UsageError(f'{path} does not fit {what}: its tensors have other names or shapes; '
                         f'{advice}') from None


def load_checkpoint(path):
    """The checkpoint at path, with a clear error for a missing, unreadable or incomplete one."""
    if not path.is_file():
        raise UsageError(f'nothing to resume: no checkpoint at {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # truncated, or not a file torch.save wrote
        ckpt = None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in (
            'epoch', 'args', 'history', 'model', 'optimizer', 'scheduler', 'scaler', 'rng')):
        raise UsageError(f'{path} is not a readable checkpoint of train.py (it may be truncated); '
                         f'to start over, move the files beside it away')
    if 'taken' not in ckpt['scheduler']:
        raise UsageError(f'{path} was written by an earlier version of train.py, whose lr '
                         f'schedule this one cannot go on with; its weights still work '
                         f'(predict.py, --init), or train anew with another --out')
    return ckpt


def resume(ckpt, model, optimizer, scaler, device):
    """Put a checkpoint's states back into the run's model, optimizer, loss scaler and random
    generators (its lr schedule: train.build_schedule). The optimizer keeps its own
    implementation (fused or not): a checkpoint written on another device carries that
    device's."""
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    for group in optimizer.param_groups:
        group['fused'] = optimizer.defaults['fused']
        group['foreach'] = optimizer.defaults['foreach']
    scaler.load_state_dict(ckpt['scaler'])
    set_rng_state(ckpt['rng'], device)


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
