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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analyses.common.level import LEVELS
from analyses.common.results import config_to_dict, read_json
from analyses.impact.config import REDUCTIONS, StudyConfig, to_toml
from analyses.impact.paper import PAPER_MODEL, PAPER_TABLES
from hooked_vit import atomic

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
DONE_FILE = "done.json"
README = Path(__file__).resolve().parents[2] / "README.md"  # where each level is explained (source checkouts)
PROTOCOL_DOC = "docs/protocol.md"
# Per level, the settings the paper leaves open (dotted paths into the level's config).
OPEN_CHOICES: dict[str, tuple[str, ...]] = {
    "accuracy": ("method", "finetune_epochs", "n_calib", "calib_sampling", "split"),
    "neuron": ("blocks", "sites", "top_k", "selection", "negatives", "pooled_means", "n_means_images"),
    "layer": ("sae.hook_name", "sae.tokens", "sae.k", "sae.expansion_factor", "sae.training_samples",
              "sae.normalize_activations", "sae.dead_feature_window", "top_k", "negatives"),
    "circuit": ("k", "loss", "reference", "steps", "batch_size", "lr", "schedule", "tau", "n_means_images"),
    "model": ("methods", "reference", "step", "start_layer", "layerscale_rule", "n_images"),
}
FIGURES: dict[str, dict[str, str]] = {
    "neuron": {"figure.png": "Figure 2: neuron metrics vs sparsity (early, middle, late block)"},
    "layer": {"figure.png": "Figure 3: SAE latent metrics vs sparsity"},
    "circuit": {"metrics.png": "circuit node and edge fractions, accuracy and NCQ vs sparsity",
                "heatmap.png": "circuit membership per site and block"},
    "model": {"figure4.png": "Figure 4: attribution maps of the dense and sparse models",
              "curves.png": "insertion and deletion curves"},
}


def level_dir(out: str | os.PathLike, level: str, method: str) -> Path:
    """Where level ``level`` of the ``method`` variants saves its units and result."""
    return Path(out) / level / method


def _lookup(config: Any, path: str) -> Any:
    value: Any = config_to_dict(config)
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _choice(level: str, path: str, config: Any) -> str:
    """A setting's value as the report shows it (``None`` defaults spelt out where they resolve late)."""
    value = _lookup(config, path)
    if level == "circuit" and path == "k" and value is None:
        from analyses.circuits.config import resolve_k

        return f"model preset: dense `{resolve_k(config, 0.0):g}`, sparse `{resolve_k(config, 0.5):g}`"
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
              f"beside this report; choices the paper leaves open are explained in `{PROTOCOL_DOC}`.", ""]
    reduced = REDUCTIONS.get(config.preset or "", {})
    if any(name in reduced for name in config.levels):
        lines += ["**Reduced from the full protocol** (this preset):", ""]
        lines += [f"- {LEVELS[name].title}: {reduced[name]}" for name in config.levels if name in reduced]
        lines += [""]
    lines += ["## Wall time", "", "| Level | Variants | Wall time | Processes | Resumed |", "|---|---|---:|---:|---|"]
    for name in config.levels:
        for method in config.methods:
            done = level_dir(out, name, method) / DONE_FILE
            info = read_json(done) if done.is_file() else {}
            lines.append(f"| {LEVELS[name].title} | {method} | "
                         f"{_seconds(info['seconds']) if 'seconds' in info else 'not run'} | "
                         f"{info.get('processes', '')} | {'yes' if info.get('resumed') else 'no' if info else ''} |")
    lines += [""]
    lines += ["## Choices where the paper is silent", "",
              f"The paper's words beside each choice, its alternatives and their measured effects: `{PROTOCOL_DOC}`.", "",
              "| Level | Setting | Value |", "|---|---|---|"]
    for name in config.levels:
        level_config = config.level_config(name, config.methods[0])
        for path in OPEN_CHOICES[name]:
            lines.append(f"| {LEVELS[name].title} | `{path}` | {_choice(name, path, level_config)} |")
    lines += [""]
    for name in config.levels:
        level = LEVELS[name]
        where = (f"[{level.title}]({Path(os.path.relpath(README, out)).as_posix()}{level.docs})" if README.is_file()
                 else f"section {level.title}")
        lines += [f"## {level.title} ({level.paper})", "", f"Unit of work: {level.unit}. Explained in the README, {where}.",
                  ""]
        for method in config.methods:
            directory = level_dir(out, name, method)
            if not (directory / DONE_FILE).is_file():
                lines += [f"*{method}: not run yet.*", ""]
                continue
            result = level.result_class.load(directory)
            if len(config.methods) > 1:
                lines += [f"### {method}", ""]
            lines += [result.markdown().strip(), ""]
            for file, caption in FIGURES.get(name, {}).items():
                if (directory / file).is_file():
                    rel = (directory / file).relative_to(out).as_posix()
                    figures.append((rel, caption))
                    lines += [f"![{caption}]({rel})", "", f"*{caption}.*", ""]
        if config.model == PAPER_MODEL and name in PAPER_TABLES:
            lines += ["The paper's numbers (DeiT-III B/16, ImageNet-1K):", "", PAPER_TABLES[name], ""]
    return "\n".join(lines), figures


def _inline_figures(body: str, out: Path, figures: list[tuple[str, str]]) -> str:
    for rel, _ in figures:
        data = base64.b64encode((out / rel).read_bytes()).decode("ascii")
        body = body.replace(f'src="{html.escape(rel)}"', f'src="data:image/png;base64,{data}"')
    return body


def write_report(config: StudyConfig, out: str | os.PathLike) -> Report:
    """Write ``report.md`` and ``report.html`` into ``out`` from the results saved there."""
    import markdown

    out = Path(out)
    text, figures = build_markdown(config, out)
    body = markdown.markdown(text, extensions=["tables", "fenced_code"])
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>IMPACT study of {html.escape(config.model)}</title>\n<style>"
            "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.2em .5em}"
            "img{max-width:100%}code{background:#f4f4f4}</style></head><body>\n"
            f"{_inline_figures(body, out, figures)}\n<h2>Config</h2>\n<pre>{html.escape(to_toml(config))}</pre>\n"
            "</body></html>\n")
    md = atomic.write_text(out / REPORT_MD, text + "\n")
    page_path = atomic.write_text(out / REPORT_HTML, page)
    return Report(text, Path(md), Path(page_path))
