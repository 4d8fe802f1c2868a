"""The documentation stays true to the code: every setting documented once, every link resolves, README short.

docs/configuration.md is the reference of every environment variable `Settings` reads; README.md is the
five-minute page and links into docs/. These tests read only files, no process is started.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from samseg.core.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CONFIGURATION = REPO / "docs" / "configuration.md"
README_MAX_BYTES = 15 * 1024

# Every Markdown page whose links must resolve: the README, docs/, and the READMEs beside what they describe.
PAGES = sorted(
    {
        REPO / "README.md",
        *(REPO / "docs").glob("*.md"),
        *(REPO / name / "README.md" for name in ("weights", "docker", "config")),
        *(REPO / "benchmarks").glob("*.md"),
    }
)

_NAME = re.compile(r"\b(?:SAMSEG|AWS)_[A-Z0-9_]*[A-Z0-9]\b")
_FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
# [text](target) and ![alt](target), with an optional "title"; reference-style links are not used here.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^\s)>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
# A repository path written in backticks: `samseg/queue/polling.py`, `docs/flower-on-sqs.md`.
_REPO_PATH = re.compile(
    r"^(?:samseg|docs|scripts|benchmarks|config|docker|tests|weights|\.ci)/[A-Za-z0-9_./-]*[A-Za-z0-9_]$"
)


# --- helpers -------------------------------------------------------------------------------------------------
def settings_env_names() -> dict[str, set[str]]:
    """Field name → every environment variable that sets it: its aliases, else prefix + NAME."""
    prefix = Settings.model_config.get("env_prefix", "")
    names: dict[str, set[str]] = {}
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if alias is None:
            names[field_name] = {f"{prefix}{field_name}".upper()}
        else:
            choices = getattr(alias, "choices", [alias])
            names[field_name] = {str(choice).upper() for choice in choices}
    return names


def without_code(text: str) -> str:
    """The text with fenced code blocks and inline code removed (links and headings inside them are not)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def without_fences(text: str) -> str:
    return _FENCE.sub("", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: Markdown removed, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: Counter[str] = Counter()
    result: set[str] = set()
    for match in _HEADING.finditer(without_fences(path.read_text())):
        slug = github_slug(match.group(2))
        result.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return result


def table_rows(text: str) -> list[list[str]]:
    """Every Markdown table body row, split into cells (header and delimiter rows left out)."""
    rows: list[list[str]] = []
    lines = without_fences(text).splitlines()
    for index, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if all(re.fullmatch(r":?-{3,}:?", cell) for cell in cells):
            continue
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if re.fullmatch(r"\|?\s*:?-{3,}.*", following):  # the header row sits above the delimiter row
            continue
        rows.append(cells)
    return rows


def documented_rows() -> list[tuple[set[str], list[str]]]:
    """The rows of docs/configuration.md whose first cell names an environment variable: (names, cells)."""
    rows = []
    for cells in table_rows(CONFIGURATION.read_text()):
        names = set(_NAME.findall(cells[0]))
        if names:
            rows.append((names, cells))
    return rows


def env_example_values() -> dict[str, str]:
    """The uncommented NAME=value lines of .env.example."""
    text = (REPO / ".env.example").read_text()
    return dict(re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", text, flags=re.MULTILINE))


# --- the configuration reference ----------------------------------------------------------------------------
def test_every_samseg_setting_is_documented_exactly_once():
    rows = documented_rows()
    missing, repeated = [], []
    for field_name, env_names in settings_env_names().items():
        count = sum(1 for names, _ in rows if names & env_names)
        if count == 0:
            missing.append(f"{field_name} ({' / '.join(sorted(env_names))})")
        elif count > 1:
            repeated.append(f"{field_name} ({count} rows)")
    assert not missing, f"settings with no row in docs/configuration.md: {missing}"
    assert not repeated, f"settings documented in more than one row of docs/configuration.md: {repeated}"


def test_each_configuration_row_documents_one_known_setting():
    """One setting per row (its aliases beside it), with a default and a meaning; no row for an unknown name."""
    known = settings_env_names()
    for names, cells in documented_rows():
        fields = [field for field, env_names in known.items() if names & env_names]
        assert len(fields) == 1, f"a row must document exactly one setting: {cells[0]} names {fields or 'none'}"
        assert names <= known[fields[0]], f"{cells[0]}: {sorted(names - known[fields[0]])} are not its env names"
        assert len(cells) >= 3, f"{cells[0]}: a row needs setting | default | meaning, got {cells}"
        assert cells[1], f"{cells[0]}: no default"
        assert len(cells[-1]) >= 10, f"{cells[0]}: no real meaning: {cells[-1]!r}"


def test_no_documented_setting_is_unknown():
    """Every SAMSEG_* name anywhere in the docs (and .env.example) is one Settings reads: no stale names."""
    known = set().union(*settings_env_names().values())
    for path in [*PAGES, REPO / ".env.example"]:
        names = {name for name in _NAME.findall(path.read_text()) if name.startswith("SAMSEG_")}
        unknown = sorted(names - known)
        assert not unknown, f"{path.relative_to(REPO)} names settings Settings does not have: {unknown}"


def test_documented_defaults_agree_with_env_example():
    """.env.example sets each setting to its real default (tests/unit/test_env_example.py); the docs say the same."""
    default_of = {name: cells[1] for names, cells in documented_rows() for name in names}
    disagree = []
    for name, value in env_example_values().items():
        if value and name in default_of and f"`{value}`" not in default_of[name]:
            disagree.append(f"{name}: .env.example {value!r}, docs/configuration.md {default_of[name]!r}")
    assert not disagree, "\n".join(disagree)


# --- links and size ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(page: Path):
    broken = []
    for target in _LINK.findall(without_code(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE):  # https:, mailto:, …
            continue
        path_part, _, fragment = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
            continue
        if fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target}: no heading #{fragment} in {destination.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", [*PAGES, REPO / ".env.example"], ids=lambda p: str(p.relative_to(REPO)))
def test_repository_paths_named_in_docs_exist(page: Path):
    """A repository path the text names (`samseg/queue/polling.py`) exists: a move must update the docs."""
    text = page.read_text()
    # In Markdown a path is written in backticks; .env.example is all comments, so any path-like word counts.
    spans = re.findall(r"[\w./-]+", text) if page.suffix != ".md" else re.findall(r"`([^`\n]+)`", text)
    stale = set()
    for span in spans:
        candidate = span.strip().rstrip("/.,;:")
        if candidate.endswith(".pt"):  # checkpoints are git-ignored downloads, not repository files
            continue
        if _REPO_PATH.fullmatch(candidate) and not (REPO / candidate).exists():
            stale.add(candidate)
    assert not stale, f"{page.relative_to(REPO)} names paths that do not exist: {sorted(stale)}"


def test_readme_is_short():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}: move detail to docs/"


def test_github_slug():
    assert github_slug("Pipeline latency and the GPU idle gap") == "pipeline-latency-and-the-gpu-idle-gap"
    assert github_slug("What doesn't work") == "what-doesnt-work"
    assert github_slug("`SAMSEG_*` settings: AWS / SQS") == "samseg_-settings-aws--sqs"
