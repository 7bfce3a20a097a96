"""Saving and loading: the files a run writes beside --out, each replaced in one step.

weight.pth holds the best weights as a plain state_dict, as in the article; weight.json says what
they are (model, classes, image size, mean and std, accuracy); weight.csv and weight.png hold the
history; weight.ckpt holds what --resume needs.
"""
import csv
import io
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


class RunFiles:
    """The files of one training run, beside `out`, and the validation accuracy they hold.

    A good weight.pth is only ever replaced by weights of the same setup that are better on the
    validation images: the weights already at `out`, if any, set the accuracy to beat, and
    weights of another setup, or whose weight.json is gone, stop the run before anything is
    written. The test accuracy is recorded once, at the end, and chooses nothing.
    """

    def __init__(self, out, setup, info, resume=False):
        self.out = Path(out)
        self.json, self.ckpt = self.out.with_suffix('.json'), self.out.with_suffix('.ckpt')
        self.setup = setup  # what must match to compare or resume: model, data, split, ...
        self.info = info  # also written to weight.json: mean, std, epochs
        self.valid_acc, self.best_epoch = -1.0, 0  # of the weights in out (None: no validation)
        self.test_acc = None  # of the weights in out, once measured
        self.best_params = None  # best weights not yet written
        self.improved = False  # whether this run replaced the weights in out
        self.seconds = 0.0  # spent writing
        if self.out.exists():
            self._read_previous(resume)

    def _read_previous(self, resume):
        prev = read_json(self.json)
        acc = prev.get('valid_acc', 'missing') if prev else 'missing'
        if not (acc is None or isinstance(acc, (int, float))):
            raise UsageError(f'{self.out} already holds weights, but {self.json}, which says what '
                             f'they are and how good, is missing or unreadable; pass --out NEW.pth '
                             f'to write elsewhere, or move {self.out} away')
        if {k: prev.get(k) for k in self.setup} != self.setup:
            raise UsageError(f'{self.out} already holds weights of another setup; pass --out '
                             f'NEW.pth to write elsewhere, or move {self.out} away')
        self.valid_acc, self.best_epoch = acc, prev.get('best_epoch', 0)
        self.test_acc = prev.get('test_acc')
        if resume:
            return
        if acc is None:
            raise UsageError(f'{self.out} already holds weights of a run without validation '
                             f'images, and only the test set could tell whether this run does '
                             f'better; pass --out NEW.pth to write elsewhere, or move {self.out} '
                             f'away')
        print(f'{self.out} exists (valid accuracy {acc:.2f}%); this run replaces it only with '
              f'weights better on the validation images')

    def offer(self, params, acc, epoch):
        """Keep params (a copy, not the live state_dict) to write at the next save if their
        validation accuracy beats the weights in out; acc None (no validation): always."""
        if acc is not None and self.valid_acc is not None and acc <= self.valid_acc:
            return
        self.best_params, self.valid_acc, self.best_epoch = params, acc, epoch
        self.test_acc = None
        self.improved = True

    def record_test(self, acc):
        """The test accuracy of the weights in out, measured once after the run chose them."""
        self.test_acc = acc
        self._write_json()

    def _write_json(self):
        save_text(json.dumps({**self.setup, **self.info, 'valid_acc': self.valid_acc,
                              'best_epoch': self.best_epoch, 'test_acc': self.test_acc},
                             indent=1), self.json)

    def save(self, checkpoint=None):
        """Write the best weights, if new, and after a completed epoch its checkpoint (with the
        history, as CSV and as a plot)."""
        t = time.perf_counter()
        if self.best_params is not None:
            save_torch(self.best_params, self.out)
            self._write_json()
            self.best_params = None
        if checkpoint is not None:
            save_torch(checkpoint, self.ckpt)
            save_text(history_csv(checkpoint['history']), self.out.with_suffix('.csv'))
            save_plot(checkpoint['history'], self.out.with_suffix('.png'))
        self.seconds += time.perf_counter() - t


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
                   'batch_size', 'precision', 'setup', 'history', 'improved')


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


def check_same_run(ckpt, args, setup, precision):
    """Stop unless the checkpoint is of the run these arguments describe."""
    was_precision = ckpt['precision']
    if ckpt['setup'] != setup or ckpt['epochs'] != args.epochs \
            or ckpt['batch_size'] != args.batch_size or was_precision != precision:
        was = ckpt['setup']
        raise UsageError(f'the checkpoint beside {args.out} is from another run (--epochs '
                         f'{ckpt["epochs"]} --batch-size {ckpt["batch_size"]} --precision '
                         f'{was_precision} --model {was["model"]}'
                         f'{" --small-input" if was["small_input"] else ""}'
                         f'{" --plain" if was["plain"] else ""} --image-size '
                         f'{was["image_size"]} --recipe {was["recipe"]} --valid-split '
                         f'{was["valid_split"]["fraction"]} --seed {was["valid_split"]["seed"]}); '
                         f'resume it with the same arguments')


def resume(trainer, ckpt, args, files):
    """Load an interrupted run's checkpoint into trainer; return its history and next epoch."""
    trainer.model.load_state_dict(ckpt['model'])
    load_optimizer_state(trainer.optimizer, ckpt['optimizer'])
    trainer.scheduler.load_state_dict(ckpt['scheduler'])
    trainer.scaler.load_state_dict(ckpt['scaler'])
    set_rng_state(ckpt['rng'], trainer.device)
    files.improved = ckpt['improved']  # whether the epochs before replaced the weights in out
    if ckpt['epoch'] >= args.epochs:
        print(f'{files.ckpt}: that run already finished (epoch {args.epochs} of {args.epochs})')
    else:
        print(f'resuming from epoch {ckpt["epoch"]} of {args.epochs}')
    return ckpt['history'], ckpt['epoch'] + 1


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
    if not isinstance(state, dict):  # a checkpoint of before, with the CPU's state alone
        state = {'cpu': state}
    torch.set_rng_state(state['cpu'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)
    elif device.type == 'mps' and 'mps' in state:
        torch.mps.set_rng_state(state['mps'])


def checkpoint(trainer, epoch, args, files, history):
    """What --resume needs to go on after `epoch` as if the run had never stopped."""
    return {'model': trainer.model.state_dict(), 'optimizer': trainer.optimizer.state_dict(),
            'scheduler': trainer.scheduler.state_dict(), 'scaler': trainer.scaler.state_dict(),
            'rng': rng_state(trainer.device), 'epoch': epoch, 'epochs': args.epochs,
            'batch_size': args.batch_size, 'precision': files.info['precision'],
            'setup': files.setup, 'history': history, 'improved': files.improved}
