"""The whole study (``hooked-vit impact``) on a tiny setting of the embedded model: every level
through one runner, the report, config files and presets, refusing a different config, resuming
after a kill inside any level, and the same results from 2 torchrun (gloo) processes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

# A study small enough for tests: dense + Wanda 0.5 without fine-tuning, a class or two, a few steps.
TINY = dict(
    sparsities=(0.0, 0.5), finetune_epochs=0, n_calib=32,
    level={
        "accuracy": {},
        "neuron": {"classes": [0, 3], "blocks": [3], "top_k": 5, "n_means_images": 100},
        "layer": {"sae": {"k": 4, "expansion_factor": 1, "training_samples": 2048, "train_batch_size": 256,
                          "lr": 1e-3, "log_every": 4}, "top_k": 4, "classes": [0, 3]},
        "circuit": {"classes": [0, 3], "steps": 3, "batch_size": 4, "n_eval": 5, "n_means_images": 50,
                    "class_batch": 1},
        "model": {"n_images": 4, "chunk_size": 2, "methods": ["chefer", "random"], "batch_size": 64},
    },
)
LEVEL_TABLES = {"accuracy": "table1.csv", "neuron": "summary.csv", "layer": "quality.csv", "circuit": "table3.csv",
                "model": "table4.csv"}


def tiny_config(**overrides):
    from analyses.impact import preset

    return preset("quick", **{**TINY, **overrides})


def numbers(out: Path, level: str) -> list[dict]:
    """A level's table without wall times (what must not depend on how the run was split or resumed)."""
    from analyses.common.results import read_csv

    rows = read_csv(out / level / "wanda" / LEVEL_TABLES[level])
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """The tiny study, run once in one process without interruption."""
    from analyses import impact

    out = tmp_path_factory.mktemp("reference")
    report = impact.run(tiny_config(), out, show_progress=False, log=None)
    return out, report


def test_one_run_writes_every_level_and_the_report(reference):
    out, report = reference
    for level, table in LEVEL_TABLES.items():
        assert (out / level / "wanda" / table).is_file(), level
        assert (out / level / "wanda" / "done.json").is_file(), level
    text = (out / "report.md").read_text()
    for heading in ("## Accuracy (Table 1)", "## Neuron level (Figure 2)", "## Layer level (Table 2, Figure 3)",
                    "## Circuit level (Table 3)", "## Model level (Table 4, Figure 4)", "## Wall time",
                    "## Choices where the paper is silent", "Reduced from the full protocol"):
        assert heading in text, heading
    assert "| Wanda | Top-1 |" in text and "NCQ" in text and "Insertion" in text
    assert text == report.markdown + "\n"
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    # every figure the markdown links is inline in the HTML
    linked = [line for line in text.splitlines() if line.startswith("![")]
    assert linked and page.count('src="data:image/png;base64,') == len(linked)
    assert (out / "study.toml").is_file() and (out / "study.json").is_file()
    # each level's page travels with the report (markdown and HTML), so its links work where it is moved
    for level in LEVEL_TABLES:
        assert f"Explained on [its page](docs/{level}.md)." in text
        assert (out / "docs" / f"{level}.md").is_file() and (out / "docs" / f"{level}.html").is_file()
        assert f'href="docs/{level}.html"' in page


CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).is_file()), None)
# Chromium on this closed network: no background connections, no sandbox as root (the machines' own flags).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if CHROMIUM is None:
        pytest.skip("no Chromium to drive (apt-get install chromium; .ci/run installs it)")
    return sync_playwright


