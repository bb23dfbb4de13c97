"""The documentation is tested: every fenced code block in README.md and docs/*.md runs, or says why not.

Each block is classified by an HTML comment on the line just before its opening fence (a
``<!-- test-command -->`` marker in between is skipped over):

- ``<!-- run -->``: executed by the default suite;
- ``<!-- run: slow -->``: executed only under ``pytest -m slow``;
- ``<!-- no-run: <reason> -->``: not executed, for the reason given (hub weights, ImageNet, a GPU, ...).

Output blocks (tables shown as text, tree listings, a terminal session) carry the language tag
``text`` and need no comment. A block with neither fails :func:`test_every_block_is_classified`, so
nothing is silently unrun.

Python blocks of one page run in order in one fresh namespace (like a notebook), in a temporary
working directory, with ``HF_HUB_OFFLINE=1``; the default test of a page runs its ``run`` blocks,
the slow test all of its ``run`` and ``run: slow`` blocks. Bash blocks run one by one with
``bash -euo pipefail`` in a temporary working directory, the venv's ``bin`` first on ``PATH``. TOML
blocks are study config files: they are loaded with ``analyses.impact.config.load_config``.

Also checked: README.md stays a front page (at most 250 lines), and every relative link in README.md
and docs/*.md resolves (to a file, and to a heading's ``#anchor`` by GitHub's slug rules).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES: list[Path] = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
OUTPUT_LANGUAGES = {"text"}
RUNNABLE_LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash",
                      "toml": "toml"}
CLASS_COMMENT = re.compile(r"^\s*<!--\s*(run(?::\s*slow)?|no-run:\s*(?P<reason>.*?))\s*-->\s*$")
MARKERS = {"<!-- test-command -->"}  # markers other tools look for (.ci/run), skipped when classifying
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
BASH_TIMEOUT = 1800  # seconds: a slow block may train models


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    mode: str | None  # "run", "slow", "no-run", or None (unclassified)
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"


def _classify(lines: list[str], fence_index: int) -> tuple[str | None, str]:
    i = fence_index - 1
    while i >= 0 and lines[i].strip() in MARKERS:
        i -= 1
    if i < 0:
        return None, ""
    match = CLASS_COMMENT.match(lines[i])
    if not match:
        return None, ""
    tag = match.group(1)
    if tag == "run":
        return "run", ""
    if tag.startswith("run:"):
        return "slow", ""
    return "no-run", (match.group("reason") or "").strip()


def parse_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page, in order."""
    lines = page.read_text(encoding="utf-8").split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, info = opening.group("fence"), opening.group("info").strip()
        language = info.split()[0].lower() if info else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if closing and closing.group("fence")[0] == fence[0] and len(closing.group("fence")) >= len(fence) \
                    and not closing.group("info").strip():
                break
            body.append(lines[j])
            j += 1
        mode, reason = _classify(lines, i)
        blocks.append(Block(page, i + 1, language, "\n".join(body) + "\n", mode, reason))
        i = j + 1
    return blocks


ALL_BLOCKS: list[Block] = [block for page in PAGES for block in parse_blocks(page)]


def test_every_block_is_classified():
    problems = []
    for block in ALL_BLOCKS:
        if block.mode is None:
            if block.language in OUTPUT_LANGUAGES:
                continue
            problems.append(f"{block.where}: ```{block.language} block without <!-- run -->, <!-- run: slow --> or "
                            "<!-- no-run: reason --> on the line before it (output blocks: tag them ```text)")
        elif block.mode == "no-run" and not block.reason:
            problems.append(f"{block.where}: <!-- no-run: --> needs a reason")
        elif block.mode in ("run", "slow") and block.language not in RUNNABLE_LANGUAGES:
            problems.append(f"{block.where}: cannot run a ```{block.language or '(untagged)'} block "
                            f"(runnable: {', '.join(sorted(RUNNABLE_LANGUAGES))})")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------- running


def _page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _language(block: Block) -> str | None:
    return RUNNABLE_LANGUAGES.get(block.language)


