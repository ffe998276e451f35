"""The one rule pairing student and teacher decoder layers (shared by every logit method).

Student layer i (0-based, of L_S) is paired with teacher layer ceil((i+1) L_T / L_S) - 1:
the identity for equal depths, last with last always, evenly spread otherwise (4 student /
6 teacher layers -> [1, 2, 4, 5]). Grade D: no paper of the six sets a rule for unequal
depths (the paper-built teachers have equal depths; KD-DETR / DETRDistill / GKD distil
stage i to stage i). Before, CLoCKDistill rounded (banker's rounding: [1, 2, 3, 5]) while
KD-DETR / DETRDistill took the ceiling; one rule now.
"""
from __future__ import annotations

import math

LAYER_MODES = ("all", "last")


def paired_layer(student_layer: int, student_layers: int, teacher_layers: int) -> int:
    return math.ceil((student_layer + 1) * teacher_layers / student_layers) - 1


def layer_pairs(num_student: int, num_teacher: int, mode: str = "all") -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs: every student layer (``all``) or the last (``last``)."""
    if mode == "last":
        return [(num_student - 1, num_teacher - 1)]
    if mode != "all":
        raise ValueError(f"layers must be one of {list(LAYER_MODES)}, got {mode!r}")
    return [(i, paired_layer(i, num_student, num_teacher)) for i in range(num_student)]
