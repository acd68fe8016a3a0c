"""Pictures: the same images with several models' detections side by side."""
from typing import List, Sequence, Tuple

import cv2
import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402


def detections_side_by_side(
    models: Sequence[Tuple[str, object]],
    image_files: List[str],
    dataset_name: str,
    out_png: str,
    score_thresh: float = 0.4,
) -> str:
    """Write a grid: one row per image, one column per ``(title, cfg)`` model.

    Each cfg must name its weights in ``MODEL.WEIGHTS``; predictions are drawn above
    ``score_thresh`` with the dataset's class names.
    """
    meta = MetadataCatalog.get(dataset_name)
    predictors = []
    for _, cfg in models:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_thresh
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = score_thresh
        predictors.append(DefaultPredictor(cfg))
    rows, cols = len(image_files), len(models)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for r, path in enumerate(image_files):
        image = cv2.imread(path)
        for c, ((title, _), predictor) in enumerate(zip(models, predictors)):
            instances = predictor(image)["instances"].to("cpu")
            drawn = Visualizer(image[:, :, ::-1], meta, scale=2.0).draw_instance_predictions(instances)
            ax = axes[r][c]
            ax.imshow(drawn.get_image())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
