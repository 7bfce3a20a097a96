"""What exists only to make training fast on a device; a learner can skip this file.

Without it, training would reach about the same accuracy, only more slowly. Here are the
precision and memory-format choice, a CPU route for convolutions with a one-pixel output, and
the CUDA graphs that replay a whole training step at once.
"""
import contextlib
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import config
from errors import UsageError


PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # autocast dtypes


def choose_precision(name, device):
    """The autocast dtype for --precision `name` on device; None means fp32, no autocast.

    auto: on CUDA, bf16 where the GPU computes it natively (compute capability 8.0 and later:
    A100, RTX 30xx, L4, H100), else fp16 with loss scaling (T4, V100); on a CPU with bf16
    instructions (AVX512-BF16 or AMX), bf16, faster there than fp32 to the same accuracy
    (RESULTS.md); fp32 elsewhere (Apple's mps, other CPUs). A name given explicitly is used as
    it is, unless the device cannot do it: then one sentence says so.
    """
    if name == 'auto':
        if device.type == 'cuda':
            return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
        return torch.bfloat16 if device.type == 'cpu' and cpu_has_native_bf16() else None
    dtype = PRECISIONS[name]
    if dtype is torch.bfloat16 and device.type == 'cuda' and not cuda_has_native_bf16():
        major, minor = torch.cuda.get_device_capability()
        raise UsageError(f'--precision bf16: this GPU (compute capability {major}.{minor}) has no '
                         f'native bf16, only a slow emulation; use --precision fp16 or auto')
    if dtype is not None and not autocast_works(device, dtype):
        raise UsageError(f'--precision {name}: this torch build cannot compute in {name} on '
                         f'{device.type}; use --precision fp32 or auto')
    return dtype


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


def cuda_has_native_bf16():
    # Not torch.cuda.is_bf16_supported(): from torch 2.4 it also answers True for GPUs that
    # only emulate bf16 (T4, V100), where training would be slow or fail in cuDNN.
    return torch.cuda.get_device_capability() >= (8, 0)


def cpu_has_native_bf16(cpuinfo='/proc/cpuinfo'):
    """Whether this CPU has bf16 instructions (AVX512-BF16, or AMX-BF16); False where unsure.

    torch asks the CPU itself through private functions whose names vary between versions;
    where they are missing, Linux's /proc/cpuinfo lists the flags.
    """
    for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'):
        try:
            if getattr(torch.cpu, name)():
                return True
        except Exception:  # missing in this torch version
            pass
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(':', 1)[1].split() for line in f
                          if line.startswith('flags')), [])
    except OSError:  # not Linux
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


def route_one_pixel_convs(model):
    """Give every nn.Conv2d of model OnePixelConv2d's forward, in place, and return model.

    Only the class changes (as torch.nn.utils.parametrize also does): the module keeps its
    parameters, names and hooks, so the state_dict, and weight.pth, stay a plain model's.
    """
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = OnePixelConv2d
    return model


def prepare_model(model, device):
    """The model on device, in its fastest memory format; on the CPU, with the one-pixel route
    (printing the model shows OnePixelConv2d where nn.Conv2d was)."""
    if device.type == 'cpu':
        route_one_pixel_convs(model)
    return model.to(device, memory_format=memory_format(device))


def prepare_step(step, model, optimizer, scaler, loader, model_name, graphs=True,
                 whole_step=None):
    """The training step to use, how it runs (in words, for the run's header) and the seconds
    spent recording it: on the CPU, the one-pixel route (prepare_model put it in); on CUDA,
    cuDNN's timing of its kernels and the step recorded as CUDA graphs (record_graphs; not for
    AlexNet, whose few large kernels keep a GPU busy already, and whose dropout draws random
    numbers). `scaler` is the Trainer's MixedPrecision, on the training device."""
    device, t0 = scaler.device, time.perf_counter()
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # time cuDNN's algorithms once per shape
    if device.type != 'cuda' or not graphs or model_name == 'alexnet':
        return step, ONE_PIXEL_ROUTE if device.type == 'cpu' else 'eager', 0.0
    graphed, how = record_graphs(step, model, optimizer, scaler, loader, whole_step)
    return graphed or step, how, time.perf_counter() - t0


def graph_model(model, sample, amp_dtype):
    """CUDA only (--no-graph-whole-step, or fp16): record the model's training forward and
    backward as two CUDA graphs.

    A ResNet18 step at 32 px is hundreds of small kernels, and launching them one by one from
    Python takes about as long as the GPU takes to run them; a graph launches a pass at once.
    The model is changed in place: in train mode it replays the graphs, which hold fixed input
    buffers, so every batch must have the shape of `sample` (the train batches all do); in
    eval mode it runs as before. Recording runs 3 warm-up passes on `sample` first.
    """
    _quiet_graph_warnings()
    # Recorded under autocast so the graphs hold its casts; graphs cannot use its weight cache.
    amp = (torch.autocast('cuda', dtype=amp_dtype, cache_enabled=False) if amp_dtype
           else contextlib.nullcontext())
    with amp:
        return torch.cuda.make_graphed_callables(model, (sample,))


