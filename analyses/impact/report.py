"""The study's report, rebuilt from saved results alone: ``report.md`` (figures linked) and
``report.html`` (the same, figures inline), with the settings, what each preset reduced, the
choices made where the paper is silent, wall time per level and, in the paper's own setting, the
paper's numbers beside ours.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analyses.common.level import DONE_FILE, get_level
from analyses.common.results import config_to_dict, read_json
from analyses.impact.config import StudyConfig, reductions, to_toml
from analyses.impact.docs import DOCS_DIR, PROTOCOL_PAGE, render, write_docs
from hooked_vit import atomic

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PAPER_MODEL = "deit3_base"  # the paper's setting: its own numbers are shown beside ours


def level_dir(out: str | os.PathLike, level: str, method: str) -> Path:
    """Where level ``level`` of the ``method`` variants saves its units and result."""
    return Path(out) / level / method


def _lookup(config: Any, path: str) -> Any:
    value: Any = config_to_dict(config)
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _choice(level: Any, path: str, config: Any) -> str:
    """A setting's value as the report shows it (the level explains values that resolve late)."""
    described = level.describe_choice(config, path)
    if described is not None:
        return described
    value = _lookup(config, path)
    if value is None:
        return "default (resolved per model; see the level's result)"
    return f"`{json.dumps(value)}`"


@dataclass
class Report:
    """The report of a study: its markdown, and the files written."""

    markdown: str
    path_md: Path
    path_html: Path
    sections: dict[str, Any] = field(default_factory=dict)


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def build_markdown(config: StudyConfig, out: Path) -> tuple[str, list[tuple[str, str]]]:
    """The report's markdown and the figures it links (relative path, caption)."""
    figures: list[tuple[str, str]] = []
    lines = [f"# IMPACT study of `{config.model}`", ""]
    variants = ", ".join(f"{m} {float(s):g}" for m in config.methods for s in config.sparsities if float(s) > 0)
    family = config.level_config(config.levels[0], config.methods[0])
    lines += [f"Dense model and its variants ({variants}) on `{config.data}`; each variant calibrated on "
              f"{family.n_calib} train images ({family.calib_sampling}) and fine-tuned {family.finetune_epochs} "
              f"epoch(s) with its masks. Preset: `{config.preset}`. The resolved config is `study.toml` "
              f"beside this report; choices the paper leaves open are explained in [the protocol]({PROTOCOL_PAGE}).",
              ""]
    reduced = reductions(config.preset, config.levels)
    if any(name in reduced for name in config.levels):
        lines += ["**Reduced from the full protocol** (this preset):", ""]
        lines += [f"- {get_level(name).title}: {reduced[name]}" for name in config.levels if name in reduced]
        lines += [""]
    lines += ["## Wall time", "", "| Level | Variants | Wall time | Processes | Resumed |", "|---|---|---:|---:|---|"]
    for name in config.levels:
        for method in config.methods:
            done = level_dir(out, name, method) / DONE_FILE
            info = read_json(done) if done.is_file() else {}
            lines.append(f"| {get_level(name).title} | {method} | "
                         f"{_seconds(info['seconds']) if 'seconds' in info else 'not run'} | "
                         f"{info.get('processes', '')} | {'yes' if info.get('resumed') else 'no' if info else ''} |")
    lines += [""]
    lines += ["## Choices where the paper is silent", "",
              f"The paper's words beside each choice, its alternatives and their measured effects: "
              f"[the protocol]({PROTOCOL_PAGE}).", "",
              "| Level | Setting | Value |", "|---|---|---|"]
    for name in config.levels:
        level, level_config = get_level(name)(), config.level_config(name, config.methods[0])
        for path in level.open_choices:
            lines.append(f"| {level.title} | `{path}` | {_choice(level, path, level_config)} |")
    lines += [""]
    pages = write_docs(out, config.levels)
    for name in config.levels:
        level = get_level(name)
        where = f"[its page]({pages[name]})" if name in pages else "its page in the project's docs"
        lines += [f"## {level.title} ({level.paper})", "", f"Unit of work: {level.unit}. Explained on {where}.", ""]
        for method in config.methods:
            directory = level_dir(out, name, method)
            if not (directory / DONE_FILE).is_file():
                lines += [f"*{method}: not run yet.*", ""]
                continue
            result = level.Result.load(directory)
            if len(config.methods) > 1:
                lines += [f"### {method}", ""]
            lines += [result.markdown().strip(), ""]
            for file, caption in level.figures.items():
                if (directory / file).is_file():
                    rel = (directory / file).relative_to(out).as_posix()
                    figures.append((rel, caption))
                    lines += [f"![{caption}]({rel})", "", f"*{caption}.*", ""]
        if config.model == PAPER_MODEL and level.paper_numbers:
            lines += ["The paper's numbers (DeiT-III B/16, ImageNet-1K):", "", level.paper_numbers, ""]
    return "\n".join(lines), figures


def _inline_figures(body: str, out: Path, figures: list[tuple[str, str]]) -> str:
    for rel, _ in figures:
        data = base64.b64encode((out / rel).read_bytes()).decode("ascii")
        body = body.replace(f'src="{html.escape(rel)}"', f'src="data:image/png;base64,{data}"')
    return body


def write_report(config: StudyConfig, out: str | os.PathLike) -> Report:
    """Write ``report.md`` and ``report.html`` into ``out`` from the results saved there (the HTML
    with its figures inline and its links to the copied docs pages' HTML versions)."""
    out = Path(out)
    text, figures = build_markdown(config, out)
    html_text = re.sub(rf"\]\(({DOCS_DIR}/[\w-]+)\.md", r"](\1.html", text)
    page = render(html_text + f"\n\n## Config\n\n```toml\n{to_toml(config)}```\n",
                  f"IMPACT study of {config.model}")
    md = atomic.write_text(out / REPORT_MD, text + "\n")
    page_path = atomic.write_text(out / REPORT_HTML, _inline_figures(page, out, figures))
    return Report(text, Path(md), Path(page_path))
