"""Every shipped config loads, follows the naming scheme, and its teacher config resolves with
a matching label space."""
import glob
import os
import re

import pytest
from detectron2.modeling import META_ARCH_REGISTRY

from d2kd.config import load_config
from d2kd.modeling import DENSE, TWO_STAGE
from d2kd.modeling.kinds import is_distill_meta_arch
from d2kd.modeling.lazy_teacher import LazyTeacherConfig
from d2kd.modeling.teacher import build_teacher_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
# Short names users know, each only a _BASE_ on a canonical config (test_the_alias_config...).
ALIASES = {os.path.join(REPO, "configs", "gk_faster_r50.yaml"): "gk_faster_rcnn_R_50_FPN_2x_coco.yaml"}
LEAVES = [p for p in CONFIGS if not os.path.basename(p).startswith("Base-") and p not in ALIASES]
NAME = re.compile(r"^([a-z][a-z_]*_)?(faster_rcnn|cascade_rcnn|retinanet|gfl)_R_\d+(_half)?_FPN_\w+_(coco|voc|shapes)\.yaml$")


def config_classes(cfg) -> int:
    if isinstance(cfg, LazyTeacherConfig):  # a .py teacher: its LazyConfig's own key
        model = cfg.lazy.model
        return model.roi_heads.num_classes if "roi_heads" in model else model.num_classes
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch in ("GFL", "DistillGFL"):
        return cfg.MODEL.GFL.NUM_CLASSES
    kind = getattr(META_ARCH_REGISTRY.get(arch), "kind", None)
    if kind is None:
        kind = DENSE if arch == "RetinaNet" else TWO_STAGE
    return cfg.MODEL.ROI_HEADS.NUM_CLASSES if kind is TWO_STAGE else cfg.MODEL.RETINANET.NUM_CLASSES


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, REPO) for p in CONFIGS])
def test_config_loads_from_any_working_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    if is_distill_meta_arch(cfg.MODEL.META_ARCHITECTURE) and not os.path.basename(path).startswith("Base-"):
        assert cfg.DISTILL.HEADS, "a distillation config enables at least one head"
        teacher = build_teacher_cfg(cfg)
        assert config_classes(teacher) == config_classes(cfg)
        assert cfg.DISTILL.TEACHER.WEIGHTS or "shapes" in path


@pytest.mark.parametrize("path", LEAVES, ids=[os.path.relpath(p, REPO) for p in LEAVES])
def test_config_names_follow_the_scheme_and_plain_configs_stay_plain(path):
    name = os.path.basename(path)
    assert NAME.match(name), f"{name}: expected <method>_<arch>_R_<depth>_FPN_<schedule>_<data>.yaml"
    cfg = load_config(path)
    if name.startswith(("faster_rcnn_", "cascade_rcnn_", "retinanet_", "gfl_")):  # a plain detector (teacher or student alone)
        assert not is_distill_meta_arch(cfg.MODEL.META_ARCHITECTURE)
        with open(path) as f:
            assert "Distill" not in f.read(), "plain configs do not inherit from a Distill base"
    else:
        assert is_distill_meta_arch(cfg.MODEL.META_ARCHITECTURE)
        assert any(name.startswith(h + "_") for h in cfg.DISTILL.HEADS), "the name starts with an enabled head"


# LazyConfig (.py) models: plain detectors only (a teacher, trained with tools/lazy_train_net.py)
LAZY_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True))
LAZY_NAME = re.compile(r"^[a-z][a-z0-9]*_(faster_rcnn|cascade_rcnn|retinanet|gfl)_\w+_\d+k_(coco|voc|shapes)\.py$")


@pytest.mark.parametrize("path", LAZY_CONFIGS, ids=[os.path.relpath(p, REPO) for p in LAZY_CONFIGS])
def test_lazy_configs_follow_the_scheme_load_from_anywhere_and_are_plain_detectors(path, tmp_path, monkeypatch):
    from detectron2.config import LazyConfig

    name = os.path.basename(path)
    assert LAZY_NAME.match(name), f"{name}: expected <backbone>_<arch>_<backbone details>_<schedule>_<data>.py"
    monkeypatch.chdir(tmp_path)
    cfg = LazyConfig.load(path)
    assert {"model", "dataloader", "optimizer", "train", "lr_multiplier"} <= set(cfg)
    assert not is_distill_meta_arch(getattr(cfg.model._target_, "__name__", str(cfg.model._target_)))
    assert f"_{cfg.train.max_iter // 1000}k_" in name


