"""The asset layout over a BlobStore: where a job's masks, result and work files live, and how a job is
published, read and removed.

    {uuid}/mask_images/mask_000.png …     published masks (served by the API at the same path)
    {uuid}/label_map.png, overlay.jpg     the job-level outputs it asked for (samseg.stores.outputs)
    {uuid}/result.json                    the result document; written last — a job is published once it exists
    .samseg/work/{uuid}/{run_id}/…        files handed between the stages of one run (image, packed masks)

Work files are keyed by run, so two runs of one uuid never share (or delete) each other's files. A re-run
overwrites the masks, then result.json, then removes masks the earlier run had beyond the new count; a
removal deletes result.json first. Readers that check result.json therefore never see a half-written or
half-removed job.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from samseg.core.contracts import UUID_PATTERN
from samseg.core.masks import PackedMasks, mask_filename
from samseg.core.outputs import LABEL_MAP_FILE, OVERLAY_FILE
from samseg.stores.blobs import BlobStore
from samseg.stores.results import MASK_DIR, RESULT_FILE, write_result

WORK_ROOT = ".samseg/work"
MASK_NAME = re.compile(r"^mask_\d{3,6}\.png$")
# The job-level files a job may have next to its masks, by name, with their media types (served by the API).
JOB_FILES = {LABEL_MAP_FILE: "image/png", OVERLAY_FILE: "image/jpeg", RESULT_FILE: "application/json"}
RUN_ID = re.compile(r"^[0-9a-f]{6,32}$")


def mask_key(uuid: str, name: str) -> str:
    return f"{checked(uuid)}/{MASK_DIR}/{name}"


def result_key(uuid: str) -> str:
    return f"{checked(uuid)}/{RESULT_FILE}"


def job_file_key(uuid: str, name: str) -> str:
    if name not in JOB_FILES:
        raise ValueError(f"not a job file: {name!r}")
    return f"{checked(uuid)}/{name}"


def work_prefix(uuid: str, run_id: str | None = None) -> str:
    if run_id is None:
        return f"{WORK_ROOT}/{checked(uuid)}"
    if not RUN_ID.fullmatch(run_id):
        raise ValueError(f"unsafe run id {run_id!r}")
    return f"{WORK_ROOT}/{checked(uuid)}/{run_id}"


def work_key(uuid: str, run_id: str, name: str) -> str:
    return f"{work_prefix(uuid, run_id)}/{name}"


def checked(uuid: str) -> str:
    if not UUID_PATTERN.fullmatch(uuid):
        raise ValueError(f"unsafe job id {uuid!r}")
    return uuid


@dataclass(frozen=True)
class Assets:
    blobs: BlobStore

    def publish(
        self,
        uuid: str,
        masks: PackedMasks,
        body: BaseModel,
        write_outputs: Callable[[], None] | None = None,
        outputs: tuple[str, ...] = (),
    ) -> None:
        """Unpublish an earlier run (if any), masks, the job-level outputs (`write_outputs`: `outputs` names the
        files it writes), result.json (published from here on), then stale masks and files out."""
        self.blobs.delete([result_key(uuid)])  # a reader must never pair an old result with new masks
        try:
            write_result(self.blobs, f"{checked(uuid)}/", masks, body, write_outputs)
        except BaseException:
            with contextlib.suppress(Exception):  # leave no unpublished masks behind (disk full, S3 refusing)
                self.blobs.delete_prefix(checked(uuid))
            raise
        current = {mask_key(uuid, mask_filename(i)) for i in range(len(masks))}
        stale = [key for key, _ in self.blobs.walk(f"{checked(uuid)}/{MASK_DIR}") if key not in current]
        stale += [job_file_key(uuid, name) for name in (LABEL_MAP_FILE, OVERLAY_FILE) if name not in outputs]
        if stale:
            self.blobs.delete(stale)

    def read_result(self, uuid: str) -> dict[str, Any] | None:
        data = self.blobs.get(result_key(uuid))
        if data is None:
            return None
        try:
            parsed: dict[str, Any] = json.loads(data)
        except ValueError:
            return None
        return parsed

    def is_published(self, uuid: str) -> bool:
        return self.blobs.head(result_key(uuid)) is not None

    def discard_work(self, uuid: str, run_id: str | None = None) -> int:
        return self.blobs.delete_prefix(work_prefix(uuid, run_id))

    def remove_job(self, uuid: str, run_id: str | None = None) -> int:
        """Unpublish first (result.json), then delete the masks and the work files of `run_id`.

        Only the named run's work files: a run started since the caller checked the record keeps its own.
        Without a run (no record says which), every run's work files go.
        """
        published = self.blobs.head(result_key(uuid)) is not None
        self.blobs.delete([result_key(uuid)])
        removed = int(published) + self.blobs.delete_prefix(checked(uuid))
        if run_id is None or RUN_ID.fullmatch(run_id):
            removed += self.discard_work(uuid, run_id)
        return removed
