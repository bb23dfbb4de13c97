"""Nothing lost: kills at a chosen write, corrupt and read-only caches, concurrent builders of one
cached variant, file modes, alias-vs-directory names and pruned checkpoints with stray weights.

Kill tests run the real command in a subprocess that SIGKILLs itself at a chosen write (see
``KILLER``), then rerun it and check that every file is whole and the run finishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

# A subprocess preamble: SIGKILL this process at the write of a file whose name contains $KILL_AT,
# either half-way through writing its bytes ($KILL_PHASE=write: Python-level opens, i.e. text/JSON
# writers, whichever file they open) or just before it is renamed into place ($KILL_PHASE=rename).
KILLER = textwrap.dedent("""
    import builtins, io, os, signal
    target, phase = os.environ["KILL_AT"], os.environ.get("KILL_PHASE", "rename")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if phase == "rename":
        real_replace = os.replace
        def replace(src, dst, *args, **kwargs):
            if target in os.path.basename(os.fspath(dst)):
                die()
            return real_replace(src, dst, *args, **kwargs)
        os.replace = replace
    else:
        real_open = builtins.open
        class Dying:
            def __init__(self, handle):
                self.handle = handle
            def write(self, data):
                self.handle.write(data[: max(1, len(data) // 2)])
                self.handle.flush()
                die()
            def __getattr__(self, name):
                return getattr(self.handle, name)
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)
        def dying_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if any(m in mode for m in "wax") and target in os.path.basename(os.fspath(file)):
                return Dying(handle)
            return handle
        builtins.open = io.open = dying_open
""")


def run_killed(argv: list[str], at: str, phase: str, cwd: Path, env: dict[str, str] | None = None):
    """Run ``hooked-vit argv`` in a subprocess that kills itself at the write of ``at``."""
    code = KILLER + "\nimport sys\nfrom hooked_vit.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "KILL_AT": at, "KILL_PHASE": phase, "OMP_NUM_THREADS": "1",
                               **(env or {})}, timeout=300)


def all_json_whole(directory: Path) -> list[str]:
    """Names of the JSON files under ``directory`` (each must parse)."""
    names = []
    for path in sorted(directory.rglob("*.json")):
        json.loads(path.read_text())
        names.append(path.name)
    return names


# ------------------------------------------------------------------------------------ kills
SWEEP = ["sweep-sparsity", "--model", "deit3_tiny_digits", "--methods", "magnitude", "--sparsities", "0,0.5",
         "--batch-size", "360", "--finetune-epochs", "0"]


def test_sweep_killed_while_writing_a_result_resumes(tmp_path, monkeypatch, capsys):
    """Killed half-way through writing results/magnitude_0.5.json: before, a torn file that every
    rerun tripped over; now the result file is absent or whole and the rerun finishes."""
    out = tmp_path / "sweep"
    killed = run_killed([*SWEEP, "--out", str(out)], at="magnitude_0.5.json", phase="write", cwd=tmp_path,
                        env={"HOOKED_VIT_CACHE": str(tmp_path / "cache")})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "results" / "magnitude_0.5.json").exists()  # never half there
    assert all_json_whole(out) == ["dense.json", "sweep.json"]  # written before the kill, whole

    from hooked_vit.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([*SWEEP, "--out", str(out)]) == 0
    assert "| Magnitude (per layer) | Top-1 |" in capsys.readouterr().out
    assert all_json_whole(out) == ["dense.json", "magnitude_0.5.json", "sweep.json"]
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert sorted(r["sparsity"] for r in rows) == [0.0, 0.5]
    leftovers = [p.name for p in (out / "results").iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".magnitude_0.5.json.")  # the dead process's, hidden


@pytest.mark.slow
def test_sweep_killed_before_renaming_the_table_keeps_the_old_one(tmp_path):
    """Killed after sweep.csv's new content is complete but before it replaces the old file: the
    old table stays whole (readers never see a partial one)."""
    out = tmp_path / "sweep"
    (out).mkdir()
    (out / "sweep.csv").write_text("# old\nmethod,sparsity\n")
    killed = run_killed([*SWEEP, "--out", str(out)], at="sweep.csv", phase="rename", cwd=tmp_path,
                        env={"HOOKED_VIT_CACHE": str(tmp_path / "cache")})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / "sweep.csv").read_text() == "# old\nmethod,sparsity\n"
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".sweep.csv.")  # whole new table, never renamed
    assert not list(out.glob("*.csv"))[0].name.endswith(".tmp")  # globs for *.csv never see the temporary


@pytest.mark.slow
def test_layer_killed_while_writing_store_state_resumes(tmp_path, monkeypatch, capsys):
    """Killed while writing a checkpoint's store_state.json (before: a 0-byte file and every rerun
    failed): the rerun resumes from the last complete checkpoint and finishes."""
    argv = ["layer", "--sparsities", "0", "--sae.training-samples", "512", "--sae.train-batch-size", "64",
            "--sae.expansion-factor", "2", "--sae.k", "4", "--sae.n-checkpoints", "3", "--sae.buffer-size", "256",
            "--sae.log-every", "2", "--batch-size", "128", "--sae.image-batch-size", "128", "--out", str(tmp_path / "run")]
    env = {"HOOKED_VIT_CACHE": str(tmp_path / "cache")}
    killed = run_killed(argv, at="store_state.json", phase="write", cwd=tmp_path, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert all(p.stat().st_size > 0 for p in (tmp_path / "run").rglob("store_state.json"))

    from hooked_vit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOOKED_VIT_CACHE", env["HOOKED_VIT_CACHE"])
    assert main(argv) == 0
    assert "| dense |" in capsys.readouterr().out
    assert "training.json" in all_json_whole(tmp_path / "run")


@pytest.mark.slow
def test_cache_store_killed_before_rename_leaves_no_entry_and_rebuilds(tmp_path, monkeypatch):
    """Killed with the pruned model written aside but not yet renamed into the cache: no partial
    entry is visible, the next call builds it and clears the dead process's leftovers."""
    code = KILLER + textwrap.dedent("""
        from hooked_vit import HookedViT
        HookedViT.from_pretrained("deit3_tiny_digits", sparsity=0.5, method="magnitude")
    """)
    cache = tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KILL_AT": "deit3_tiny_digits-magnitude-s0.5-", "KILL_PHASE": "rename",
                                 "HOOKED_VIT_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    entries = [p for p in (cache / "pruned").iterdir()]
    assert len(entries) == 1 and entries[0].name.endswith(".tmp")  # only the dead process's temporary

    from hooked_vit import HookedViT

    monkeypatch.setenv("HOOKED_VIT_CACHE", str(cache))
    model = HookedViT.from_pretrained("deit3_tiny_digits", sparsity=0.5, method="magnitude")
    assert abs(model.pruning_info.overall_sparsity - 0.5) < 0.01
    names = [p.name for p in (cache / "pruned").iterdir()]
    assert len(names) == 1 and names[0].startswith("deit3_tiny_digits-magnitude-s0.5-")


# ------------------------------------------------------------------------------------ the shared cache
def ask_for_a_variant_and_its_means(logs: Path, barrier: Path, other: subprocess.Popen | None = None) -> str:
    """What each of two processes does at the same moment: ask for one pruned variant, then for the
    means of one dataset; builds and mean computations are logged by pid to ``logs`` (and widened by
    a second). Returns the variant's weight digest and the means' sums. Gives up waiting for the
    other process after 5 minutes, or once ``other`` (a subprocess) has exited."""
    import time

    from analyses.common import ablation
    from hooked_vit import HookedViT
    from hooked_vit.pruning import recipe
    from hooked_vit.pruning.cached import state_digest

    def logged(real, log_name):
        def slow(*args, **kwargs):  # widen the window in which the other process arrives
            with open(logs / log_name, "a") as log:
                log.write(f"{os.getpid()}\n")
            time.sleep(1)
            return real(*args, **kwargs)
        return slow

    real_prune, real_means = recipe.prune, ablation.compute_means
    recipe.prune, ablation.compute_means = logged(real_prune, "builds.txt"), logged(real_means, "means.txt")
    try:
        (barrier / str(os.getpid())).touch()
        deadline = time.monotonic() + 300
        while len(list(barrier.iterdir())) < 2:  # both ask at the same moment
            if time.monotonic() > deadline or (other is not None and other.poll() is not None):
                raise RuntimeError("the other process never asked")
            time.sleep(0.01)
        model = HookedViT.from_pretrained("deit3_tiny_digits", sparsity=0.5, method="magnitude")
        images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        data = torch.utils.data.TensorDataset(images, torch.zeros(8, dtype=torch.long))
        means = ablation.load_or_compute_means(model, data, show_progress=False)
        return f"{state_digest(model)} {[float(means.means[k].double().sum()) for k in sorted(means.means)]}"
    finally:
        recipe.prune, ablation.compute_means = real_prune, real_means


def test_two_processes_asking_for_one_variant_and_its_means_build_them_once(tmp_path, monkeypatch):
    """Two processes (torchrun ranks, parallel jobs) ask for the same pruned variant at once, then
    for the same dataset means: one builds each (under its file lock), the other waits and loads;
    both get the same weights and means and nobody crashes. The second process is this one (a
    subprocess costs a second import of torch and the libraries)."""
    code = (f"import sys; from pathlib import Path; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "from test_recovery import ask_for_a_variant_and_its_means as ask; "
            "print(ask(Path(sys.argv[1]), Path(sys.argv[2])))")
    (tmp_path / "barrier").mkdir()
    monkeypatch.setenv("HOOKED_VIT_CACHE", str(tmp_path / "cache"))
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(tmp_path / "barrier")],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        here = ask_for_a_variant_and_its_means(tmp_path, tmp_path / "barrier", other)
    finally:
        out, err = other.communicate(timeout=300)
        assert other.returncode == 0, err[-2000:]  # the other side's error explains a failure on this side too
    assert out.strip().splitlines()[-1] == here  # the same weights and the same means
    assert len((tmp_path / "builds.txt").read_text().split()) == 1  # built once, loaded once
    assert len((tmp_path / "means.txt").read_text().split()) == 1  # computed once, loaded once
    assert [p.name.split("-")[:3] for p in (tmp_path / "cache" / "pruned").iterdir()] == \
        [["deit3_tiny_digits", "magnitude", "s0.5"]]


