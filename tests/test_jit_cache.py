"""The compiled policies' disk cache (`harness.cache.jit`): keyed by a digest of every source of the package, so
an edit of a callee's file cannot leave its callers running the old code; old digests' folders pruned."""

import os

from harness.cache.jit import CACHES_KEPT, kernel_options, numba_cache_dir, sources_digest


def test_the_digest_follows_every_source_file(tmp_path):
    (tmp_path / "policies").mkdir()
    (tmp_path / "compiled.py").write_text("def f(): return 1\n")
    (tmp_path / "policies" / "p.py").write_text("from compiled import f\n")
    (tmp_path / "notes.txt").write_text("not a source")
    first = sources_digest(tmp_path)
    assert len(first) == 16 and sources_digest(tmp_path) == first
    (tmp_path / "notes.txt").write_text("changed, still not a source")
    assert sources_digest(tmp_path) == first
    (tmp_path / "compiled.py").write_text("def f(): return 2\n")  # the callee alone
    second = sources_digest(tmp_path)
    assert second != first
    (tmp_path / "policies" / "p.py").rename(tmp_path / "policies" / "q.py")  # same bytes, another file
    assert sources_digest(tmp_path) not in (first, second)


def test_the_cache_folder_is_the_digests_and_only_the_latest_folders_are_kept(tmp_path):
    root = tmp_path / "numba"
    for i in range(CACHES_KEPT + 2):
        folder = root / f"old{i}"
        folder.mkdir(parents=True)
        os.utime(folder, (1000 + i, 1000 + i))  # old0 used longest ago
    assert numba_cache_dir(root, "abc") == root / "abc"
    kept = sorted(p.name for p in root.iterdir())
    assert len(kept) == CACHES_KEPT and "abc" in kept
    assert kept == sorted(["abc"] + [f"old{i}" for i in range(3, CACHES_KEPT + 2)])


def test_a_cache_root_that_cannot_hold_folders_leaves_numbas_default(tmp_path):
    (tmp_path / "numba").write_text("a file where the folder would go")
    assert numba_cache_dir(tmp_path / "numba", "abc") is None


def test_kernels_count_no_references_where_numba_offers_it():
    class WithNrt:
        _nrt = True

    assert kernel_options(WithNrt) == {"cache": True, "error_model": "numpy", "_nrt": False}
    assert kernel_options(object) == {"cache": True, "error_model": "numpy"}  # a numba without the option
