"""samseg.storage: atomic publication of a job folder and the purge of old folders and leftovers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from samseg.storage import AssetStore

TTL = 3600.0
WORK_MAX_AGE = 7200.0

UNSAFE_IDS = ["../x", "..", ".", "a/b", "/abs", "", "x" * 300, "a\x00b", ".hidden", "-lead", "a b", "a\nb", "abc\n"]


def age(path: Path, seconds: float, now: float) -> None:
    """Set a path's mtime `seconds` before `now` (the link itself for symlinks)."""
    stamp = now - seconds
    os.utime(path, (stamp, stamp), follow_symlinks=False)


def make_job(root: Path, uuid: str) -> Path:
    folder = root / uuid
    (folder / "mask_images").mkdir(parents=True)
    (folder / "mask_images" / "mask_000.png").write_bytes(b"png")
    (folder / "result.json").write_text("{}")
    return folder


@pytest.fixture
def store(tmp_path) -> AssetStore:
    s = AssetStore(tmp_path / "assets")
    s.ensure_layout()
    return s


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- purge --------------------------------------------------------------------------------------------


def test_purge_removes_only_old_job_folders(store):
    now = time.time()
    old = ["0b7c9a4e-7d7e-4f0e-9e55-2f8a7d1c0a11", "job_old_2"]
    fresh = ["5f1d2c3b-aaaa-4bbb-8ccc-123456789abc", "job-fresh"]
    for uuid in old:
        age(make_job(store.root, uuid), TTL + 60, now)
    for uuid in fresh:
        age(make_job(store.root, uuid), TTL - 60, now)

    removed = store.purge(TTL, WORK_MAX_AGE, now=now)

    assert sorted(removed) == sorted(old)
    for uuid in old:
        assert not (store.root / uuid).exists()
    for uuid in fresh:
        assert (store.root / uuid / "result.json").read_text() == "{}"


def test_purge_judges_the_folder_not_its_files(store):
    now = time.time()
    folder = make_job(store.root, "fresh-folder-old-files")
    for f in folder.rglob("*"):
        age(f, TTL * 10, now)
    age(folder, 10, now)
    assert store.purge(TTL, WORK_MAX_AGE, now=now) == []
    assert (folder / "result.json").exists()


def test_purge_leaves_other_entries_alone(store):
    now = time.time()
    (store.root / "README.txt").write_text("keep me")
    (store.root / "not a job").mkdir()
    (store.root / ".hidden").mkdir()
    (store.root / "lost+found").mkdir()
    (store.root / "uuid-named-file").write_text("a file, not a job folder")
    (store.state_dir / "jobs.sqlite").write_bytes(b"db")
    (store.state_dir / "celerybeat-schedule").write_bytes(b"beat")
    for entry in [*store.root.iterdir(), *store.state_dir.iterdir()]:
        age(entry, TTL * 100, now)
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))

    assert store.purge(TTL, WORK_MAX_AGE, now=now) == []

    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before
    assert (store.state_dir / "jobs.sqlite").read_bytes() == b"db"


def test_purge_does_not_follow_a_uuid_named_symlink(store, tmp_path):
    now = time.time()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("do not delete")
    age(outside / "precious.txt", TTL * 10, now)
    age(outside, TTL * 10, now)
    link = store.root / "11111111-2222-4333-8444-555555555555"
    link.symlink_to(outside, target_is_directory=True)
    age(link, TTL * 10, now)

    removed = store.purge(TTL, WORK_MAX_AGE, now=now)

    assert link.name not in removed
    assert (outside / "precious.txt").read_text() == "do not delete"
    assert outside.is_dir()


def test_purge_does_not_follow_symlinks_in_the_state_dir(store, tmp_path):
    now = time.time()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("do not delete")
    for folder in (store.work_root, store.staging_root, store.trash_root):
        link = folder / f"link-{folder.name}"
        link.symlink_to(outside, target_is_directory=True)
        age(link, WORK_MAX_AGE * 2, now)

    store.purge(TTL, WORK_MAX_AGE, now=now)

    assert (outside / "precious.txt").read_text() == "do not delete"


def test_purge_removes_abandoned_work_staging_and_trash(store):
    now = time.time()
    old_paths, young_paths = [], []
    for folder in (store.work_root, store.staging_root, store.trash_root):
        old_dir = folder / "abandoned-job"
        old_dir.mkdir()
        (old_dir / "source.img").write_bytes(b"x" * 10)
        old_file = folder / "stray.part"
        old_file.write_bytes(b"partial")
        young_dir = folder / "in-flight-job"
        young_dir.mkdir()
        (young_dir / "masks.npy").write_bytes(b"y")
        for p in (old_dir, old_file):
            age(p, WORK_MAX_AGE + 5, now)
        age(young_dir, WORK_MAX_AGE - 5, now)
        old_paths += [old_dir, old_file]
        young_paths.append(young_dir)

    removed = store.purge(TTL, WORK_MAX_AGE, now=now)

    assert removed == []  # only job folders are reported
    for p in old_paths:
        assert not p.exists(), p
    for p in young_paths:
        assert (p / "masks.npy").read_bytes() == b"y"
    # The areas themselves survive.
    assert store.work_root.is_dir() and store.staging_root.is_dir() and store.trash_root.is_dir()


