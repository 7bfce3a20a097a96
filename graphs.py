"""CUDA only: the training step recorded as CUDA graphs and replayed (speed.prepare_step puts
it in). A ResNet18 step at 32 px is hundreds of small kernels; launched one by one from Python
they take about as long as the GPU takes to run them, and a graph launches them all at once.
A learner can skip this file.
"""
import contextlib
import warnings

import torch


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
    train_step) recorded as one CUDA graph and replayed for each batch, in the step's place.
    Recording runs the step `warmup` times (cuDNN picks kernels, SGD makes its momentum), then
    puts weights, BatchNorm statistics and momentum back: replays train as the step would. The
    graph reads the lr from tensors set at each call. A call's outputs live in the graph's
    memory until the next call; the loss is copied."""

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


def record_graphs(step, model, optimizer, scaler, loader, whole_step=True):
    """CUDA only: record the training step on the first train batch, as one graph of the whole
    step (GraphedStep) or as the model's graphs (graph_model, in place); return (the new step
    or None, how the step now runs)."""
    inputs, targets = next(iter(loader))
    if whole_step and can_graph_whole_step(scaler.dtype):
        return (GraphedStep(step, model, optimizer, scaler, inputs, targets),
                'the whole step as a CUDA graph')
    if whole_step:
        print('the whole step is not graphed in fp16 (its loss scaling is not recorded): '
              'recording the model\'s forward and backward instead')
    graph_model(model, inputs, scaler.dtype)
    return None, 'the model as CUDA graphs'
