#!/usr/bin/env python
"""The demo's comparison over several seeds, for every method: is the gain real?

Two-stage table (the Faster R-CNN pair)::

    python benchmarks/bench_shapes_seeds.py --seeds 0 1 2 --methods gk fitnet kd pkd fgfi defeat \
        defeat_rw kd_rw rkd rkd_global gk_pkd

One-stage table (the RetinaNet pair, the heterogeneous Faster R-CNN -> RetinaNet method, and
the GFL pair with LD)::

    python benchmarks/bench_shapes_seeds.py --pair one_stage --seeds 0 1 2 --output-dir output/one_stage

The methods of other toolboxes and the newest (issue 18: CWD, MGD, FGD, FBKD, CrossKD, BCKD;
``<m>_authors`` the released weights literally; GK + FGD, GK + CWD) on the two-stage, RetinaNet and GFL
pairs (named methods only)::

    python benchmarks/bench_shapes_seeds.py --seeds 0 1 2 --output-dir output/demo --methods \
        cwd mgd fgd fbkd gk gk_cwd gk_fgd
    python benchmarks/bench_shapes_seeds.py --pair retinanet --seeds 0 1 2 --output-dir output/one_stage/retinanet \
        --methods crosskd cwd mgd fgd gk
    python benchmarks/bench_shapes_seeds.py --pair gfl --seeds 0 1 2 --output-dir output/one_stage/gfl \
        --methods ld crosskd bckd

The RM + PFI ablation (named methods only: RM alone, PFI alone, both on logits)::

    python benchmarks/bench_shapes_seeds.py --pair retinanet --seeds 0 1 --output-dir output/one_stage/retinanet \
        --methods rm_pfi rm_only pfi_only rm_pfi_logits

GK's ablation (the paper's Table 3: each term alone, each pair, all three without robust
weights), the weights of the authors' code, and the global term's strength (named methods only)::

    python benchmarks/bench_shapes_seeds.py --seeds 0 1 2 --output-dir output/demo --methods gk \
        gk_global gk_feature gk_response gk_global_feature gk_global_response gk_feature_response \
        gk_no_rw gk_authors_weights

The RM + PFI strength sweep with sigmoid scores (RM temperature and weight, PFI weight)::

    python benchmarks/bench_shapes_seeds.py --pair retinanet --seeds 0 --output-dir output/one_stage/retinanet \
        --methods rm_pfi rm_pfi_t02 rm_pfi_t01 rm_pfi_rm40 rm_pfi_pfi50 rm_pfi_t02_pfi50

A Cascade R-CNN teacher (R-18, three stages) distilling the same two-stage student with GK and
KD, beside the Faster R-CNN teacher's rows (named methods only)::

    python benchmarks/bench_shapes_seeds.py --seeds 0 1 2 --output-dir output/demo --methods \
        gk_cascade kd_cascade gk kd

A ViTDet-style teacher (a LazyConfig: ViT + SimpleFeaturePyramid, 2000 iterations) distilling the
same two-stage student with GK, PKD and FitNet, by stride (GK and FitNet on p2-p4 as their configs
say; ``*_p2p6`` on every level; named methods only)::

    python benchmarks/bench_shapes_seeds.py --seeds 0 1 2 --output-dir output/demo --methods \
        gk_vit pkd_vit fitnet_vit gk_vit_p2p6 fitnet_vit_p2p6

Two teachers at once (GK from the Faster R-CNN teacher, PKD from the RetinaNet teacher) against
each alone (named methods only)::

    python benchmarks/bench_shapes_seeds.py --seeds 0 1 2 --output-dir output/demo --methods \
        gk_pkd_retina pkd_retina gk

Each pair's teacher (seed 0) is trained once and shared, as a released teacher would be; a
method whose teacher is another pair's (``gk_from_faster``) uses that pair's teacher, trained
once under ``<output-dir>/<pair>/teacher_seed0``. The student alone and each distilled
student are trained once per seed, with the same iterations (stages run one per CPU core).
Prints mean +- sample std of COCO AP per model, and each method's gain over its student alone.
Stages are reused from --output-dir (default output/bench_shapes), so an interrupted run resumes.
"""
import argparse
import os
import statistics
from typing import Dict, NamedTuple, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import d2kd  # noqa: E402,F401
from d2kd.data import ensure_shapes_generated  # noqa: E402
from d2kd.engine.experiment import SHAPES_PAIRS, run_stages  # noqa: E402
from d2kd.utils.threads import add_threads_argument, set_cpu_threads  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "shapes")


