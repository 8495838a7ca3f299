"""Start-up of the broker-free commands: wall time and modules loaded by ``run-once``
(and ``validate``) in a fresh interpreter, for this checkout and, as a baseline,
for any other checkouts named on the command line (the same interpreter for all).

Run: .venv/bin/python bench/bench_startup.py [OTHER_CHECKOUT ...]
e.g. ``git worktree add /tmp/before <commit>`` and pass /tmp/before.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
RUNS = 21
PROBE = """
import sys, contextlib, io
from heartbeat_consumer.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main({argv!r})
print(len(sys.modules), code)
"""


def once(tree: Path, argv: list[str]) -> tuple[float, int]:
    """Wall seconds of a fresh interpreter running ``argv`` in ``tree``, and its modules."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return time.perf_counter() - start, int(out[0])


def main() -> None:
    trees = [HERE, *(Path(p).resolve() for p in sys.argv[1:])]
    print(
        f"# start-up, median of {RUNS} runs, the checkouts interleaved; "
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "run-once": [
                "run-once",
                "examples/cack.heartbeat.json",
                "--state",
                f"{tmp}/s.json",
                "--at",
                "2026-06-01T00:00:00Z",
            ],
            "validate": ["validate", "examples/cack.heartbeat.json"],
        }
        print(f"{'checkout':<40} {'command':<10} {'wall':>8} {'modules':>8}")
        for name, argv in commands.items():
            walls: dict[Path, list[float]] = {tree: [] for tree in trees}
            modules: dict[Path, int] = {}
            for _ in range(RUNS):
                for tree in trees:
                    Path(f"{tmp}/s.json").unlink(missing_ok=True)
                    wall, modules[tree] = once(tree, argv)
                    walls[tree].append(wall)
            first = statistics.median(walls[HERE])
            for tree in trees:
                median = statistics.median(walls[tree])
                ratio = f"  x{median / first:.2f} of this checkout" if tree != HERE else ""
                print(
                    f"{str(tree)[-40:]:<40} {name:<10} {median * 1000:>6.0f}ms "
                    f"{modules[tree]:>8}{ratio}"
                )


if __name__ == "__main__":
    main()
