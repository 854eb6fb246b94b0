"""Prompt sets (JSONL): {"id", "prompt", "reference"?} per line; sweep files (YAML) that ship beside them.

The shipped sets live in the package (`harness/data/workloads/prompts`, `.../sweeps`), so a plain
`pip install` finds `default`; the repository's top-level `workloads/` is a link to that folder. A
`workloads/prompts/NAME.jsonl` in the current folder is looked up first, so a user's own sets work too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from harness.errors import HarnessError
from harness.spec import RunSpec

PROMPTS_DIR = Path("workloads") / "prompts"
PACKAGED_WORKLOADS = Path(str(resources.files("harness") / "data" / "workloads"))
"""The prompt sets and sweep files installed with the package."""


@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt: str
    reference: str | None = None
    """Continuation fed token by token in teacher-forced decoding."""


def _candidates(name: str) -> list[Path]:
    if name.endswith(".jsonl") or "/" in name:
        return [Path(name)]
    return [PROMPTS_DIR / f"{name}.jsonl", PACKAGED_WORKLOADS / "prompts" / f"{name}.jsonl"]


def workload_path(name: str) -> Path | None:
    """The JSONL file of workload `name` (a NAME in workloads/prompts or a path), or None when there is none."""
    return next((path for path in _candidates(name) if path.is_file()), None)


def prompt_file(spec: RunSpec) -> Path | None:
    """The file a spec's prompts come from; None for a prompt given inline (it is part of the spec)."""
    return None if spec.prompt else workload_path(spec.workload or "default")


def load_workload(name: str) -> list[PromptItem]:
    path = workload_path(name)
    if path is None:
        raise HarnessError(f"workload {name!r} not found (looked for {', '.join(map(str, _candidates(name)))})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HarnessError(f"{path}: not UTF-8 text, so not a JSONL prompt set") from None
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            items.append(PromptItem(str(data.get("id", number)), str(data["prompt"]), data.get("reference")))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise HarnessError(f"{path}:{number}: not a prompt line ({exc.__class__.__name__}: {exc})") from None
    if not items:
        raise HarnessError(f"{path} holds no prompts")
    return items


def select_prompts(spec: RunSpec, random_init: bool) -> tuple[list[PromptItem], str]:
    """The cell's prompts and decoding mode: teacher-forced by default for random-init models (their free
    generation collapses into repeated tokens), greedy otherwise."""
    prompts = [PromptItem("prompt", spec.prompt)] if spec.prompt else load_workload(spec.workload or "default")
    prompts = prompts[: spec.max_prompts] if spec.max_prompts else prompts
    mode = spec.decode or ("teacher-forced" if random_init else "greedy")
    if mode == "teacher-forced" and any(not p.reference for p in prompts):
        raise HarnessError(
            "teacher-forced decoding needs a 'reference' continuation for every prompt; "
            "use --decode greedy or a workload with references"
        )
    return prompts, mode
