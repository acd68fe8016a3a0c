"""The one place where the numbers of ``cfg.DISTILL`` are checked: weights, temperatures,
periods, start iterations, counts and fractions, with one message style.

yacs checks a value's type against its default but not its range: ``FEATURE_WEIGHT -1``
trains towards a loss of minus infinity, ``RESPONSE_WEIGHT -5`` silently drops a term and
``PROTOTYPES.PERIOD -5`` means "never". The rules go by the key's name, so they also cover
keys that a head registered outside d2kd adds to its own ``cfg.DISTILL.<NAME>`` node.
"""
import math
from typing import Callable, Iterable, List, Optional, Tuple

__all__ = ["InvalidValueError", "check_distill_values", "problems"]


class InvalidValueError(ValueError):
    """One or more ``cfg.DISTILL`` values lie outside their range (the message lists each)."""


Rule = Tuple[Callable[[float], bool], str]

_NON_NEGATIVE: Rule = (lambda x: x >= 0, "must be >= 0")
_POSITIVE: Rule = (lambda x: x > 0, "must be > 0")
_AT_LEAST_ONE: Rule = (lambda x: x >= 1, "must be >= 1")

# Keys whose rule is not the one their name gives (full key -> rule).
_BY_KEY = {
    "DISTILL.PKD.WEIGHT": (lambda x: x >= 0 or x == -1, "must be >= 0, or -1 for the released weight"),
    "DISTILL.PROTOTYPES.NUM": (lambda x: x >= 1, "must be >= 1 (prototypes per class and stride)"),
    "DISTILL.PROTOTYPES.ONLINE_CAPACITY": (lambda x: x >= 1, "must be >= 1 (instances kept per class)"),
    "DISTILL.PROTOTYPES.PERIOD": (lambda x: x >= 0, "must be >= 0 (0: never rebuild)"),
    "DISTILL.PROTOTYPES.PERIOD_EPOCHS": (lambda x: x >= 0, "must be >= 0 (0: use PERIOD)"),
    "DISTILL.PROTOTYPES.START_EPOCHS": (lambda x: x >= 0, "must be >= 0 (0: use START_ITER)"),
    "DISTILL.FGFI.THRESHOLD": (lambda x: 0 <= x <= 1, "must lie in [0, 1]"),
    "DISTILL.LD.VLR_LOWER": (lambda x: 0 <= x < 1, "must lie in [0, 1)"),
}


def _rule_for(name: str) -> Optional[Rule]:
    """The rule of a key by its last name (``FEATURE_WEIGHT``, ``KD_TEMPERATURE``, ...)."""
    if name.endswith("WEIGHT"):
        return (lambda x: x >= 0, "must be >= 0 (0 turns the term off)")
    if name.endswith("TEMPERATURE"):
        return _POSITIVE
    if "PERIOD" in name or name.startswith("START_") or name.endswith("START_ITER"):
        return _NON_NEGATIVE
    if name in ("NUM", "TOPK", "MAX_IMAGES"):
        return _AT_LEAST_ONE
    if name in ("NUM_LEVELS", "MIN_SIZE", "ALPHA") or name.endswith("CACHE_BYTES"):
        return _NON_NEGATIVE
    if name == "ADAPTER_KERNEL":
        return (lambda x: x in (1, 3), "must be 1 or 3")
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def problems(cfg, nodes: Iterable[str]) -> List[str]:
    """``"KEY = value: must be ..."`` for every value out of range in the named nodes
    (e.g. ``"DISTILL.GK"``); nodes the config lacks are skipped."""
    found = []
    for path in nodes:
        node = cfg
        for part in path.split("."):
            node = node.get(part) if hasattr(node, "get") else None
            if node is None:
                break
        if node is None:
            continue
        for name, value in node.items():
            key = f"{path}.{name}"
            rule = _BY_KEY.get(key) or _rule_for(name)
            if rule is None or not _is_number(value):
                continue
            ok, requirement = rule
            if not math.isfinite(value):
                found.append(f"{key} = {value}: must be a finite number")
            elif not ok(value):
                found.append(f"{key} = {value}: {requirement}")
    return found


def distill_nodes(cfg) -> List[str]:
    """The nodes a distillation model reads: the schedule, the prototypes (shared by GK and
    every head with robust weights) and the node of each enabled head."""
    nodes = ["DISTILL.SCHEDULE", "DISTILL.PROTOTYPES"]
    for head in cfg.DISTILL.HEADS:
        node = f"DISTILL.{str(head).upper()}"
        if node not in nodes:
            nodes.append(node)
    return nodes


def check_distill_values(cfg, nodes: Optional[Iterable[str]] = None) -> None:
    """Raise :class:`InvalidValueError` listing every value out of range in ``nodes``
    (default: :func:`distill_nodes`). Called when a distillation model is built, before the
    teacher, and by every head for its own node."""
    found = problems(cfg, distill_nodes(cfg) if nodes is None else nodes)
    if found:
        raise InvalidValueError(
            "invalid distillation value(s); set them in the config file or on the command line:\n  "
            + "\n  ".join(found)
        )
