"""What the scripts say instead of a traceback: a problem the user can fix, and what stopped a
run (Ctrl-C, a loss that is no longer a number, running out of memory), each in one sentence."""
import sys
from pathlib import Path

import torch


class UsageError(Exception):
    """A problem the user can fix (arguments, data, files): one sentence, exit code 2."""


def out_of_memory(e):
    """Whether e is torch running out of memory: on a GPU (torch.cuda.OutOfMemoryError), on
    Apple's mps or in the CPU's allocator (a RuntimeError that says so)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or isinstance(e, RuntimeError) and any(
        s in str(e) for s in ('out of memory', "can't allocate memory", 'not enough memory'))


def stopped(e, where='', out=None, device='device', batch_size=None, image_size=None, lr=None):
    """Say what stopped the run `where` ('in epoch 3'), what it kept at `out` and what to do,
    on stderr; return the exit code (130 for Ctrl-C, else 1). Any other error is raised."""
    if isinstance(e, KeyboardInterrupt):
        what = f'interrupted {where}'.strip()
    elif isinstance(e, FloatingPointError):
        what = f'error: the loss became {e} {where}; try a lower --lr than {lr}'
    elif out_of_memory(e):
        images = f'{batch_size or "the default number of"} images' + \
            f' at {image_size} px' * bool(image_size)
        what = (f'error: {where + ", " if where else ""}the {device} ran out of memory for '
                f'batches of {images}; pass a smaller --batch-size' +
                ' or --image-size' * bool(image_size))
    else:
        raise e
    if out and Path(out).exists():
        what += f'; the best weights so far are in {out}'
        if not isinstance(e, KeyboardInterrupt):
            what += '; a new run needs its own --out'
        elif where == 'in the test':
            what += f'; to test them: python predict.py --test --weights {out}'
        elif Path(out).with_suffix('.ckpt').exists():
            what += f'; to go on: python train.py --resume --out {out}'
    elif out:
        what += '; no epoch had finished, so nothing was saved'
    print(f'\n{what}', file=sys.stderr)
    return 130 if isinstance(e, KeyboardInterrupt) else 1


def guarded(run, **context):
    """run()'s exit code; a UsageError (2), or what stopped it (stopped(), given `context`),
    in one sentence instead of a traceback."""
    try:
        return run()
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except (KeyboardInterrupt, FloatingPointError, RuntimeError) as e:
        return stopped(e, **context)
