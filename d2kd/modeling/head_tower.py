"""A dense head's towers cut at a layer: the student's tower output there (recorded during its
own forward, in the graph) and the teacher's head run from that layer on other tensors.

This implements the context's ``head_tower`` and ``cross_head`` capabilities (CrossKD's
cross-head predictions) for any head laid out as a :class:`~d2kd.modeling.kinds.TowerSpec`
says: detectron2's ``RetinaNetHead`` and d2kd's ``GFLHead``. A tower is an ``nn.Sequential``
of L blocks ``conv, [norm], activation``; layer i (1..L) is block i's output before its
activation, layer 0 the head's input (see :class:`d2kd.structures.HeadTower`).
"""
from typing import Dict, Iterable, List

from detectron2.layers import CycleBatchNormList
from torch import Tensor, nn

from .kinds import DetectorKind

# The activations that end a tower block (detectron2 and d2kd build towers with nn.ReLU).
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU)


def activation_indices(tower: nn.Sequential) -> List[int]:
    """Positions of the block-ending activations in a tower, in order (one per block)."""
    return [i for i, m in enumerate(tower) if isinstance(m, ACTIVATIONS)]


def _tower(model: nn.Module, kind: DetectorKind, branch: int) -> nn.Sequential:
    return getattr(model.head, kind.towers.branches[branch][0])


def tower_depth(model: nn.Module, kind: DetectorKind) -> int:
    """L, the number of blocks of the model's towers (the smallest over its branches)."""
    return min(len(activation_indices(_tower(model, kind, b))) for b in range(len(kind.towers.branches)))


def check_tower_layers(model: nn.Module, kind: DetectorKind, layers: Iterable[int], role: str) -> None:
    """Raise unless every layer exists in the model's towers and can be read without copying
    (the activation after it must not work in place, or it would overwrite the recorded value)."""
    if kind.towers is None or not hasattr(model, "head"):
        raise ValueError(f"the {role} {type(model).__name__} has no dense-head towers d2kd knows")
    for b, (subnet, predictor, scale) in enumerate(kind.towers.branches):
        for name in (subnet, predictor) + ((scale,) if scale else ()):
            if not hasattr(model.head, name):
                raise ValueError(
                    f"the {role}'s head ({type(model.head).__name__}) has no '{name}'; d2kd reads "
                    "towers of detectron2's RetinaNetHead layout (cls_subnet, cls_score, bbox_subnet, bbox_pred)"
                )
    depth = tower_depth(model, kind)
    for layer in layers:
        if not 0 <= layer <= depth:
            raise ValueError(
                f"tower layer {layer} does not exist in the {role}'s head: its towers have {depth} "
                f"conv blocks, so the layer must lie in [0, {depth}] (the head's NUM_CONVS)"
            )
        if layer > 0:
            for b in range(len(kind.towers.branches)):
                tower = _tower(model, kind, b)
                act = tower[activation_indices(tower)[layer - 1]]
                if getattr(act, "inplace", False):
                    raise ValueError(
                        f"the {role}'s tower activation after layer {layer} works in place and would "
                        "overwrite the recorded tower output"
                    )


def tower_record_paths(model: nn.Module, kind: DetectorKind, layers: Iterable[int]) -> Dict[str, str]:
    """Record key ``"tower.<branch>.<layer>"`` -> path of the module whose output is that layer
    (one output per level, in head order); layer 0 needs no hook (it is the head's input)."""
    paths = {}
    for layer in sorted(set(layers)):
        if layer == 0:
            continue
        for b, (subnet, _, _) in enumerate(kind.towers.branches):
            index = activation_indices(_tower(model, kind, b))[layer - 1] - 1
            paths[tower_key(b, layer)] = f"head.{subnet}.{index}"
    return paths


def tower_key(branch: int, layer: int) -> str:
    return f"tower.{branch}.{layer}"


def _at_level(module: nn.Module, x: Tensor, level: int) -> Tensor:
    """``module(x)`` for level ``level``: a per-level BN list (detectron2's CycleBatchNormList,
    which otherwise picks its BN by a call counter) uses that level's BN explicitly."""
    if isinstance(module, CycleBatchNormList):
        out = module[level](x)
        if module._affine:
            out = out * module.weight.reshape(1, -1, 1, 1) + module.bias.reshape(1, -1, 1, 1)
        return out
    return module(x)


def head_from(model: nn.Module, kind: DetectorKind, layer: int, branches: List[List[Tensor]]) -> List[List[Tensor]]:
    """Run the model's head from tower ``layer`` on: per branch, per level (head order),
    block ``layer``'s activation (layer > 0), the remaining blocks, the predictor and the
    level's scale. Called with gradients enabled, it keeps the inputs' graph.

    Args:
        branches (list[list[Tensor]]): per branch, per level (N, C, H, W) layer outputs.
    Returns:
        list[list[Tensor]]: per branch, per level, the predictor outputs (as the head returns them).
    """
    outputs = []
    for b, (subnet, predictor, scale) in enumerate(kind.towers.branches):
        tower = getattr(model.head, subnet)
        start = activation_indices(tower)[layer - 1] if layer > 0 else 0
        rest = list(tower)[start:]
        per_level = []
        for level, x in enumerate(branches[b]):
            for module in rest:
                x = _at_level(module, x, level)
            x = getattr(model.head, predictor)(x)
            if scale:
                x = x * getattr(model.head, scale)[level]
            per_level.append(x)
        outputs.append(per_level)
    return outputs


TOWER_REQUIREMENTS = frozenset({"student.head_tower", "teacher.head_tower", "teacher.cross_head"})


def check_heads_tower_layers(heads: Dict[str, nn.Module], student: nn.Module, student_kind: DetectorKind,
                             teacher: nn.Module, teacher_kind: DetectorKind) -> frozenset:
    """At build: every head that reads towers names its layers (``tower_layers``), and they
    exist on the sides it reads. Returns the union of the layers (what the models record)."""
    layers = set()
    for name, head in heads.items():
        wanted = TOWER_REQUIREMENTS & set(head.requires)
        if not wanted:
            continue
        own = set(getattr(head, "tower_layers", ()))
        if not own:
            raise ValueError(
                f"distillation head '{name}' requires {sorted(wanted)} but names no tower layer "
                "(its attribute tower_layers)"
            )
        try:
            if "student.head_tower" in wanted:
                check_tower_layers(student, student_kind, own, "student")
            if wanted & {"teacher.head_tower", "teacher.cross_head"}:
                check_tower_layers(teacher, teacher_kind, own, "teacher")
        except ValueError as e:
            raise ValueError(f"distillation head '{name}': {e}") from None
        layers |= own
    return frozenset(layers)
