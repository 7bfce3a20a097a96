"""What the scripts turn into one sentence instead of a traceback: a problem the user can fix,
Ctrl-C before anything was written, and running out of memory."""
import sys

import torch


class UsageError(Exception):
    """A problem the user can fix (arguments, data, files): one sentence, exit code 2."""


def out_of_memory(e):
    """Whether e is torch running out of memory: on a GPU (torch.cuda.OutOfMemoryError), on
    Apple's mps or in the CPU's allocator (a RuntimeError that says so)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or isinstance(e, RuntimeError) and any(
        s in str(e) for s in ('out of memory', "can't allocate memory", 'not enough memory'))


def guarded(run, out_of_memory_advice):
    """run()'s exit code; a UsageError (2), Ctrl-C (130) or running out of memory (1, with
    out_of_memory_advice()) prints one sentence instead."""
    try:
        return run()
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a training run's epochs handle their own (train.train)
        print('\ninterrupted; nothing was written', file=sys.stderr)
        return 130
    except Exception as e:
        if not out_of_memory(e):
            raise
        print(f'error: {out_of_memory_advice()}', file=sys.stderr)
        return 1
