"""What exists only to make training fast on a device; a learner can skip this file.

Without it, training would reach about the same accuracy, only more slowly. Here are the
precision and memory-format choice, a CPU route for convolutions with a one-pixel output, and
the call that, on CUDA, records the training step as CUDA graphs (graphs.py).
"""
import contextlib
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import config
from errors import UsageError


PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # autocast dtypes


def choose_precision(name, device):
    """The autocast dtype for --precision `name` on device (None: fp32, no autocast): see
    pick_precision. One sentence where this torch build cannot compute in it there."""
    dtype = pick_precision(name, device.type, torch.cuda.get_device_capability(device)
                           if device.type == 'cuda' else None,
                           device.type == 'cpu' and cpu_has_native_bf16())
    if name != 'auto' and dtype is not None and not autocast_works(device, dtype):
        raise UsageError(f'--precision {name}: this torch build cannot compute in {name} on '
                         f'{device.type}; use --precision fp32 or auto')
    return dtype


def pick_precision(name, device_type, capability=None, cpu_bf16=False):
    """auto: on CUDA, bf16 where the GPU computes it natively (compute capability 8.0 and later:
    A100, RTX 30xx, L4, H100), else fp16 with loss scaling (T4, V100); on a CPU with bf16
    instructions (cpu_bf16), bf16, faster there than fp32 to the same accuracy (RESULTS.md);
    fp32 elsewhere (Apple's mps, other CPUs). A name given is used as it is, but bf16 on a GPU
    that only emulates it is one sentence."""
    if name == 'auto':
        if device_type == 'cuda':
            return torch.bfloat16 if capability >= (8, 0) else torch.float16
        return torch.bfloat16 if cpu_bf16 else None
    if name == 'bf16' and device_type == 'cuda' and capability < (8, 0):
        raise UsageError(f'--precision bf16: this GPU (compute capability {capability[0]}.'
                         f'{capability[1]}) has no native bf16, only a slow emulation; use '
                         f'--precision fp16 or auto')
    return PRECISIONS[name]


def autocast(device, dtype, cache_enabled=True):
    """torch.autocast to dtype on device; for fp32 (None), no autocast at all: torch before 2.5
    refuses even a disabled one on Apple's mps device."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


class MixedPrecision(torch.amp.GradScaler):
    """The Trainer's mixed precision: autocast() computes in `dtype` (None: fp32, no autocast),
    and as a GradScaler it scales fp16's loss so that small gradients do not underflow. For
    bf16 and fp32 the scaler is off: scale(loss) is loss, step(optimizer) is optimizer.step()."""

    def __init__(self, device, dtype=None):
        device = torch.device(device)
        super().__init__(device.type, enabled=dtype == torch.float16)
        self.device, self.dtype = device, dtype
        self.cache = True  # autocast's weight cache; off while a CUDA graph records

    def autocast(self):
        return autocast(self.device, self.dtype, self.cache)


def precision_name(dtype):
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def cpu_has_native_bf16(cpuinfo='/proc/cpuinfo'):
    """Whether this CPU has bf16 instructions (AVX512-BF16, or AMX-BF16); False where unsure.
    torch asks the CPU itself through private functions whose names vary between versions;
    where they are missing, Linux's `cpuinfo` lists the flags (cpu_flags_have_bf16)."""
    for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'):
        try:
            if getattr(torch.cpu, name)():
                return True
        except Exception:  # missing in this torch version
            pass
    return cpu_flags_have_bf16(cpuinfo)


def cpu_flags_have_bf16(cpuinfo):
    """Whether the CPU flags in Linux's /proc/cpuinfo (at `cpuinfo`) include bf16's; False
    where there is no such file (not Linux)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(':', 1)[1].split() for line in f
                          if line.startswith('flags')), [])
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def autocast_works(device, dtype):
    """Whether torch.autocast computes a linear layer in dtype on device (an old CPU build
    turns fp16 autocast off with a warning; an old mps build refuses it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with torch.autocast(device.type, dtype=dtype):
                out = F.linear(torch.ones(1, 2, device=device), torch.ones(2, 2, device=device))
        return out.dtype == dtype
    except (RuntimeError, ValueError, AssertionError):
        return False


def memory_format(device):
    # channels_last (NHWC) picks the faster convolution kernels of cuDNN and of oneDNN on the
    # CPU (RESULTS.md, "How it is fast").
    return torch.channels_last if device.type in ('cuda', 'cpu') else torch.contiguous_format


class OnePixelConv2d(nn.Conv2d):
    """nn.Conv2d, computed as one matrix product on the CPU when its output is a single pixel.

    Not in the article: a CPU speed-up (RESULTS.md, "How it is fast"). At 32 px ResNet18's last
    stage works on 1x1 maps, where a 3x3 conv sees its input through the centre tap alone (the
    stride-2 conv into the stage through 4 taps): one matrix product, which oneDNN's conv is slow
    at. Same parameters, same values up to rounding; padding-only taps get a zero gradient.
    Other devices and larger outputs take nn.Conv2d's own route.
    """

    def forward(self, x):
        if not self.one_pixel_out(x):
            return super().forward(x)
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        rows, cols = min(kh - ph, x.shape[-2]), min(kw - pw, x.shape[-1])  # the window seen
        weight = self.weight[:, :, ph:ph + rows, pw:pw + cols]
        out = F.linear(x[:, :, :rows, :cols].flatten(1), weight.flatten(1), self.bias)
        return out[:, :, None, None]

    def one_pixel_out(self, x):
        """Whether x takes the matrix-product route: CPU, plain conv, 1x1 output."""
        if (x.device.type != 'cpu' or x.dim() != 4 or self.groups != 1
                or self.dilation != (1, 1) or self.padding_mode != 'zeros'
                or isinstance(self.padding, str)):
            return False
        return all((size + 2 * p - k) // s == 0 for size, k, s, p in zip(
            x.shape[-2:], self.kernel_size, self.stride, self.padding))


ONE_PIXEL_ROUTE = '1x1-output convs as matrix products'  # for the run's header


def prepare_model(model, device):
    """The model on device, in its fastest memory format; on the CPU, every nn.Conv2d given
    OnePixelConv2d's forward, in place (printing the model shows OnePixelConv2d). Only the class
    changes, as torch.nn.utils.parametrize also does: the module keeps its parameters, names
    and hooks, so the state_dict, and weight.pth, stay a plain model's."""
    for m in model.modules():
        if device.type == 'cpu' and type(m) is nn.Conv2d:
            m.__class__ = OnePixelConv2d
    return model.to(device, memory_format=memory_format(device))


def prepare_step(step, model, optimizer, scaler, loader, model_name,
                 graphs=config.CUDA_GRAPHS, whole_step=config.GRAPH_WHOLE_STEP):
    """The training step to use, and how it runs (in words, for the run's header): on the
    CPU, the one-pixel route (prepare_model put it in); on CUDA, cuDNN's timing of its kernels
    and the step recorded as CUDA graphs (graphs.py; not for AlexNet, whose few large kernels
    keep a GPU busy already, and whose dropout draws random numbers). `scaler` is the
    Trainer's MixedPrecision, on the training device."""
    device = scaler.device
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # time cuDNN's algorithms once per shape
    if device.type != 'cuda' or not graphs or model_name == 'alexnet':
        return step, ONE_PIXEL_ROUTE if device.type == 'cpu' else 'eager'
    import graphs as cuda_graphs  # CUDA only
    graphed, how = cuda_graphs.record_graphs(step, model, optimizer, scaler, loader, whole_step)
    return graphed or step, how


def sync(device):
    """Wait for the device to finish what it was given (for timing)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()
