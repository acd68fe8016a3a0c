"""What a published student buys: accuracy against parameters, FLOPs and CPU latency, eager and
TorchScript, measured on a release exactly as a consumer loads it (its config.yaml, strict
weights, its ``.ts``)."""
import os
from typing import Dict, List, Sequence, Tuple

import cv2
import torch
from detectron2.modeling import build_model

from ..checkpoint import StrictDetectionCheckpointer
from ..deploy import test_time_input
from ..export import load_release_config, read_manifest
from ..utils.inference_cost import latency_ms

__all__ = ["release_latency", "payoff_table", "format_latency"]


def release_latency(release_dir: str, image_files: Sequence[str], threads: Sequence[int] = (1, 2)) -> Dict:
    """Per-image CPU latency of the release in ``release_dir`` on ``image_files`` (resized as
    at test time, decoding and resizing not timed), at each thread count, eager and (when the
    release has one) TorchScript.

    Returns:
        {"eager": {"1": stats, "2": stats}, "torchscript": {...}, "images": n} with stats as
        d2kd.utils.inference_cost.latency_ms gives (milliseconds, median and quartiles).
    """
    cfg = load_release_config(os.path.join(release_dir, "config.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    StrictDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    inputs = [test_time_input(cv2.imread(f), cfg) for f in image_files]
    runs = {"eager": lambda x: model([{"image": x}])}
    ts = (read_manifest(release_dir) or {}).get("torchscript")
    if ts:
        runs["torchscript"] = torch.jit.load(os.path.join(release_dir, ts["file"]), map_location="cpu")
    out = {"images": len(inputs)}
    for kind, run in runs.items():
        out[kind] = {str(t): latency_ms(run, inputs, t) for t in threads}
    return out


def format_latency(stats) -> str:
    if not stats:
        return "—"
    return f"{stats['median']:.1f} ({stats['q1']:.1f}–{stats['q3']:.1f})"


def payoff_table(rows: List[Tuple[str, Dict]], threads: Sequence[int] = (1, 2)) -> str:
    """Markdown: per model (title, index entry) AP, parameters, GFLOPs and latency per image
    (median and interquartile range, ms) at each thread count, eager and TorchScript."""
    head = ["model", "AP", "AP50", "params", "GFLOPs"]
    for t in threads:
        head += [f"{t} thread{'s' if t > 1 else ''}: eager ms", "TorchScript ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for title, e in rows:
        metrics = e.get("metrics") or {}
        cells = [title, f"{metrics.get('AP', float('nan')):.1f}", f"{metrics.get('AP50', float('nan')):.1f}",
                 f"{e['params'] / 1e6:.2f} M", f"{e['gflops']:.2f}"]
        latency = e.get("latency_ms") or {}
        for t in threads:
            cells += [format_latency((latency.get("eager") or {}).get(str(t))),
                      format_latency((latency.get("torchscript") or {}).get(str(t)))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
