"""How long a run trains: the lr schedule over its planned steps, and --minutes M.

Schedule sets the lr of every step: a warm-up, then a linear decay that reaches 0 at the last
planned step, where the last epoch stops. Under --minutes a Budget times a few steps, plans the
steps that fit, and follows the plan as the run goes, every few seconds, so that a wrong first
guess or a machine that slows down is put right while there is time to use. Decaying linearly
to 0 at the end does best under a fixed budget (Li, Yumer and Ramanan, "Budgeted Training").
"""
import math
import time

import torch

import speed
from errors import UsageError

MARGIN = 0.03       # of the budget, kept back for what varies (the machine, the saves)
GROW = 0.05         # the plan grows once this share of its steps more fit: it does not jitter
EVERY = 5.0         # seconds between fittings of the plan (at most 2% of the budget)
EXIT_SECONDS = 2.0  # writing the last files and the interpreter's exit, which torch makes slow


class Schedule:
    """The lr of each step (the Trainer calls step() after each): rising over the first
    `warmup` share of `total` steps, but never faster than to the peak in `min_warmup` steps (a
    short run of a net without BatchNorm then peaks lower), then falling linearly to 0 at
    `total`; warmup None: the article's constant lr. refit() moves the end and the lr goes on
    from where it is; under --minutes the `budget` refits it as the run goes."""

    def __init__(self, optimizer, total, warmup, min_warmup=0, budget=None):
        self.optimizer, self.total, self.taken, self.budget = optimizer, total, 0, budget
        self.peak_lrs = [g['lr'] for g in optimizer.param_groups]
        rise = 0 if warmup is None else max(round(total * warmup), min_warmup, 1)
        self.warmup = min(rise, max(1, total // 2))
        # The warm-up climbs to `peak`; the decay runs from (anchor, its factor) to (total, 0).
        self.peak = self.anchor_factor = self.warmup / rise if rise else 1.0
        self.anchor = self.warmup if rise else None  # None: constant
        self.set_lr()  # the first step's

    def factor(self, step):
        if self.anchor is None:
            return 1.0
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        return self.anchor_factor * max(0, self.total - step) / max(1, self.total - self.anchor)

    def step(self):
        self.taken += 1
        if self.budget:
            self.budget.follow(self)
        self.set_lr()

    def set_lr(self):  # the optimizer's groups, which loading its state_dict replaces
        for group, lr in zip(self.optimizer.param_groups, self.peak_lrs):
            group['lr'] = lr * self.factor(self.taken)

    def steps_left(self):
        return self.total - self.taken

    def seconds_left(self, per_epoch, epoch_seconds):
        """The seconds to the run's end: under --minutes, to its deadline; else those of the
        epochs left, each `epoch_seconds` long."""
        if self.budget:
            return self.budget.deadline - time.monotonic()
        return math.ceil(self.steps_left() / per_epoch) * epoch_seconds

    def epoch(self, loader):
        """The loader's batches for one epoch: all of them, or those the plan has left."""
        return loader if self.steps_left() >= len(loader) and not self.budget else \
            Steps(loader, self)

    def refit(self, total):
        """End at step `total` instead (not before the steps taken), the lr going from where it
        is to 0 there. In the warm-up the rise keeps its pace; an end too soon for the peak
        makes it stop rising sooner."""
        total = max(total, self.taken)
        if self.anchor is not None and total != self.total:
            if self.taken >= self.warmup:
                self.anchor_factor, self.anchor = self.factor(self.taken), self.taken
            elif total < 2 * self.warmup:
                rise = max(self.taken, total // 2, 1)
                self.peak = self.anchor_factor = self.peak * rise / self.warmup
                self.warmup = self.anchor = rise
        self.total = total

    def state_dict(self):
        return {k: getattr(self, k) for k in ('total', 'taken', 'warmup', 'peak', 'anchor',
                                              'anchor_factor')}

    def load_state_dict(self, state):
        self.__dict__.update(state)
        self.set_lr()


def schedule(optimizer, epochs, warmup, min_warmup, per_epoch, state=None, minutes=None,
             start=None, timing=None, n_valid=0, n_test=0):
    """The Schedule of a run: over `epochs` epochs of `per_epoch` steps, or under --minutes the
    steps that fit from `start` on (a Budget; timing() gives the seconds of a step and of an
    image evaluated: seconds_per_step). Resumed from a checkpoint's `state`, its plan goes on,
    to the end `epochs` or `minutes` give now, if any."""
    budget, steps = None, (epochs or 0) * per_epoch
    if minutes:  # timed before a checkpoint's states are put back: timing clears them
        budget = Budget(minutes, start, per_epoch, n_valid, n_test)
        steps = budget.first_plan(*timing(), state['taken'] if state else 0)
    plan = Schedule(optimizer, steps, warmup, min_warmup, budget)
    if state:
        plan.load_state_dict(state)
        plan.refit(steps or plan.total)
    return plan


class Steps:
    """One epoch of a loader's batches that ends where the schedule's plan ends."""

    def __init__(self, loader, schedule):
        self.loader, self.schedule = loader, schedule

    def __len__(self):
        return min(len(self.loader), self.schedule.steps_left())

    def __iter__(self):
        for batch in self.loader:
            if self.schedule.steps_left() <= 0:
                return
            yield batch


class Budget:
    """--minutes M: the time from `start` (a time.monotonic() reading) to the deadline, and the
    steps that fit in it, an epoch being `per_epoch` steps and then a validation of `n_valid`
    images; the test of `n_test` images and the exit come last."""

    def __init__(self, minutes, start, per_epoch, n_valid, n_test):
        self.seconds, self.deadline = 60 * minutes, start + 60 * minutes
        self.per_epoch, self.n_valid, self.n_test = per_epoch, n_valid, n_test
        self.every = min(EVERY, 0.02 * self.seconds)

    def first_plan(self, step_seconds, per_image, taken=0):
        """The steps in all (`taken` and more) that fit, from the seconds of a step and of an
        image evaluated; fewer than an epoch's, if that is all that fits. One sentence when not
        one does."""
        self.step_seconds, self.per_image, self.last = step_seconds, per_image, None
        steps = self.fit(MARGIN)
        if steps == 0:
            started = time.monotonic() - self.deadline + self.seconds
            least = step_seconds + (self.n_valid + self.n_test) * per_image + EXIT_SECONDS
            raise UsageError(f'--minutes {self.seconds / 60:g} is too short to train: starting '
                             f'took {started:.0f} s, and a step, a validation and the test '
                             f'would take about {least:.0f} s more; give --minutes '
                             f'{math.ceil((started + least) / (1 - MARGIN) / 6) / 10:g} or more')
        return taken + steps

    def fit(self, margin):
        """How many more steps fit before the deadline with `margin` of the budget kept back:
        each step with its share of the validation at its epoch's end (the epoch under way's in
        full), then the test and the exit."""
        valid = self.n_valid * self.per_image
        left = self.deadline - time.monotonic() - margin * self.seconds - valid - \
            self.n_test * self.per_image - EXIT_SECONDS
        return max(0, int(left / (self.step_seconds + valid / self.per_epoch)))

    def follow(self, schedule):
        """After each step: time the steps since the last fitting, and every few seconds fit the
        plan to the time left. A step that began an epoch also waited for the last one's
        validation, which times an image evaluated. The plan shrinks once it no longer fits, to
        what fits with the margin kept, and grows only once GROW more of it fits: the lr does
        not go to and fro."""
        now, taken = time.monotonic(), schedule.taken
        if self.last is None or (taken - 1) % self.per_epoch == 0:  # the run's or an epoch's
            if self.last is not None and self.n_valid:                # first step
                self.per_image = max(0.0, now - self.last - self.step_seconds) / self.n_valid
            self.mark = (now, taken)
        self.last = now
        if now - self.mark[0] >= self.every:
            self.step_seconds = (now - self.mark[0]) / (taken - self.mark[1])
            self.mark = (now, taken)
            planned, fits = schedule.steps_left(), self.fit(MARGIN)
            if self.fit(0) < planned or fits - planned >= GROW * schedule.total:
                schedule.refit(taken + fits)


def seconds_per_step(step, model, optimizer, scaler, batches, evaluate, eval_batch, steps=4,
                     warmup=2):
    """How long step(inputs, targets) takes on the first of `batches`, the mean of `steps` calls
    after `warmup` more, and how long evaluate([eval_batch]) takes an image, the second of two
    calls. Everything the calls change is put back: the weights and buffers, the optimizer's
    momentum (none yet), the loss scaler and the random generators."""
    saved = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    scale, (inputs, targets) = scaler.state_dict(), next(iter(batches))
    device = saved[0].device
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        for i in range(warmup + steps):
            if i == warmup:
                speed.sync(device)
                t0 = time.perf_counter()
            step(inputs, targets.long())
        speed.sync(device)
        t1 = time.perf_counter()
        for _ in range(2):
            t2 = time.perf_counter()
            evaluate([eval_batch])  # it syncs: it returns numbers
    seconds = (time.perf_counter() - t2) / len(eval_batch[1])
    with torch.no_grad():
        for t, s in zip((*model.parameters(), *model.buffers()), saved):
            t.copy_(s)
    optimizer.state.clear()
    optimizer.zero_grad(set_to_none=True)
    scaler.load_state_dict(scale)
    return (t1 - t0) / steps, seconds
