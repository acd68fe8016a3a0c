#!/usr/bin/env python
"""Train or evaluate a distilled detector (the logic lives in d2kd/train_net.py).

    python train_net.py --config-file configs/gk_faster_rcnn_R_50_FPN_2x_coco.yaml --num-gpus 8
    python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file <cfg> --resume
"""
from d2kd.train_net import invoke_main

if __name__ == "__main__":
    invoke_main()