def test_lock_timeout_names_the_lock_file(tmp_path, monkeypatch):
    from hooked_vit.errors import CacheLockTimeoutError
    from hooked_vit.pruning import cached

    monkeypatch.setenv("HOOKED_VIT_CACHE", str(tmp_path))
    entry = tmp_path / "pruned" / "model-wanda-s0.5-0123456789abcdef"
    held = cached.acquire_lock(entry)
    try:
        with pytest.raises(CacheLockTimeoutError) as raised:
            cached.acquire_lock(entry, timeout=0.2)
    finally:
        held.release()
    assert str(cached.lock_path(entry)) in str(raised.value) and "HOOKED_VIT_LOCK_TIMEOUT" in str(raised.value)
    cached.acquire_lock(entry, timeout=0.2).release()  # free again


def test_corrupt_cached_variant_is_moved_aside_and_rebuilt(tmp_path, monkeypatch):
    from hooked_vit import HookedViT

    monkeypatch.setenv("HOOKED_VIT_CACHE", str(tmp_path))
    first = HookedViT.from_pretrained("deit3_tiny_digits", sparsity=0.5, method="magnitude")
    (entry,) = (tmp_path / "pruned").iterdir()
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # torn by a disk error or an old non-atomic writer
    with pytest.warns(RuntimeWarning, match=r"model.safetensors is not HookedViT weights .*moved it to .*corrupt-"):
        again = HookedViT.from_pretrained("deit3_tiny_digits", sparsity=0.5, method="magnitude")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    names = sorted(p.name for p in (tmp_path / "pruned").iterdir())
    assert names[0] == entry.name and ".corrupt-" in names[1] and len(names) == 2


