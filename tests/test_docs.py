"""The README and docs/ hold together: every relative link resolves to a file in this repository
and, with #anchor, to a heading of that file (as GitHub names headings); every `charlstm COMMAND
--option` they show is an option of that command; nothing points outside the repository.

Links are read from the prose only: fenced code, `code spans` and <!-- comments --> are not links
(a TODO comment may name a page that does not exist yet).
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

COMMENT = re.compile(r"<!--.*?-->", re.S)
CODE_SPAN = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...
COMMAND = re.compile(r"\bcharlstm\s+([a-z][a-z-]*)(.*)")


def split(text):
    """(prose lines, code lines): fenced blocks apart from the rest, comments dropped, and the
    code spans of prose lines moved to the code side."""
    prose, code, fence = [], [], None
    for line in COMMENT.sub("", text).splitlines():
        marker = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if fence is None and marker:
            fence = marker.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is not None:
            code.append(line)
        else:
            code.extend(span[1:-1] for span in CODE_SPAN.findall(line))
            prose.append(CODE_SPAN.sub("", line))
    return prose, code


def slug(heading):
    """GitHub's anchor for a heading: links reduced to their text, lowercase, everything but
    letters, digits, '_', '-' and spaces dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """Every heading's anchor in a markdown file; repeats get -1, -2, ... as on GitHub."""
    seen, found = {}, set()
    prose, _ = split(path.read_text(encoding="utf-8"))
    for line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page, root=ROOT):
    """Each link of `page` that does not resolve, as 'target: why'."""
    problems = []
    prose, _ = split(page.read_text(encoding="utf-8"))
    for line in prose:
        for target in LINK.findall(line):
            if EXTERNAL.match(target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page.resolve()
            if not path and not anchor:
                problems.append(f"{target!r}: empty link")
            elif not resolved.is_relative_to(root.resolve()):
                problems.append(f"{target}: outside the repository")
            elif not resolved.exists():
                problems.append(f"{target}: no such file")
            elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
                problems.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return problems


def command_options():
    """{command: every option string it takes} from the CLI itself."""
    from charlstm.cli import cli

    return {name: {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
            for name, command in cli.commands.items()}


def unknown_options(page, options):
    """Each `charlstm COMMAND ... --option` in the page's code whose command or option does not exist."""
    problems = []
    _, code = split(page.read_text(encoding="utf-8"))
    for line in code:
        line = re.split(r"(?:^|\s)#", line)[0]  # a shell or Python comment is prose
        for m in COMMAND.finditer(line):
            name, rest = m.group(1), re.split(r"\s(?:#|\||;|&&|>)", m.group(2))[0]
            if name not in options:
                problems.append(f"charlstm {name}: no such command")
                continue
            for token in rest.split():
                if token.startswith("-") and not re.fullmatch(r"-?\d[\d.e-]*", token):
                    if token.split("=")[0] not in options[name]:
                        problems.append(f"charlstm {name} {token}: no such option")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_exists(page):
    assert unknown_options(page, command_options()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_points_outside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text and "/work/" not in text


def test_the_docs_are_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve()
              for line in split((ROOT / "README.md").read_text(encoding="utf-8"))[0] for target in LINK.findall(line)}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_the_checker_finds_what_is_broken(tmp_path):
    """The checks above can fail: a page with one good link and each kind of bad one."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## What 10 minutes buys, and why\n\n## Repeat\n## Repeat\n")
    page = tmp_path / "README.md"
    page.write_text("# Top\n\n"
                    "[good](docs/other.md#what-10-minutes-buys-and-why) [repeat](docs/other.md#repeat-1) "
                    "[self](#top) [web](https://example.org/x)\n"
                    "[missing](docs/none.md) [no anchor](docs/other.md#nope) [self, no anchor](#nope) "
                    "[outside](../elsewhere.md)\n"
                    "<!-- [in a comment](docs/none.md) --> `[in code](docs/none.md)`\n"
                    "```\n[in a block](docs/none.md)\ncharlstm train --no-such-option\ncharlstm frobnicate\n"
                    "charlstm sample x.npz --seed 1 --temperature 0.8 | head --lines 3\n"
                    "python demo.py   # charlstm verifies --this in a comment\n```\n")
    assert broken_links(page, root=tmp_path) == [
        "docs/none.md: no such file", "docs/other.md#nope: no heading #nope in other.md",
        "#nope: no heading #nope in README.md", "../elsewhere.md: outside the repository"]
    assert unknown_options(page, command_options()) == [
        "charlstm train --no-such-option: no such option", "charlstm frobnicate: no such command"]
