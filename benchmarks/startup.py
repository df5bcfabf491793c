"""Start-up cost of the cached-feature commands against a bare `import torch`, on this machine.

A command that only reads cached features (`featcache fit --adapter zero-shot`, `featcache ls`) should cost little
more than importing torch: open_clip, torchvision and torch._dynamo load only when a backbone is needed or something
trains. This script builds a tiny digits store with the tiny test backbone (featcache-tiny/random) in a temporary
folder, then times, as the wall time of a fresh subprocess (median of --repeats runs):

  - `python -c "import torch"`
  - `featcache fit --adapter zero-shot ...` on that store: time to its first line of output, and to exit
  - `featcache ls` on that folder: the same

with the ratio to `import torch` and the 1-minute load average (os.getloadavg) beside every figure, then the
`-X importtime` top offenders of the fit command. Goal: first output within 1.5x the bare `import torch`.

  python benchmarks/startup.py [--repeats 3] [--top 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 1.5


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def featcache_cmd() -> list[str]:
    """The installed console script when there is one (what a user runs), else the module."""
    script = Path(sys.executable).with_name("featcache")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds to the first byte on stdout, seconds to exit) of one fresh subprocess; fails loudly on exit != 0."""
    t0 = time.perf_counter()
    env = os.environ | {"PYTHONUNBUFFERED": "1"}  # a line reaches the pipe when printed, not at exit
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.read(1)
    first = time.perf_counter() - t0
    _, err = p.communicate()
    total = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {err.decode().strip()}")
    return first, total


def median_of(cmd: list[str], repeats: int) -> tuple[float, float]:
    runs = [timed(cmd) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def importtime_offenders(cmd: list[str], top: int) -> list[tuple[float, float, str]]:
    """(self s, cumulative s, module) of the modules with the largest self import time in one run of `cmd`."""
    p = subprocess.run([sys.executable, "-X", "importtime", *cmd], capture_output=True, text=True, check=True)
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cum, name = line.removeprefix("import time:").split("|")
        rows.append((int(own) / 1e6, int(cum) / 1e6, name.strip()))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=10, help="importtime offenders to list")
    args = parser.parse_args()

    from featcache.extract import extract

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        extract("digits", "featcache-tiny/random", cache_dir=cache, workers=0, batch_size=256, progress=False)
        fc = featcache_cmd()
        fit = [*fc, "fit", "--adapter", "zero-shot", "--dataset", "digits", "--backbone", "featcache-tiny/random",
               "--cache-dir", str(cache)]  # fmt: skip
        ls = [*fc, "ls", "--cache-dir", str(cache)]
        print(f"median of {args.repeats} fresh subprocesses; python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
        bare, _ = median_of([sys.executable, "-c", "import torch; print('ok')"], args.repeats)
        label = 'python -c "import torch"'
        print(f"  {label:<34} {bare:6.2f} s                                   ({load()})")
        worst = 0.0
        for label, cmd in (("featcache fit --adapter zero-shot", fit), ("featcache ls", ls)):
            first, total = median_of(cmd, args.repeats)
            worst = max(worst, first / bare)
            print(f"  {label:<34} {first:6.2f} s to first output = {first / bare:4.2f}x, exit {total:5.2f} s  "
                  f"({load()})")  # fmt: skip
        verdict = "met" if worst <= GOAL else "NOT met"
        print(f"goal: first output within {GOAL}x of import torch: {verdict} (worst {worst:.2f}x)")
        mod = [sys.executable, "-m", "cli.main", *fit[len(fc) :]]
        print(f"top {args.top} imports by own time in `featcache fit --adapter zero-shot` ({load()}):")
        for own, cum, name in importtime_offenders(mod[1:], args.top):
            print(f"  {own:6.3f} s own {cum:6.3f} s cumulative  {name}")


if __name__ == "__main__":
    main()