# ------------------------------------------------------------------------------------ read-only caches
@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only for this process: chmod for a normal user; for root (whom chmod does
    not stop) a read-only bind mount, skipped where mounting is not allowed."""
    mounted: list[Path] = []

    def make(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            path.chmod(0o555)
            return path
        done = subprocess.run(f"mount --bind '{path}' '{path}' && mount -o remount,ro,bind '{path}'", shell=True,
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip("running as root without permission to mount: cannot make a folder read-only")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "--lazy", str(path)], check=False)
    for path in tmp_path.rglob("*"):
        if path.is_dir() and not mounted:
            path.chmod(0o755)  # let pytest remove it


def test_read_only_cache_warns_and_carries_on(tmp_path, monkeypatch, read_only):
    from hooked_vit import HookedViT

    monkeypatch.setenv("HOOKED_VIT_CACHE", str(tmp_path / "shared"))
    built = HookedViT.from_pretrained("deit3_tiny_digits", sparsity=0.5, method="magnitude")  # fills the cache
    read_only(tmp_path / "shared")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an existing entry loads without writing anything
        loaded = HookedViT.from_pretrained("deit3_tiny_digits", sparsity=0.5, method="magnitude")
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), loaded.state_dict().values()))
    with pytest.warns(RuntimeWarning, match="cannot write the pruned-model cache .*building without caching"):
        other = HookedViT.from_pretrained("deit3_tiny_digits", sparsity=0.3, method="magnitude")
    assert abs(other.pruning_info.overall_sparsity - 0.3) < 0.01


def test_read_only_activation_and_means_caches_warn_and_carry_on(tmp_path, read_only):
    from analyses.common.ablation import load_or_compute_means
    from analyses.layer.activation_store import ActivationStore, ActivationStoreConfig
    from hooked_vit import HookedViT
    from hooked_vit.data import load_dataset

    model = HookedViT.from_pretrained("deit3_tiny_digits")
    dataset = load_dataset("digits", "val", model=model).subset(range(16))
    locked = read_only(tmp_path / "locked")
    config = ActivationStoreConfig(hook_names=("blocks.1.hook_resid_post",), cache_dir=str(locked / "acts"),
                                   images_per_shard=8, train_batch_size=8, buffer_size=16, progress=False)
    store = ActivationStore(model, dataset, config)
    with pytest.warns(RuntimeWarning, match="cannot write the activation cache"):
        acts, positions = store.collect()
    assert acts["blocks.1.hook_resid_post"].shape == (16, 96) and store.source == "memory"
    with pytest.warns(RuntimeWarning, match="could not cache the means"):
        means = load_or_compute_means(model, dataset, directory=locked / "means", show_progress=False)
    assert means.n_images == 16


# ------------------------------------------------------------------------------------ files and names
def test_atomic_writes_honour_the_umask_and_leave_no_temporaries(tmp_path):
    from analyses.common.results import write_csv, write_json
    from hooked_vit import atomic

    old = os.umask(0o022)
    try:
        paths = [write_json(tmp_path / "r.json", {"a": 1}), write_csv(tmp_path / "t.csv", [{"a": 1}]),
                 atomic.torch_save({"w": torch.ones(2)}, tmp_path / "c.pt"),
                 atomic.save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")]
        os.umask(0o002)
        paths.append(atomic.write_text(tmp_path / "group.md", "x"))
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in paths] == ["0o644"] * 4 + ["0o664"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "group.md", "r.json", "t.csv", "w.safetensors"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    from hooked_vit import atomic

    path = atomic.write_json(tmp_path / "result.json", {"old": True})
    with pytest.raises(TypeError):
        atomic.write_json(path, {"new": object()})  # fails half-way through json.dump
    assert json.loads(path.read_text()) == {"old": True} and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_dead_writers_temporaries_are_removed_and_live_ones_kept(tmp_path):
    """A process killed inside atomic writes leaves hidden temporaries naming it; the sweep a
    resuming job runs removes those (file and directory) and keeps a live writer's, another host's
    and foreign files."""
    from hooked_vit import atomic

    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from hooked_vit import atomic
        out = Path({str(tmp_path)!r}) / "results" / "sparsity_0.5"
        with atomic.atomic_directory(out / "sae"), atomic.atomic_path(out / "unit.json") as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    dead = sorted(p.name for p in (tmp_path / "results" / "sparsity_0.5").iterdir())
    assert len(dead) == 2 and all(p.startswith((".sae.", ".unit.json.")) and p.endswith(".tmp") for p in dead)
    other_host = tmp_path / "results" / f".r.json.{'0' * 12}.1@elsewhere.invalid.tmp"
    other_host.write_text("x")
    foreign = tmp_path / ".notes.tmp"
    foreign.write_text("x")
    with atomic.atomic_path(tmp_path / "results" / "live.json") as live:
        removed = atomic.remove_stale_temporaries(tmp_path)
        assert live.exists()
    assert sorted(p.name for p in removed) == dead
    assert not any((tmp_path / "results" / "sparsity_0.5").iterdir())
    assert other_host.exists() and foreign.exists() and (tmp_path / "results" / "live.json").exists()


def test_corrupt_sweep_result_is_moved_aside_and_recomputed(tmp_path):
    from hooked_vit.pruning.sweep import _load_result

    path = tmp_path / "results" / "wanda_0.5.json"
    path.parent.mkdir()
    path.write_text("")
    with pytest.warns(RuntimeWarning, match=r"wanda_0.5.json is not a sweep result \(JSON\) \(an empty file.*moved"):
        assert _load_result(path, {"seed": 0}) is None
    assert not path.exists() and len(list(path.parent.glob("wanda_0.5.json.corrupt-*"))) == 1


def test_alias_and_same_named_directory(tmp_path, monkeypatch, tiny):
    from hooked_vit import HookedViT

    monkeypatch.chdir(tmp_path)
    tiny.save_pretrained(tmp_path / "deit3_tiny_digits")  # a directory shadowing the alias's name
    with pytest.warns(UserWarning, match=r"'deit3_tiny_digits' is both a model alias and a directory .*'\./deit3"):
        chosen = HookedViT.from_pretrained("deit3_tiny_digits")
    assert chosen.cfg.model_name == "deit3_tiny_digits" and chosen.cfg.d_model == 96
    assert HookedViT.from_pretrained("./deit3_tiny_digits").cfg.d_model == tiny.cfg.d_model == 32
    assert HookedViT.from_pretrained(Path("deit3_tiny_digits")).cfg.d_model == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HookedViT.from_pretrained("alias:deit3_tiny_digits").cfg.d_model == 96


def test_loading_a_pruned_checkpoint_rezeroes_masked_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    from hooked_vit import HookedViT

    pruned = HookedViT.from_pretrained("deit3_tiny_digits", sparsity=0.5, method="magnitude", cache=False)
    directory = pruned.save_pretrained(tmp_path / "pruned")
    state = load_file(directory / "model.safetensors")
    mask = state["blocks.0.mlp.fc1.weight_mask"]
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"] + (~mask).float()  # edited without masks
    save_file(state, directory / "model.safetensors")
    with pytest.warns(RuntimeWarning, match=f"{int((~mask).sum())} pruned weights .* were not zero"):
        loaded = HookedViT.from_pretrained(directory)
    weight = loaded.blocks[0].mlp.fc1.weight
    assert torch.all(weight[~mask] == 0) and torch.equal(weight[mask], pruned.blocks[0].mlp.fc1.weight[mask])


def test_checkpoints_load_weights_only(tmp_path):
    """A pickle that would run code is refused, by our loaders and by the torch.load default that
    sae-lens's trainer relies on (torch >= 2.6, the floor in pyproject.toml)."""
    from hooked_vit.errors import CorruptFileError
    from hooked_vit.reading import torch_load

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "trainer_state.pt"
    torch.save({"optimizer": Exploit()}, path)
    with pytest.raises(CorruptFileError, match="trainer_state.pt is not a torch checkpoint"):
        torch_load(path)
    with pytest.raises(Exception):
        torch.load(path)  # what sae-lens calls
    assert not (tmp_path / "pwned").exists()
    assert tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 6)


# Modules whose writes go through hooked_vit.atomic.
ATOMIC_MODULES = ["hooked_vit/**/*.py", "analyses/**/*.py"]
RAW_WRITE = r"(?<!atomic)\.write_(text|bytes)\(|(?<![\w.])save_file\(|torch\.save\(|\.savefig\(|np\.save\(|json\.dump\(|open\([^)]*[\"']w"


def test_every_writer_goes_through_the_atomic_module():
    import re

    root = Path(__file__).resolve().parents[1]
    files = sorted({p for pattern in ATOMIC_MODULES for p in root.glob(pattern)}
                   - {root / "hooked_vit" / "atomic.py"})
    assert len(files) > 30
    raw = [f"{p.relative_to(root)}:{n}: {line.strip()}" for p in files
           for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(RAW_WRITE, line)]
    assert raw == []
