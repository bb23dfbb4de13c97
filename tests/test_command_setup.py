"""What the ``hooked-vit`` command sets up before a subcommand runs: glibc keeps freed tensor memory
for reuse (hooked_vit.cpu_memory: big CPU batches without page faults), and ``--no-progress`` turns
every progress bar off, ours and tqdm's defaults for other libraries (hooked_vit.bars)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")

# Resident memory (MB) of a process that allocated, touched and freed 512 MB through malloc, the
# allocator torch's CPU tensors come from (no torch import: the probe starts in a fraction of a second).
PROBE = textwrap.dedent("""
    import ctypes, sys
    from hooked_vit.cpu_memory import retain_freed_memory
    took = retain_freed_memory() if sys.argv[1] == "retain" else None
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    before = rss()
    block = libc.malloc(2**29)
    ctypes.memset(block, 1, 2**29)  # every page touched
    libc.free(block)
    print(took, rss() - before)
""")


def resident_after_free(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    took, grown = out.stdout.split()
    return took, float(grown)


@glibc_only
def test_freed_tensor_memory_stays_for_reuse_only_when_retained():
    took, retained = resident_after_free("retain")
    assert took == "True"
    _, released = resident_after_free("system")
    assert retained > 400, f"a retaining process kept only {retained:.0f} MB of the freed 512"
    assert released < 100, f"the system default kept {released:.0f} MB (it should return a freed 512 MB block)"


def test_the_command_retains_freed_memory_before_running(monkeypatch, capsys):
    import hooked_vit.cli as cli

    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(True) or True)
    assert cli.main(["info", "--model", "deit3_tiny_digits"]) == 0
    assert calls == [True]
    assert cli.main(["info", "--no-such-option"]) == 2  # a bad option: nothing runs
    assert calls == [True]


def test_no_progress_silences_every_bar_while_the_command_runs(monkeypatch, capsys):
    import os

    import hooked_vit.cli as cli
    from hooked_vit.bars import bars_enabled
    from hooked_vit.data.progress import progress

    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    seen = []

    def configure(parser):
        parser.add_argument("--no-progress", action="store_true")

    @cli.subcommand("bars-probe", "draw a bar", configure=configure)
    def probe(args):
        seen.append((bars_enabled(), os.environ.get("TQDM_DISABLE")))
        list(progress(range(3), desc="probe-bar"))
        return 0

    monkeypatch.setattr(sys.modules["hooked_vit.data.progress"], "PROGRESS_DELAY_S", 0.0)  # draw at once
    assert cli.main(["bars-probe"]) == 0
    assert "probe-bar" in capsys.readouterr().err
    assert cli.main(["bars-probe", "--no-progress"]) == 0
    assert "probe-bar" not in capsys.readouterr().err
    assert seen == [(True, None), (False, "1")]
    assert "TQDM_DISABLE" not in os.environ  # main() called in-process leaves the switch as it was
