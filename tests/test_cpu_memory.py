"""hooked_vit.cpu_memory: glibc keeps freed tensor memory for reuse (big CPU batches without page
faults), process-wide, when the ``hooked-vit`` command runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")

# Resident memory (MB) of a process that allocated, touched and freed a 512 MB tensor.
PROBE = textwrap.dedent("""
    import sys, torch
    from hooked_vit.cpu_memory import retain_freed_memory
    took = retain_freed_memory() if sys.argv[1] == "retain" else None
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    before = rss()
    x = torch.ones(2**27)  # 512 MB, every page touched
    del x
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
