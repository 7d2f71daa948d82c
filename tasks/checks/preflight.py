"""Preflight: what a build needs from outside it, checked before its first task, without loading a model.

Every role of the spec is resolved (`music_model.roles.hub`): local folders hold their checkpoint,
hub models are in the cache or reachable, gated ones accessible, and each hub model's revision
resolves to a commit. The free disk must cover the plan's estimate of what the build still writes.
Each problem is one line naming the role, the model and what to do.

On a machine with CUDA, a spec with an `llm` or `vlm` role also needs what xgrammar's Triton mask
kernel compiles with (a C compiler, `Python.h`: `music_model.roles.kernels`); where one is missing,
grammar masks use xgrammar's torch-native kernel, and preflight says so in a note (not a problem).

The commits are the build folder's: the first run records them in `models.json`, every role then
loads exactly that commit, and a later run whose commits differ (the repository's branch moved, or
the spec names another revision) stops with one line, unless the spec pins that commit.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from data_specs.build import BuildSpec
from music_model.roles.hub import HubState, Resolved, resolve
from music_model.roles.kernels import triton_toolchain_problem
from safe_files import write_atomic
from tasks.checks.cost_plan import disk, funnel
from tasks.engine.build_paths import build_dir, models_record, recorded


class PreflightError(RuntimeError):
    """A build that cannot start: one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Preflight:
    roles: list[Resolved]
    needed_bytes: float
    free_bytes: int
    disk_path: Path
    problems: list[str]
    notes: list[str]

    def pinned_spec(self, spec: BuildSpec) -> BuildSpec:
        """`spec` with each hub role's revision set to its resolved commit, which its loads then use."""
        roles = {r.role: spec.roles[r.role].model_copy(update={"revision": r.commit})
                 for r in self.roles if r.source in ("hub", "cache") and r.commit}
        return spec.model_copy(update={"roles": {**spec.roles, **roles}})

    def record(self) -> dict:
        return {r.role: r.record() for r in self.roles}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def kernel_notes(spec: BuildSpec, cuda: bool) -> list[str]:
    """A line when grammar-constrained roles would run on CUDA (`cuda`: this machine has it) where
    xgrammar's Triton kernel cannot be built, so its torch-native kernel masks instead."""
    structured = sorted(name for name, role in spec.roles.items() if role.role in ("llm", "vlm") and role.device != "cpu")
    if not (cuda and structured) or (problem := triton_toolchain_problem()) is None:
        return []
    return [f"roles.{', roles.'.join(structured)}: xgrammar's Triton bitmask kernel cannot be built on this machine: {problem}; "
            "grammar masks will use xgrammar's torch-native kernel"]


def check(spec: BuildSpec) -> Preflight:
    """Resolve every role and compare the free disk with the plan's estimate; records nothing."""
    state = HubState()
    roles = [resolve(name, role, state) for name, role in sorted(spec.roles.items())]
    problems = [r.problem for r in roles if r.problem]
    out = build_dir(spec)
    estimate = disk(spec, funnel(spec))
    needed = max(0.0, estimate["intermediate_bytes"] + estimate["published_bytes"] - folder_bytes(out))
    where = existing_parent(out)
    free = shutil.disk_usage(where).free
    if needed > free:
        problems.append(f"disk: the build needs about {_gib(needed)} more under {out} (`music plan` estimates it) and "
                        f"{where} has {_gib(free)} free: free space, or set output_root to a larger disk")
    import torch

    return Preflight(roles, needed, free, where, problems, kernel_notes(spec, torch.cuda.is_available()))


def changed_commits(spec: BuildSpec, result: Preflight, before: dict) -> list[str]:
    """One line for each role whose weights differ from the ones the folder was made with."""
    lines = []
    for role in result.roles:
        old = before.get(role.role)
        # Another model is a parameter change, which the fingerprints handle; the same name at another commit is not.
        if old is None or old["model"] != role.model or role.source not in ("hub", "cache") or old["commit"] == role.commit:
            continue
        lines.append(f"roles.{role.role}: {build_dir(spec)} was made with {role.model} at commit {old['commit']} and the "
                     f"spec now resolves it to {role.commit}: pin `revision: {old['commit']}` to resume with the weights "
                     "it was made with, or build into a new output_root")
    return lines


def check_against_folder(spec: BuildSpec) -> tuple[Preflight, list[str]]:
    """`check`, and its problems with a line for each commit that differs from the folder's record."""
    result = check(spec)
    before = recorded(spec)
    return result, result.problems + (changed_commits(spec, result, before) if before else [])


def preflight(spec: BuildSpec) -> BuildSpec:
    """Check, refuse a changed commit, record the commits and return the spec pinned to them; raises
    PreflightError with one line per problem. Call under the build's lock, before the first stage."""
    from music_model.zoo import ensure_entry

    for role in spec.roles.values():  # the zoo is built on first use, as the hub's models are downloaded
        if role.model.startswith("zoo:"):
            ensure_entry(role.model.removeprefix("zoo:"))
    result, problems = check_against_folder(spec)
    if problems:
        raise PreflightError(problems)
    record = result.record()
    if record != recorded(spec):
        write_atomic(models_record(spec), lambda tmp: tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n"))
    return result.pinned_spec(spec)
