"""DistillTrainer: detectron2's DefaultTrainer with atomic checkpoints, CPU-capable DDP,
an evaluator from the dataset's metadata, and the prototype refresh hook."""
import logging
import os
import weakref

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import AtomicDetectionCheckpointer
from ..data.shapes import DATASET_PREFIX as SHAPES_PREFIX
from ..data.shapes import ensure_shapes_generated

logger = logging.getLogger(__name__)


def build_evaluator(cfg, dataset_name, output_folder=None):
    """COCO or VOC evaluation, chosen by the dataset's ``evaluator_type`` metadata."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
    meta = MetadataCatalog.get(dataset_name)
    kind = getattr(meta, "evaluator_type", None)
    if kind == "coco":
        if dataset_name.startswith(SHAPES_PREFIX):
            ensure_shapes_generated(dataset_name)  # COCOEvaluator reads the json it writes
        return COCOEvaluator(dataset_name, output_dir=output_folder)
    if kind == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    raise NotImplementedError(
        f"no evaluator for dataset '{dataset_name}' (metadata evaluator_type={kind!r}); d2kd "
        "evaluates 'coco' and 'pascal_voc' datasets. Register a COCO-format dataset with "
        "detectron2.data.datasets.register_coco_instances (see datasets/README.md)"
    )


def create_ddp_model(model, **kwargs):
    """detectron2's create_ddp_model, minus its ``device_ids`` on CPU (DDP rejects them)."""
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type == "cuda":
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    return DistributedDataParallel(model, **kwargs)


class DistillTrainer(DefaultTrainer):
    """Trains a Distill* model (or any detectron2 model) the way DefaultTrainer does."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, with two changes: DDP also works for CPU models (gloo), and
        # checkpoints are written atomically.
        TrainerBase.__init__(self)
        logger_ = logging.getLogger("detectron2")
        if not logger_.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        ret = super().build_hooks()
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        if getattr(model, "prototype_bank", None) is not None:
            from .prototype_refresh import PrototypeRefreshHook

            # Right after the timer: before the checkpointer, so a checkpoint taken at a refresh
            # iteration holds the new prototypes.
            ret.insert(1, PrototypeRefreshHook(self.cfg))
        return ret

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)
