"""Weight gradients of the small-side convolutions on the CPU, computed as one forward convolution.

oneDNN 3.12 on avx512_core_bf16 computes weight gradients with its older direct kernel (`jit_bf16`). On
the two layers of the paper's 64 px nets whose small side is 4x4 (D 256->512 and G 512->256), it runs at
0.17-0.18 TFLOP/s, under half the rate of oneDNN's forward kernels on the same shapes. The same gradient
is itself a convolution: with the batch as its channels, the input (I, N, H, W) convolved by the output
gradient (O, N, oh, ow), dilated by the stride, gives (I, O, k, k). On the 2-core EPYC that takes
24 ms instead of 45-50 (benchmarks/onednn_step.py; docs/PERFORMANCE.md 2d). On larger sides the forward
form is slower, so only layers with a small side of at most 4x4 switch; and on narrower layers (the
demo's 128->256) the kernel gains too little to survive the copies around it, so only weights of at
least 256 x 512 x 4 x 4 do.

The switch changes a layer's class, not its parameters: state dicts, checkpoints and DDP are as before,
and without a gradient (sampling, the EMA copy) the layer is the plain one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SMALL_SIDE = 16                  # positions (4 x 4): the largest small side where the forward form won
MIN_WEIGHT_ELEMENTS = 256 * 512 * 16     # won in the whole step; the demo's 128 x 256 won per kernel only


def weight_grad_as_conv(x: torch.Tensor, g: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """dW (O, I, k, k) of y = conv2d(x, W, stride, padding) from x (N, I, H, W) and dL/dy g (N, O, oh, ow).
    For y = conv_transpose2d(x, W), pass (g, x): it is the convolution from y's side back to x's."""
    xt = x.transpose(0, 1).contiguous(memory_format=torch.channels_last)
    gt = g.transpose(0, 1).contiguous(memory_format=torch.channels_last)
    return F.conv2d(xt, gt, padding=padding, dilation=stride).transpose(0, 1)


class _SmallSideConv(torch.autograd.Function):
    """A (de)convolution whose weight gradient is `weight_grad_as_conv`; the input gradient is oneDNN's."""

    @staticmethod
    def forward(ctx, x, w, stride: int, padding: int, transposed: bool):
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding, ctx.transposed = stride, padding, transposed
        conv = F.conv_transpose2d if transposed else F.conv2d
        return conv(x, w, stride=stride, padding=padding)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        s, p = (ctx.stride,) * 2, (ctx.padding,) * 2
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(g, x, w, None, s, p, (1, 1), ctx.transposed, (0, 0), 1,
                                                     (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            dw = weight_grad_as_conv(g, x, ctx.stride, ctx.padding) if ctx.transposed else \
                weight_grad_as_conv(x, g, ctx.stride, ctx.padding)
            gw = torch.empty_like(w).copy_(dw)        # in the weight's own layout, as AccumulateGrad wants
        return gx, gw, None, None, None


class _Switchable:
    """Mixed into nn.Conv2d / nn.ConvTranspose2d: the forward form when training a small-side layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        transposed = isinstance(self, nn.ConvTranspose2d)
        if not (torch.is_grad_enabled() and self.weight.requires_grad) or self._side(x, transposed) > SMALL_SIDE:
            return super().forward(x)
        w = self.weight
        if torch.is_autocast_enabled("cpu"):          # cast as autocast would, since it skips custom Functions
            dtype = torch.get_autocast_dtype("cpu")
            x, w = x.to(dtype), w.to(dtype)
        return _SmallSideConv.apply(x, w, self.stride[0], self.padding[0], transposed)

    def _side(self, x: torch.Tensor, transposed: bool) -> int:
        """Positions on the small side: the input of a deconvolution, the output of a convolution."""
        if transposed:
            return x.shape[-2] * x.shape[-1]
        k, s, p = self.kernel_size[0], self.stride[0], self.padding[0]
        return ((x.shape[-2] + 2 * p - k) // s + 1) * ((x.shape[-1] + 2 * p - k) // s + 1)


class SwitchableConv2d(_Switchable, nn.Conv2d):
    pass


class SwitchableConvTranspose2d(_Switchable, nn.ConvTranspose2d):
    pass


def _eligible(m: nn.Module) -> bool:
    return (type(m) in (nn.Conv2d, nn.ConvTranspose2d) and m.weight.numel() >= MIN_WEIGHT_ELEMENTS
            and m.bias is None and m.groups == 1
            and m.dilation == (1, 1) and m.padding_mode == "zeros" and len(set(m.stride)) == 1
            and isinstance(m.padding, tuple) and len(set(m.padding)) == 1 and len(set(m.kernel_size)) == 1
            and getattr(m, "output_padding", (0, 0)) == (0, 0))


def use_forward_weight_grads(model: nn.Module) -> int:
    """Let every plain, bias-free, square (de)convolution in `model` with a weight of at least
    MIN_WEIGHT_ELEMENTS take the forward form when its small side is at most 4x4. Returns how many
    layers may switch."""
    switched = 0
    for m in model.modules():
        if _eligible(m):
            m.__class__ = SwitchableConvTranspose2d if isinstance(m, nn.ConvTranspose2d) else SwitchableConv2d
            switched += 1
    return switched


def switched_layers(*models: nn.Module) -> int:
    """How many layers of `models` may take the forward form: a fact of the run, saved with it."""
    return sum(isinstance(m, _Switchable) for model in models for m in model.modules())
