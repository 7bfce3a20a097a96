"""Grad-CAM: where in an image a trained network found the evidence for a class.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization" (2017, arXiv 1610.02391). Take the feature map A (C channels) of one layer and the
gradient of the class's logit with respect to it. Each channel's weight is its gradient averaged
over the map; the CAM is ReLU(sum of weight x channel), enlarged to the input's size and divided
by its maximum. Hot means: these positions raised this class's score. It does not mean the
network "understands" the object there, and a coarse map (2x2) can only point to a quarter.

    heat = grad_cam(model, images, targets)          # (N, H, W) in [0, 1]
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


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
