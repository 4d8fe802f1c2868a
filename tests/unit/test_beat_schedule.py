"""Beat's scheduler makes the folder of its schedule file: a fresh host (job store not local) has none."""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from samseg.worker.beat_schedule import StateDirScheduler


def test_scheduler_opens_its_file_in_a_folder_that_does_not_exist_yet(tmp_path: Path) -> None:
    filename = tmp_path / "host" / "assets" / ".samseg" / "celerybeat-schedule"
    app = Celery("beat-schedule-test", broker="memory://", set_as_current=False)
    scheduler = StateDirScheduler(app=app, schedule_filename=str(filename))  # opens the file, as beat does
    try:
        assert filename.parent.is_dir()
    finally:
        scheduler.close()


def test_samseg_beat_uses_it() -> None:
    from samseg.core.settings import Settings
    from samseg.worker.config import celery_config

    assert celery_config(Settings())["beat_scheduler"] == "samseg.worker.beat_schedule:StateDirScheduler"
