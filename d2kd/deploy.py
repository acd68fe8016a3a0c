"""Deployment formats of a plain detectron2 student: TorchScript, traced with detectron2.export.

A traced student (``<name>_<md5[:6]>.ts``) is a self-contained TorchScript module: loading it
needs ``torch.jit.load`` and torchvision's operators (its graph calls ``torchvision::nms`` and,
for R-CNN, ``roi_align``: ``import torchvision`` in Python, libtorchvision linked in C++), and
no detectron2, no d2kd, no Python source. Its contract, the same for Faster R-CNN, RetinaNet
and GFL students:

* input: one image, a float ``(3, H, W)`` tensor in the config's ``INPUT.FORMAT`` channel order
  (BGR for detectron2's defaults), already resized the way the config's test-time
  ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`` resizes it; pixel normalisation and
  padding happen inside;
* outputs: a tuple ``(pred_boxes (R, 4) XYXY, pred_classes (R,), scores (R,), image_size (2,))``
  in the coordinates of the input tensor (``TORCHSCRIPT_OUTPUTS``); scaling the boxes back to
  the original image is the caller's (``TorchScriptPredictor`` does it with detectron2's own
  ``detector_postprocess``, as ``DefaultPredictor`` does).

Why tracing (``TracingAdapter`` + ``torch.jit.trace``) and not scripting: detectron2's
``scripting_with_instances`` covers its own meta-architectures only, while tracing covers
d2kd's GFL too, and detectron2 keeps its R-CNN and RetinaNet inference trace-friendly, so one
traced module serves other input sizes (checked by the tests on several sizes). A traced
module is specialised to the device it was traced on (MODEL.DEVICE). ONNX is not offered:
see the README ("Deployment formats").
"""
import io
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.export import TracingAdapter
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

__all__ = ["TORCHSCRIPT_OUTPUTS", "FORMATS", "trace_student", "test_time_input", "TorchScriptPredictor",
           "predictions_difference", "as_prediction_dicts", "ParityError", "DEFAULT_TOLERANCE"]

FORMATS = ("torchscript",)
TORCHSCRIPT_OUTPUTS = ("pred_boxes", "pred_classes", "scores", "image_size")
# Largest absolute difference (pixels for boxes, probability for scores) allowed between the
# eager student and its exported form on the same image; classes must be equal.
DEFAULT_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """The exported model predicts differently from the eager student."""


def _inference(model):
    """How TracingAdapter calls ``model``: boxes in the input tensor's coordinates."""
    if isinstance(model, GeneralizedRCNN):
        # R-CNN's own postprocess would need the original size; leave it to the caller
        return lambda m, inputs: [{"instances": m.inference(inputs, do_postprocess=False)[0]}]
    return None  # dense detectors: forward() without height/width keeps the input's size


def trace_student(model, sample_image: torch.Tensor) -> bytes:
    """Trace ``model`` (a plain detector in eval mode, weights loaded) on ``sample_image``
    (a preprocessed ``(3, H, W)`` tensor, see the module docstring) and return the saved
    TorchScript module's bytes. The output order is checked against TORCHSCRIPT_OUTPUTS."""
    model.eval()
    adapter = TracingAdapter(model, [{"image": sample_image}], _inference(model))
    with torch.no_grad(), warnings.catch_warnings():
        # detectron2's shape checks and asserts become constants; its code is trace-safe there
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(adapter, (sample_image,), check_trace=False)
    keys = tuple(adapter.outputs_schema.schemas[0].schemas[0].keys) + ("image_size",)
    if keys != TORCHSCRIPT_OUTPUTS:
        raise RuntimeError(f"traced outputs are {keys}, expected {TORCHSCRIPT_OUTPUTS}")
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def test_time_input(original_image: np.ndarray, cfg) -> torch.Tensor:
    """A BGR ``(H, W, 3)`` uint8 image as the traced student takes it: the config's channel
    order and test-time resize, as ``DefaultPredictor`` prepares it, ``(3, H', W')`` float."""
    image = original_image[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else original_image
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


class TorchScriptPredictor:
    """``DefaultPredictor`` for a traced student: a BGR ``(H, W, 3)`` uint8 image in, its
    ``Instances`` (original-image coordinates) out. ``model``: a ``.ts`` path, a file-like
    object holding one, or a loaded module. Needs detectron2 for the resize and the
    postprocess, never d2kd."""

    def __init__(self, model, cfg):
        self.model = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.load(model, map_location="cpu")
        self.cfg = cfg

    def __call__(self, original_image: np.ndarray) -> Instances:
        with torch.no_grad():
            boxes, classes, scores, size = self.model(test_time_input(original_image, self.cfg))
        inst = Instances((int(size[0]), int(size[1])), pred_boxes=Boxes(boxes), pred_classes=classes, scores=scores)
        return detector_postprocess(inst, original_image.shape[0], original_image.shape[1])


def predictions_difference(expected: Sequence[Dict[str, torch.Tensor]], got: Sequence[Instances],
                           names: Optional[Sequence[str]] = None, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """The largest box or score difference between ``expected`` (dicts of boxes, scores,
    classes per image, as d2kd.export.student_predictions gives) and ``got``.

    Raises:
        ParityError: an image with other detections (count or classes), or a difference above
            ``tolerance``; the message names the image.
    """
    worst = 0.0
    for i, (exp, inst) in enumerate(zip(expected, got)):
        name = names[i] if names else f"image {i}"
        if len(inst) != len(exp["classes"]) or not torch.equal(inst.pred_classes, exp["classes"]):
            raise ParityError(f"different detections on {name}: {len(inst)} instead of {len(exp['classes'])}")
        if len(inst):
            diff = max((inst.pred_boxes.tensor - exp["boxes"]).abs().max().item(),
                       (inst.scores - exp["scores"]).abs().max().item())
            if diff > tolerance:
                raise ParityError(f"predictions on {name} differ by {diff:g} (tolerance {tolerance:g})")
            worst = max(worst, diff)
    return worst


def as_prediction_dicts(instances: List[Instances]) -> List[Dict[str, torch.Tensor]]:
    return [{"boxes": i.pred_boxes.tensor, "scores": i.scores, "classes": i.pred_classes} for i in instances]