def _config(name: str) -> str:
    return os.path.join(CONFIGS, name)


class Method(NamedTuple):
    """A distilled student: its config, the pair whose teacher it uses, and extra options."""

    config: str
    teacher_pair: str
    opts: Tuple[str, ...] = ()
    # more teachers (DISTILL.TEACHERS.<NAME>): (name, the pair whose seed-0 teacher it is)
    teachers: Tuple[Tuple[str, str], ...] = ()


class Pair(NamedTuple):
    """A teacher/student pair, its methods (name -> Method) and those run when none are named."""

    teacher: str
    student: str
    methods: Dict[str, Method]
    default_methods: Tuple[str, ...]


def _pair(name: str, methods: Dict[str, Method], default_methods: Sequence[str] = None) -> Pair:
    teacher, student = SHAPES_PAIRS[name]
    return Pair(_config(teacher), _config(student), methods, tuple(default_methods or methods))


RM_PFI = _config("rank_mimic_retinanet_R_18_half_FPN_1k_withpfi_shapes.yaml")
GK = _config("gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml")


def _gk_options(**values) -> Tuple[str, ...]:
    # weights as floats: yacs refuses an int for a float key
    def text(value):
        return str(float(value)) if isinstance(value, int) and not isinstance(value, bool) else str(value)

    return tuple(x for key, value in values.items() for x in (f"DISTILL.GK.{key}", text(value)))


# GK's terms switched off by weight 0 (the prototypes are still built: the robust weights of
# the terms left on need them); run only when named
GK_VARIANTS = {
    # every weight 0: the distillation machinery (teacher, prototype builds, adapters) with no
    # loss, a control for the student alone
    "gk_none": _gk_options(GLOBAL_WEIGHT=0, FEATURE_WEIGHT=0, RESPONSE_WEIGHT=0),
    "gk_global": _gk_options(FEATURE_WEIGHT=0, RESPONSE_WEIGHT=0),
    "gk_feature": _gk_options(GLOBAL_WEIGHT=0, RESPONSE_WEIGHT=0),
    "gk_response": _gk_options(GLOBAL_WEIGHT=0, FEATURE_WEIGHT=0),
    "gk_global_feature": _gk_options(RESPONSE_WEIGHT=0),
    "gk_global_response": _gk_options(FEATURE_WEIGHT=0),
    "gk_feature_response": _gk_options(GLOBAL_WEIGHT=0),
    "gk_no_rw": _gk_options(ROBUST_WEIGHTS=False),
    # the authors' code: 5 on the global term, 1 on the response (the paper as read: 1 and 5)
    "gk_authors_weights": _gk_options(GLOBAL_WEIGHT=5, RESPONSE_WEIGHT=1),
    # the global term alone at other strengths and in the paper's projection form
    **{f"gk_global_w{w}": _gk_options(FEATURE_WEIGHT=0, RESPONSE_WEIGHT=0, GLOBAL_WEIGHT=w) for w in (10, 100, 1000)},
    "gk_global_projection": _gk_options(FEATURE_WEIGHT=0, RESPONSE_WEIGHT=0, GLOBAL_FORM="projection"),
    **{f"gk_global_projection_w{w}": _gk_options(FEATURE_WEIGHT=0, RESPONSE_WEIGHT=0, GLOBAL_FORM="projection",
                                                 GLOBAL_WEIGHT=w) for w in (100, 1000)},
    # all three terms, the global one in the projection form or stronger
    "gk_projection": _gk_options(GLOBAL_FORM="projection"),
    **{f"gk_global_x{w}": _gk_options(GLOBAL_WEIGHT=w) for w in (10, 100)},
    # prototypes built from the training steps' own instance features (no re-extraction)
    "gk_online": ("DISTILL.PROTOTYPES.SOURCE", "online"),
}
# The RM + PFI strength sweep, sigmoid scores kept
RM_PFI_SWEEP = {
    "rm_pfi_t02": ("DISTILL.RANK_MIMIC.TEMPERATURE", "0.2"),
    "rm_pfi_t01": ("DISTILL.RANK_MIMIC.TEMPERATURE", "0.1"),
    "rm_pfi_rm40": ("DISTILL.RANK_MIMIC.WEIGHT", "40.0"),
    "rm_pfi_pfi50": ("DISTILL.PFI.WEIGHT", "50.0"),
    "rm_pfi_t02_pfi50": ("DISTILL.RANK_MIMIC.TEMPERATURE", "0.2", "DISTILL.PFI.WEIGHT", "50.0"),
    "rm_pfi_t02_rm40": ("DISTILL.RANK_MIMIC.TEMPERATURE", "0.2", "DISTILL.RANK_MIMIC.WEIGHT", "40.0"),
}


