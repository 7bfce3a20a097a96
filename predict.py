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
from data import IMG_EXTENSIONS, ImageFiles, decode_images, find_images, make_loader, \
    memory_shortfall
from errors import UsageError
from gradcam import grad_cam

NEEDED = ('model', 'classes', 'image_size', 'mean', 'std')  # what weight.json must say


def load_model(path, device):
    """The network saved at path, in eval mode on device, and its weight.json."""
    path = Path(path)
    state = saving.load_weights(path)
    meta = saving.read_json(path.with_suffix('.json'))
    if meta is None or not all(k in meta for k in NEEDED):
        raise UsageError(f'{path} has no readable {path.with_suffix(".json").name} beside it, '
                         f'which says what the weights are and how to prepare an image; keep '
                         f'the one train.py wrote with them')
    if meta['model'] not in options.MODELS:
        raise UsageError(f'{path.with_suffix(".json")} names an unknown model {meta["model"]!r}')
    small_input, plain = meta.get('small_input', False), meta.get('plain', False)
    model = train.build_model(meta['model'], len(meta['classes']), small_input, plain)
    what = (f'the {meta["model"]}{" --small-input" * small_input}{" --plain" * plain} its '
            f'weight.json names')
    saving.load_into(model, state, path, what, advice='retrain, or put back the weight.json '
                                                      'that was written with them')
    return speed.prepare_model(model, device).eval(), meta


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


def batches(files, meta, device, workers=0, stream=None):
    """A loader of the files' images as evaluation feeds them: decoded at once or, when they
    would not fit in memory (or stream=True), batch by batch as train.py streams its test
    images."""
    held = meta.get('held_size', meta['image_size'])
    if stream is None:
        stream = memory_shortfall(len(files), held, device) is not None
    workers = workers or os.cpu_count() or 1
    images = ImageFiles(files, held) if stream else decode_images(files, held, workers)
    return make_loader(images, torch.zeros(len(files), dtype=torch.long),
                       config.EVAL_BATCH_SIZE, meta['mean'], meta['std'], meta['image_size'],
                       False, device, workers, memory_format=speed.memory_format(device))


@torch.no_grad()
def batch_probabilities(loader, model, device, amp_dtype):
    """Yield each batch's inputs as fed and their class probabilities, (B, num_classes)."""
    for inputs, _ in loader:
        with speed.autocast(device, amp_dtype):
            logits = model(inputs)
        # Article: its AlexNet took the softmax over the batch (dim=0), not over the classes.
        yield inputs, logits.float().softmax(dim=1)


def probabilities(files, model, meta, device, amp_dtype, workers=0, stream=None):
    """Yield each file's class probabilities, (num_classes,)."""
    loader = batches(files, meta, device, workers, stream)
    for _, probs in batch_probabilities(loader, model, device, amp_dtype):
        yield from probs.cpu()


def write_cams(files, model, meta, device, amp_dtype, folder, k):
    """For each file, FOLDER/<name>.cam.png (<folder>_<name>.cam.png where two files share a
    name): the image as fed, its Grad-CAM for the likeliest class over it, and the k likeliest
    classes. Returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mean, std = (torch.tensor(meta[key], device=device).view(3, 1, 1) for key in ('mean', 'std'))
    stems = [Path(f).stem for f in files]
    repeated = {s for s, n in Counter(stems).items() if n > 1}  # same name, other folders
    names = [f'{Path(f).parent.name}_{s}' if s in repeated else s for f, s in zip(files, stems)]
    written, i = [], 0
    loader = batches(files, meta, device)
    for inputs, probs in batch_probabilities(loader, model, device, amp_dtype):
        heat = grad_cam(model, inputs.float(), probs.argmax(dim=1))
        for x, h, p in zip(inputs, heat, probs.cpu()):
            top = p.topk(k)
            path = folder / f'{names[i]}.cam.png'
            pictures.save_png(pictures.cam_picture(
                x.float() * std + mean, h, [(meta['classes'][c], q) for q, c in
                                            zip(top.values.tolist(), top.indices.tolist())],
                Path(files[i]).name), path)
            written.append(path)
            i += 1
    return written


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
        model, meta = load_model(args.weights, device)
        files = image_files(args.images)
        amp_dtype = speed.choose_precision('auto', device)
        k = min(args.topk, len(meta['classes']))
        for path, probs in zip(files, probabilities(files, model, meta, device, amp_dtype)):
            top = probs.topk(k)
            print(path + ''.join(f'  {meta["classes"][c]} {p:.1%}'
                                 for p, c in zip(top.values.tolist(), top.indices.tolist())))
        if args.cam:
            written = write_cams(files, model, meta, device, amp_dtype, args.cam, k)
            print(f'wrote {len(written)} Grad-CAM picture{"s" * (len(written) != 1)} to '
                  f'{args.cam}')
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
