"""The private parts of torch's AMP and fused Adam that a sync-free step needs, in one version-guarded
place. Read in torch 2.13 and 2.14:

- `GradScaler._scale` is the scale tensor on the device. Comparing it before and after `update()` says
  whether the step was skipped (it only backs off when it found an inf) without a host sync.
- Fused Adam reads `found_inf` and `grad_scale` attributes set on the optimizer and skips the update
  on the device when found_inf is non-zero: GradScaler.step uses that protocol itself.
- `torch._amp_foreach_non_finite_check_and_unscale_` is GradScaler's own non-finite check.
- `torch.ops.mkldnn._is_mkldnn_bf16_supported` says whether this CPU runs bf16 natively.

`check()` fails at start, naming the missing piece, on a torch that changed them.
"""
from __future__ import annotations

import contextlib

import torch

TESTED = ((2, 13), (2, 14))


def check() -> None:
    pieces = {"torch._amp_foreach_non_finite_check_and_unscale_":
              hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_"),
              "torch.amp.GradScaler._scale": "_scale" in vars(torch.amp.GradScaler(device="cpu"))}
    missing = [name for name, ok in pieces.items() if not ok]
    if missing:
        version = torch.__version__.split("+")[0]
        raise RuntimeError(f"torch {version} lacks {', '.join(missing)}, which the training step relies on "
                           f"(tested with torch {', '.join('%d.%d' % v for v in TESTED)})")


def native_bf16(device: torch.device) -> bool:
    """bf16 runs natively here: CUDA with bf16, or a CPU with avx512_bf16 or AMX (2x to 2.5x fp32 there,
    docs/PERFORMANCE.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def scale_of(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The scaler's scale, on the device (after its first `scale()` call)."""
    return scaler._scale


def non_finite(grads: list[torch.Tensor], one: torch.Tensor) -> torch.Tensor:
    """A device scalar, non-zero if any gradient holds an inf or NaN. Unscales by `one`: a no-op."""
    found = torch.zeros((), device=one.device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
    return found


@contextlib.contextmanager
def skip_if(opt: torch.optim.Optimizer, found_inf: torch.Tensor):
    """Within the block, a fused optimizer's step() skips its update on the device when `found_inf`
    is non-zero."""
    opt.found_inf, opt.grad_scale = found_inf, None
    try:
        yield
    finally:
        del opt.found_inf, opt.grad_scale
