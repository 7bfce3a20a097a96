"""Tests of the data: listing and decoding an image folder, channel statistics, the batched tensor
data path that replaces the article's per-image PIL transforms (data.py), and the same batches
decoded anew in every epoch for a folder too large for memory (stream.py)."""
import contextlib
import io
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
from PIL import Image

import data
import stream
from errors import UsageError
from test_helpers import make_colour_folder

# The loader arguments the tests below share.
LOADER = dict(batch_size=4, mean=[0.5] * 3, std=[0.2] * 3, image_size=8, device=torch.device('cpu'))


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
            with self.assertRaisesRegex(UsageError, '5.png is not a readable image'):
                data.decode_images(files, 4, workers=2, chunk=3)

    def test_memory_check(self):
        # ImageNet-1k at 224 px would need 180 GiB: say what is needed and what is free, in
        # the RAM and, on CUDA, the GPU's memory; a place whose free memory is unknown passes.
        gib = 2**30
        self.assertIsNone(data.memory_shortfall(50_000, 32, [('RAM', 64 * gib)]))  # 0.1 GiB
        self.assertEqual(data.memory_shortfall(1_281_167, 224, [('RAM', 64 * gib)]),
                         'held at 224 px they need 179.6 GiB of RAM, and 64.0 GiB is free '
                         '(of which 1 GiB stays for the model)')
        on_cuda = [('RAM', None), ('GPU memory', 2 * gib)]
        self.assertIsNone(data.memory_shortfall(50_000, 32, on_cuda))
        self.assertIn('need 1.1 GiB of GPU memory', data.memory_shortfall(400_000, 32, on_cuda))
        (place, ram), = data.free_memory(torch.device('cpu'))
        self.assertTrue(place == 'RAM' and (ram is None or ram > 0))
        with mock.patch.object(torch.cuda, 'mem_get_info', return_value=(3 * gib, 16 * gib)):
            self.assertEqual(data.free_memory(torch.device('cuda'))[1], ('GPU memory', 3 * gib))

    def test_batches_are_normalised(self):
        # The article fed raw [0, 1] pixels.
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
        mean, std = data.channel_stats(images)
        loader = data.TensorLoader(images, torch.zeros(64, dtype=torch.long), 64, mean, std, 8,
                                   train=False)
        x, _ = next(iter(loader))
        for c in range(3):
            self.assertAlmostEqual(x[:, c].mean().item(), 0, places=4)
            self.assertAlmostEqual(x[:, c].std(unbiased=False).item(), 1, places=3)

    def test_each_sample_is_cropped_and_flipped_anew_each_epoch(self):
        # The article fed every image as it is. Iterating the train loader must give each image
        # a random crop (a shifted window of the reflect-padded image) and a random horizontal
        # flip, drawn anew each epoch, and the same again for the same seed and epoch.
        n, p = 64, 2
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
        padded = nn.functional.pad(images.float(), (p, p, p, p), mode='reflect')

        def crops(seed, epoch):
            """{image: (row shift, column shift, flipped)} of one epoch, read off the samples."""
            loader = data.TensorLoader(images, torch.arange(n), 16, [0] * 3, [1 / 255] * 3, 8,
                                       train=True, seed=seed, padding=p)
            loader.set_epoch(epoch)
            found = {}
            for x, y in loader:
                for sample, i in zip(x, y.tolist()):
                    found[i] = next((r, c, f) for r in range(2 * p + 1) for c in range(2 * p + 1)
                                    for f in (False, True) if torch.equal(
                                        sample, padded[i, :, r:r + 8, c:c + 8].flip(2) if f
                                        else padded[i, :, r:r + 8, c:c + 8]))
            return found

        first, again, second = crops(0, 1), crops(0, 1), crops(0, 2)
        self.assertEqual(first, again)
        self.assertEqual(sorted(first), list(range(n)))  # every image, once
        flips = [f for _, _, f in first.values()]
        shifts = {(r, c) for r, c, _ in first.values()}
        self.assertTrue(16 < sum(flips) < 48, sum(flips))  # about half are flipped
        self.assertGreater(len(shifts), 12)  # of the 25 windows, most are drawn
        self.assertGreater(sum(first[i] != second[i] for i in range(n)), n // 2)
        self.assertNotEqual(crops(1, 1), first)  # another seed, other crops

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
            return data.gather(images, idx, *loader._crop_windows(shift, flip))
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

    def test_resize_is_bilinear_and_antialiased(self):
        # As PIL's Resize: shrinking a 1 px checkerboard averages it to grey (nearest would
        # keep black and white), and enlarging blends the edge between two halves.
        board = ((torch.arange(16)[:, None] + torch.arange(16)) % 2 * 255).to(torch.uint8)
        half = torch.zeros(8, 8, dtype=torch.uint8)
        half[:, 4:] = 255
        for image, size in ((board, 8), (half, 16)):
            images = image.expand(2, 3, *image.shape).contiguous()
            loader = data.TensorLoader(images, torch.zeros(2, dtype=torch.long), 2, [0] * 3,
                                       [1 / 255] * 3, size, train=False)
            x, _ = next(iter(loader))  # pixel values, 0 to 255
            if size == 8:
                self.assertLess((x - 127.5).abs().max().item(), 5)  # nearest: 127.5
            else:
                self.assertTrue(((x > 10) & (x < 245)).any())

    def test_resize_on_the_device(self):
        images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
        loader = data.TensorLoader(images, torch.zeros(5, dtype=torch.long), 2, [0.5] * 3,
                                   [0.25] * 3, 20, train=False)
        self.assertEqual([tuple(x.shape) for x, _ in loader],
                         [(2, 3, 20, 20), (2, 3, 20, 20), (1, 3, 20, 20)])


    def test_the_files_and_labels_are_imagefolders(self):
        # The article's torchvision ImageFolder lists each class folder by folder, a folder's
        # files before its subfolders', each sorted: D.PNG, b, c, then a/z. One sort of the
        # whole paths would give D.PNG, a/z, b, c.
        import torchvision
        with tempfile.TemporaryDirectory() as tmp:
            for path in ('train/cat/b.png', 'train/cat/a/z.png', 'train/cat/c.png',
                         'train/cat/D.PNG', 'train/dog/x.png', 'train/dog/notes.txt',
                         'test/cat/t.png', 'test/dog/u.png'):
                Path(tmp, path).parent.mkdir(parents=True, exist_ok=True)
                Image.new('RGB', (4, 4)).save(Path(tmp, path), format='PNG')
            files = data.list_image_folder(tmp)
            want = torchvision.datasets.ImageFolder(Path(tmp, 'train'))
        self.assertEqual([Path(f).name for f, _ in files.train], ['D.PNG', 'b.png', 'c.png',
                                                                  'z.png', 'x.png'])
        self.assertEqual(files.train, want.samples)
        self.assertEqual(files.classes, want.classes)


class ValidSplitTest(unittest.TestCase):
    """The validation images that choose the best epoch, held out of the training images."""

    def test_each_class_is_split_apart_and_the_seed_fixes_the_split(self):
        counts = [100, 50, 20, 3, 2]
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
        train, valid = data.split_valid(labels, 0.1, seed=0)
        self.assertEqual(sorted(train.tolist() + valid.tolist()), list(range(len(labels))))
        self.assertEqual(set(train.tolist()) & set(valid.tolist()), set())
        # A tenth of each class, and at least one image of each in both parts.
        self.assertEqual(labels[valid].bincount().tolist(), [10, 5, 2, 1, 1])
        self.assertEqual(labels[train].bincount().tolist(), [90, 45, 18, 2, 1])
        again = data.split_valid(labels, 0.1, seed=0)
        self.assertTrue(torch.equal(valid, again[1]) and torch.equal(train, again[0]))
        self.assertFalse(torch.equal(valid, data.split_valid(labels, 0.1, seed=1)[1]))
        train, valid = data.split_valid(labels, 0.0, seed=0)
        self.assertEqual((len(train), len(valid)), (len(labels), 0))


class OrientationTest(unittest.TestCase):

    def test_photos_decode_upright(self):
        # A portrait photo as a phone stores it: landscape pixels, and an EXIF orientation tag
        # (6: turn 90 degrees clockwise to view). Decoded, it must stand upright, as the same
        # photo stored upright does.
        upright = Image.new('RGB', (16, 32), (20, 40, 200))  # 16 wide, 32 tall: blue ...
        upright.paste((220, 30, 30), (0, 0, 16, 8))          # ... with a red top
        with tempfile.TemporaryDirectory() as tmp:
            plain, tagged = Path(tmp, 'upright.jpg'), Path(tmp, 'tagged.jpg')
            upright.save(plain, quality=95)
            exif = Image.Exif()
            exif[0x0112] = 6
            upright.transpose(Image.Transpose.ROTATE_90).save(tagged, quality=95, exif=exif)
            with Image.open(tagged) as img:
                self.assertEqual(img.size, (32, 16))  # stored on its side
            want = torch.from_numpy(data.decode_image(plain, 16)).int()
            got = torch.from_numpy(data.decode_image(tagged, 16)).int()
        self.assertLess((want - got).abs().max().item(), 40)  # JPEG's loss at the edge
        self.assertGreater(got[1, 8, 0].item(), 150)  # the top is red
        self.assertGreater(got[14, 8, 2].item(), 150)  # the bottom is blue


class StreamTest(unittest.TestCase):
    """--stream: the same batches from image files decoded in every epoch (stream.py)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = make_colour_folder(Path(cls.tmp.name, 'colours'), n_train=6, n_test=4)
        with contextlib.redirect_stdout(io.StringIO()):  # 'decoding ...', 'streaming ...'
            cls.held = data.load_dataset(cls.root, 8, workers=1)
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