def _python_cases() -> list:
    cases = []
    for page in PAGES:
        blocks = [b for b in ALL_BLOCKS if b.page == page and _language(b) == "python" and b.mode in ("run", "slow")]
        if any(b.mode == "run" for b in blocks):
            cases.append(pytest.param(page, ("run",), id=_page_id(page)))
        if any(b.mode == "slow" for b in blocks):
            cases.append(pytest.param(page, ("run", "slow"), id=f"{_page_id(page)}-slow", marks=pytest.mark.slow))
    return cases


def _block_cases(language: str) -> list:
    return [pytest.param(b, id=b.where, marks=[pytest.mark.slow] if b.mode == "slow" else [])
            for b in ALL_BLOCKS if _language(b) == language and b.mode in ("run", "slow")]


@pytest.fixture
def docs_env(tmp_path, monkeypatch):
    """A temporary working directory, offline hub, the venv's bin first on PATH."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    constants = sys.modules.get("huggingface_hub.constants")  # already imported: read its flag at import
    if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


@pytest.mark.parametrize(("page", "modes"), _python_cases())
def test_python_blocks(page: Path, modes: tuple[str, ...], docs_env):
    """A page's Python blocks, in order, in one namespace (like a notebook)."""
    namespace: dict = {"__name__": "__docs__"}
    for block in ALL_BLOCKS:
        if block.page != page or _language(block) != "python" or block.mode not in modes:
            continue
        code = compile(block.code, f"<{block.where}>", "exec")
        try:
            exec(code, namespace)  # noqa: S102 - the documentation's own examples
        except Exception as error:
            raise AssertionError(f"the Python block at {block.where} failed: {type(error).__name__}: {error}") \
                from error


@pytest.mark.parametrize("block", _block_cases("bash"))
def test_bash_block(block: Block, docs_env):
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=docs_env, capture_output=True,
                            text=True, timeout=BASH_TIMEOUT, env=os.environ.copy())
    assert result.returncode == 0, (f"the bash block at {block.where} exited with {result.returncode}\n"
                                    f"--- stdout (end)\n{result.stdout[-3000:]}\n--- stderr (end)\n"
                                    f"{result.stderr[-3000:]}")


@pytest.mark.parametrize("block", _block_cases("toml"))
def test_toml_block(block: Block, docs_env):
    """A TOML block is a study config file: it loads into a StudyConfig."""
    from analyses.impact.config import load_config

    path = docs_env / "study.toml"
    path.write_text(block.code, encoding="utf-8")
    try:
        load_config(path)
    except Exception as error:
        raise AssertionError(f"the TOML block at {block.where} does not load: {type(error).__name__}: {error}") \
            from error


# ------------------------------------------------------------------------------------- front page, links


def test_readme_is_a_front_page():
    n_lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n_lines <= README_MAX_LINES, f"README.md has {n_lines} lines (at most {README_MAX_LINES}): move text to docs/"


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation other than '-' and '_'
    removed, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = text.strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def _prose_lines(page: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    lines = page.read_text(encoding="utf-8").split("\n")
    fenced = set()
    for block in parse_blocks(page):
        fenced.update(range(block.line, block.line + block.code.count("\n") + 1))
    return [(i + 1, line) for i, line in enumerate(lines) if i + 1 not in fenced]


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in _prose_lines(page):
        match = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    for _, line in _prose_lines(page):  # explicit HTML anchors
        result.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line))
    return result


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _links(page: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in _prose_lines(page):
        line = re.sub(r"`[^`]*`", "", line)  # code spans are not links
        found += [(number, target) for target in LINK.findall(line)]
    return found


def test_relative_links_resolve():
    problems = []
    for page in PAGES:
        for number, target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:, ...
                continue
            path_part, _, anchor = target.partition("#")
            resolved = page if not path_part else (page.parent / path_part).resolve()
            where = f"{_page_id(page)}:{number}: {target}"
            if not resolved.exists():
                problems.append(f"{where}: {path_part} does not exist")
                continue
            if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{where}: no heading with the anchor #{anchor} in {resolved.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)
