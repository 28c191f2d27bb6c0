"""Startup time of the ``compress`` CLI: ``compress --help`` and every ``compress CMD --help``.

Each command line runs in a fresh interpreter (the way the console script
starts: ``from compressor.cli import main; main()``), best of ``--repeat``
wall-clock runs. ``--pythonpath`` points at another checkout to measure it the
same way (e.g. the code before a change). Prints JSON; ``--baseline`` adds the
other checkout's figures and the speedup ratios in the same run.

Goal (issue 13): every help within 0.5 s. ``--check`` exits 1 when one is slower.

    python benchmarks/cli_startup.py --repeat 5
    python benchmarks/cli_startup.py --baseline ../main --repeat 5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GOAL_S = 0.5
ENTRY = "from compressor.cli import main; main()"


def _env(pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.path.abspath(pythonpath)
    return env


def _cwd(pythonpath: str | None) -> str | None:
    # ``python -c`` puts the working directory first on sys.path: run inside the checkout measured
    return os.path.abspath(pythonpath) if pythonpath else None


def command_names(pythonpath: str | None) -> list[str]:
    """The subcommands the checkout under test registers (asked in a subprocess)."""
    code = "from compressor.cli import cli; print(' '.join(sorted(cli.commands)))"
    out = subprocess.run([sys.executable, "-c", code], env=_env(pythonpath), cwd=_cwd(pythonpath), check=True,
                         capture_output=True, text=True).stdout
    return out.split()


def time_help(args: list[str], pythonpath: str | None, repeat: int) -> float:
    """Best wall time (s) of ``compress ARGS`` over ``repeat`` fresh interpreters."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", ENTRY, *args], env=_env(pythonpath), cwd=_cwd(pythonpath),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"compress {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
        best = min(best, elapsed)
    return best


def measure(pythonpath: str | None, repeat: int, commands: list[str]) -> dict:
    times = {"--help": time_help(["--help"], pythonpath, repeat)}
    for name in commands:
        times[f"{name} --help"] = time_help([name, "--help"], pythonpath, repeat)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="fresh interpreters per command line (best is kept)")
    ap.add_argument("--pythonpath", default=None, help="checkout to measure [default: the importable one]")
    ap.add_argument("--baseline", default=None, help="another checkout measured in the same run, e.g. ../main")
    ap.add_argument("--check", action="store_true", help=f"exit 1 if any help takes more than {GOAL_S} s")
    args = ap.parse_args(argv)

    commands = command_names(args.pythonpath)
    report = {"python": sys.executable, "repeat": args.repeat, "goal_s": GOAL_S,
              "seconds": measure(args.pythonpath, args.repeat, commands)}
    report["max_s"] = max(report["seconds"].values())
    if args.baseline:
        base = measure(args.baseline, args.repeat, [c for c in commands if c in command_names(args.baseline)])
        report["baseline"] = {"pythonpath": os.path.abspath(args.baseline), "seconds": base}
        report["speedup"] = {k: round(base[k] / v, 1) for k, v in report["seconds"].items() if k in base}
    print(json.dumps(report, indent=2))
    if args.check and report["max_s"] > GOAL_S:
        print(f"goal missed: slowest help took {report['max_s']:.2f} s > {GOAL_S} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
