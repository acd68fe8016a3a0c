"""Train or evaluate a plain detector described by a detectron2 LazyConfig (a ``.py`` file),
with detectron2's LazyConfig training loop; ``tools/lazy_train_net.py`` is its command line.

    python tools/lazy_train_net.py --config-file configs/shapes/vitdet_faster_rcnn_ViT_tiny_SFP_2k_shapes.py
    python tools/lazy_train_net.py --config-file <cfg.py> --resume            # continue from train.output_dir
    python tools/lazy_train_net.py --config-file <cfg.py> --eval-only train.init_checkpoint=<model_final.pth>
    python tools/lazy_train_net.py --config-file <cfg.py> train.max_iter=5 train.output_dir=/tmp/x

Overrides are LazyConfig "key=value" strings. This is how a LazyConfig teacher (e.g. the ViTDet
one) is trained; a distilled student is a yacs config and trains with ``train_net.py``. The
config holds ``model``, ``optimizer`` (its ``params.model`` is set to the built model),
``dataloader.train`` / ``.test`` / ``.evaluator``, ``lr_multiplier`` and a ``train`` dict as
detectron2's ``common/train.py`` (``output_dir``, ``init_checkpoint``, ``max_iter``, ``amp``,
``ddp``, ``checkpointer``, ``eval_period``, ``log_period``, ``device``), plus d2kd's optional
``train.clip_grad_norm`` (clip the gradients' global L2 norm to it).

What d2kd adds to detectron2's loop: checkpoints written atomically and loaded with
``weights_only=True`` (d2kd.checkpoint), DDP on CPU processes (gloo), ``train.amp`` on CPU
(bfloat16), training images that cannot be read named in the error, the built-in shapes data
generated before its evaluator reads it.
"""
import copy
import logging
import os
import time
from types import SimpleNamespace
from typing import Dict, Sequence

import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    HookBase,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import AtomicDetectionCheckpointer
from .data.mapper import ImageNamingMapper
from .data.shapes import DATASET_PREFIX as SHAPES_PREFIX
from .data.shapes import ensure_shapes_generated
from .engine.experiment import save_stage_results, save_train_time, stage_results
from .engine.resume import ResumePastMaxIterError
from .engine.trainer import DistillAMPTrainer, create_ddp_model
from .utils.atomic import remove_stale_temporaries
from .utils.logging import setup_d2kd_logger

logger = logging.getLogger("d2kd")


class ClipGradNormHook(HookBase):
    """Clips the gradients' global L2 norm after each backward (``train.clip_grad_norm``).

    Under a loss-scaling GradScaler the gradients are unscaled first (``unscale_`` once per
    step is what GradScaler allows; its ``step`` then does not unscale again).
    """

    def __init__(self, max_norm: float):
        self.max_norm = float(max_norm)

    def after_backward(self):
        trainer = self.trainer._trainer if hasattr(self.trainer, "_trainer") else self.trainer
        scaler = getattr(trainer, "grad_scaler", None)
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(trainer.optimizer)
        params = [p for group in trainer.optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)


def load_lazy_config(config_file: str, overrides: Sequence[str] = ()):
    """``LazyConfig.load`` + "key=value" overrides; KEY VALUE pairs (yacs style) are an error."""
    bare = [o for o in overrides if "=" not in o]
    if bare:
        raise ValueError(
            f"{config_file} is a LazyConfig: its overrides are 'key=value' strings (e.g. "
            f"train.max_iter=100), not yacs-style KEY VALUE pairs; not of that form: {bare}"
        )
    cfg = LazyConfig.load(config_file)
    return LazyConfig.apply_overrides(cfg, list(overrides))


def setup(args):
    """The config, then detectron2's ``default_setup`` (its logger, the config saved to
    ``train.output_dir``, the seed) and the ``d2kd`` logger, as d2kd/train_net.py."""
    cfg = load_lazy_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_d2kd_logger(cfg.train.output_dir, distributed_rank=comm.get_rank())
    return cfg


