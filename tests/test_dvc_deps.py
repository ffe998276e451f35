"""DVC tells the truth: every stage depends on every project file its command can import.

A stage whose command imports a file that is not among its ``deps`` is never re-run when that
file changes, and ``dvc status`` then reports a stale result as up to date. The check reads
each stage's ``python -m <module>`` commands from dvc.yaml, follows every ``import`` statement
of the project's own packages (module level *and* inside functions, read from the source, so
lazily imported modules count too), and asks that each file reached lies under one of the
stage's deps.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("models", "distill", "reproduce")


def module_file(name: str) -> Path | None:
    """The source file of a project module (``pkg/mod.py`` or ``pkg/mod/__init__.py``)."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    else:
        parts.pop()   # a module's package is its folder
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module ``path`` imports (absolute and relative), anywhere in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path).split(".")
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            # `from pkg import mod` imports pkg.mod when it is a module
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def project_closure(module: str) -> set[Path]:
    """Every project source file reached from ``module`` by imports, its packages' __init__s too."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_modules(path))
    return seen


def stage_commands(stage: dict) -> list[str]:
    body = stage.get("do", stage)
    cmd = body["cmd"]
    return cmd if isinstance(cmd, list) else [cmd]


def stage_deps(stage: dict) -> list[str]:
    body = stage.get("do", stage)
    return [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])]


def uncovered(module_files: set[Path], deps: list[str]) -> list[str]:
    """Project files that no dep path equals or contains."""
    dep_paths = [ROOT / d for d in deps if "${" not in d]
    missing = []
    for path in sorted(module_files):
        if not any(path == d or d in path.parents for d in dep_paths):
            missing.append(str(path.relative_to(ROOT)))
    return missing


def load_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


STAGES = load_stages()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_every_file_its_command_imports(name):
    stage = STAGES[name]
    modules = [m for cmd in stage_commands(stage) for m in re.findall(r"python -m ([\w.]+)", cmd)]
    assert modules, f"stage {name}: no `python -m` command found"
    files: set[Path] = set()
    for module in modules:
        closure = project_closure(module)
        assert closure, f"stage {name}: module {module} not found in the project"
        files |= closure
    missing = uncovered(files, stage_deps(stage))
    assert not missing, (f"dvc.yaml stage {name!r} imports files it does not depend on: {missing}; "
                         "add them (or their package folder) to its deps")


def test_the_check_fails_when_a_dependency_is_dropped():
    """Removing ``models`` from the training stage's deps must be caught."""
    stage = STAGES["student"]
    files = project_closure("reproduce.training.train")
    deps = stage_deps(stage)
    assert not uncovered(files, deps)
    dropped = [d for d in deps if d != "models"]
    missing = uncovered(files, dropped)
    assert "models/detr_base.py" in missing and "models/build.py" in missing


# --- params: the training stages list every profile key a run reads ---------------------------

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_training_stage_params_cover_every_profile_key_but_distill(name):
    """Teachers and students leave ``profiles.<p>.distill`` out of their params, so tuning a
    KD weight retrains no teacher; every other key of every profile must be listed."""
    listed = {p.removeprefix("profiles.${profile}.") for p in STAGES[name]["do"]["params"]}
    for profile, keys in PARAMS["profiles"].items():
        missing = set(keys) - {"distill"} - listed
        assert not missing, f"{name}: profiles.{profile}.{sorted(missing)} not in its dvc.yaml params"


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_teacher_and_student_configs_do_not_read_the_profile_distill_options(role):
    import copy

    from reproduce.training.runconfig import resolve_run
    changed = copy.deepcopy(PARAMS)
    changed["profiles"]["mini"]["distill"] = {"fgd": {"kd_weight": 7.0}, "clockdistill": {"tcld": False}}
    base = resolve_run(PARAMS, "dino", role, profile="mini", dataset_len=100)
    assert resolve_run(changed, "dino", role, profile="mini", dataset_len=100) == base
    # ... while a KD run does read them (the distill stage keeps the whole profile)
    kd = resolve_run(changed, "dino", "student", method="fgd", profile="mini", dataset_len=100)
    assert kd["distill"]["kd_weight"] == 7.0
