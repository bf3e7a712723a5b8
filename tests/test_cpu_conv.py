"""train.cpu_forward_weight_grads: the small-side (de)convolutions' weight gradients as one forward
convolution. It must be the same layer: the same outputs and gradients, parameters and state dict."""
import copy

import pytest
import torch
from torch import nn

from dcgan_dist.nets.models import build_models
from dcgan_dist.ops import cpu_conv
from dcgan_dist.ops.cpu_conv import (SwitchableConv2d, SwitchableConvTranspose2d, _SmallSideConv,
                                       use_forward_weight_grads, weight_grad_as_conv)


def test_the_weight_gradient_as_one_forward_conv_is_autograds():
    torch.manual_seed(0)
    x = torch.randn(5, 6, 8, 8, dtype=torch.float64)
    w = torch.randn(7, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    y = nn.functional.conv2d(x, w, stride=2, padding=1)                          # 5, 7, 4, 4
    g = torch.randn_like(y)
    torch.testing.assert_close(weight_grad_as_conv(x, g, 2, 1), torch.autograd.grad(y, w, g)[0])
    # A transposed convolution's is the convolution's from its output back to its input: swap the two.
    wt = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    yt = nn.functional.conv_transpose2d(x, wt, stride=2, padding=1)             # 5, 3, 16, 16
    gt = torch.randn_like(yt)
    torch.testing.assert_close(weight_grad_as_conv(gt, x, 2, 1), torch.autograd.grad(yt, wt, gt)[0])


@pytest.fixture
def any_width(monkeypatch):
    """Small layers for speed: let them switch too."""
    monkeypatch.setattr(cpu_conv, "MIN_WEIGHT_ELEMENTS", 0)


def _both(plain: nn.Module):
    switched = copy.deepcopy(plain)
    assert use_forward_weight_grads(switched) == 1
    return plain, switched


def _grads(layer, x, g, autocast):
    x = x.clone().requires_grad_()
    layer.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(g.to(y.dtype))
    return y.float(), x.grad.float(), layer.weight.grad.float()


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind,shape", [
    ("conv", (6, 32, 8, 8)),          # D's 4th layer in small: 8x8 -> 4x4 (switched)
    ("conv", (6, 32, 16, 16)),        # 16x16 -> 8x8: a large small side (the plain path)
    ("deconv", (6, 32, 4, 4)),        # G's 2nd layer in small: 4x4 -> 8x8 (switched)
    ("deconv", (6, 32, 1, 1)),        # G's first layer: stride 1, 1x1 -> 4x4 (switched)
])
def test_a_switched_layer_gives_the_plain_layers_outputs_and_gradients(kind, shape, autocast, monkeypatch,
                                                                      any_width):
    torch.manual_seed(0)
    if kind == "conv":
        plain = nn.Conv2d(32, 24, 4, 2, 1, bias=False)
    else:
        plain = nn.ConvTranspose2d(32, 24, 4, 2 if shape[-1] > 1 else 1, 1 if shape[-1] > 1 else 0, bias=False)
    plain, switched = _both(plain.to(memory_format=torch.channels_last))
    calls = []
    monkeypatch.setattr(_SmallSideConv, "backward", staticmethod(
        lambda ctx, g, real=_SmallSideConv.backward: calls.append(1) or real(ctx, g)))
    x = torch.randn(*shape).to(memory_format=torch.channels_last)
    with torch.no_grad():
        g = torch.randn_like(plain(x))
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip(_grads(plain, x, g, autocast), _grads(switched, x, g, autocast)):
        torch.testing.assert_close(b, a, **tol)
    assert bool(calls) == (shape[-1] != 16), "the forward form must be used exactly on small sides"
    assert switched.weight.grad.stride() == switched.weight.stride()          # the weight's own layout


def test_only_the_paper_nets_wide_small_side_layers_switch():
    G, D = build_models(100, 64, 64, 64)                 # the paper's 64 px nets
    assert use_forward_weight_grads(G) == 1 and use_forward_weight_grads(D) == 1
    assert [m.weight.shape for m in G.modules() if type(m) is SwitchableConvTranspose2d] == [(512, 256, 4, 4)]
    assert [m.weight.shape for m in D.modules() if type(m) is SwitchableConv2d] == [(512, 256, 4, 4)]
    G, D = build_models(100, 32, 32, 64)                 # the demo's: no layer is wide enough
    assert use_forward_weight_grads(G) == 0 and use_forward_weight_grads(D) == 0


def test_switching_keeps_parameters_state_dict_and_the_eval_path(any_width):
    G, D = build_models(16, 8, 8, 32)
    keys = (list(G.state_dict()), list(D.state_dict()))
    # Every (de)convolution takes the class; each call decides by its small side.
    assert use_forward_weight_grads(G) == 4 and use_forward_weight_grads(D) == 4
    assert (list(G.state_dict()), list(D.state_dict())) == keys
    assert {type(m) for m in G.modules()} >= {SwitchableConvTranspose2d}
    assert {type(m) for m in D.modules()} >= {SwitchableConv2d}
    ema = copy.deepcopy(G).requires_grad_(False)                    # as the EMA generator is made
    z = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(ema(z), G(z))
    assert use_forward_weight_grads(G) == 0                         # already switched: nothing to do
