"""`.env.example` documents every setting, with its real default."""

from __future__ import annotations

import re

from samseg.core.settings import Settings
from tests.support import REPO


def _env_names(name: str, field) -> set[str]:
    alias = field.validation_alias
    if alias is None:
        return {f"SAMSEG_{name.upper()}"}
    choices = getattr(alias, "choices", [alias])
    return {str(choice) for choice in choices}


def test_every_setting_is_in_env_example():
    text = (REPO / ".env.example").read_text()
    mentioned = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))
    missing = [name for name, field in Settings.model_fields.items() if not (_env_names(name, field) & mentioned)]
    assert not missing, f"settings missing from .env.example: {missing}"


def test_env_example_values_are_the_defaults(tmp_path, monkeypatch):
    """Uncommented lines parse and equal the defaults, so copying the file changes nothing."""
    for key in list(__import__("os").environ):
        if key.startswith(("SAMSEG_", "AWS_")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    defaults = Settings(_env_file=None)
    configured = Settings(_env_file=REPO / ".env.example")
    assert configured.model_dump() == defaults.model_dump()
