"""Tests for stream.py: an image folder's files decoded by DataLoader workers, batch by batch,
into the very batches the in-memory path gives."""
import contextlib
import io
import tempfile
import unittest
from pathlib import Path

import torch

import data
import stream
from errors import UsageError
from test_helpers import make_colour_folder

LOADER = dict(batch_size=4, mean=[0.5] * 3, std=[0.2] * 3, image_size=8, device=torch.device('cpu'))


class StreamTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = make_colour_folder(Path(cls.tmp.name, 'colours'), n_train=6, n_test=4)
        with contextlib.redirect_stdout(io.StringIO()):  # 'decoding ...', 'streaming ...'
            cls.held = data.load_dataset(cls.root, None, 8, workers=1)
            cls.files = stream.load_dataset(cls.root, 8, workers=1)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_both_paths_give_the_same_batches(self):
        # The same labels in the same order, the same images before augmentation, and, as the
        # epoch plan is shared, the same crops and flips after it.
        (images, labels), (files, labels2) = self.held.train, self.files.train
        self.assertTrue(torch.equal(labels, labels2))
        self.assertEqual(files.shape, tuple(images.shape))
        for augment in (False, True):
            for workers in (1, 2):  # in this process, and in 2 worker processes
                files.workers = workers
                a = data.make_loader(images, labels, train=True, augment=augment, seed=3,
                                     **LOADER)
                b = stream.make_loader(files, labels, train=True, augment=augment, seed=3,
                                       **LOADER)
                for epoch in (1, 2):
                    a.set_epoch(epoch)
                    b.set_epoch(epoch)
                    batches = list(zip(a, b))
                    self.assertEqual(len(batches), len(a))
                    for (xa, ya), (xb, yb) in batches:
                        self.assertTrue(torch.equal(xa, xb) and torch.equal(ya, yb))
        # Evaluation: every image once, in order.
        a = data.make_loader(*self.held.test, train=False, **LOADER)
        b = stream.make_loader(*self.files.test, train=False, **LOADER)
        for (xa, ya), (xb, yb) in zip(a, b):
            self.assertTrue(torch.equal(xa, xb) and torch.equal(ya, yb))
        self.assertEqual(data.channel_stats(files), data.channel_stats(images))

    def test_a_subset_of_files_is_the_same_images(self):
        # images[indices] of ImageFiles is the files at those indices, as a tensor's is the
        # images there; images[i] and images[i:j] decode.
        idx = torch.tensor([0, 3, 7])
        images, files = self.held.train.images, self.files.train.images
        picked = files[idx]
        self.assertEqual(picked.files, [files.files[i] for i in (0, 3, 7)])
        self.assertTrue(torch.equal(images[idx], picked[0:3]))
        self.assertTrue(torch.equal(images[idx][1], picked[1]))

    def test_an_unreadable_image_is_one_sentence_from_a_worker(self):
        files = self.files.test.images[torch.arange(len(self.files.test.labels))]
        broken = Path(self.tmp.name, 'broken.png')
        broken.write_bytes(b'not a png')
        files.files[5], files.workers = str(broken), 2
        loader = stream.make_loader(files, torch.zeros(len(files), dtype=torch.long),
                                    train=False, **LOADER)
        with self.assertRaises(UsageError) as caught:
            list(loader)
        self.assertEqual(str(caught.exception).count('\n'), 0)
        self.assertTrue(str(caught.exception).startswith(f'{broken} is not a readable image'))


if __name__ == '__main__':
    unittest.main()
