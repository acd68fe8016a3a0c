"""A new method is one file: a head defined outside d2kd brings its own config node.

The head module below is written to a temporary directory, outside the package, and imported
from there; nothing in d2kd/config.py names it.
"""
import importlib.util
import os
import sys
import textwrap

import pytest
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import d2kd
from conftest import distill_cfg, random_batch, write_yaml
from d2kd.config import load_config

PLUGIN = textwrap.dedent('''
    """A user's own method, in a file of its own."""
    from detectron2.config import CfgNode as CN

    from d2kd.heads import DISTILL_HEAD_REGISTRY, DistillHead


    @DISTILL_HEAD_REGISTRY.register()
    class {cls}(DistillHead):
        """WEIGHT * mean((F_s - F_t)^2) at the strides in STRIDES (the user's own keys)."""

        @classmethod
        def add_config(cls, cfg):
            cfg.DISTILL.{node} = CN()
            cfg.DISTILL.{node}.WEIGHT = 0.5
            cfg.DISTILL.{node}.STRIDES = [8]

        def __init__(self, cfg, student_shapes, teacher_shapes):
            super().__init__(cfg, student_shapes, teacher_shapes)
            self.weight = cfg.DISTILL.{node}.WEIGHT
            self.strides = list(cfg.DISTILL.{node}.STRIDES)

        def forward(self, ctx):
            total = ctx.zero_loss()
            for s in self.strides:
                # same channels on both sides in this test (16 and 16)
                total = total + ((ctx.student_features[s] - ctx.teacher_features[s]) ** 2).mean()
            return {{self.loss_key(): self.weight * total}}
''')


@pytest.fixture(autouse=True)
def registry_restored():
    """Unregister the test's heads afterwards: a config dumped by a later test must not carry
    their nodes into a process that never imported them."""
    from d2kd.heads import DISTILL_HEAD_REGISTRY

    before = dict(DISTILL_HEAD_REGISTRY._obj_map)
    yield
    DISTILL_HEAD_REGISTRY._obj_map.clear()
    DISTILL_HEAD_REGISTRY._obj_map.update(before)


def _import_plugin(tmp_path, cls: str, node: str):
    path = tmp_path / f"{cls.lower()}_plugin.py"
    path.write_text(PLUGIN.format(cls=cls, node=node))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_a_head_outside_the_package_owns_its_config_node_and_trains_a_step(tmp_path):
    config_source = open(os.path.join(os.path.dirname(d2kd.__file__), "config.py")).read()
    assert "PLUGINPROBE" not in config_source
    _import_plugin(tmp_path, "PluginProbeHead", "PLUGINPROBE")

    # the node exists in any config made after the import, with the head's defaults ...
    cfg = distill_cfg(tmp_path, heads=["pluginprobe"], teacher_channels=16)
    assert cfg.DISTILL.PLUGINPROBE.WEIGHT == 0.5 and cfg.DISTILL.PLUGINPROBE.STRIDES == [8]
    # ... a yaml sets its keys like any other (detectron2 refuses unknown keys) ...
    cfg.DISTILL.PLUGINPROBE.WEIGHT = 2.0
    cfg.DISTILL.PLUGINPROBE.STRIDES = [8, 16]
    yaml_path = write_yaml(cfg, tmp_path / "plugin.yaml")
    loaded = load_config(yaml_path)
    assert loaded.DISTILL.PLUGINPROBE.WEIGHT == 2.0 and loaded.DISTILL.PLUGINPROBE.STRIDES == [8, 16]

    # ... and the head trains a step with its configured weight
    model = build_model(loaded)
    model.train()
    with EventStorage(0):
        losses = model(random_batch())
    loss = losses["loss_distill_pluginprobe"]
    assert loss.item() > 0
    head = model.distill_heads["pluginprobe"]
    assert head.weight == 2.0 and head.strides == [8, 16]
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())

    # its numbers are checked by key name like a built-in head's
    loaded.defrost()
    loaded.DISTILL.PLUGINPROBE.WEIGHT = -1.0
    with pytest.raises(ValueError, match="DISTILL.PLUGINPROBE.WEIGHT"):
        build_model(loaded)


def test_a_config_made_before_the_heads_module_was_imported_is_a_clear_error(tmp_path):
    cfg = distill_cfg(tmp_path, heads=["fitnet"], teacher_channels=16)
    assert "LATEPLUGIN" not in cfg.DISTILL
    _import_plugin(tmp_path, "LatePluginHead", "LATEPLUGIN")
    cfg.DISTILL.HEADS = ["lateplugin"]
    with pytest.raises(KeyError, match=r"no DISTILL\.LATEPLUGIN: it was made before the head's module"):
        build_model(cfg)


def test_every_built_in_head_with_settings_owns_its_node():
    from d2kd.heads import available_heads
    from detectron2.config import get_cfg

    cfg = get_cfg()
    d2kd.add_distill_config(cfg)
    for name, cls in available_heads().items():
        if cls.__module__.startswith("d2kd."):
            own = cls.__dict__.get("add_config")
            assert own is not None, f"{name} has no add_config of its own"
            assert name.upper() in cfg.DISTILL, name


FLOORS = ["utils", "structures", "prototypes", "heads", "modeling", "engine"]


def _module_level_d2kd_imports(path, package):
    """The d2kd subpackages a file imports at module level (relative imports resolved)."""
    import ast

    tree = ast.parse(open(path).read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: 1 = this package, 2 = d2kd
                parts = (package if node.level == 1 else "").split(".") if node.level <= 2 else []
                target = ".".join(p for p in parts + (node.module or "").split(".") if p)
            else:
                target = node.module or ""
                if not target.startswith("d2kd"):
                    continue
                target = target[len("d2kd."):] if target != "d2kd" else ""
            found.add(target.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("d2kd.")}
    return found - {""}


def test_imports_flow_one_way_between_the_floors():
    """utils <- structures <- prototypes <- heads <- modeling <- engine, at module level."""
    root = os.path.dirname(d2kd.__file__)
    wrong = []
    for level, floor in enumerate(FLOORS):
        for dirpath, _, files in os.walk(os.path.join(root, floor)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    for target in _module_level_d2kd_imports(path, floor):
                        if target in FLOORS and FLOORS.index(target) > level:
                            wrong.append(f"{os.path.relpath(path, root)} imports d2kd.{target}")
    assert not wrong, "a lower floor imports a higher one: " + "; ".join(wrong)
