"""Classify your own images with the weights train.py saved: the step after the article's end.

weight.json, beside weight.pth, says which network the weights are for, its classes, and how
its images were prepared. Each image is prepared exactly as evaluation prepares the test images:
read upright (a photo's EXIF orientation applied) as RGB, resized to the size the training
images were held at, then to the size the network was fed, and normalised with the training
images' mean and std.

    python predict.py photo.jpg                         # the top 3 classes, with probabilities
    python predict.py my_photos/ --topk 5               # every image in a folder, sorted
    python predict.py a.png b.png --weights runs/w.pth  # other weights
    python predict.py photo.jpg --cam cams/             # and where it looked (Grad-CAM)
    python predict.py --test                            # the test images: accuracy, pictures
"""
import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import torch

import config
import options
import pictures
import saving
import speed
import stream
import train
from data import IMG_EXTENSIONS, find_images, load_dataset, make_loader
from errors import UsageError, guarded


def load_model(path, device):
    """The network saved at path, in eval mode on device, and its weight.json (a dict)."""
    path = Path(path)
    state = saving.load_weights(path)
    record = saving.read_record(path)
    a = record['args']
    if a.get('model') not in options.MODELS:
        raise UsageError(f'{path.with_suffix(".json")} names an unknown model {a.get("model")!r}')
    model = train.build_model(a['model'], len(record['classes']), a['small_input'], a['plain'])
    saving.load_into(model, state, path, f'the {describe(record)} its weight.json names',
                     advice='retrain, or put back the weight.json that was written with them')
    return speed.prepare_model(model, device).eval(), record


def describe(record):
    a = record['args']
    return options.describe(a['model'], a['small_input'], a['plain'])


def flips_of(record):
    """Whether the run evaluated each image with its mirror image (weight.json; not recorded
    before it could)."""
    return record['args'].get('flips', False)


def image_files(paths):
    """Each path that is a file, and the images of each folder (any depth, sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(str(path))
        elif path.is_dir():
            found = find_images(path)
            if not found:
                raise UsageError(f'{path} holds no images (read: {", ".join(IMG_EXTENSIONS)})')
            files += found
        else:
            raise UsageError(f'{path} is neither an image nor a folder')
    return files


def batches(files, record, device, workers=0):
    """A loader of the files' images as evaluation feeds them, decoded batch by batch (in
    `workers` processes; 0: one per CPU core), as train.py --stream reads its images."""
    images = stream.ImageFiles(files, record['held_size'], workers or os.cpu_count() or 1)
    return stream.make_loader(images, torch.zeros(len(files), dtype=torch.long),
                              **loader_args(record, device))


def loader_args(record, device, batch_size=config.EVAL_BATCH_SIZE):
    """make_loader's arguments for evaluating the weights `record` (weight.json) describes."""
    return dict(batch_size=batch_size, mean=record['mean'], std=record['std'],
                image_size=record['args']['image_size'], train=False, device=device,
                memory_format=speed.memory_format(device))


@torch.no_grad()
def batch_probabilities(loader, model, device, amp_dtype, flips=False):
    """Yield each batch's inputs as fed and their class probabilities, (B, num_classes), as
    evaluation sees them (flips: train.logits)."""
    for inputs, _ in loader:
        with speed.autocast(device, amp_dtype):
            logits = train.logits(model, inputs, flips)
        # Article: its AlexNet took the softmax over the batch (dim=0), not over the classes.
        yield inputs, logits.float().softmax(dim=1)


def probabilities(files, model, record, device, amp_dtype, workers=0):
    """Yield each file's class probabilities, (num_classes,)."""
    loader = batches(files, record, device, workers)
    for _, probs in batch_probabilities(loader, model, device, amp_dtype, flips_of(record)):
        yield from probs.cpu()


