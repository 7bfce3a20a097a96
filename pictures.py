"""What a trained network learned, in pictures drawn with PIL alone (no matplotlib needed).

Where it looked: grad_cam (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks
via Gradient-based Localization", 2017) takes the feature map A (C channels) of one layer and
the gradient of a class's logit with respect to it; each channel's weight is its gradient
averaged over the map, and the CAM is ReLU(sum of weight x channel), enlarged to the input's size
and divided by its maximum. Hot means: these positions raised this class's score. It does not
mean the network "understands" the object there, and a coarse map (2x2) can only point to a
quarter. cam_picture draws a photo as fed, its heat map over it, and the top classes.

What it confuses: `python predict.py --test` draws the confusion matrix (also as CSV), the test
images the network got wrong with the highest confidence, and its first conv layer's filters.
"""
import csv
import io

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import saving

def grad_cam(model, images, targets, layer=None):
    """The Grad-CAM of each image for its target class, (N, H, W) in [0, 1] at the images' size.

    layer: the module whose output is explained; by default the deepest of the model's top-level
    modules whose output is still a map (larger than 1x1) at this input size. At 32 px,
    ResNet18's layer4 is 1x1, one number a channel, where no position can be told apart, so
    there it is layer3 (2x2); at 224 px it is layer4 (7x7).
    """
    fired = []  # (module, input, output) in the order the forward ran them
    hooks = [m.register_forward_hook(lambda m, i, o: fired.append((m, i[0], o)))
             for m in ([layer] if layer is not None else model.children())]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            images = images.detach().requires_grad_(True)  # a graph even if the model is frozen
            logits = model(images)
            maps = fired[-1][2] if layer is not None else deepest_map(fired)
            score = logits.float().gather(1, targets.view(-1, 1).to(logits.device)).sum()
            grads, = torch.autograd.grad(score, maps)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    maps, grads = maps.detach().float(), grads.float()
    weights = grads.mean(dim=(2, 3), keepdim=True)          # (N, C, 1, 1)
    cam = F.relu((weights * maps).sum(dim=1, keepdim=True))  # (N, 1, h, w)
    cam = F.interpolate(cam, size=images.shape[-2:], mode='bilinear', align_corners=False)
    peak = cam.amax(dim=(2, 3), keepdim=True)
    return (cam / peak.clamp_min(1e-12)).squeeze(1)


def deepest_map(fired):
    """The output of the last module to run whose output is a map larger than 1x1: not an
    in-place ReLU (its output is changed later), nor a pool that enlarges its input (AlexNet's
    adaptive pool at small sizes only repeats each value)."""
    def spatial(t):
        return t.shape[-2] * t.shape[-1] if isinstance(t, torch.Tensor) and t.dim() == 4 else 0

    maps = [o for m, i, o in fired if spatial(o) > 1 and spatial(o) <= spatial(i)
            and not isinstance(m, nn.ReLU)]
    if not maps:
        raise ValueError('no layer of this model outputs a map larger than 1x1 at this size')
    return maps[-1]


TILE = 128  # px of a photo in a picture (CIFAR's 32 px, enlarged)
# The heat map's colours, from cold to hot: dark blue, blue, cyan, yellow, red.
HEAT = torch.tensor([[0, 0, 96], [0, 64, 255], [0, 220, 220], [255, 230, 0], [220, 0, 0]],
                    dtype=torch.float32)


def font(size=13):
    try:
        return ImageFont.load_default(size=size)  # Pillow 10.1 and later, with FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def to_image(x, size=TILE):
    """A (3, H, W) tensor in [0, 1] as a PIL image, enlarged to size x size."""
    x = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(x.cpu().numpy()).resize((size, size), Image.BICUBIC)


def heat_colours(heat):
    """(H, W) values in [0, 1] as a (3, H, W) image in [0, 1], through HEAT's colours."""
    pos = heat.detach().float().cpu().clamp(0, 1) * (len(HEAT) - 1)
    low = pos.floor().long().clamp(max=len(HEAT) - 2)
    frac = (pos - low).unsqueeze(-1)
    rgb = HEAT[low] * (1 - frac) + HEAT[low + 1] * frac
    return rgb.permute(2, 0, 1) / 255


def save_png(image, path):
    saving.atomic_write(path, lambda f: image.save(f, format='PNG'))


def cam_picture(photo, heat, top, title):
    """The photo as fed (3, H, W in [0, 1]), the heat map (H, W) over it, and the top classes,
    a list of (name, probability)."""
    heat = F.interpolate(heat[None, None].float(), size=photo.shape[-2:], mode='bilinear',
                         align_corners=False)[0, 0]
    overlay = 0.5 * photo.float().cpu() + 0.5 * heat_colours(heat)
    lines = [title, f'map for: {top[0][0]}, the likeliest'] + [f'{name}  {p:.1%}'
                                                               for name, p in top]
    if heat.max() <= 0:  # Grad-CAM's ReLU left nothing: no place raised the class's score
        lines.append('(no place raised its score here)')
    pic = Image.new('RGB', (2 * TILE + 30, TILE + 20 + 18 * len(lines)), 'white')
    pic.paste(to_image(photo), (10, 10))
    pic.paste(to_image(overlay), (TILE + 20, 10))
    draw = ImageDraw.Draw(pic)
    for i, line in enumerate(lines):
        draw.text((10, TILE + 16 + 18 * i), line, fill='black', font=font())
    return pic


