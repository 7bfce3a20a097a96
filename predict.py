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
import train
from data import IMG_EXTENSIONS, ImageFiles, decode_images, find_images, load_dataset, \
    make_loader, memory_shortfall
from errors import UsageError
from gradcam import grad_cam


def load_model(path, device):
    """The network saved at path, in eval mode on device, and its saving.WeightRecord."""
    path = Path(path)
    state = saving.load_weights(path)
    record = saving.read_record(path)
    if record.model not in options.MODELS:
        raise UsageError(f'{path.with_suffix(".json")} names an unknown model {record.model!r}')
    model = train.build_model(record.model, len(record.classes), record.small_input,
                              record.plain)
    what = (f'the {record.model}{" --small-input" * record.small_input}'
            f'{" --plain" * record.plain} its weight.json names')
    saving.load_into(model, state, path, what, advice='retrain, or put back the weight.json '
                                                      'that was written with them')
    return speed.prepare_model(model, device).eval(), record


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


def batches(files, record, device, workers=0, stream=None):
    """A loader of the files' images as evaluation feeds them: decoded at once or, when they
    would not fit in memory (or stream=True), batch by batch as train.py streams its test
    images."""
    held = record.held_size
    if stream is None:
        stream = memory_shortfall(len(files), held, device) is not None
    workers = workers or os.cpu_count() or 1
    images = ImageFiles(files, held) if stream else decode_images(files, held, workers)
    return make_loader(images, torch.zeros(len(files), dtype=torch.long), **loader_args(
        record, device, workers))


def loader_args(record, device, workers, batch_size=config.EVAL_BATCH_SIZE):
    """make_loader's arguments for evaluating the weights `record` describes."""
    return dict(batch_size=batch_size, mean=record.mean, std=record.std,
                image_size=record.image_size, train=False, device=device, workers=workers,
                memory_format=speed.memory_format(device))


@torch.no_grad()
def batch_probabilities(loader, model, device, amp_dtype):
    """Yield each batch's inputs as fed and their class probabilities, (B, num_classes)."""
    for inputs, _ in loader:
        with speed.autocast(device, amp_dtype):
            logits = model(inputs)
        # Article: its AlexNet took the softmax over the batch (dim=0), not over the classes.
        yield inputs, logits.float().softmax(dim=1)


def probabilities(files, model, record, device, amp_dtype, workers=0, stream=None):
    """Yield each file's class probabilities, (num_classes,)."""
    loader = batches(files, record, device, workers, stream)
    for _, probs in batch_probabilities(loader, model, device, amp_dtype):
        yield from probs.cpu()


def write_cams(files, model, record, device, amp_dtype, folder, k):
    """For each file, FOLDER/<name>.cam.png (<folder>_<name>.cam.png where two files share a
    name): the image as fed, its Grad-CAM for the likeliest class over it, and the k likeliest
    classes. Returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mean, std = (torch.tensor(v, device=device).view(3, 1, 1) for v in (record.mean, record.std))
    stems = [Path(f).stem for f in files]
    repeated = {s for s, n in Counter(stems).items() if n > 1}  # same name, other folders
    names = [f'{Path(f).parent.name}_{s}' if s in repeated else s for f, s in zip(files, stems)]
    written, i = [], 0
    loader = batches(files, record, device)
    for inputs, probs in batch_probabilities(loader, model, device, amp_dtype):
        heat = grad_cam(model, inputs.float(), probs.argmax(dim=1))
        for x, h, p in zip(inputs, heat, probs.cpu()):
            top = p.topk(k)
            path = folder / f'{names[i]}.cam.png'
            pictures.save_png(pictures.cam_picture(
                x.float() * std + mean, h, [(record.classes[c], q) for q, c in
                                            zip(top.values.tolist(), top.indices.tolist())],
                Path(files[i]).name), path)
            written.append(path)
            i += 1
    return written


def evaluate(args, device):
    """python train.py --eval PATH: the test accuracy, per-class accuracy and confusion matrix
    of saved weights, and pictures of them. Their weight.json says what they are and which
    data they were trained on (--data names another folder with the same classes)."""
    path = Path(args.eval)
    model, record = load_model(path, device)
    data_dir = args.data or (record.data if record.data != 'cifar10' else None)
    if not args.data and data_dir and not Path(data_dir).is_dir():
        raise UsageError(f'{path} was trained on {data_dir}, which is not there any more; '
                         f'pass --data DIR with its test images')
    _, _, test_x, test_y, classes = load_dataset(data_dir, args.data_root, record.image_size,
                                                 args.workers, need_train=False, device=device,
                                                 stream=args.stream)
    if record.classes != list(classes):
        raise UsageError(f'{path} was trained on the classes {record.classes}, '
                         f'but the data has {list(classes)}')
    trainer = train.Trainer(model, None, train.build_criterion(options.fixes_of(record.recipe)),
                            device, precision=speed.choose_precision(args.precision, device))
    batch_size = options.eval_batch_size(args.batch_size)
    loader = make_loader(test_x, test_y, **loader_args(record, device, args.workers, batch_size))
    loss, acc = trainer.epoch_valid(loader)
    print('per-class accuracy:')
    saving.print_class_accuracy(classes, trainer.class_accuracy)
    print('confusion matrix, in images (rows: the true class; columns: the predicted class):')
    print('\n'.join(pictures.confusion_text(trainer.confusion, classes)))
    what = record.model + ' --small-input' * record.small_input + ' --plain' * record.plain
    print(f'{path}: test accuracy {acc:.2f}% on {len(test_y):,} images ({what}, '
          f'{record.image_size} px, loss {loss:.3f})' +
          (f'; the run measured {record.test_acc:.2f}%' if record.test_acc is not None else ''))
    probs = torch.cat([p.cpu() for _, p in
                       batch_probabilities(loader, model, device, trainer.amp.dtype)])
    for line in pictures.write_eval_files(path, trainer.confusion, model, probs, classes,
                                          test_x, test_y):
        print(line)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description='Classify images with weights train.py saved.')
    p.add_argument('images', nargs='+', metavar='IMAGE_OR_FOLDER',
                   help='image files, or folders whose images are all read')
    p.add_argument('--weights', default=config.OUT_PATH, metavar='PATH',
                   help='weights train.py saved, with their .json beside them '
                        '(default: %(default)s)')
    p.add_argument('--topk', type=options.positive(int), default=3,
                   help='how many of the likeliest classes to print (default: %(default)s)')
    p.add_argument('--cam', metavar='DIR',
                   help='also write DIR/<image>.cam.png: the image as fed, where the network '
                        'looked for its likeliest class (Grad-CAM), and its top classes')
    options.add_device_argument(p)
    args = p.parse_args(argv)
    try:
        device = options.pick_device(args.device)
        model, record = load_model(args.weights, device)
        files = image_files(args.images)
        amp_dtype = speed.choose_precision('auto', device)
        k = min(args.topk, len(record.classes))
        for path, probs in zip(files, probabilities(files, model, record, device, amp_dtype)):
            top = probs.topk(k)
            print(path + ''.join(f'  {record.classes[c]} {p:.1%}'
                                 for p, c in zip(top.values.tolist(), top.indices.tolist())))
        if args.cam:
            written = write_cams(files, model, record, device, amp_dtype, args.cam, k)
            print(f'wrote {len(written)} Grad-CAM picture{"s" * (len(written) != 1)} to '
                  f'{args.cam}')
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
