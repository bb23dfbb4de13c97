"""The documentation pages a report links to, copied beside it (``<out>/docs/``) as markdown and as
HTML, so a report that is moved, shared or made by an installed package keeps working links.

The pages are the project's ``docs/*.md``, shipped inside the package (``analyses/docs`` is that
folder). In the copies, a link to another copied page stays (``.html`` in the HTML pages); a link
to anything else that is not a web address (a source file, the README) becomes plain text.
"""

from __future__ import annotations

import html
import os
import re
import unicodedata
from importlib import resources
from pathlib import Path

from hooked_vit import atomic

DOCS_DIR = "docs"
PROTOCOL_PAGE = f"{DOCS_DIR}/protocol.md"
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def source_pages() -> dict[str, str]:
    """Every shipped documentation page: name (file stem) -> markdown."""
    folder = resources.files("analyses") / "docs"
    if not folder.is_dir():
        return {}
    return {Path(entry.name).stem: entry.read_text(encoding="utf-8")
            for entry in sorted(folder.iterdir(), key=lambda e: e.name) if entry.name.endswith(".md")}


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = unicodedata.normalize("NFKC", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _local_links(text: str, pages: set[str], suffix: str) -> str:
    """``text`` with links to other pages pointing at their copies (``<page><suffix>``) and links to
    files that are not copied turned into their plain text."""

    def replace(match: re.Match) -> str:
        image, label, target = match.groups()
        if image or re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return match.group(0)
        path, _, anchor = target.partition("#")
        name = Path(path).stem
        if path.endswith(".md") and Path(path).name == f"{name}.md" and name in pages and "/" not in path.lstrip("./"):
            return f"[{label}]({name}{suffix}{'#' + anchor if anchor else ''})"
        return label

    return _LINK.sub(replace, text)


def render(markdown_text: str, title: str) -> str:
    """A standalone HTML page of ``markdown_text`` (tables, code, headings with GitHub's anchors)."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code", "toc"],
                             extension_configs={"toc": {"slugify": lambda value, separator: github_slug(value)}})
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title>\n<style>"
            "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.2em .5em}"
            "img{max-width:100%}code{background:#f4f4f4}pre{background:#f4f4f4;padding:.5em;overflow-x:auto}"
            f"</style></head><body>\n{body}\n</body></html>\n")


def write_docs(out: str | os.PathLike, levels: tuple[str, ...]) -> dict[str, str]:
    """Copy every shipped page into ``<out>/docs/`` (``.md`` and ``.html``); returns, for each of
    ``levels`` that has a page, the report-relative link to it."""
    pages = source_pages()
    folder = Path(out) / DOCS_DIR
    for name, text in pages.items():
        atomic.write_text(folder / f"{name}.md", _local_links(text, set(pages), ".md"))
        atomic.write_text(folder / f"{name}.html", render(_local_links(text, set(pages), ".html"), name))
    return {name: f"{DOCS_DIR}/{name}.md" for name in levels if name in pages}


__all__ = ["DOCS_DIR", "PROTOCOL_PAGE", "github_slug", "render", "source_pages", "write_docs"]
