"""Running a study: claim the output folder for one config, run each level over the variants (each
process its share of the units), assemble each level once all shares are saved, write the report.

Layout of ``out``::

    study.toml, study.json            the resolved config (TOML to rerun or share; JSON: what it is compared by)
    <level>/<method>/                 one level's units, result (result.json, CSV, markdown, figures), done.json
    report.md, report.html            the report (rebuilt from the saved results alone)

A finished level (``done.json`` with the same settings) is skipped; an unfinished one resumes unit by
unit. A rerun into a folder made with another config is refused with the list of differences.
"""

from __future__ import annotations

import os
from pathlib import Path

from analyses.common.level import get_level, run_level
from analyses.common.processes import Processes, start, stop
from analyses.common.results import config_to_dict, read_json, write_json
from analyses.impact.config import StudyConfig, differences, to_toml
from analyses.impact.report import Report, level_dir, write_report
from hooked_vit import atomic
from hooked_vit.errors import InvalidArgumentError

STUDY_TOML = "study.toml"
STUDY_JSON = "study.json"


def claim(out: Path, config: StudyConfig, processes: Processes) -> None:
    """Refuse ``out`` if it holds a study with other settings; else record ``config`` there."""
    identity = config.identity()
    path = out / STUDY_JSON
    if path.is_file():
        stored = read_json(path, "a study's settings (JSON)", "delete the folder or use another --out")
        found = differences(stored.get("identity", {}), identity)
        if found:
            raise InvalidArgumentError(f"{out} holds a study made with a different config ({'; '.join(found)}); "
                                       "use another --out, or the same config (its study.toml)")
    processes.barrier()  # every process has compared before the main one writes
    if processes.is_main:
        write_json(path, {"identity": identity, "config": config_to_dict(config)})
        atomic.write_text(out / STUDY_TOML, to_toml(config))
    processes.barrier()


def run_study_level(name: str, method: str, config: StudyConfig, out: Path, processes: Processes,
                    show_progress: bool = True) -> None:
    """Level ``name`` on the ``method`` variants through the one driver
    (:func:`analyses.common.level.run_level`): this process's units, then the combined result and
    ``done.json`` on the main process; skipped when already done with these settings."""
    level_config = config.level_config(name, method)
    level_config.device = processes.device(config.device)
    run_level(get_level(name)(show_progress=show_progress), level_config, level_dir(out, name, method),
              shard=processes.shard, barrier=processes.barrier, done_settings=config.identity()[f"level.{name}.{method}"])


def run(config: StudyConfig, out: str | os.PathLike, *, report_only: bool = False,
        show_progress: bool = True, log=print) -> Report | None:
    """Run (or resume) ``config``'s levels into ``out`` and write the report; with ``report_only``,
    only rebuild the report from what is saved. Under torchrun every process calls this; the main
    process returns the :class:`Report`, the others ``None``."""
    out = Path(out)
    processes = start()
    try:
        if report_only:
            if not (out / STUDY_JSON).is_file():
                raise InvalidArgumentError(f"{out} holds no study ({STUDY_JSON} is missing): run it first")
        else:
            out.mkdir(parents=True, exist_ok=True)
            claim(out, config, processes)
            if processes.is_main:  # files a killed earlier run was writing when it died
                atomic.remove_stale_temporaries(out)
            for name in config.levels:
                for method in config.methods:
                    if processes.is_main and log is not None:
                        level = get_level(name)
                        log(f"[impact] {level.title} ({level.paper}), {method} variants")
                    run_study_level(name, method, config, out, processes, show_progress=show_progress and processes.is_main)
        return write_report(config, out) if processes.is_main else None
    finally:
        stop(processes)


def stored_config(out: str | os.PathLike) -> StudyConfig:
    """The config of the study saved in ``out``."""
    from analyses.common.results import config_from_dict

    path = Path(out) / STUDY_JSON
    if not path.is_file():
        raise InvalidArgumentError(f"{out} holds no study ({STUDY_JSON} is missing): run it first")
    return config_from_dict(StudyConfig, read_json(path)["config"])


__all__ = ["STUDY_JSON", "STUDY_TOML", "claim", "run", "run_study_level", "stored_config"]
