"""Measure training speed: the model's raw step rate against a real Trainer epoch, on CPU or GPU.

For each configuration it reports, in images per second: the raw training step (forward,
backward and optimizer step on one resident batch), a Trainer epoch through train.py's own data
path (TensorLoader: crop, flip, normalise, resize), their ratio (the pipeline efficiency) and
evaluation. It also times the article's ResNet18 as written, and the article's PIL input pipeline
against the tensor path.

    python benchmark.py                 # the full table for this machine's device
    python benchmark.py --quick         # under a minute on 2 CPU cores (the tests run this)
    python benchmark.py --json out.json
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

import data
import layers
import options
import saving
import graphs
import speed
import stream
import train
from errors import UsageError
from resnet import ResNet18


# ----------------------------------------------------------------------------------------------
# A specimen of the article's bugs, for timing only: its ResNet18 exactly as written. Every stage
# has 3 blocks (first_block + num_blocks), no stage has a stride (all run at 56x56 for 224 px),
# and every conv has a bias. Do not train this; resnet.py is the fixed network.

def article_residual_layer(num_blocks, in_channels, out_channels):
    def block(cin, cout, downsample=None):
        b = layers.BasicBlock(cin, cout, downsample=downsample)
        b.conv1 = nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=True)
        b.conv2 = nn.Conv2d(cout, cout, kernel_size=3, padding=1, bias=True)
        return b
    downsample = None
    if in_channels != out_channels:  # the article's only condition; stride 1 always
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=True),
                                   nn.BatchNorm2d(out_channels))
    return nn.Sequential(block(in_channels, out_channels, downsample),
                         *[block(out_channels, out_channels) for _ in range(num_blocks)])


def article_resnet18(num_classes):
    model = ResNet18(num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)  # bias=True
    model.layer1 = article_residual_layer(2, 64, 64)
    model.layer2 = article_residual_layer(2, 64, 128)
    model.layer3 = article_residual_layer(2, 128, 256)
    model.layer4 = article_residual_layer(2, 256, 512)
    return model


# ----------------------------------------------------------------------------------------------

def build(name, num_classes=10):
    if name == 'resnet18-article':
        return article_resnet18(num_classes)
    if name == 'resnet18-small':
        return train.build_model('resnet18', num_classes, small_input=True)
    return train.build_model(name, num_classes)


class Resident:
    """A 'loader' that yields one batch, already on the device, `steps` times."""

    def __init__(self, inputs, targets, steps):
        self.batch, self.steps = (inputs, targets), steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))


def measure(name, image_size, batch_size, device, precision, steps, repeats, launch='eager',
            warmup=1):
    """Raw step, Trainer epoch and eval img/s for one configuration (medians of repeats)."""
    torch.manual_seed(0)
    mf = speed.memory_format(device)
    model = build(name)
    if launch == 'no-route':  # the CPU without speed.py's one-pixel conv route
        model = model.to(device, memory_format=mf)
    else:
        model = speed.prepare_model(model, device)  # as train.py prepares it
    recipe = options.recipe_values('fixed')  # train.py's own optimizer and loss
    optimizer = train.build_optimizer(model.parameters(), 0.01, recipe['momentum'],
                                      recipe['weight_decay'], recipe['nesterov'], device)
    amp_dtype = speed.choose_precision(precision, device)
    trainer = train.Trainer(model, optimizer, train.build_criterion(recipe['label_smoothing']),
                            device, precision=amp_dtype)
    trainer.progress = False

    # A synthetic data set of CIFAR's shape (32 px uint8), fed at image_size as train.py does.
    n = batch_size * steps
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (n,))
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    loader = data.TensorLoader(images, labels, batch_size, mean, std, image_size, train=True,
                               memory_format=mf)
    valid = data.TensorLoader(images, labels, batch_size, mean, std, image_size, train=False,
                              memory_format=mf)
    inputs, targets = next(iter(loader))
    resident = Resident(inputs, targets, steps)
    if launch == 'graph':  # as train.py --no-graph-whole-step does on CUDA
        graphs.graph_model(model, inputs, amp_dtype)
    elif launch == 'whole':  # as train.py does on CUDA (its default)
        trainer.train_step = graphs.GraphedStep(trainer.train_step, model, optimizer,
                                               trainer.amp, inputs, targets)

    def rate(fn, count):
        speed.sync(device)
        t0 = time.perf_counter()
        fn()
        speed.sync(device)
        return count / (time.perf_counter() - t0)

    if warmup:
        trainer.epoch_train(Resident(inputs, targets, warmup))
        trainer.epoch_valid(valid)
    raw, epoch, evals = [], [], []
    for r in range(repeats):  # interleaved, so drifting clocks hit both alike
        raw.append(rate(lambda: trainer.epoch_train(resident), n))
        loader.set_epoch(r)
        epoch.append(rate(lambda: trainer.epoch_train(loader), n))
        evals.append(rate(lambda: trainer.epoch_valid(valid), n))
    step_rate, epoch_rate = statistics.median(raw), statistics.median(epoch)
    return {'model': name, 'device': device.type, 'precision': speed.precision_name(amp_dtype),
            'launch': launch, 'batch': batch_size, 'px': image_size,
            'step_img_s': round(step_rate, 1),
            'epoch_img_s': round(epoch_rate, 1), 'efficiency': round(epoch_rate / step_rate, 3),
            'eval_img_s': round(statistics.median(evals), 1)}


def data_path_rates(device, count, batch_size=128, workers=None):
    """img/s of the data path alone, no model: the article's PIL pipeline (Resize(224) +
    ToTensor, one process) against the TensorLoader at 224 px and at the default 32 px, and
    the StreamLoader decoding JPEG files in worker processes: 32 px files fed at 32 px, and
    256 px files (photo-like, a fifth as many) fed at 224 px."""
    g = torch.Generator().manual_seed(0)
    arrays = torch.randint(0, 256, (count, 32, 32, 3), generator=g, dtype=torch.uint8)
    pil_images = [Image.fromarray(a.numpy()) for a in arrays]
    article = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])
    t0 = time.perf_counter()
    for img in pil_images:
        article(img)
    rates = {'pil_224_img_s': round(count / (time.perf_counter() - t0), 1)}

    images = arrays.permute(0, 3, 1, 2).contiguous().to(device)
    for px in (224, 32):
        rates[f'tensor_{px}_img_s'] = loader_rate(
            data.make_loader(images, torch.zeros(count, dtype=torch.long), batch_size=batch_size,
                             mean=[0.5] * 3, std=[0.25] * 3, image_size=px, train=True,
                             device=device, memory_format=speed.memory_format(device)), device)
    with tempfile.TemporaryDirectory() as tmp:
        for px, held, n in ((32, 32, count), (224, 256, max(batch_size, count // 5))):
            files = []
            for i, img in enumerate(pil_images[:n]):
                files.append(str(Path(tmp, f'{held}-{i}.jpg')))
                img.resize((held, held), Image.BILINEAR).save(files[-1], quality=90)
            rates[f'stream_{px}_img_s'] = loader_rate(
                stream.make_loader(stream.ImageFiles(files, px, workers or os.cpu_count() or 1),
                                   torch.zeros(n, dtype=torch.long), batch_size=batch_size,
                                   mean=[0.5] * 3, std=[0.25] * 3, image_size=px, train=True,
                                   device=device, memory_format=speed.memory_format(device)),
                device)
    return rates


def loader_rate(loader, device):
    """img/s of a loader's second epoch (the first starts its workers and warms up)."""
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        speed.sync(device)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        speed.sync(device)
    return round(len(loader) * loader.batch_size / (time.perf_counter() - t0), 1)


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name()
    try:  # the CPU's model name, on Linux
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if 'model name' in line)
    except (OSError, StopIteration):
        return device.type