def write_cams(files, model, record, device, amp_dtype, folder, k):
    """For each file, FOLDER/<name>.cam.png (<folder>_<name>.cam.png where two files share a
    name): the image as fed, its Grad-CAM for the likeliest class over it, and the k likeliest
    classes, captioned with its folder and name. Returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mean, std = (torch.tensor(record[k], device=device).view(3, 1, 1) for k in ('mean', 'std'))
    stems = [Path(f).stem for f in files]
    repeated = {s for s, n in Counter(stems).items() if n > 1}  # same name, other folders
    names = [f'{Path(f).parent.name}_{s}' if s in repeated else s for f, s in zip(files, stems)]
    written, i = [], 0
    for inputs, probs in batch_probabilities(batches(files, record, device), model, device,
                                             amp_dtype, flips_of(record)):
        heat = pictures.grad_cam(model, inputs.float(), probs.argmax(dim=1))
        for x, h, p in zip(inputs, heat, probs.cpu()):
            top = p.topk(k)
            path = folder / f'{names[i]}.cam.png'
            pictures.save_png(pictures.cam_picture(
                x.float() * std + mean, h, [(record['classes'][c], q) for q, c in
                                            zip(top.values.tolist(), top.indices.tolist())],
                f'{Path(files[i]).parent.name}/{Path(files[i]).name}'), path)
            written.append(path)
            i += 1
    return written


def test(args, device):
    """python predict.py --test: the test accuracy, per-class accuracy and confusion matrix of
    the weights, and pictures of them. Their weight.json says which data they were trained on
    (--data names another folder with the same classes) and which images were the test's."""
    path = Path(args.weights)
    model, record = load_model(path, device)
    data_dir = args.data or (record['data'] if record['data'] != 'cifar10' else None)
    if not args.data and data_dir and not Path(data_dir).is_dir():
        raise UsageError(f'{path} was trained on {data_dir}, which is not there any more; '
                         f'pass --data DIR with its test images')
    size, split = record['args']['image_size'], record['test_split'] or config.TEST_SPLIT
    images = (stream.load_dataset(data_dir, size, args.workers, False, split) if args.stream else
              load_dataset(data_dir, size, args.workers, False, device, split))
    test_x, test_y = images.test
    if record['classes'] != list(images.classes):
        raise UsageError(f'{path} was trained on the classes {record["classes"]}, '
                         f'but the data has {list(images.classes)}')
    smoothing = options.recipe_values(record['args']['recipe'])['label_smoothing']
    trainer = train.Trainer(model, None, train.build_criterion(smoothing), device,
                            precision=speed.choose_precision('auto', device),
                            flips=flips_of(record))
    make = stream.make_loader if args.stream else make_loader
    loader = make(test_x, test_y, **loader_args(record, device, args.batch_size))
    loss, acc = trainer.epoch_valid(loader)
    print('per-class accuracy:')
    saving.print_class_accuracy(images.classes, trainer.class_accuracy)
    print('confusion matrix, in images (rows: the true class; columns: the predicted class):')
    print('\n'.join(pictures.confusion_text(trainer.confusion, images.classes)))
    print(f'{path}: test accuracy {acc:.2f}% on {len(test_y):,} images ({describe(record)}, '
          f'{size} px, loss {loss:.3f})' + (f'; the run measured {record["test_acc"]:.2f}%'
                                            if record.get('test_acc') is not None else ''))
    probs = torch.cat([p.cpu() for _, p in
                       batch_probabilities(loader, model, device, trainer.amp.dtype,
                                           trainer.flips)])
    for line in pictures.write_eval_files(path, trainer.confusion, model, probs,
                                          images.classes, test_x, test_y):
        print(line)
    return 0


def classify(args, device):
    """The top classes of each image named, and with --cam, where the network looked."""
    if not args.images:
        raise UsageError('name the images (or folders of them) to classify, or pass --test to '
                         'measure the weights on their test images')
    model, record = load_model(args.weights, device)
    files = image_files(args.images)
    amp_dtype = speed.choose_precision('auto', device)
    classes = record['classes']
    k = min(args.topk, len(classes))
    for path, probs in zip(files, probabilities(files, model, record, device, amp_dtype,
                                                args.workers)):
        top = probs.topk(k)
        print(path + ''.join(f'  {classes[c]} {p:.1%}'
                             for p, c in zip(top.values.tolist(), top.indices.tolist())))
    if args.cam:
        written = write_cams(files, model, record, device, amp_dtype, args.cam, k)
        print(f'wrote {len(written)} Grad-CAM picture{"s" * (len(written) != 1)} to {args.cam}')
    return 0


def build_parser():
    p = argparse.ArgumentParser(description='Classify images with weights train.py saved, or '
                                            'test the weights on their test images.')
    p.add_argument('images', nargs='*', metavar='IMAGE_OR_FOLDER',
                   help='image files, or folders whose images are all read')
    p.add_argument('--weights', default=config.OUT_PATH, metavar='PATH',
                   help='weights train.py saved, with their .json beside them '
                        '(default: %(default)s)')
    p.add_argument('--topk', type=options.positive(int), default=3,
                   help='how many of the likeliest classes to print (default: %(default)s)')
    p.add_argument('--cam', metavar='DIR',
                   help='also write DIR/<image>.cam.png: the image as fed, where the network '
                        'looked for its likeliest class (Grad-CAM), and its top classes')
    p.add_argument('--test', action='store_true',
                   help='instead, measure the weights on the test images of the data they were '
                        'trained on, and write their confusion matrix (.confusion.csv, .png), '
                        'surest mistakes (.mistakes.png) and first-layer filters (.filters.png) '
                        'beside them')
    p.add_argument('--data', metavar='DIR', help='with --test: another image folder with the '
                   'same classes')
    p.add_argument('--stream', action='store_true', help='with --test: decode the test images '
                   'batch by batch, for a folder too large for memory')
    p.add_argument('--batch-size', type=options.positive(int), default=config.EVAL_BATCH_SIZE,
                   help='images per step (default: %(default)s)')
    p.add_argument('--workers', type=options.positive(int, allow_zero=True),
                   default=config.NUM_WORKERS,
                   help='processes that decode images; 0: one per CPU core (default: %(default)s)')
    options.add_device_argument(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)

    def run():
        device = options.pick_device(args.device)
        return test(args, device) if args.test else classify(args, device)

    return guarded(run, batch_size=args.batch_size)


if __name__ == '__main__':
    sys.exit(main())