def test_the_report_and_its_docs_pages_work_in_a_real_browser(reference, tmp_path):
    """report.html, moved to another folder, opened in headless Chromium: every figure decodes, every
    level's table is there, every link (to the copied docs pages, and their links and anchors in
    turn) resolves, and the console shows no error."""
    import shutil

    sync_playwright = _browser_or_skip()
    moved = tmp_path / "shared report"
    shutil.copytree(reference[0], moved)  # a report that is moved or shared keeps working
    errors: list[str] = []
    seen: set[str] = set()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        pending = [(moved / "report.html").as_uri()]
        while pending:
            url = pending.pop()
            address, _, anchor = url.partition("#")
            if address not in seen:
                seen.add(address)
                response = page.goto(address)
                assert response is not None and response.ok, address
                images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
                assert all(complete and width > 0 for complete, width in images), address
                if address.endswith("report.html"):
                    assert len(images) >= 5 and page.locator("table").count() >= 8
                    headings = page.locator("h2").all_inner_texts()
                    assert {"Accuracy (Table 1)", "Circuit level (Table 3)", "Config"} <= set(headings)
                links = page.evaluate("Array.from(document.links).map(a => a.href)")
                for link in links:
                    assert link.startswith("file://"), f"{address} links outside the report: {link}"
                    target = Path(__import__("urllib.parse").parse.unquote(link.partition("#")[0][len("file://"):]))
                    assert target.is_file() and target.is_relative_to(moved), f"{address}: broken link {link}"
                    pending.append(link)
            if anchor:
                if page.url.partition("#")[0] != address:
                    page.goto(address)
                assert page.locator(f"[id='{anchor}']").count() == 1, f"no anchor #{anchor} in {address}"
        browser.close()
    assert len(seen) >= 6  # the report and the level pages it links (and the pages those link)
    assert errors == []


