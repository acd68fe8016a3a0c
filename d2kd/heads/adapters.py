"""Student-side adapters that map student channels to teacher channels, one per stride."""
from typing import Dict, Iterable

import fvcore.nn.weight_init as weight_init
from detectron2.layers import ShapeSpec
from torch import Tensor, nn


ADAPTER_INITS = ("msra", "trunc_normal")


def make_adapter(in_channels: int, out_channels: int, kernel_size: int = 1, relu: bool = False,
                 init: str = "msra"):
    """A conv (kernel 1 or 3, 'same' padding), optionally followed by ReLU.

    ``init`` "msra": detectron2's ``c2_msra_fill`` (bias 0). "trunc_normal": weights from a
    normal of std 1e-4 truncated at 2 std, bias left at PyTorch's default, as FGFI's code
    initialises its adapter (``normal_().fmod_(2).mul_(1e-4)``, which leaves the bias alone).
    """
    if kernel_size not in (1, 3):
        raise ValueError(f"adapter kernel size must be 1 or 3, got {kernel_size}")
    if init not in ADAPTER_INITS:
        raise ValueError(f"adapter init must be one of {ADAPTER_INITS}, got '{init}'")
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    if init == "msra":
        weight_init.c2_msra_fill(conv)
    else:
        nn.init.trunc_normal_(conv.weight, std=1e-4, a=-2e-4, b=2e-4)
    return nn.Sequential(conv, nn.ReLU()) if relu else conv


class StrideAdapters(nn.Module):
    """Adapters keyed by stride. Strides without an adapter pass the student map through.

    Adapters belong to the distillation heads: they train with the student and are dropped
    when the student is exported.
    """

    def __init__(
        self,
        strides: Iterable[int],
        student_shapes: Dict[int, ShapeSpec],
        teacher_shapes: Dict[int, ShapeSpec],
        mode: str = "auto",
        kernel_size: int = 1,
        relu: bool = False,
        init: str = "msra",
    ):
        super().__init__()
        if mode not in ("auto", "always"):
            raise ValueError(f"adapter mode must be 'auto' or 'always', got '{mode}'")
        self.adapters = nn.ModuleDict()
        for s in strides:
            c_s, c_t = student_shapes[s].channels, teacher_shapes[s].channels
            if mode == "always" or c_s != c_t:
                self.adapters[f"s{s}"] = make_adapter(c_s, c_t, kernel_size, relu, init)

    def forward(self, stride: int, x: Tensor) -> Tensor:
        key = f"s{stride}"
        return self.adapters[key](x) if key in self.adapters else x

    def __contains__(self, stride: int) -> bool:
        return f"s{stride}" in self.adapters