PAIRS = {
    "faster_rcnn": _pair(
        "faster_rcnn",
        {
            name: Method(_config(f"{file}_faster_rcnn_R_18_half_FPN_1k{variant}_shapes.yaml"), "faster_rcnn")
            for name, file, variant in [
                ("gk", "gk", ""), ("fitnet", "fitnet", ""), ("kd", "kd", ""), ("pkd", "pkd", ""),
                ("fgfi", "fgfi", ""), ("defeat", "defeat", ""), ("defeat_rw", "defeat", "_rw"),
                ("kd_rw", "kd", "_rw"), ("rkd", "rkd", ""), ("rkd_global", "rkd", "_global"),
                ("gk_pkd", "gk", "_withpkd"),
                # other toolboxes' feature methods (issue 18)
                ("cwd", "cwd", ""), ("mgd", "mgd", ""), ("fgd", "fgd", ""), ("fbkd", "fbkd", ""),
            ]
        }
          # two teachers: GK from the Faster R-CNN teacher, PKD from the RetinaNet one, and that PKD alone
          | {"gk_pkd_retina": Method(_config("gk_faster_rcnn_R_18_half_FPN_1k_withpkdretina_shapes.yaml"), "faster_rcnn",
                                     teachers=(("RETINA", "retinanet"),)),
             "pkd_retina": Method(_config("gk_faster_rcnn_R_18_half_FPN_1k_withpkdretina_shapes.yaml"), "faster_rcnn",
                                  ("DISTILL.HEADS", '["pkd"]'), teachers=(("RETINA", "retinanet"),))} | {name: Method(GK, "faster_rcnn", opts) for name, opts in GK_VARIANTS.items()}
          # the Cascade R-CNN teacher (the cascade_rcnn pair's) distilling the same student
          | {f"{m}_cascade": Method(_config(f"{m}_faster_rcnn_R_18_half_FPN_1k_cascadeteacher_shapes.yaml"),
                                    "cascade_rcnn") for m in ("gk", "kd")}
          # the ViTDet-style teacher (the vitdet pair's), paired by stride
          | {f"{m}_vit": Method(_config(f"{m}_faster_rcnn_R_18_half_FPN_1k_vitteacher_shapes.yaml"), "vitdet")
             for m in ("gk", "pkd", "fitnet")}
          # GK and FitNet with every level, p2-p6 (their configs distil p2-p4 only: p5-p6 come from
          # LastLevelP6P7's plain convolutions, 2.6x and 11.8x the CNN teacher's mean square)
          | {"gk_vit_p2p6": Method(_config("gk_faster_rcnn_R_18_half_FPN_1k_vitteacher_shapes.yaml"), "vitdet",
                                   ("DISTILL.GK.STRIDES", "[4, 8, 16, 32, 64]",
                                    "DISTILL.PROTOTYPES.STRIDES", "[4, 8, 16, 32, 64]")),
             "fitnet_vit_p2p6": Method(_config("fitnet_faster_rcnn_R_18_half_FPN_1k_vitteacher_shapes.yaml"), "vitdet",
                                       ("DISTILL.FITNET.STRIDES", "[4, 8, 16, 32, 64]")),
             # GK from the ViT teacher without its response term (the teacher's box head's KL)
             "gk_vit_no_response": Method(_config("gk_faster_rcnn_R_18_half_FPN_1k_vitteacher_shapes.yaml"), "vitdet",
                                          _gk_options(RESPONSE_WEIGHT=0))}
          # the released weights literally (the shapes configs rescale the summed terms), and GK + FGD
          | {"mgd_authors": Method(_config("mgd_faster_rcnn_R_18_half_FPN_1k_shapes.yaml"), "faster_rcnn",
                                   ("DISTILL.MGD.TWO_STAGE.WEIGHT", "5e-7")),
             "fgd_authors": Method(_config("fgd_faster_rcnn_R_18_half_FPN_1k_shapes.yaml"), "faster_rcnn",
                                   ("DISTILL.FGD.TWO_STAGE.FG_WEIGHT", "5e-5", "DISTILL.FGD.TWO_STAGE.BG_WEIGHT",
                                    "2.5e-5", "DISTILL.FGD.TWO_STAGE.GLOBAL_WEIGHT", "5e-7")),
             "fbkd_authors": Method(_config("fbkd_faster_rcnn_R_18_half_FPN_1k_shapes.yaml"), "faster_rcnn",
                                    ("DISTILL.FBKD.FEATURE_WEIGHT", "7e-5", "DISTILL.FBKD.CHANNEL_WEIGHT", "4e-3",
                                     "DISTILL.FBKD.SPATIAL_WEIGHT", "4e-3", "DISTILL.FBKD.NONLOCAL_WEIGHT", "7e-5")),
             "gk_fgd": Method(GK, "faster_rcnn", ("DISTILL.HEADS", '["gk", "fgd"]',
                                                  "DISTILL.FGD.TWO_STAGE.FG_WEIGHT", "2e-4",
                                                  "DISTILL.FGD.TWO_STAGE.BG_WEIGHT", "1e-4",
                                                  "DISTILL.FGD.TWO_STAGE.GLOBAL_WEIGHT", "1e-4")),
             # GK + CWD: CWD's defaults are its shapes config's (mmrazor's tau 1, weight 10)
             "gk_cwd": Method(GK, "faster_rcnn", ("DISTILL.HEADS", '["gk", "cwd"]'))},
        default_methods=("gk", "fitnet", "kd"),
    ),
    # a teacher only: Cascade R-CNN R-18 (three stages), for the two-stage student's
    # gk_cascade / kd_cascade; trained once under <output-dir>/cascade_rcnn_teacher
    "cascade_rcnn": Pair(_config("cascade_rcnn_R_18_FPN_1k_shapes.yaml"),
                         _config(SHAPES_PAIRS["faster_rcnn"][1]), {}, ()),
    # a teacher only: the ViTDet-style LazyConfig (ViT 192 x 6 + SimpleFeaturePyramid, trained by
    # d2kd's LazyConfig loop), for gk_vit / pkd_vit / fitnet_vit; under <output-dir>/vitdet_teacher
    "vitdet": Pair(_config("vitdet_faster_rcnn_ViT_tiny_SFP_2k_shapes.py"),
                   _config(SHAPES_PAIRS["faster_rcnn"][1]), {}, ()),
    # RetinaNet R-18 -> R-18 half width, levels p2-p6; gk_from_faster: the Faster R-CNN teacher.
    # rm_only / pfi_only / rm_pfi_logits: the RM + PFI ablation, run only when named
    "retinanet": _pair(
        "retinanet",
        {
            "gk": Method(_config("gk_retinanet_R_18_half_FPN_1k_shapes.yaml"), "retinanet"),
            "fitnet": Method(_config("fitnet_retinanet_R_18_half_FPN_1k_shapes.yaml"), "retinanet"),
            "rm_pfi": Method(RM_PFI, "retinanet"),
            "gk_from_faster": Method(_config("gk_retinanet_R_18_half_FPN_1k_fasterteacher_shapes.yaml"), "faster_rcnn"),
            "rm_only": Method(RM_PFI, "retinanet", ("DISTILL.HEADS", '["rank_mimic"]')),
            "pfi_only": Method(RM_PFI, "retinanet", ("DISTILL.HEADS", '["pfi"]')),
            "rm_pfi_logits": Method(RM_PFI, "retinanet",
                                    ("DISTILL.RANK_MIMIC.SCORES", "logits", "DISTILL.PFI.SCORES", "logits")),
            # other toolboxes' feature methods (issue 18), and the released weights literally
            **{m: Method(_config(f"{m}_retinanet_R_18_half_FPN_1k_shapes.yaml"), "retinanet")
               for m in ("cwd", "mgd", "fgd", "crosskd")},
            "mgd_authors": Method(_config("mgd_retinanet_R_18_half_FPN_1k_shapes.yaml"), "retinanet",
                                  ("DISTILL.MGD.DENSE.WEIGHT", "2e-5")),
            "fgd_authors": Method(_config("fgd_retinanet_R_18_half_FPN_1k_shapes.yaml"), "retinanet",
                                  ("DISTILL.FGD.DENSE.FG_WEIGHT", "1e-3", "DISTILL.FGD.DENSE.BG_WEIGHT", "5e-4",
                                   "DISTILL.FGD.DENSE.GLOBAL_WEIGHT", "5e-6")),
        } | {name: Method(RM_PFI, "retinanet", opts) for name, opts in RM_PFI_SWEEP.items()},
        default_methods=("gk", "fitnet", "rm_pfi", "gk_from_faster"),
    ),
    # GFL R-18 -> R-18 half width (distribution box branch): LD
    "gfl": _pair(
        "gfl",
        {m: Method(_config(f"{m}_gfl_R_18_half_FPN_1k_shapes.yaml"), "gfl") for m in ("ld", "crosskd", "bckd")},
        default_methods=("ld",),
    ),
}
# --pair one_stage: every one-stage student in one table
GROUPS = {"one_stage": ("retinanet", "gfl")}


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pair", choices=sorted(PAIRS) + sorted(GROUPS), default="faster_rcnn")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="methods of the chosen pair(s) (default: gk fitnet kd for faster_rcnn, "
                             "the table's methods of a one-stage pair; the RM + PFI ablation "
                             "rm_only pfi_only rm_pfi_logits only when named)")
    parser.add_argument("--output-dir", default=os.path.join(REPO, "output", "bench_shapes"))
    add_threads_argument(parser)
    args = parser.parse_args()

    pairs = GROUPS.get(args.pair, (args.pair,))
    offered = {m: p for p in pairs for m in PAIRS[p].methods}
    methods = args.methods or [m for p in pairs for m in PAIRS[p].default_methods]
    unknown = [m for m in methods if m not in offered]
    if unknown:
        parser.error(f"methods {unknown} have no config for --pair {args.pair}; choose from {sorted(offered)}")
    setup_logger(name="detectron2")
    setup_logger(name="d2kd")
    set_cpu_threads(args.threads)  # run_stages splits it among the stages side by side
    for split in ("d2kd_shapes_train", "d2kd_shapes_val"):
        ensure_shapes_generated(split)

    out = args.output_dir
    # one pair alone keeps the flat layout (<out>/teacher_seed0, ...); a group nests per pair
    pair_dir = {p: out if len(pairs) == 1 else os.path.join(out, p) for p in PAIRS}
    teacher_pairs = list(dict.fromkeys([*pairs, *(PAIRS[offered[m]].methods[m].teacher_pair for m in methods),
                                        *(p for m in methods for _, p in PAIRS[offered[m]].methods[m].teachers)]))
    for p in teacher_pairs:
        if p not in pairs:  # another pair's teacher, kept apart from this pair's stages
            pair_dir[p] = os.path.join(out, f"{p}_teacher")
    teacher_dirs = {p: os.path.join(pair_dir[p], "teacher_seed0") for p in teacher_pairs}
    students = {
        p: [("student", PAIRS[p].student, os.path.join(pair_dir[p], f"student_seed{s}"), ["SEED", str(s)])
            for s in args.seeds]
        for p in pairs
    }
    # the teachers first (beside the first students): every distilled student needs one
    # a LazyConfig teacher (the ViTDet one) takes "key=value" overrides
    def seed0(config):
        return ["train.seed=0"] if config.endswith(".py") else ["SEED", "0"]

    first = [("teacher", PAIRS[p].teacher, teacher_dirs[p], seed0(PAIRS[p].teacher)) for p in teacher_pairs]
    first += [students[p][0] for p in pairs]
    teachers = dict(zip(teacher_pairs, run_stages(first)))
    stages, keys = [], []
    for p in pairs:
        stages += students[p]
        keys += [(p, "student")] * len(args.seeds)
    for s in args.seeds:
        for m in methods:
            p = offered[m]
            method = PAIRS[p].methods[m]
            weights = os.path.join(teacher_dirs[method.teacher_pair], "model_final.pth")
            stages.append((m, method.config, os.path.join(pair_dir[p], f"{m}_seed{s}"),
                           ["SEED", str(s), "DISTILL.TEACHER.WEIGHTS", weights, *method.opts,
                            *[x for name, tp in method.teachers for x in (
                                f"DISTILL.TEACHERS.{name}.WEIGHTS", os.path.join(teacher_dirs[tp], "model_final.pth"))]]))
            keys.append((p, m))
    results = run_stages(stages)
    ap = {}
    for key, r in zip(keys, results):
        ap.setdefault(key, []).append(r["AP"])

    print(f"\nCOCO AP on d2kd_shapes_val, seeds {args.seeds} (one teacher per pair, seed 0)\n")
    print("| pair | model | teacher | AP mean ± std | per seed | gain over the student alone (mean ± std) |")
    print("|---|---|---|---|---|---|")
    for p in pairs:
        print(f"| {p} | teacher | {p} | {teachers[p]['AP']:.2f} | - | - |")
        student_ap = ap[(p, "student")]
        s_mean, s_std = mean_std(student_ap)
        print(f"| {p} | student alone | - | {s_mean:.2f} ± {s_std:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in student_ap)} | - |")
        for m in [m for m in methods if offered[m] == p]:
            values = ap[(p, m)]
            mean, std = mean_std(values)
            g, gsd = mean_std([v - b for v, b in zip(values, student_ap)])
            method = PAIRS[p].methods[m]
            note = "" if method.teacher_pair == p else f" (AP {teachers[method.teacher_pair]['AP']:.2f})"
            # every teacher the config names: the default one, then DISTILL.TEACHERS.<NAME>
            named = "".join(f", {name}: {tp} (AP {teachers[tp]['AP']:.2f})" for name, tp in method.teachers)
            print(f"| {p} | {m} | {method.teacher_pair}{note}{named} | {mean:.2f} ± {std:.2f} | "
                  f"{', '.join(f'{v:.2f}' for v in values)} | {g:+.2f} ± {gsd:.2f} |")


if __name__ == "__main__":
    main()