def test_report_only_rebuilds_the_same_report_from_saved_results(reference, tmp_path):
    from hooked_vit.cli import main

    out, report = reference
    before = (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert main(["impact", "--report-only", "--out", str(out), "--no-progress"]) == 0
    assert (out / "report.md").read_text() == before


def test_config_file_reproduces_the_study_and_a_different_one_is_refused(reference, tmp_path, capsys):
    from analyses.impact import load_config
    from hooked_vit.cli import main

    out, _ = reference
    again = load_config(out / "study.toml")
    assert again.identity() == tiny_config().identity()
    # rerunning the saved config into the same folder: every level is done, nothing is recomputed
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.parent.name != out.name}
    assert main(["impact", "--config", str(out / "study.toml"), "--out", str(out), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # a different setting is refused, naming it, before any work
    assert main(["impact", "--config", str(out / "study.toml"), "--out", str(out), "--sparsities", "0,0.3"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "sparsities: [0.0, 0.5] there, [0.0, 0.3] now" in err
    assert len(err.strip().splitlines()) == 1


def test_presets_and_config_errors(tmp_path):
    from analyses.impact import load_config, preset
    from analyses.impact.config import to_toml
    from hooked_vit.errors import InvalidArgumentError

    quick, full = preset("quick"), preset("full")
    assert quick.level_config("circuit", "wanda").steps == 100 and full.level_config("circuit", "wanda").steps == 600
    assert quick.level_config("circuit", "wanda").classes == (0, 3, 7) and full.level_config("circuit", "wanda").classes is None
    assert preset("paper", data="/data/imagenet").level_config("circuit", "wanda").classes == tuple(range(0, 1000, 10))
    with pytest.raises(InvalidArgumentError, match="paper preset analyses ImageNet-1K: give --data"):
        preset("paper")
    path = tmp_path / "study.toml"
    path.write_text('preset = "full"\nlevels = ["neuron", "circuit"]\n[level.circuit]\nsteps = 50\n')
    config = load_config(path)
    assert config.levels == ("neuron", "circuit") and config.level_config("circuit", "wanda").steps == 50
    assert config.level_config("circuit", "wanda").batch_size == 32  # the rest from the preset
    path.write_text(to_toml(config))
    assert load_config(path).identity() == config.identity()
    bad = [
        ('[level.circuit]\nstepz = 5\n', "has no setting(s) stepz"),
        ('[level.neuron]\nmodel = "x"\n', "which the study sets for every level"),
        ('levels = ["neuron", "pixels"]\n', "unknown level(s) ['pixels']"),
        ('sparsities = [0.3, 0.5]\n', "must include 0"),
        ('colour = "red"\n', "unknown setting(s) colour"),
        ('[level.circuit]\nsteps = 0\n', "steps=0 is invalid"),
        ('levels = [\n', "is not valid TOML"),
    ]
    for text, message in bad:
        path.write_text(text)
        with pytest.raises(InvalidArgumentError, match=None) as error:
            load_config(path)
        assert message in str(error.value), (text, str(error.value))


def test_resumes_after_a_kill_inside_each_level(reference, cache, tmp_path, monkeypatch):
    """Killed in every level in turn, each time as the sparse model's first unit file lands (the
    dense model's units are done, one is in flight): every rerun leaves the finished units' files
    untouched, and the last ends with the uninterrupted run's numbers."""
    from analyses import impact
    from hooked_vit import atomic

    out = tmp_path / "study"
    config = tiny_config()
    real_replace = os.replace
    for level in LEVEL_TABLES:
        def killing_replace(src, dst, level=level):
            if Path(dst).is_relative_to(out / level / "wanda" / "sparsity_0.5"):
                raise KeyboardInterrupt(f"killed in the {level} level")
            return real_replace(src, dst)

        monkeypatch.setattr(atomic.os, "replace", killing_replace)
        with pytest.raises(KeyboardInterrupt, match=level):
            impact.run(config, out, show_progress=False, log=None)
        monkeypatch.setattr(atomic.os, "replace", real_replace)
        assert not (out / level / "wanda" / "done.json").exists()
        saved = {p: p.stat().st_mtime_ns for p in (out / level / "wanda" / "sparsity_0").rglob("*") if p.is_file()}
        assert saved, f"the dense model's {level} units were saved before the kill"
        finished = {p: p.stat().st_mtime_ns for p in out.rglob("done.json")}
        # resume this level only (the next kill comes in the next one)
        impact.run(dataclasses.replace(config, levels=(level,)), out, show_progress=False, log=None)
        assert {p: p.stat().st_mtime_ns for p in saved} == saved, level  # finished units were not redone
        assert {p: p.stat().st_mtime_ns for p in finished} == finished, level  # nor finished levels
        assert numbers(out, level) == numbers(reference[0], level), level


def test_two_torchrun_processes_give_the_single_process_results(reference, cache, tmp_path):
    """``torchrun --nproc-per-node 2 -m hooked_vit impact``: ranks share the units (gloo on CPU),
    rank 0 assembles; every table equals the single-process run's."""
    from analyses.impact.config import to_toml

    study = tmp_path / "tiny.toml"
    study.write_text(to_toml(tiny_config()))
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "hooked_vit", "impact", "--config", str(study), "--out", str(out),
                          "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for level in LEVEL_TABLES:
        assert numbers(out, level) == numbers(reference[0], level), level
        assert '"processes": 2' in (out / level / "wanda" / "done.json").read_text()
    # both ranks did units: the circuits of the two models x two classes are split between them
    assert run.stdout.count("## Circuit level") == 1  # only rank 0 prints the report


@pytest.mark.slow
def test_sigkill_of_the_command_then_rerun_gives_the_same_report_numbers(reference, cache, tmp_path):
    """A real ``kill -9`` of ``hooked-vit impact`` once the circuit level has saved a unit; the rerun
    finishes and every table equals the uninterrupted run's."""
    import signal
    import time

    from analyses.impact.config import to_toml

    study = tmp_path / "tiny.toml"
    study.write_text(to_toml(tiny_config()))
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "hooked_vit", "impact", "--config", str(study), "--out", str(out), "--no-progress"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((out / "circuit").rglob("circuit.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "circuit" / "wanda" / "done.json").exists()
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    for level in LEVEL_TABLES:
        assert numbers(out, level) == numbers(reference[0], level), level
