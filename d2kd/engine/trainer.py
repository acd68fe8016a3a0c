"""DistillTrainer: detectron2's DefaultTrainer with atomic checkpoints, CPU-capable DDP,
mixed precision on CUDA and CPU, an evaluator from the dataset's metadata, and the prototype
refresh hook."""
import logging
import os
import time
import weakref

import torch

from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..data.mapper import ImageNamingMapper
from ..data.shapes import DATASET_PREFIX as SHAPES_PREFIX
from ..data.shapes import ensure_shapes_generated
from ..utils.atomic import remove_stale_temporaries
from ..utils.logging import setup_d2kd_logger
from .resume import DistillCheckpointer, ResumePastMaxIterError

logger = logging.getLogger(__name__)

# What detectron2's register_pascal_voc puts into a dataset's metadata (besides thing_classes).
VOC_METADATA = ("dirname", "split", "year")


class NoEvaluatorError(RuntimeError):
    """A dataset in DATASETS.TEST has no evaluator (a RuntimeError, not the NotImplementedError
    that detectron2's ``DefaultTrainer.test`` swallows into an empty result and exit code 0)."""


def evaluator_kind(dataset_name: str) -> str:
    """``"coco"`` or ``"pascal_voc"``, from the dataset's metadata.

    ``evaluator_type`` decides when set. Without it, a dataset registered with detectron2's
    ``register_pascal_voc`` (metadata ``dirname``, ``split``, ``year``) is VOC, and one with a
    ``json_file`` is COCO. Anything else raises :class:`NoEvaluatorError` naming the dataset
    and the fix.
    """
    meta = MetadataCatalog.get(dataset_name)
    kind = meta.get("evaluator_type", None)
    if kind is None and all(meta.get(k, None) is not None for k in VOC_METADATA):
        kind = "pascal_voc"
    if kind is None and meta.get("json_file", None):
        kind = "coco"
    if kind == "pascal_voc" and meta.get("year", None) not in (2007, 2012):
        raise NoEvaluatorError(
            f"dataset '{dataset_name}' is registered the VOC way with year={meta.get('year', None)!r}; "
            "detectron2's VOC evaluator needs year 2012 (area-under-curve AP) or 2007 (11-point AP). "
            f"Register it with register_pascal_voc('{dataset_name}', dirname, split, 2012, class_names)"
        )
    if kind not in ("coco", "pascal_voc"):
        raise NoEvaluatorError(
            f"no evaluator for dataset '{dataset_name}' (in DATASETS.TEST; metadata evaluator_type="
            f"{kind!r}): d2kd evaluates COCO- and VOC-format datasets. Register it with "
            "detectron2.data.datasets.register_coco_instances (a COCO json) or register_pascal_voc "
            f"(VOC folders), or set MetadataCatalog.get('{dataset_name}').evaluator_type to 'coco' "
            "or 'pascal_voc' (see datasets/README.md); or leave it out of DATASETS.TEST"
        )
    return kind


def build_evaluator(cfg, dataset_name, output_folder=None):
    """COCO or VOC evaluation, chosen by :func:`evaluator_kind`."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
    kind = evaluator_kind(dataset_name)
    if kind == "coco":
        if dataset_name.startswith(SHAPES_PREFIX):
            ensure_shapes_generated(dataset_name)  # COCOEvaluator reads the json it writes
        return COCOEvaluator(dataset_name, output_dir=output_folder)
    return PascalVOCDetectionEvaluator(dataset_name)


def create_ddp_model(model, **kwargs):
    """detectron2's create_ddp_model, minus its ``device_ids`` on CPU (DDP rejects them)."""
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type == "cuda":
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    return DistributedDataParallel(model, **kwargs)


def allow_pickle(cfg) -> bool:
    """``DISTILL.TEACHER.ALLOW_PICKLE`` (False for a config without the DISTILL node)."""
    return bool("DISTILL" in cfg and cfg.DISTILL.TEACHER.get("ALLOW_PICKLE", False))


