#!/usr/bin/env python
"""Train or evaluate a plain detector from a detectron2 LazyConfig (.py), e.g. a ViTDet teacher
(the logic lives in d2kd/lazy_train_net.py; overrides are "key=value" strings).

    python tools/lazy_train_net.py --config-file configs/shapes/vitdet_faster_rcnn_ViT_tiny_SFP_2k_shapes.py
    python tools/lazy_train_net.py --config-file <cfg.py> --resume
    python tools/lazy_train_net.py --config-file <cfg.py> --eval-only train.init_checkpoint=<model_final.pth>
    python tools/lazy_train_net.py --config-file <cfg.py> --num-gpus 2 train.device=cpu   # 2 CPU processes
"""
from d2kd.lazy_train_net import invoke_main

if __name__ == "__main__":
    invoke_main()