def confusion_csv(confusion, classes):
    """A header of the class names, then a row per true class: its name, then the counts per
    predicted class."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['true \\ predicted', *classes])
    for name, row in zip(classes, confusion.tolist()):
        writer.writerow([name, *row])
    return buf.getvalue()


def confusion_text(confusion, classes):
    """The confusion matrix as lines of text: rows the true class, columns the predicted."""
    width = max(6, len(str(int(confusion.max()))) + 1)
    name_w = max(len(c) for c in classes)
    lines = [' ' * (name_w + 2) + ''.join(f'{c[:width - 1]:>{width}}' for c in classes)]
    for name, row in zip(classes, confusion.tolist()):
        lines.append(f'  {name:<{name_w}}' + ''.join(f'{n:>{width}}' for n in row))
    return lines


def confusion_picture(confusion, classes, cell=44):
    """Each cell shaded by its share of its row (the true class) and labelled with its count."""
    n, label_w = len(classes), 8 * max(len(c) for c in classes) + 16
    pic = Image.new('RGB', (max(label_w + n * cell + 10, 300), label_w + n * cell + 30),
                    'white')
    draw = ImageDraw.Draw(pic)
    share = confusion.float() / confusion.sum(dim=1, keepdim=True).clamp_min(1)
    for i in range(n):
        draw.text((6, label_w + i * cell + cell // 2 - 7), classes[i], fill='black', font=font())
        column = Image.new('RGB', (label_w - 6, cell), 'white')  # the column's name, upright
        ImageDraw.Draw(column).text((4, cell // 2 - 7), classes[i], fill='black', font=font())
        pic.paste(column.rotate(90, expand=True), (label_w + i * cell, 0))
        for j in range(n):
            level = int(255 * (1 - share[i, j].item()))
            box = (label_w + j * cell, label_w + i * cell)
            draw.rectangle([box, (box[0] + cell - 1, box[1] + cell - 1)],
                           fill=(level, level, 255), outline=(200, 200, 200))
            draw.text((box[0] + 6, box[1] + cell // 2 - 7), str(int(confusion[i, j])),
                      fill='white' if level < 110 else 'black', font=font(12))
    draw.text((6, label_w + n * cell + 8), 'rows: true class; columns: predicted class',
              fill='black', font=font())
    return pic


def grid(tiles, captions, columns=8, tile=96):
    """Images (PIL) in rows of `columns`, each with its caption (one or two lines) below."""
    rows = (len(tiles) + columns - 1) // columns
    below = 40 if any(captions) else 0
    pic = Image.new('RGB', (columns * (tile + 8) + 8, rows * (tile + below + 8) + 8), 'white')
    draw = ImageDraw.Draw(pic)
    for k, (im, caption) in enumerate(zip(tiles, captions)):
        x, y = 8 + (k % columns) * (tile + 8), 8 + (k // columns) * (tile + below + 8)
        pic.paste(im.resize((tile, tile), Image.NEAREST if im.width < 16 else Image.BICUBIC),
                  (x, y))
        for i, line in enumerate(caption.split('\n')):
            draw.text((x, y + tile + 2 + 15 * i), line, fill='black', font=font(11))
    return pic


def mistakes_picture(images, true, predicted, confidence, classes):
    """The images (uint8, (K, 3, H, W)) each labelled true -> predicted and its probability."""
    tiles = [to_image(x.float() / 255) for x in images]
    captions = [f'{classes[t]} ->\n{classes[p]} {c:.0%}'
                for t, p, c in zip(true.tolist(), predicted.tolist(), confidence.tolist())]
    return grid(tiles, captions)


def filters_picture(model):
    """The first conv layer's filters as RGB tiles, each stretched to its own range."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    w = conv.weight.detach().float().cpu()[:, :3]
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    w = (w - lo) / (hi - lo).clamp_min(1e-12)
    tiles = [to_image(f, size=f.shape[-1]) for f in w]
    return grid(tiles, [''] * len(tiles), columns=16, tile=max(24, 6 * w.shape[-1]))


def most_confident_mistakes(probs, labels, k=24):
    """(indices, predicted classes, probabilities) of the k wrongly classified images the
    network was surest of, surest first; probs are (N, num_classes)."""
    confidence, predicted = probs.max(dim=1)
    wrong = (predicted != labels).nonzero().flatten()
    surest = wrong[confidence[wrong].argsort(descending=True)[:k]]
    return surest, predicted[surest], confidence[surest]


def write_eval_files(path, confusion, model, probs, classes, images, labels):
    """Beside the weights at path (NAME.pth): NAME.confusion.csv, NAME.confusion.png,
    NAME.mistakes.png and NAME.filters.png, from an evaluation's confusion matrix and class
    probabilities (N, num_classes). Returns a line for each, saying what was written."""
    stem = str(path.with_suffix(''))
    saving.save_text(confusion_csv(confusion, classes), f'{stem}.confusion.csv')
    save_png(confusion_picture(confusion, classes), f'{stem}.confusion.png')
    save_png(filters_picture(model), f'{stem}.filters.png')
    lines = [f'wrote {stem}.confusion.csv and {stem}.confusion.png (the matrix), '
             f'{stem}.filters.png (the first layer\'s filters)']
    idx, predicted, confidence = most_confident_mistakes(probs, labels)
    if len(idx) == 0:
        return lines + ['every test image was classified right: no mistakes to draw']
    shown = torch.stack([images[i] for i in idx.tolist()])  # held in memory, or streamed
    save_png(mistakes_picture(shown, labels[idx], predicted, confidence, classes),
             f'{stem}.mistakes.png')
    return lines + [f'wrote {stem}.mistakes.png (the {len(idx)} test images it got wrong with '
                    f'the highest confidence)']
