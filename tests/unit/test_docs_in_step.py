"""The Spanish guide (docs/es/LEEME.md) keeps in step with the README.

The guide is written in Spanish, not translated line by line, so its prose is free. What must
not drift is what a reader types or looks for: every command of the README's quick start,
deployment and troubleshooting sections (the lines of their code blocks and every inline
code span: commands, flags, file names, variables, the messages the programs print), every
port number and every `make` target named there must appear verbatim in the guide. The
sections are found by their headings, so new paragraphs, rows or commands in them are checked
without touching this test; a renamed heading fails it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
LEEME = REPO_ROOT / "docs" / "es" / "LEEME.md"
DEPLOYMENT = REPO_ROOT / "docs" / "deployment.md"

# The README sections the guide covers (each with its subsections).
SECTIONS = ("Quick start", "Deployment on several PCs", "Troubleshooting")

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
# A port: four or five digits standing alone (not part of an address, a number, a version or an
# id; a comma or a full stop after it may end a list or a sentence).
PORT = re.compile(r"(?<!\w)(?<!\d[.,])\d{4,5}(?!\w|[.,]\d)")
# `make TARGET` where make is the command (first word, or after VAR=value, `&&`, `;`, `|`), so
# that `apt-get install make chromium` names no target.
MAKE_TARGET = re.compile(r"(?:^|&&|;|\|)\s*(?:\w+=\S*\s+)*make\s+([a-z][\w-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Item:
    kind: str  # "command", "code", "port" or "make target"
    text: str
    section: str

    def __str__(self) -> str:
        return f"{self.kind} {self.text!r} (README, {self.section})"


def normalise(text: str) -> str:
    """Whitespace collapsed, and a pipe escaped for a table cell (`\\|`) read as a pipe."""
    return " ".join(text.replace("\\|", "|").split())


def split_fenced(markdown: str) -> tuple[list[str], list[list[str]]]:
    """The lines outside fenced code blocks, and each block's lines."""
    prose: list[str] = []
    blocks: list[list[str]] = []
    block: list[str] | None = None
    for line in markdown.splitlines():
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
        elif block is None:
            prose.append(line)
        else:
            block.append(line)
    return prose, blocks


def section(markdown: str, title: str) -> str:
    """The text under the heading `title` (any level) up to the next heading of its level or
    above; headings inside code blocks (shell comments) do not count."""
    lines = markdown.splitlines()
    in_block = False
    start: int | None = None
    level = 0
    for number, line in enumerate(lines):
        if FENCE.match(line):
            in_block = not in_block
            continue
        match = None if in_block else HEADING.match(line)
        if match is None:
            continue
        if start is None:
            if match.group(2) == title:
                start, level = number + 1, len(match.group(1))
        elif len(match.group(1)) <= level:
            return "\n".join(lines[start:number])
    if start is None:
        raise LookupError(f"README.md has no section headed {title!r}")
    return "\n".join(lines[start:])


def command_lines(block: list[str]) -> list[str]:
    """A code block's commands: continuation lines joined, comments and blank lines dropped."""
    commands: list[str] = []
    pending = ""
    for raw in block:
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        line = re.sub(r"(^|\s)#(\s.*)?$", "", line).strip()
        if line:
            commands.append(normalise(line))
    return commands


def items(readme: str) -> list[Item]:
    """What the guide must repeat verbatim, from the README's sections."""
    found: list[Item] = []
    for title in SECTIONS:
        text = section(readme, title)
        prose, blocks = split_fenced(text)
        for block in blocks:
            found += [Item("command", line, title) for line in command_lines(block)]
        for match in INLINE_CODE.finditer("\n".join(prose)):
            found.append(Item("code", normalise(match.group(2)), title))
        found += [Item("port", port, title) for port in sorted(set(PORT.findall(text)))]
        code = [item.text for item in found if item.section == title and item.kind != "port"]
        targets = sorted({target for line in code for target in MAKE_TARGET.findall(line)})
        found += [Item("make target", f"make {target}", title) for target in targets]
    return found


