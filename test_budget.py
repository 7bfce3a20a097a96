"""Tests for budget.py and --minutes: the epochs fitted to a speed, the lr schedule ending at 0
where the epochs that fit end, the refusal of a budget too short, and the time a run has left.
Nothing here is timed: the clock the budget reads is a fake that the tests move."""
import csv
import json
import types
import unittest
from unittest import mock

import torch
import torch.nn as nn

import budget
import speed
import train
from test_helpers import ColourFolderCase, run_main


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

    def test_the_epochs_fit_the_speed_and_are_planned_again(self):
        clock = FakeClock(elapsed=10)  # 10 s gone in starting and reading the data
        with clock.patch():
            plan = budget.Budget(1, train.START)  # 60 s
            # An epoch: 10 steps of 0.5 s, and 64 validation images at 0.4 of a trained one;
            # then 128 test images and the exit, with 4% of the budget kept back.
            per_image = budget.EVAL_COST * 0.5 / 32
            epoch, after = 10 * 0.5 + 64 * per_image, 128 * per_image + budget.EXIT_SECONDS
            epochs = plan.first_plan(0.5, 10, 32, 64, 128, data_seconds=4)
            self.assertEqual(epochs, int((60 - 10 - after - budget.MARGIN * 60) // epoch))
            self.assertEqual(epochs, 8)
            self.assertLessEqual(10 + epochs * epoch + after, 60 * (1 - budget.MARGIN))
            # The epochs turn out slower (6 s): 8 no longer fit, 7 do; then one faster (3 s):
            # with the margin kept, one more would fit, not two, and the plan stands; another
            # fast one: two more fit, and it grows; then a slow one (15 s): back to what fits.
            for now, done, planned in ((16, 1, 7), (22, 2, 7), (25, 3, 7), (28, 4, 9),
                                       (43, 5, 7)):
                clock.now = train.START + now
                self.assertEqual(plan.replan(done, epochs), planned, now)
                epochs = planned
            # After 5 epochs of 6 s, 16 s are left: two more fit before the test and the exit,
            # though not with the margin kept. A plan of 7 stands, one of 8 shrinks to 7; one of
            # 5 stays (one more fits with the margin), one of 4 grows to 6.
            plan.began, clock.now = train.START + 14, train.START + 44
            for planned, then in ((7, 7), (8, 7), (5, 5), (4, 6)):
                self.assertEqual(plan.replan(5, planned), then, planned)
                self.assertLessEqual(44 + (then - 5) * 6 + after, 60)

    def test_too_short_a_budget_is_one_sentence(self):
        with FakeClock(elapsed=9).patch():
            with self.assertRaises(budget.UsageError) as caught:
                budget.Budget(0.2, train.START).first_plan(0.5, 10, 32, 64, 128, data_seconds=7)
        said = str(caught.exception)
        self.assertEqual(said, '--minutes 0.2 is too short to train: starting took 9 s '
                               '(reading the data 7 s), and one epoch would take about 5 s more; '
                               'give --minutes 0.3 or more')

    def test_timing_steps_puts_everything_back(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5),
                              nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        trainer = train.Trainer(model, train.build_optimizer(model, 0.1, torch.device('cpu')),
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
    """--minutes end to end, on the fake clock: each epoch takes 15 s of it, not the 10 s
    that the timed steps promised."""

    def train(self, *extra):
        return run_main('--data', self.data, '--image-size', 8, '--small-input', '--lr', 0.01,
                        '--batch-size', 16, '--device', 'cpu', '--workers', 1, '--out',
                        self.dir / 'weight.pth', *extra)

    def test_the_lr_reaches_0_where_the_epochs_that_fit_end(self):
        clock = FakeClock(elapsed=5)
        real = train.Trainer.epoch_train

        def fifteen_seconds(trainer, loader):
            clock.now += 15
            return real(trainer, loader)

        with clock.patch(), mock.patch.object(budget, 'seconds_per_step', return_value=10 / 3), \
                mock.patch.object(train.Trainer, 'epoch_train', fifteen_seconds):
            code, out, err = self.train('--minutes', 1)
        self.assertEqual(code, 0, err)
        # 4 epochs of 10.5 s were planned; at 15 s each, 3 fit, and the lr ends at 0 there.
        self.assertIn('about 4 epochs of 3 batches of 16 in 1 min, peak lr 0.01', out)
        self.assertIn('epoch 3/3', out)
        with open(self.dir / 'weight.csv') as f:
            rows = list(csv.DictReader(f))
        self.assertEqual((len(rows), float(rows[-1]['lr'])), (3, 0.0))
        record = json.loads((self.dir / 'weight.json').read_text())
        self.assertEqual((record['args']['minutes'], record['args']['epochs'], record['steps']),
                         (1.0, 3, 9))
        self.assertGreater(record['test_acc'], 0)
        # Resumed, a stopped run of a budget goes on to the epochs it had planned.
        code, out, err = run_main('--resume', '--out', self.dir / 'weight.pth')
        self.assertEqual((code, out.strip()), (0, f'{self.dir / "weight.ckpt"}: that run '
                                                    f'already finished (3 epochs)'), err)

    def test_an_ordinary_run_says_when_it_will_end(self):
        code, out, err = self.train('--epochs', 2)
        self.assertEqual(code, 0, err)
        first, last = [line for line in out.splitlines() if line.startswith('epoch ')]
        self.assertRegex(first, r'img/s  about \d+ s left$')
        self.assertRegex(last, r'img/s$')
        self.assertIn(speed.ONE_PIXEL_ROUTE, out)


if __name__ == '__main__':
    unittest.main()
