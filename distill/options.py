"""Method options: defaults merged with a run's choices, unknown names rejected (shared toolkit).

Every Distiller declares ``DEFAULTS`` (option -> default, each with its grade in a comment);
``resolve_options`` is the one place that merges and checks them, so a typo such as
``{'alpah': 1}`` fails at construction with the list of valid names instead of being ignored.
"""
from __future__ import annotations

import difflib


def resolve_options(method: str, defaults: dict, cfg: dict | None) -> dict:
    """``{**defaults, **cfg}``; raises ValueError naming every unknown key and the valid ones."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{method}: unknown options {', '.join(hints)}; valid options: "
                         f"{', '.join(sorted(defaults)) or '(none)'}")
    return {**defaults, **cfg}


def check_choice(method: str, key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{method}: option {key} must be one of {list(choices)}, got {value!r}")
