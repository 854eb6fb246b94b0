"""Prompt sets (JSONL in workloads/prompts): {"id", "prompt", "reference"?} per line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError

PROMPTS_DIR = Path("workloads") / "prompts"


@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt: str
    reference: str | None = None
    """Continuation fed token by token in teacher-forced decoding."""


def _candidates(name: str) -> list[Path]:
    repo_root = Path(__file__).resolve().parents[1]
    if name.endswith(".jsonl") or "/" in name:
        return [Path(name)]
    return [PROMPTS_DIR / f"{name}.jsonl", repo_root / PROMPTS_DIR / f"{name}.jsonl"]


def load_workload(name: str) -> list[PromptItem]:
    for path in _candidates(name):
        if path.is_file():
            break
    else:
        raise HarnessError(f"workload {name!r} not found (looked for {', '.join(map(str, _candidates(name)))})")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            items.append(PromptItem(str(data.get("id", number)), str(data["prompt"]), data.get("reference")))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HarnessError(f"{path}:{number}: not a prompt line ({exc.__class__.__name__}: {exc})") from None
    if not items:
        raise HarnessError(f"{path} holds no prompts")
    return items
