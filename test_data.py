"""Tests for data.py: decoding, channel statistics and the batched tensor data path that
replaces the article's per-image PIL transforms."""
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
from PIL import Image

import data


class DataPathTest(unittest.TestCase):
    """The tensor data path that replaces the article's per-image PIL transforms."""

    def test_channel_stats_is_the_std_over_all_pixels(self):
        # Images of different brightness: the mean of per-image stds (how 0.2023 came about for
        # CIFAR-10) is far below the true per-channel std, which channel_stats returns.
        g = torch.Generator().manual_seed(0)
        base = torch.randint(0, 200, (64, 1, 1, 1), generator=g)
        images = (base + torch.randint(0, 56, (64, 3, 8, 8), generator=g)).to(torch.uint8)
        mean, std = data.channel_stats(images, chunk=10)
        x = images.double() / 255
        true_std = x.transpose(0, 1).reshape(3, -1).std(dim=1, unbiased=False)
        per_image = x.std(dim=(2, 3), unbiased=False).mean(dim=0)
        for c in range(3):
            self.assertAlmostEqual(std[c], true_std[c].item(), places=6)
            self.assertAlmostEqual(mean[c], x[:, c].mean().item(), places=6)
            self.assertGreater(std[c], 2 * per_image[c].item())

    def test_decode_keeps_file_order_across_chunks_and_workers(self):
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for i in range(7):  # image i is filled with the value 10 * i
                files.append(str(Path(tmp, f'{i}.png')))
                Image.new('RGB', (4, 4), (10 * i,) * 3).save(files[-1])
            Image.new('L', (6, 4), 200).save(files[3])  # grayscale and not square
            images = data.decode_images(files, 4, workers=2, chunk=3)
            self.assertEqual(images.shape, (7, 3, 4, 4))
            self.assertEqual(images.dtype, torch.uint8)
            expected = [10 * i for i in range(7)]
            expected[3] = 200
            self.assertEqual(images[:, :, 1, 1].tolist(), [[v] * 3 for v in expected])
            Path(files[5]).write_bytes(b'not a png')  # in the second of three chunks
            with self.assertRaisesRegex(data.UsageError, '5.png is not a readable image'):
                data.decode_images(files, 4, workers=2, chunk=3)

    def test_memory_check(self):
        # ImageNet-1k at 224 px would need 193 GB: stop with what is needed and what is free.
        gib = 2**30
        with mock.patch.object(data, 'available_ram', return_value=64 * gib):
            data.check_memory(50_000, 32, torch.device('cpu'))  # CIFAR-10: 0.1 GiB
            with self.assertRaisesRegex(data.UsageError, r'the 1,281,167 images, held at '
                                        r'224x224 px, need 179.6 GiB of RAM, and 64.0 GiB'):
                data.check_memory(1_281_167, 224, torch.device('cpu'))
        # On CUDA the GPU's free memory counts too; where the RAM is unknown (not Linux), only it.
        cuda = torch.device('cuda')
        with mock.patch.object(data, 'available_ram', return_value=None), \
                mock.patch.object(torch.cuda, 'mem_get_info', return_value=(2 * gib, 16 * gib)):
            data.check_memory(50_000, 32, cuda)
            with self.assertRaisesRegex(data.UsageError, 'need 1.1 GiB of GPU memory'):
                data.check_memory(400_000, 32, cuda)
        ram = data.available_ram()
        self.assertTrue(ram is None or ram > 0)

    def test_batches_are_normalised_and_augmented(self):
        # The article fed raw [0, 1] pixels with no augmentation.
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
        mean, std = data.channel_stats(images)
        loader = data.TensorLoader(images, torch.zeros(64, dtype=torch.long), 64, mean, std, 8,
                                   train=False)
        x, _ = next(iter(loader))
        for c in range(3):
            self.assertAlmostEqual(x[:, c].mean().item(), 0, places=4)
            self.assertAlmostEqual(x[:, c].std(unbiased=False).item(), 1, places=3)

        loader.train = True
        loader.set_epoch(1)
        a, _ = next(iter(loader))
        a_again, _ = next(iter(loader))
        loader.set_epoch(2)
        b, _ = next(iter(loader))
        self.assertTrue(torch.equal(a, a_again))  # same seed and epoch, same batch
        self.assertFalse(torch.equal(a, b))

    def test_no_augmentation_for_the_articles_recipe(self):
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (8, 3, 8, 8), generator=g, dtype=torch.uint8)
        loader = data.TensorLoader(images, torch.arange(8), 4, [0] * 3, [1] * 3, 8, train=True,
                                   augment=False)
        for x, y in loader:  # shuffled, but each image as it is, in [0, 1]
            torch.testing.assert_close(x, images[y].float() / 255)

    def test_crop_and_flip(self):
        images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
        loader = data.TensorLoader(images, torch.zeros(4, dtype=torch.long), 4, [0] * 3,
                                   [1] * 3, 8, train=True, padding=4)
        idx = torch.arange(4)
        centre = torch.full((4, 2), 4)
        no, yes = torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)

        def crop(shift, flip):
            return loader._gather(idx, *loader._crop_windows(shift, flip))
        self.assertTrue(torch.equal(crop(centre, no), images))
        self.assertTrue(torch.equal(crop(centre, yes), images.flip(3)))
        padded = nn.functional.pad(images.float(), (4, 4, 4, 4), mode='reflect')
        corner = torch.tensor([[0, 8]] * 4)  # top rows, right-most columns
        self.assertTrue(torch.equal(crop(corner, no).float(), padded[:, :, 0:8, 8:16]))

    def test_each_image_once_an_epoch_with_its_label(self):
        # Every train sample must be a reflect-padded crop (flipped or not) of the image its
        # label belongs to, and every image must come once an epoch: here label i is image i.
        n, p = 12, 2
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
        loader = data.TensorLoader(images, torch.arange(n), 4, [0] * 3, [1 / 255] * 3, 8,
                                   train=True, padding=p)
        padded = nn.functional.pad(images.float(), (p, p, p, p), mode='reflect')
        crops = [[padded[i, :, r:r + 8, c:c + 8] for r in range(2 * p + 1)
                  for c in range(2 * p + 1)] for i in range(n)]
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            seen = []
            for x, y in loader:
                for sample, label in zip(x, y.tolist()):
                    seen.append(label)
                    self.assertTrue(any(torch.equal(sample, c) or torch.equal(sample, c.flip(2))
                                        for c in crops[label]), f'sample of image {label}')
            self.assertEqual(sorted(seen), list(range(n)))

    def test_a_train_batch_is_one_gather_and_a_normalise(self):
        # Crop windows and labels are worked out once an epoch. Per batch this leaves four
        # kernels (gather, to float, multiply, subtract); on a GPU at 32 px each launch costs
        # about what its work does, and working out the windows per batch took 23.
        from torch.utils._python_dispatch import TorchDispatchMode

        class CountKernels(TorchDispatchMode):
            count = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.count += not func.is_view
                return func(*args, **(kwargs or {}))

        def kernels(n_batches):
            images = torch.randint(0, 256, (4 * n_batches, 3, 8, 8), dtype=torch.uint8)
            loader = data.TensorLoader(images, torch.zeros(4 * n_batches, dtype=torch.long), 4,
                                       [0.5] * 3, [0.25] * 3, 8, train=True,
                                       memory_format=torch.channels_last)
            with CountKernels() as mode:
                for _ in loader:
                    pass
            return mode.count
        self.assertLessEqual((kernels(6) - kernels(2)) / 4, 4)

    def test_resize_on_the_device(self):
        images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
        loader = data.TensorLoader(images, torch.zeros(5, dtype=torch.long), 2, [0.5] * 3,
                                   [0.25] * 3, 20, train=False)
        self.assertEqual([tuple(x.shape) for x, _ in loader],
                         [(2, 3, 20, 20), (2, 3, 20, 20), (1, 3, 20, 20)])