def _quiet_graph_warnings():
    # Recording runs on a side stream, and PyTorch then warns at each backward that the
    # gradients' streams differ (and once that cuBLAS had no context yet). The graphed runs
    # train as the eager ones do (RESULTS.md), so those two messages are left out.
    warnings.filterwarnings('ignore', message="The AccumulateGrad node's stream does not match")
    warnings.filterwarnings('ignore', message='Attempting to run cuBLAS, but there was no current')


def can_graph_whole_step(amp_dtype):
    """Whether GraphedStep can record the step: in bf16 or fp32, yes; fp16's loss scaling
    (GradScaler) is not recorded in a graph here, so with fp16 the model alone is graphed."""
    return amp_dtype != torch.float16


class GraphedStep:
    """CUDA only: a training step (forward, loss, backward, SGD update: the Trainer's
    train_step) recorded as one CUDA graph, replayed for each batch; `trainer.train_step =
    GraphedStep(...)` puts it in the step's place. Recording runs the step `warmup` times
    (cuDNN picks kernels, SGD makes its momentum), then puts weights, BatchNorm statistics and
    momentum back: replays train as the step would. The graph reads the lr from tensors set at
    each call. A call's outputs live in the graph's memory until the next call; the loss is
    copied."""

    def __init__(self, step, model, optimizer, scaler, inputs, targets, warmup=3):
        self.model, self.optimizer, self.warmup = model, optimizer, warmup
        self.eager_step = step  # the step it records
        model.train()  # BatchNorm as in training: the graph replays what it records
        self.inputs, self.targets = inputs.clone(), targets.clone()  # the fixed input buffers
        self.groups = optimizer.param_groups
        # One lr tensor per parameter group, in the weights' dtype (float32 on CUDA, which is
        # what fused SGD reads there).
        self.lrs = [torch.tensor(float(g['lr']), dtype=g['params'][0].dtype, device=inputs.device)
                    for g in self.groups]
        self.loss = self.outputs = None
        state = self._state()
        saved = [t.detach().clone() for t in state]
        scaler.cache = False  # autocast's weight cache: off while a CUDA graph records
        try:
            with self._lr_from_tensors():
                self._replay = self._record(self._step)
        finally:
            scaler.cache = True
        with torch.no_grad():
            for t, s in zip(state, saved):
                t.copy_(s)
            for t in self._state():
                if not any(t is s for s in state):  # momentum that the warm-up created:
                    t.zero_()  # from zero, the next update equals SGD's first one

    def __call__(self, inputs, targets):
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        for lr, group in zip(self.lrs, self.groups):
            lr.fill_(group['lr'])
        self._replay()
        return self.loss.detach().clone(), self.outputs.detach()

    def _step(self):
        self.loss, self.outputs = self.eager_step(self.inputs, self.targets)

    def _state(self):
        """What a step changes besides the gradients: the weights, the model's buffers, then
        the momentum buffers that exist."""
        model, optimizer = self.model, self.optimizer
        momentum = [optimizer.state[p]['momentum_buffer'] for g in self.groups
                    for p in g['params'] if optimizer.state[p].get('momentum_buffer') is not None]
        return [*model.parameters(), *model.buffers(), *momentum]

    @contextlib.contextmanager
    def _lr_from_tensors(self):
        """The optimizer reads its lr from self.lrs while this is on (the graph records that)."""
        floats = [g['lr'] for g in self.groups]
        for lr, group in zip(self.lrs, self.groups):
            group['lr'] = lr
        try:
            yield
        finally:
            for lr, group in zip(floats, self.groups):
                group['lr'] = lr

    def _record(self, step):
        """Run `step` `warmup` times, record it as a CUDA graph, and return the graph's replay.
        (The tests stand in for this one method on the CPU.)"""
        _quiet_graph_warnings()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up and recording on one side stream
            for _ in range(self.warmup):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.optimizer.zero_grad(set_to_none=True)  # the graph makes its own gradients
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
        return graph.replay


def record_graphs(step, model, optimizer, scaler, loader, whole_step=None):
    """CUDA only: record the training step on the first train batch, as one graph of the whole
    step (GraphedStep; whole_step None: config.GRAPH_WHOLE_STEP) or as the model's graphs
    (graph_model, in place); return (the new step or None, how the step now runs)."""
    whole_step = config.GRAPH_WHOLE_STEP if whole_step is None else whole_step
    inputs, targets = next(iter(loader))
    if whole_step and can_graph_whole_step(scaler.dtype):
        return (GraphedStep(step, model, optimizer, scaler, inputs, targets),
                'the whole step as a CUDA graph')
    if whole_step:
        print('the whole step is not graphed in fp16 (its loss scaling is not recorded): '
              'recording the model\'s forward and backward instead')
    graph_model(model, inputs, scaler.dtype)
    return None, 'the model as CUDA graphs'