def test_coco_gk_config_is_the_documented_one():
    cfg = load_config(os.path.join(REPO, "configs", "gk_faster_rcnn_R_50_FPN_2x_coco.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "DistillRCNN"
    assert cfg.DISTILL.TEACHER.CONFIG_FILE == "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
    assert cfg.DISTILL.TEACHER.WEIGHTS.startswith("detectron2://COCO-Detection/faster_rcnn_R_101_FPN_3x/")
    assert cfg.MODEL.RESNETS.DEPTH == 50 and "ImageNetPretrained" in cfg.MODEL.WEIGHTS
    gk = cfg.DISTILL.GK
    assert (gk.GLOBAL_WEIGHT, gk.FEATURE_WEIGHT, gk.RESPONSE_WEIGHT) == (1.0, 1.0, 5.0)
    assert (gk.FG_WEIGHT, gk.BG_WEIGHT) == (1.0, 4.0)
    assert (gk.INSTANCES, gk.RESPONSE_ROIS, gk.ADAPTER_KERNEL) == ("auto", "positive", 3)
    assert cfg.DISTILL.PROTOTYPES.NUM == 10 and cfg.DISTILL.PROTOTYPES.ALPHA == 10.0
    assert (cfg.DISTILL.PROTOTYPES.MAX_IMAGES, cfg.DISTILL.PROTOTYPES.MIN_SIZE) == (800, 30)


def test_the_alias_config_is_the_canonical_one_resolves_its_teacher_and_builds(tmp_path):
    """configs/gk_faster_r50.yaml (the README's headline command) is the COCO GK config under
    the name users know: the same config, its teacher resolved, the model built with a stand-in
    (randomly initialised, same architecture) teacher checkpoint."""
    import torch
    from detectron2.modeling import build_model

    alias, canonical = next(iter(ALIASES.items()))
    with open(alias) as f:
        keys = [l for l in f if l.strip() and not l.lstrip().startswith("#")]
    assert keys == [f'_BASE_: "{canonical}"\n'], "an alias only names its canonical config"
    cfg = load_config(alias)
    assert cfg.dump() == load_config(os.path.join(REPO, "configs", canonical)).dump()
    cfg.MODEL.DEVICE = "cpu"
    teacher_cfg = build_teacher_cfg(cfg)
    assert teacher_cfg.MODEL.RESNETS.DEPTH == 101 and config_classes(teacher_cfg) == config_classes(cfg) == 80

    torch.manual_seed(0)
    stand_in = str(tmp_path / "teacher_stand_in.pth")
    torch.save({"model": build_model(teacher_cfg).state_dict()}, stand_in)
    cfg.DISTILL.TEACHER.WEIGHTS = stand_in
    model = build_model(cfg)
    assert type(model).__name__ == "DistillRCNN" and list(model.distill_heads) == ["gk"]
    assert model.teacher.backbone.bottom_up.stages[2].__len__() == 23  # R-101's res4
    assert not any(k.startswith("teacher") for k in model.state_dict())


def test_the_readme_headline_command_uses_the_alias():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert "python train_net.py --config-file configs/gk_faster_r50.yaml --num-gpus 8" in readme


def test_the_demo_pairs_name_shipped_configs_and_their_distilled_students_the_pair_teacher():
    """tools/demo.py and benchmarks/bench_shapes_seeds.py read SHAPES_PAIRS: a renamed or
    retrained config must stay consistent with what they run."""
    import importlib.util

    from d2kd.engine.experiment import SHAPES_PAIRS

    spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "tools", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    shapes = os.path.join(REPO, "configs", "shapes")
    assert set(demo.DISTILLED) == set(SHAPES_PAIRS)
    for pair, (teacher, student) in SHAPES_PAIRS.items():
        teacher_cfg, student_cfg = (load_config(os.path.join(shapes, f)) for f in (teacher, student))
        assert not is_distill_meta_arch(teacher_cfg.MODEL.META_ARCHITECTURE)
        assert not is_distill_meta_arch(student_cfg.MODEL.META_ARCHITECTURE)
        assert teacher_cfg.SOLVER.MAX_ITER >= student_cfg.SOLVER.MAX_ITER == 1000
        distilled = load_config(os.path.join(shapes, demo.DISTILLED[pair][0]))
        assert os.path.basename(distilled.DISTILL.TEACHER.CONFIG_FILE) == teacher
        assert distilled.DISTILL.HEADS[0] == demo.DISTILLED[pair][1]
        assert distilled.SOLVER.MAX_ITER == student_cfg.SOLVER.MAX_ITER
        assert distilled.MODEL.BACKBONE.NAME == student_cfg.MODEL.BACKBONE.NAME


def test_every_benchmark_method_loads_with_its_options_and_names_its_teacher_pairs_teacher():
    """benchmarks/bench_shapes_seeds.py: each method's config + extra options merge (a
    misspelt key fails here, not an hour into a benchmark), its heads are registered, and its
    teacher config is the one of the pair whose teacher weights it is given."""
    import importlib.util

    from d2kd.heads.registry import available_heads
    from d2kd.engine.experiment import SHAPES_PAIRS

    path = os.path.join(REPO, "benchmarks", "bench_shapes_seeds.py")
    spec = importlib.util.spec_from_file_location("bench_shapes_seeds", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    registered = available_heads()
    for pair in bench.PAIRS.values():
        assert set(pair.default_methods) <= set(pair.methods)
        for name, method in pair.methods.items():
            cfg = load_config(method.config, method.opts)
            assert cfg.DISTILL.HEADS and all(h.lower() in registered for h in cfg.DISTILL.HEADS), name
            teacher = bench.PAIRS[method.teacher_pair].teacher
            assert SHAPES_PAIRS.get(method.teacher_pair, (os.path.basename(teacher),))[0] == os.path.basename(teacher)
            assert cfg.DISTILL.TEACHER.CONFIG_FILE == teacher, name
            for other, other_pair in method.teachers:  # DISTILL.TEACHERS.<NAME>: that pair's teacher
                assert cfg.DISTILL.TEACHERS[other].CONFIG_FILE == bench.PAIRS[other_pair].teacher, name
    ablation = bench.PAIRS["retinanet"].methods
    assert load_config(ablation["rm_only"].config, ablation["rm_only"].opts).DISTILL.HEADS == ["rank_mimic"]
    logits = load_config(ablation["rm_pfi_logits"].config, ablation["rm_pfi_logits"].opts)
    assert (logits.DISTILL.RANK_MIMIC.SCORES, logits.DISTILL.PFI.SCORES) == ("logits", "logits")


def test_the_suite_keeps_only_failed_tests_temporary_directories(pytestconfig):
    # a passing run writes ~9 GB of tiny checkpoints; kept for 3 runs they once filled CI's disk
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    assert int(pytestconfig.getini("tmp_path_retention_count")) <= 1
