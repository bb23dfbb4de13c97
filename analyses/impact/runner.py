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

import dataclasses
import os
import time
from pathlib import Path

from analyses.common.level import LEVELS
from analyses.common.results import config_to_dict, read_json, write_json
from analyses.common.units import Shard
from analyses.impact.config import StudyConfig, differences, to_toml
from analyses.impact.distributed import Processes, start, stop
from analyses.impact.report import DONE_FILE, Report, level_dir, write_report
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


def run_level(name: str, method: str, config: StudyConfig, out: Path, processes: Processes,
              show_progress: bool = True) -> None:
    """Level ``name`` on the ``method`` variants: this process's units, then (main process, once all
    are saved) the combined result and ``done.json``. Skipped when already done with these settings."""
    level = LEVELS[name]
    directory = level_dir(out, name, method)
    level_config = config.level_config(name, method)
    level_config.device = processes.device(config.device)
    if name == "layer":  # the SAE trainer's own progress bar and device follow the run's
        level_config.sae = dataclasses.replace(level_config.sae, progress=show_progress, device=level_config.device)
    settings = config.identity()[f"level.{name}.{method}"]
    done = directory / DONE_FILE
    if done.is_file() and read_json(done).get("settings") == settings:
        return
    resumed = directory.is_dir()
    start_time = time.perf_counter()
    level(level_config, directory, shard=processes.shard, show_progress=show_progress)
    processes.barrier()
    if processes.is_main:
        if not processes.shard.whole:  # every share is saved: assemble them (nothing is recomputed)
            level(level_config, directory, shard=Shard(), show_progress=False)
        write_json(done, {"settings": settings, "seconds": time.perf_counter() - start_time,
                          "processes": processes.shard.world, "resumed": resumed})
    processes.barrier()


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
                        log(f"[impact] {LEVELS[name].title} ({LEVELS[name].paper}), {method} variants")
                    run_level(name, method, config, out, processes, show_progress=show_progress and processes.is_main)
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


__all__ = ["STUDY_JSON", "STUDY_TOML", "claim", "run", "run_level", "stored_config"]