def build_model(cfg):
    model = instantiate(cfg.model)
    model.to(torch.device(cfg.train.device))
    logger.info(f"Model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    return model


def do_test(cfg, model) -> Dict:
    """``inference_on_dataset`` on ``dataloader.test`` with ``dataloader.evaluator`` ({} if none)."""
    if cfg.dataloader.get("evaluator") is None:  # none, or dataloader.evaluator=null
        return {}
    name = OmegaConf.select(cfg, "dataloader.evaluator.dataset_name", default=None)
    if isinstance(name, str) and name.startswith(SHAPES_PREFIX):
        ensure_shapes_generated(name)  # COCOEvaluator reads the json it writes
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def build_train_loader(cfg):
    """``dataloader.train``, its mapper wrapped so that an unreadable image is named."""
    loader_cfg = cfg.dataloader.train
    if "mapper" in loader_cfg:
        names = OmegaConf.select(loader_cfg, "dataset.names", default=None)
        names = [names] if isinstance(names, str) else list(names or [])
        loader_cfg = copy.deepcopy(loader_cfg)  # the saved config stays the user's
        loader_cfg.mapper = L(ImageNamingMapper)(mapper=loader_cfg.mapper, dataset_names=names)
    return instantiate(loader_cfg)


def _ddp(model, options):
    """d2kd's create_ddp_model (DDP also on CPU) with ``train.ddp``'s options;
    ``fp16_compression`` is detectron2's: a gradient-compression hook, not a DDP argument."""
    options = dict(options or {})
    fp16 = options.pop("fp16_compression", False)
    model = create_ddp_model(model, **options)
    if fp16 and isinstance(model, DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        model.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return model


def do_train(args, cfg) -> Dict:
    """detectron2's LazyConfig loop: model, optimizer, loader, (AMP)trainer, hooks, resume.
    Returns the last evaluation's results (the EvalHook's; it also runs after the last step)."""
    train = cfg.train
    if comm.is_main_process():
        remove_stale_temporaries(train.output_dir)
    model = build_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    data_loader = build_train_loader(cfg)
    model = _ddp(model, train.ddp)
    trainer = (DistillAMPTrainer if train.amp.enabled else SimpleTrainer)(model, data_loader, optimizer)
    checkpointer = AtomicDetectionCheckpointer(model, train.output_dir, trainer=trainer)
    clip = OmegaConf.select(cfg, "train.clip_grad_norm", default=None)
    last_results = {}

    def evaluate():
        last_results.clear()
        last_results.update(do_test(cfg, model))
        return last_results

    trainer.register_hooks([
        hooks.IterationTimer(),
        ClipGradNormHook(clip) if clip else None,
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(train.eval_period, evaluate),
        hooks.PeriodicWriter(default_writers(train.output_dir, train.max_iter), period=train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    if start_iter > train.max_iter:
        raise ResumePastMaxIterError(
            f"--resume: the checkpoint {checkpointer.get_checkpoint_file()} ended iteration "
            f"{start_iter - 1}, past train.max_iter = {train.max_iter}: nothing would be trained. To "
            f"train on, set train.max_iter above {start_iter}"
        )
    trainer.train(start_iter, train.max_iter)
    return dict(last_results)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = create_ddp_model(build_model(cfg))
        checkpointer = AtomicDetectionCheckpointer(model, cfg.train.output_dir)
        if not cfg.train.init_checkpoint and not (args.resume and checkpointer.has_checkpoint()):
            raise ValueError(
                "--eval-only needs the weights to evaluate: add train.init_checkpoint=<model_final.pth> "
                f"(or --resume, to take the last checkpoint in {cfg.train.output_dir})"
            )
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
        return do_test(cfg, model)
    return do_train(args, cfg)


def train_and_evaluate_lazy(config_file: str, output_dir: str, overrides: Sequence[str] = ()) -> Dict:
    """A stage as d2kd.engine.experiment.train_and_evaluate, for a LazyConfig: train
    ``config_file`` into ``output_dir`` (resuming an interrupted run), evaluate it, return and
    save the bbox metrics (its ``final_results.json``, so ``stage_results`` reads it); a
    finished stage is returned without work. ``overrides`` are "key=value" strings; a
    ``train.seed`` >= 0 seeds every RNG, as detectron2's ``default_setup`` does."""
    done = stage_results(output_dir)
    if done is not None:
        logger.info(f"Reusing finished stage {output_dir}")
        return done
    os.makedirs(output_dir, exist_ok=True)
    cfg = load_lazy_config(config_file, list(overrides) + [f"train.output_dir={output_dir}"])
    seed = OmegaConf.select(cfg, "train.seed", default=-1)
    seed_all_rng(None if seed is None or seed < 0 else seed + comm.get_rank())
    if comm.is_main_process():
        LazyConfig.save(cfg, os.path.join(output_dir, "config.yaml"))
    start = time.perf_counter()
    results = do_train(SimpleNamespace(resume=True), cfg)
    save_train_time(output_dir, time.perf_counter() - start, cfg.train.max_iter)
    bbox = dict(results.get("bbox", {}))
    save_stage_results(output_dir, bbox)
    return bbox


def invoke_main(argv=None) -> None:
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
