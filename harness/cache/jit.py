"""numba for the cache policies: `njit`, the kernels' compile options (`KERNEL`), where compiled code is cached.

numba, not a C extension: the functions stay Python source (readable beside the other policies, and they run
as plain Python where numba is missing), need no compiler at install (wheels on every platform torch has),
and are called alike from Python and from other compiled functions.

numba keeps a compiled function valid while its own source file is unchanged, but a compiled function holds
copies of the compiled functions it calls from other files (a policy's kernels hold `compiled.ranks_below`,
`flashmoe`'s hold `learned.network`): after an edit of only the callee's file, the caller's cache would run the
old callee. So the cache lives under `$HARNESS_CACHE/numba/DIGEST`, DIGEST being a hash of every source file of
this package: any edit starts a fresh cache. The folders of the CACHES_KEPT most recently used digests are
kept. Where that folder cannot be written, numba's default (`__pycache__` beside the sources) is used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from harness.paths import harness_cache_dir

CACHES_KEPT = 8
"""Cache folders of other source digests kept (a checkout switched between branches compiles each once)."""


def sources_digest(package: Path = Path(__file__).parent) -> str:
    """sha256 of the package's Python sources (relative path and bytes of each, in path order), 16 hex digits."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def numba_cache_dir(root: Path, digest: str) -> Path | None:
    """root/DIGEST, made and marked as just used, the older digests' folders beyond CACHES_KEPT removed; None
    where it cannot be written."""
    folder = root / digest
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.utime(folder)
        if not os.access(folder, os.W_OK):
            return None
    except OSError:
        return None
    try:
        others = sorted((p for p in root.iterdir() if p.is_dir() and p != folder), key=_last_used)
    except OSError:
        return folder
    for old in others[: max(0, len(others) - (CACHES_KEPT - 1))]:
        shutil.rmtree(old, ignore_errors=True)  # another process may still use it: it then recompiles
    return folder


def _last_used(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except OSError:  # removed meanwhile by another process
        return 0.0


def kernel_options(target: type) -> dict[str, Any]:
    """Compile options of the policies' kernels and their helpers (not `compiled.drive`, which allocates): without
    reference counting (they allocate nothing) and without exceptions (numpy's error model: x / 0 is inf, not an
    error). With reference counting, a kernel increments and decrements the count of every array argument on
    entry and exit (atomic operations; its pruning pass left them in these kernels), where the kernel's own work
    is often a few dozen operations: 20% of reuse-logit's compiled time under `perf`. `_nrt` is a private option
    of numba's CPU target (`target`): where a numba version lacks it, the kernels count references (slower, same
    results)."""
    options: dict[str, Any] = {"cache": True, "error_model": "numpy"}
    if hasattr(target, "_nrt"):
        options["_nrt"] = False
    return options


try:
    from numba import config as _numba_config
    from numba import njit
    from numba.core.cpu import CPUTargetOptions
except ImportError:  # the same functions, interpreted: correct, only slower

    def njit(*args, **kwargs):  # type: ignore[no-redef]
        return args[0] if args and callable(args[0]) else (lambda fn: fn)

    KERNEL: dict[str, Any] = {}

else:
    # Read by numba when each cached function is decorated, so before any policy module defines one. A cache
    # folder the user chose (NUMBA_CACHE_DIR) gets the digest folders inside it.
    _chosen = os.environ.get("NUMBA_CACHE_DIR")
    _cache = numba_cache_dir(Path(_chosen) if _chosen else harness_cache_dir() / "numba", sources_digest())
    if _cache is not None:
        _numba_config.CACHE_DIR = str(_cache)  # type: ignore[attr-defined]
    KERNEL = kernel_options(CPUTargetOptions)
