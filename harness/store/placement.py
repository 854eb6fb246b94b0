"""Where a run reads its experts from: the pack itself, or a copy of its expert file inside the `--ssd`
folder (the disk under test), made once and verified in full once per run."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from harness.errors import HarnessError
from harness.store.layout import EXPERTS_FILE, INDEX_FILE, PackIndex
from harness.store.reader import verify_expert_file

log = logging.getLogger(__name__)
COPIES_DIR = "harness-experts"


def place_expert_file(index: PackIndex, packed: dict[str, Path], ssd: str | None, model_name: str) -> Path:
    """The expert file to read: the pack's (`packed["experts"]`), or a verified copy inside the `ssd`
    folder, in `harness-experts/<model name>-<content hash>/` (a Hugging Face id's "/" becomes "--")."""
    if ssd is None:
        return packed["experts"]
    root = Path(ssd).expanduser()
    if not root.is_dir():
        raise HarnessError(f"SSD path {root} does not exist or is not a folder")
    dest_dir = root / COPIES_DIR / f"{model_name.replace('/', '--')}-{index.experts_digest()[:16]}"
    dest = dest_dir / EXPERTS_FILE
    remedy = f"delete {dest_dir} so that the next run copies the pack again"
    if dest.exists():
        verify_expert_file(dest, index, remedy)
        return dest
    log.info("copying the expert file to %s", dest)
    partial = dest.with_name(EXPERTS_FILE + ".partial")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(packed["experts"], partial)
    except OSError as exc:
        raise HarnessError(f"cannot copy the expert file into {dest_dir} ({exc.strerror})") from None
    try:
        verify_expert_file(partial, index, "the pack or this disk is corrupt: `harness model pack` checks the pack")
    except HarnessError:
        partial.unlink()
        raise
    partial.replace(dest)
    shutil.copyfile(packed["index"], dest_dir / INDEX_FILE)
    return dest
