"""--minutes M: a run that ends within M minutes.

A run times a few training steps (then puts the weights back) and plans the steps that fit in
what is left of the minutes, keeping back time for each epoch's validation, the test and the
exit; after each epoch it plans again from the epochs' times. The lr schedule follows the plan
and reaches 0 at its last step, which may end the last epoch early: under a fixed budget,
decaying linearly to 0 at its end does best (Li, Yumer and Ramanan, "Budgeted Training", 2020).
"""
import itertools
import math
import time

import torch

from errors import UsageError

MARGIN = 0.04       # of the budget, kept back for what varies (the machine, the saves)
EXIT_SECONDS = 2.0  # the interpreter's exit after the last line, which torch makes slow
EVAL_COST = 0.4     # an image evaluated costs about this much of one trained (no backward)


class Budget:
    """The time a run has: `minutes` from `start` (a time.monotonic() reading). It plans in
    training steps, an epoch being `per_epoch` of them and a validation."""

    def __init__(self, minutes, start, per_epoch):
        self.seconds, self.start, self.per_epoch = 60 * minutes, start, per_epoch
        self.deadline = start + self.seconds

    def first_plan(self, step_seconds, batch_size, n_valid, n_test, data_seconds):
        """The steps that fit, before the first, from the time of one: each epoch's steps and
        a validation of n_valid images, then the test; fewer than an epoch's, if that is all
        that fits. One sentence, naming the time the data took, when not one step does."""
        per_image = EVAL_COST * step_seconds / batch_size
        self.test_seconds = n_test * per_image + EXIT_SECONDS
        self.began = time.monotonic()
        valid = n_valid * per_image
        steps = self.steps(step_seconds + valid / self.per_epoch)
        if steps == 0:
            least = step_seconds + valid + self.test_seconds
            need = (self.began - self.start + least) / (1 - MARGIN)
            raise UsageError(f'--minutes {self.seconds / 60:g} is too short to train: starting '
                             f'took {self.began - self.start:.0f} s (reading the data '
                             f'{data_seconds:.0f} s), and a step, a validation and the test '
                             f'would take about {least:.0f} s more; give --minutes '
                             f'{math.ceil(need / 6) / 10:g} or more')
        return steps

    def replan(self, done, planned):
        """The steps to train after `done` of them, `planned` so far, each as long as their
        mean so far (validation included): as many still, while they fit before the deadline;
        as many as fit, once they do not; more only once an epoch more fits with the margin
        kept, so that noise in the epochs' times does not move the plan, and the lr with it,
        to and fro."""
        step = (time.monotonic() - self.began) / done
        fit = self.steps(step, done, margin=0)
        if fit < planned:
            return fit
        more = self.steps(step, done)
        return more if more >= planned + self.per_epoch else planned

    def steps(self, step_seconds, done=0, margin=MARGIN):
        """`done`, and as many more steps of step_seconds as fit before the test and the exit,
        with `margin` of the budget kept back."""
        left = self.deadline - time.monotonic() - self.test_seconds - margin * self.seconds
        return done + max(0, int(left // step_seconds))


def seconds_per_step(step, model, optimizer, scaler, batches, steps=4, warmup=2):
    """How long step(inputs, targets) takes: the mean of `steps` calls after `warmup` more.
    Everything the calls change is put back: the weights and buffers, the optimizer's momentum
    (none yet), the loss scaler and the random generators."""
    saved = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    scale = scaler.state_dict()
    device = saved[0].device
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        for i, (inputs, targets) in enumerate(itertools.islice(itertools.cycle(batches),
                                                               warmup + steps)):
            if i == warmup:
                sync(device)
                t0 = time.perf_counter()
            step(inputs, targets.long())
        sync(device)
        seconds = (time.perf_counter() - t0) / steps
    with torch.no_grad():
        for t, s in zip((*model.parameters(), *model.buffers()), saved):
            t.copy_(s)
    optimizer.state.clear()
    optimizer.zero_grad(set_to_none=True)
    scaler.load_state_dict(scale)
    return seconds


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()
