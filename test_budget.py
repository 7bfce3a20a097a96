"""Tests for budget.py and --minutes: the steps fitted to a speed and planned again, the lr
schedule ending at 0 at the last step that fits, the refusal of a budget too short, and the time
a run has left. Nothing here is timed: the clock the budget reads is a fake that the tests move."""
import csv
import json
import types
import unittest
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torchvision

import budget
import data
import speed
import train
from test_helpers import ColourFolderCase, make_mini_cifar, run_main

CPU = torch.device('cpu')


class FakeClock:
    """budget.py's time module, reading a clock that only the test moves (from train.START)."""

    def __init__(self, elapsed=0.0):
        self.now = train.START + elapsed

    def monotonic(self):
        return self.now

    def patch(self):
        return mock.patch.object(budget, 'time', types.SimpleNamespace(
            monotonic=self.monotonic, perf_counter=budget.time.perf_counter))


class BudgetTest(unittest.TestCase):

    def test_the_steps_fit_the_speed_and_are_planned_again(self):
        clock = FakeClock(elapsed=10)  # 10 s gone in starting and reading the data
        with clock.patch():
            plan = budget.Budget(1, train.START, per_epoch=10)  # 60 s; epochs of 10 steps
            # A step of 0.5 s, and each epoch's 64 validation images at 0.4 of a trained one:
            # 0.54 s a step; then 128 test images and the exit, with 4% of the budget kept back.
            per_image = budget.EVAL_COST * 0.5 / 32
            after = 128 * per_image + budget.EXIT_SECONDS
            steps = plan.first_plan(0.5, 32, 64, 128, data_seconds=4)
            self.assertEqual(steps, int((60 - 10 - after - budget.MARGIN * 60) // 0.54))
            self.assertEqual(steps, 82)
            # The epochs turn out slower (6 s): 82 steps no longer fit, 78 do; after another,
            # they still fit (74 with the margin kept), and the plan stands; then a fast epoch
            # (3 s): an epoch more fits with the margin, and it grows; then a slow one (15 s):
            # back to what fits.
            for now, done, planned in ((16, 10, 78), (22, 20, 78), (25, 30, 89), (43, 40, 57)):
                clock.now = train.START + now
                self.assertEqual(plan.replan(done, steps), planned, now)
                steps = planned
            # After 60 steps of 0.5 s, 16 s are left: 26 steps fit before the test and the
            # exit, 21 with the margin kept. A plan of 86 stands, one of 90 shrinks to 86; one
            # of 75 stays (not an epoch more fits with the margin), one of 70 grows to 81.
            plan.began, clock.now = train.START + 14, train.START + 44
            for planned, then in ((86, 86), (90, 86), (75, 75), (70, 81)):
                self.assertEqual(plan.replan(60, planned), then, planned)
                self.assertLessEqual(44 + (then - 60) * 0.5 + after, 60)

    def test_an_epoch_can_stop_early(self):
        # train.fit limits each epoch to the steps planned and not yet taken: the epoch that
        # holds the last step stops there.
        images = torch.zeros(40, 3, 4, 4, dtype=torch.uint8)
        loader = data.TensorLoader(images, torch.zeros(40, dtype=torch.long), 4, [0] * 3,
                                   [1] * 3, 4, train=True)
        for limit, batches in ((None, 10), (25, 10), (5, 5)):
            loader.limit = limit
            self.assertEqual((len(loader), len(list(loader))), (batches, batches))

    def test_too_short_a_budget_is_one_sentence(self):
        # A plan shorter than an epoch trains what fits; one without a step is refused.
        with FakeClock(elapsed=9).patch():
            self.assertEqual(budget.Budget(0.25, train.START, 10).first_plan(
                0.5, 32, 64, 128, data_seconds=7), 4)  # 15 - 9 - 2.8 - 0.6 s: 4 of 0.54 s
            with self.assertRaises(budget.UsageError) as caught:
                budget.Budget(0.2, train.START, 10).first_plan(0.5, 32, 64, 128, data_seconds=7)
        self.assertEqual(str(caught.exception),
                         '--minutes 0.2 is too short to train: starting took 9 s (reading the '
                         'data 7 s), and a step, a validation and the test would take about 4 s '
                         'more; give --minutes 0.3 or more')

    def test_timing_steps_puts_everything_back(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5),
                              nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        trainer = train.Trainer(model, train.build_optimizer(model, 0.1, CPU),
                                train.build_criterion())
        batches = [(torch.randn(4, 3, 8, 8), torch.arange(4) % 3)]  # one, used again and again
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        seconds = budget.seconds_per_step(trainer.train_step, model, trainer.optimizer,
                                          trainer.amp, batches, steps=2)
        self.assertGreater(seconds, 0)
        for k, v in model.state_dict().items():
            self.assertTrue(torch.equal(v, before[k]), k)
        self.assertEqual(len(trainer.optimizer.state), 0)  # no momentum yet, as before
        self.assertTrue(torch.equal(torch.get_rng_state(), rng))

    def test_time_left_in_words(self):
        self.assertEqual([train.in_words(s) for s in (0.3, 40, 89, 95, 1080)],
                         ['1 s', '40 s', '89 s', '2 min', '18 min'])


class MinutesTest(ColourFolderCase):
    """--minutes end to end, on the fake clock: each epoch of 3 steps takes 15 s of it, not the
    10.5 s that the timed steps promised."""

    def train(self, *extra):
        return run_main('--data', self.data, '--image-size', 8, '--small-input', '--lr', 0.01,
                        '--batch-size', 16, '--device', 'cpu', '--workers', 1, '--out',
                        self.dir / 'weight.pth', *extra)

    def test_the_lr_reaches_0_where_the_steps_that_fit_end(self):
        clock = FakeClock(elapsed=5)
        real = train.Trainer.epoch_train

        def fifteen_seconds(trainer, loader):
            clock.now += 15
            return real(trainer, loader)

        with clock.patch(), mock.patch.object(budget, 'seconds_per_step', return_value=10 / 3), \
                mock.patch.object(train.Trainer, 'epoch_train', fifteen_seconds):
            code, out, err = self.train('--minutes', 1)
        self.assertEqual(code, 0, err)
        # 13 steps of 3.5 s were planned (5 epochs of 3); at 5 s a step, 10 fit: 4 epochs, the
        # last of one step, and the lr ends at 0 there.
        self.assertIn('about 5 epochs of 3 batches of 16 in 1 min, peak lr 0.01', out)
        self.assertIn('\nepoch 4/4  ', out)
        with open(self.dir / 'weight.csv') as f:
            rows = list(csv.DictReader(f))
        self.assertEqual((len(rows), float(rows[-1]['lr'])), (4, 0.0))
        record = json.loads((self.dir / 'weight.json').read_text())
        self.assertEqual((record['args']['minutes'], record['args']['epochs'], record['steps']),
                         (1.0, 4, 10))
        self.assertGreater(record['test_acc'], 0)
        # Resumed, a stopped run of a budget goes on to the steps it had planned.
        code, out, err = run_main('--resume', '--out', self.dir / 'weight.pth')
        self.assertEqual((code, out.strip()), (0, f'{self.dir / "weight.ckpt"}: that run '
                                                    f'already finished (4 epochs)'), err)

    def test_the_first_download_of_cifar10_does_not_count(self):
        # The minutes count from the start, but for the first download of CIFAR-10.
        starts = []

        def plan(trainer, loaders, args, data_seconds, start):
            starts.append(start)
            raise KeyboardInterrupt  # enough: what matters is where the minutes start

        def download(dataset):  # the miniature appears, as the real one would
            if not Path(self.dir, 'cifar-10-batches-py').is_dir():
                make_mini_cifar(self.dir)

        with mock.patch.object(train, 'plan', plan), \
                mock.patch('torchvision.datasets.cifar.check_integrity', return_value=True), \
                mock.patch.object(torchvision.datasets.CIFAR10, 'download', download):
            for _ in range(2):  # downloaded, then there
                code, _, err = run_main('--data-root', self.dir, '--minutes', 1, '--batch-size',
                                        16, '--device', 'cpu', '--out', self.dir / 'w.pth')
                self.assertEqual(code, 130, err)
        self.assertGreater(starts[0], train.START)
        self.assertEqual(starts[1], train.START)

    def test_an_ordinary_run_says_when_it_will_end(self):
        code, out, err = self.train('--epochs', 2)
        self.assertEqual(code, 0, err)
        first, last = [line for line in out.splitlines() if line.startswith('epoch ')]
        self.assertRegex(first, r'img/s  about \d+ s left$')
        self.assertRegex(last, r'img/s$')
        self.assertIn(speed.ONE_PIXEL_ROUTE, out)


if __name__ == '__main__':
    unittest.main()