def configs(device_type, quick, auto):
    """(model, px, batch, precision, launch) rows for a device, where --precision auto gives
    `auto` (speed.choose_precision). launch: 'eager' (one launch a kernel), 'graph' (the model's
    CUDA graphs, train.py's in fp16), 'whole' (the whole step as one CUDA graph, train.py's
    default on CUDA) or, on the CPU, 'no-route' (eager without speed.py's one-pixel route)."""
    if quick:
        return [('resnet18', 16, 8, 'auto', 'eager'), ('resnet18-small', 16, 8, 'auto', 'eager'),
                ('alexnet', 67, 8, 'auto', 'eager'), ('resnet18-article', 16, 8, 'auto', 'eager')]
    if device_type == 'cuda':  # both of train.py's graph launches, and eager to compare
        rows = [('resnet18', 32, 512, 'auto', 'graph'), ('resnet18', 32, 512, 'auto', 'whole'),
                ('resnet18', 32, 512, 'auto', 'eager'), ('resnet18', 32, 512, 'fp32', 'graph'),
                ('resnet18', 32, 512, 'fp32', 'whole'), ('resnet18', 32, 512, 'fp32', 'eager'),
                ('resnet18-small', 32, 512, 'auto', 'graph'),
                ('alexnet', 227, 128, 'auto', 'eager'), ('resnet18', 224, 128, 'auto', 'graph'),
                ('resnet18', 224, 128, 'fp32', 'eager'),
                ('resnet18-article', 224, 128, 'fp32', 'eager')]
        # A GPU with fp16 and no bf16: train.py graphs the model alone there, so there is no
        # fp16 'whole' row to time.
        return [r for r in rows if r[4] != 'whole' or graphs.can_graph_whole_step(
            auto if r[3] == 'auto' else speed.PRECISIONS[r[3]])]
    rows = [('resnet18', 32, 512, 'fp32', 'eager'), ('resnet18', 32, 512, 'fp32', 'no-route'),
            ('resnet18', 32, 512, 'bf16', 'eager'), ('resnet18', 32, 512, 'bf16', 'no-route'),
            ('resnet18-small', 32, 128, 'fp32', 'eager'),
            ('resnet18-small', 32, 128, 'bf16', 'eager'), ('alexnet', 67, 128, 'fp32', 'eager'),
            ('alexnet', 67, 128, 'bf16', 'eager'), ('resnet18-article', 32, 128, 'fp32', 'eager'),
            ('resnet18', 32, 128, 'fp32', 'eager')]
    # bf16 rows where train.py would pick bf16 (--precision auto), that is, on a CPU that has it.
    return [r for r in rows if r[3] != 'bf16' or auto == torch.bfloat16]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true',
                   help='small batches, one step, no warm-up: a smoke test')
    options.add_device_argument(p)
    p.add_argument('--steps', type=options.positive(int), default=None,
                   help='steps per timed repeat (default: 1 quick, 3 on CPU, 50 on CUDA; '
                        'a fifth of that for the article\'s network on CUDA)')
    p.add_argument('--repeats', type=options.positive(int), default=None,
                   help='timed repeats; the median is reported (default: 1 quick, else 3)')
    p.add_argument('--json', metavar='PATH', help='also write the results as JSON')
    args = p.parse_args(argv)
    try:
        device = options.pick_device(args.device)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision('high')
    steps = args.steps or (1 if args.quick else 50 if device.type == 'cuda' else 3)
    repeats = args.repeats or (1 if args.quick else 3)

    name = device_name(device)
    print(f'device: {name}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads; '
          f'{steps} steps a repeat, median of {repeats}', flush=True)
    rows = configs(device.type, args.quick, speed.choose_precision('auto', device))
    results, failed = run_rows(rows, device, steps, repeats, args)
    # --quick decodes in this process: a smoke test, not a measurement.
    rates = data_path_rates(device, 64, 32, workers=1) if args.quick else \
        data_path_rates(device, 4096)
    print(f'data path alone: the article\'s PIL Resize(224) + ToTensor '
          f'{rates["pil_224_img_s"]:,.0f} img/s (one process); TensorLoader '
          f'{rates["tensor_224_img_s"]:,.0f} img/s at 224 px, {rates["tensor_32_img_s"]:,.0f} '
          f'img/s at 32 px ({device.type}); StreamLoader from JPEG files, '
          f'{os.cpu_count()} worker processes: {rates["stream_32_img_s"]:,.0f} img/s at 32 px, '
          f'{rates["stream_224_img_s"]:,.0f} img/s at 224 px (from 256 px files)')
    print_article_gap(results)
    if args.json:
        saving.save_text(json.dumps({'device': name, 'torch': torch.__version__,
                                     'threads': torch.get_num_threads(), 'steps': steps,
                                     'repeats': repeats, 'results': results,
                                     'data_path': rates, 'failed': failed}, indent=1), args.json)
    return 1 if failed else 0