class DistillAMPTrainer(AMPTrainer):
    """detectron2's AMPTrainer (``SOLVER.AMP.ENABLED``) on the model's device.

    On CUDA it is AMPTrainer itself: float16 autocast and a GradScaler. On CPU (where
    AMPTrainer asserts CUDA) the step runs under bfloat16 autocast with no loss scaling
    (bfloat16 has float32's exponent range); the scaler is a disabled one, so checkpoints
    and ``state_dict`` keep AMPTrainer's layout. A Distill model runs its teacher under the
    same autocast and computes its distillation losses in float32 (see DistillMixin).
    """

    def __init__(self, model, data_loader, optimizer, precision=None, **kwargs):
        self.device_type = next(model.parameters()).device.type
        if self.device_type == "cuda":
            precision = precision or torch.float16
            scaler = torch.amp.GradScaler("cuda", enabled=precision == torch.float16)
        else:
            precision = precision or torch.bfloat16
            scaler = torch.amp.GradScaler(self.device_type, enabled=False)
        kwargs.setdefault("grad_scaler", scaler)
        super().__init__(model, data_loader, optimizer, precision=precision, **kwargs)

    def run_step(self):
        if self.device_type == "cuda":
            return super().run_step()
        # AMPTrainer.run_step with the device's autocast instead of torch.cuda's.
        assert self.model.training, "[DistillAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, loss_dict, data_time, iter=self.iter)
        else:
            self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


class DistillTrainer(DefaultTrainer):
    """Trains a Distill* model (or any detectron2 model) the way DefaultTrainer does."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, with these changes: DDP also works for CPU models (gloo),
        # checkpoints are written atomically and loaded safely, temporaries of killed writers
        # are removed, the d2kd logger is set up, a test set without an evaluator fails now
        # rather than after training, and SOLVER.AMP.ENABLED also works on CPU (bfloat16).
        TrainerBase.__init__(self)
        logger_ = logging.getLogger("detectron2")
        if not logger_.isEnabledFor(logging.INFO):
            setup_logger()
        if not logging.getLogger("d2kd").isEnabledFor(logging.INFO):
            setup_d2kd_logger(distributed_rank=comm.get_rank())
        if comm.is_main_process():
            remove_stale_temporaries(cfg.OUTPUT_DIR)
        if type(self).build_evaluator.__func__ is DistillTrainer.build_evaluator.__func__:
            for name in cfg.DATASETS.TEST:
                evaluator_kind(name)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        trainer_cls = DistillAMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # atomic saves, safe loads, and a resume that checks the distillation set-up first
        self.checkpointer = DistillCheckpointer(
            model, cfg.OUTPUT_DIR, cfg=cfg, allow_pickle=allow_pickle(cfg), trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        """DefaultTrainer.resume_or_load; a resume that leaves nothing to train says so: at
        ``SOLVER.MAX_ITER`` (a finished run) in the log, past it as an error."""
        super().resume_or_load(resume=resume)
        if not (resume and self.checkpointer.has_checkpoint()) or self.start_iter < self.max_iter:
            return
        done = self.start_iter - 1
        if self.start_iter > self.max_iter:
            raise ResumePastMaxIterError(
                f"--resume: the checkpoint {self.checkpointer.get_checkpoint_file()} ended iteration "
                f"{done}, past SOLVER.MAX_ITER = {self.max_iter}: nothing would be trained and no "
                f"model_final.pth written. To train on, set SOLVER.MAX_ITER above {done + 1}; to use "
                "the checkpoint as it is, evaluate it (--eval-only MODEL.WEIGHTS <it>) or export it"
            )
        logger.info(f"Resumed a finished run (iteration {done} of SOLVER.MAX_ITER = {self.max_iter}): "
                    "nothing left to train")

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader; an image that cannot be read is named in the error."""
        mapper = ImageNamingMapper(DatasetMapper(cfg, True), cfg.DATASETS.TRAIN)
        return build_detection_train_loader(cfg, mapper=mapper)

    def build_hooks(self):
        ret = super().build_hooks()
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        banks = model.prototype_banks() if hasattr(model, "prototype_banks") else {}
        if banks or getattr(model, "prototype_bank", None) is not None:
            from .prototype_refresh import PrototypeRefreshHook

            # First, before the IterationTimer: a build runs in before_step ahead of the timer's
            # start, so it counts as hook time, not as the iteration's time. And before the
            # checkpointer, so a checkpoint taken at a refresh iteration holds the new prototypes.
            ret.insert(0, PrototypeRefreshHook(self.cfg))
        return ret

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test, except that a dataset without an evaluator is an error
        (detectron2 logs "No evaluator found" and returns an empty result)."""
        if evaluators is None:
            evaluators = []
            for name in cfg.DATASETS.TEST:
                try:
                    evaluators.append(cls.build_evaluator(cfg, name))
                except NotImplementedError as e:
                    raise NoEvaluatorError(
                        f"no evaluator for dataset '{name}' in DATASETS.TEST ({e}); implement "
                        f"{cls.__name__}.build_evaluator for it, or see datasets/README.md"
                    ) from e
        return super().test(cfg, model, evaluators)