def missing(readme: str, leeme: str) -> list[Item]:
    """The items of the README's sections that the guide lacks."""
    text = normalise(leeme)
    ports = set(PORT.findall(leeme))
    lacking: list[Item] = []
    seen: set[tuple[str, str]] = set()
    for item in items(readme):
        if (item.kind, item.text) in seen:
            continue
        seen.add((item.kind, item.text))
        if item.kind == "port":
            present = item.text in ports
        elif item.kind == "make target":
            present = re.search(rf"{re.escape(item.text)}(?![\w-])", text) is not None
        else:
            present = item.text in text
        if not present:
            lacking.append(item)
    return lacking


def test_every_command_port_and_make_target_of_the_readme_is_in_the_guide() -> None:
    lacking = missing(README.read_text(encoding="utf-8"), LEEME.read_text(encoding="utf-8"))
    assert not lacking, "docs/es/LEEME.md lacks what the README says:\n" + "\n".join(
        f"  - {item}" for item in lacking
    )


def test_each_section_is_found_and_gives_something_to_check() -> None:
    found = items(README.read_text(encoding="utf-8"))
    for title in SECTIONS:
        kinds = {item.kind for item in found if item.section == title}
        assert "code" in kinds or "command" in kinds, f"nothing to check in README's {title!r}"
    assert {item.kind for item in found} >= {"command", "code", "port", "make target"}


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("scripts/deploy.sh pc2 up", "scripts/deploy.sh pc2 arriba", "scripts/deploy.sh pc2 up"),
        ("9092", "9093", "9092"),
        ("make stop", "make parar", "make stop"),
        ("--build", "--construir", "up --build"),
        ("-Follow", "-Seguir", "-Follow"),
    ],
)
def test_the_check_names_what_the_guide_lost(old: str, new: str, expected: str) -> None:
    readme = README.read_text(encoding="utf-8")
    leeme = LEEME.read_text(encoding="utf-8")
    assert old in leeme
    lacking = {item.text for item in missing(readme, leeme.replace(old, new))}
    assert expected in lacking


def test_ports_are_found_in_prose_but_not_in_addresses_numbers_or_ids() -> None:
    text = "(:5000, :8002) and 9092. Not 192.168.1.300, 10,000, 1.12345, CP0001 or v4.1.1"
    assert PORT.findall(text) == ["5000", "8002", "9092"]


def test_sections_end_at_the_next_heading_of_their_level_and_skip_code_comments() -> None:
    markdown = "\n".join(
        [
            "# Title",
            "## Quick start",
            "```sh",
            "# not a heading",
            "make run   # starts it",
            "```",
            "### Demo accounts",
            "`user1`",
            "## Other",
            "`elsewhere`",
        ]
    )
    text = section(markdown, "Quick start")
    assert "# not a heading" in text and "`user1`" in text and "elsewhere" not in text
    prose, blocks = split_fenced(text)
    assert [command_lines(block) for block in blocks] == [["make run"]]
    with pytest.raises(LookupError, match="Troubleshooting"):
        section(markdown, "Troubleshooting")


def test_the_readme_and_the_deployment_guide_link_the_spanish_guide() -> None:
    readme = README.read_text(encoding="utf-8")
    top = readme.split("\n## ", 1)[0]
    assert "](docs/es/LEEME.md)" in top, "README.md: link docs/es/LEEME.md before its first section"
    assert "](es/LEEME.md)" in DEPLOYMENT.read_text(encoding="utf-8")


def test_the_guides_links_lead_somewhere() -> None:
    leeme = LEEME.read_text(encoding="utf-8")
    prose, _ = split_fenced(leeme)
    for target in LINK.findall("\n".join(prose)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file, _, anchor = target.partition("#")
        path = (LEEME.parent / file).resolve()
        assert path.exists(), f"docs/es/LEEME.md links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            anchors = {slug(title) for title in headings(path.read_text(encoding="utf-8"))}
            assert anchor in anchors, f"docs/es/LEEME.md links to {target}: no such heading"


def headings(markdown: str) -> list[str]:
    prose, _ = split_fenced(markdown)
    return [match.group(2) for line in prose if (match := HEADING.match(line))]


def slug(title: str) -> str:
    """A heading's anchor as GitHub makes it."""
    kept = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return kept.replace(" ", "-")