def run_rows(rows, device, steps, repeats, args):
    """Measure and print each row; a failed row (out of memory, say) leaves the others."""
    print(f'{"model":<17}{"prec":<6}{"launch":<9}{"batch":>6}{"px":>5}{"step img/s":>12}'
          f'{"epoch img/s":>13}{"efficiency":>12}{"eval img/s":>12}')
    results, failed = [], []
    for model, px, batch, precision, launch in rows:
        # On CUDA the article's network runs much slower: a fifth of the steps still takes seconds.
        fewer = model == 'resnet18-article' and device.type == 'cuda' and not args.steps
        row = (f'{model:<17}{speed.precision_name(speed.choose_precision(precision, device)):<6}'
               f'{launch:<9}{batch:>6}{px:>5}')
        try:
            r = measure(model, px, batch, device, precision, steps // 5 if fewer else steps,
                        repeats, launch, warmup=0 if args.quick else 1)
        except RuntimeError as e:
            failed.append(model)
            print(f'{row}  failed: {str(e).splitlines()[0][:200]}', flush=True)
            continue
        results.append(r)
        print(f'{row}{r["step_img_s"]:>12,.0f}{r["epoch_img_s"]:>13,.0f}'
              f'{r["efficiency"]:>12.3f}{r["eval_img_s"]:>12,.0f}', flush=True)
    return results, failed


def print_article_gap(results):
    """How much slower the article's ResNet18 steps than the fixed one, wherever both ran."""
    for a in (r for r in results if r['model'] == 'resnet18-article'):
        fixed = next((r for r in results if r['model'] == 'resnet18' and r['px'] == a['px']
                      and r['batch'] == a['batch'] and r['precision'] == a['precision']
                      and r['launch'] == a['launch']), None)
        if fixed:
            print(f'the article\'s ResNet18 as written: {a["step_img_s"]:,.0f} img/s against '
                  f'{fixed["step_img_s"]:,.0f} fixed ({fixed["step_img_s"] / a["step_img_s"]:.1f}x '
                  f'slower; {a["precision"]}, {a["px"]} px, batch {a["batch"]})')


if __name__ == '__main__':
    sys.exit(main())
