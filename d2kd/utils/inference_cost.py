"""What a detector costs at inference: parameters, FLOPs per image and CPU latency per image.

Used by the payoff table (tools/demo.py, benchmarks/bench_inference.py) and the zoo's index.
FLOPs are fvcore's count through detectron2's ``FlopCountAnalysis`` (one fused multiply-add
counts as one flop, as in detectron2's and most detection papers' "FLOPs"). Latency is the
model call on an already resized input tensor (what a traced student takes): image decoding
and resizing are left out, the model's own normalisation, padding and postprocess are in.
"""
import statistics
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, Sequence

import torch
from torch import nn

__all__ = ["parameter_count", "gflops_per_image", "latency_ms", "torch_threads"]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops_per_image(model: nn.Module, images: Sequence[torch.Tensor]) -> float:
    """Mean GFLOPs of ``model`` (a plain detectron2 detector) over ``images`` ((3, H, W) tensors
    at the test size), counted by detectron2's FlopCountAnalysis."""
    from detectron2.utils.analysis import FlopCountAnalysis

    was_training = model.training
    model.eval()
    totals = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # fvcore counts by tracing
        for image in images:
            analysis = FlopCountAnalysis(model, [{"image": image}])
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            totals.append(analysis.total() / 1e9)
    model.train(was_training)
    return statistics.fmean(totals)


@contextmanager
def torch_threads(threads: int):
    """torch's intra-op threads set to ``threads`` inside the block, restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def latency_ms(predict: Callable[[torch.Tensor], Any], images: Sequence[torch.Tensor], threads: int,
               warmup: int = 3) -> Dict[str, float]:
    """Per-image wall time of ``predict(image)`` at ``threads`` torch threads, after ``warmup``
    untimed calls (TorchScript's profiling executor optimises on its first calls).

    Returns:
        {"median", "q1", "q3", "n"}: milliseconds, quartiles over the images.
    """
    times = []
    with torch_threads(threads), torch.no_grad():
        for image in list(images[:1]) * warmup:
            predict(image)
        for image in images:
            start = time.perf_counter()
            predict(image)
            times.append((time.perf_counter() - start) * 1e3)
    q1, median, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return {"median": median, "q1": q1, "q3": q3, "n": len(times)}