def test_work_age_and_job_ttl_are_independent(store):
    now = time.time()
    job = make_job(store.root, "job-a")
    age(job, 100, now)
    work = store.work_dir("job-b")
    work.mkdir(parents=True)
    age(work, 100, now)
    # A short work age does not touch published jobs; a short TTL does not touch work folders.
    store.purge(max_age_seconds=10_000, work_max_age_seconds=50, now=now)
    assert job.exists() and not work.exists()
    work.mkdir()
    age(work, 100, now)
    assert store.purge(max_age_seconds=50, work_max_age_seconds=10_000, now=now) == ["job-a"]
    assert work.exists()


def test_purge_of_missing_root_is_a_no_op(tmp_path):
    store = AssetStore(tmp_path / "never-created")
    assert store.purge(TTL, WORK_MAX_AGE) == []
    assert not store.root.exists()


# --- publish ------------------------------------------------------------------------------------------


def test_publish_builds_in_staging_then_appears_complete(store):
    uuid = "3e7c0bb8-1f0a-4c5e-9d2b-6a8f0e1d2c3b"
    final = store.root / uuid
    seen: dict[str, object] = {}

    def build(folder: Path) -> None:
        seen["folder"] = folder
        seen["final_existed_during_build"] = final.exists()
        (folder / "mask_images").mkdir()
        (folder / "mask_images" / "mask_000.png").write_bytes(b"one")
        (folder / "result.json").write_text(json.dumps({"uuid": uuid}))

    result = store.publish(uuid, build)

    staging_folder = seen["folder"]
    assert isinstance(staging_folder, Path)
    assert staging_folder.parent == store.staging_root
    assert staging_folder.name.startswith(uuid + ".")
    assert seen["final_existed_during_build"] is False
    assert result == final == store.job_dir(uuid)
    assert snapshot(final) == {"mask_images/mask_000.png": b"one", "result.json": json.dumps({"uuid": uuid}).encode()}
    assert store.read_result(uuid) == {"uuid": uuid}
    assert list(store.staging_root.iterdir()) == []
    assert list(store.trash_root.iterdir()) == []


def test_publish_creates_the_layout_on_first_use(tmp_path):
    store = AssetStore(tmp_path / "fresh" / "assets")
    store.publish("job1", lambda folder: (folder / "result.json").write_text("{}"))
    assert (store.root / "job1" / "result.json").exists()
    assert store.staging_root.is_dir() and store.work_root.is_dir()


def test_republish_replaces_the_whole_folder(store):
    uuid = "job-replay"

    def first(folder: Path) -> None:
        (folder / "mask_images").mkdir()
        for i in range(3):
            (folder / "mask_images" / f"mask_{i:03d}.png").write_bytes(b"old%d" % i)
        (folder / "result.json").write_text('{"run": 1}')
        (folder / "old-only.txt").write_text("stale")

    def second(folder: Path) -> None:
        (folder / "mask_images").mkdir()
        (folder / "mask_images" / "mask_000.png").write_bytes(b"new0")
        (folder / "result.json").write_text('{"run": 2}')

    store.publish(uuid, first)
    store.publish(uuid, second)

    assert snapshot(store.job_dir(uuid)) == {"mask_images/mask_000.png": b"new0", "result.json": b'{"run": 2}'}
    assert store.read_result(uuid) == {"run": 2}
    assert list(store.staging_root.iterdir()) == []
    assert list(store.trash_root.iterdir()) == []


def test_failed_build_leaves_nothing_behind(store):
    class Boom(RuntimeError):
        pass

    def build(folder: Path) -> None:
        (folder / "mask_images").mkdir()
        (folder / "mask_images" / "mask_000.png").write_bytes(b"half")
        raise Boom("encoder crashed")

    with pytest.raises(Boom):
        store.publish("job-broken", build)

    assert not (store.root / "job-broken").exists()
    assert list(store.staging_root.iterdir()) == []
    assert list(store.trash_root.iterdir()) == []


def test_failed_rebuild_keeps_the_previous_result(store):
    store.publish("job-keep", lambda folder: (folder / "result.json").write_text('{"run": 1}'))

    def broken(folder: Path) -> None:
        (folder / "result.json").write_text('{"run": 2}')
        raise KeyboardInterrupt  # BaseException too: a worker being killed mid-build

    with pytest.raises(KeyboardInterrupt):
        store.publish("job-keep", broken)

    assert store.read_result("job-keep") == {"run": 1}
    assert list(store.staging_root.iterdir()) == []


def test_read_result_of_unknown_job_is_none(store):
    assert store.read_result("nobody") is None


# --- unsafe ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("uuid", UNSAFE_IDS)
def test_job_paths_reject_unsafe_ids(store, uuid):
    with pytest.raises(ValueError, match="unsafe job id"):
        store.job_dir(uuid)
    with pytest.raises(ValueError, match="unsafe job id"):
        store.work_dir(uuid)
    with pytest.raises(ValueError, match="unsafe job id"):
        store.result_path(uuid)


@pytest.mark.parametrize("uuid", ["../escape", "a/b", ""])
def test_publish_rejects_unsafe_ids_before_touching_disk(store, uuid):
    called = []
    with pytest.raises(ValueError, match="unsafe job id"):
        store.publish(uuid, called.append)
    assert called == []
    assert list(store.staging_root.iterdir()) == []
    assert not (store.root.parent / "escape").exists()


@pytest.mark.parametrize("uuid", ["a", "A1", "0b7c9a4e-7d7e-4f0e-9e55-2f8a7d1c0a11", "01HV5Z_ULID", "x" * 128])
def test_job_paths_accept_safe_ids(store, uuid):
    assert store.job_dir(uuid) == store.root / uuid
    assert store.work_dir(uuid) == store.root / ".samseg" / "work" / uuid
