from .trainer import DistillTrainer, build_evaluator

__all__ = ["DistillTrainer", "build_evaluator"]
