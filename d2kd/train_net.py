"""Train or evaluate a distilled detector, detectron2-style (the repository's train_net.py).

    python train_net.py --config-file configs/gk_faster_r50.yaml --num-gpus 8
    python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file <cfg> --resume          # continue from OUTPUT_DIR
    python train_net.py --config-file <cfg> --num-gpus 2 MODEL.DEVICE cpu   # 2 CPU processes

Plain detectron2 configs (no DISTILL node in use) train as ordinary detectors, which is how the
teacher and the student-alone baseline are trained. To train on a dataset of your own,
register it and call ``invoke_main()`` from your own script (see datasets/README.md).
"""
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from .checkpoint import AtomicDetectionCheckpointer
from .config import load_config
from .engine import DistillTrainer
from .engine.trainer import allow_pickle
from .export import StudentCheckpointer, build_student
from .modeling.kinds import is_distill_meta_arch
from .utils.logging import plain_config_dump, setup_d2kd_logger


def setup(args):
    """Config, then detectron2's ``default_setup`` (its logger, the config saved to
    OUTPUT_DIR), then the ``d2kd`` logger set up the same way: stdout on the main process,
    ``OUTPUT_DIR/log.txt`` on every rank. Colour only on a terminal, as detectron2's logger."""
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    with plain_config_dump():
        default_setup(cfg, args)
    setup_d2kd_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank())
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        if is_distill_meta_arch(cfg.MODEL.META_ARCHITECTURE):
            # Inference is the student alone: no teacher is built or loaded.
            model = build_student(cfg)
            checkpointer = StudentCheckpointer(model, save_dir=cfg.OUTPUT_DIR, allow_pickle=allow_pickle(cfg))
        else:
            model = DistillTrainer.build_model(cfg)
            checkpointer = AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR,
                                                       allow_pickle=allow_pickle(cfg))
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = DistillTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


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

