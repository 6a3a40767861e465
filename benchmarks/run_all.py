"""Run every `benchmarks/bench_*.py`, one at a time, and write their sections to one results file.

Each script runs as its own process (the same Python as this one) and prints one markdown section
starting with `## ` on stdout; its stderr (progress) is passed through here, indented. The results
file gets a header (date, machine, torch, the exact command) and every section in script order; a
script that fails gets a section saying so with the tail of its stderr, and this command then
exits 1 after writing the file. The file is written atomically (temporary name, then rename), so an
interrupted run leaves the previous results in place.

Example:
    python benchmarks/run_all.py --results benchmarks/RESULTS.md     # what `make bench` runs
    python benchmarks/run_all.py --quick --results /tmp/RESULTS-quick.md
    python benchmarks/run_all.py --only calibrate --results /tmp/calibrate.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
STDERR_TAIL_LINES = 40


@dataclass
class ScriptRun:
    script: Path
    returncode: int
    seconds: float
    stdout: str
    stderr_tail: list[str]

    @property
    def section(self) -> str:
        if self.returncode == 0 and self.stdout.lstrip().startswith("## "):
            return self.stdout.strip() + "\n"
        why = f"exited with status {self.returncode}" if self.returncode != 0 else "printed no section starting with `## `"
        lines = [f"## {self.script.name}: FAILED", "", f"`python benchmarks/{self.script.name}` {why} after {self.seconds:.0f} s. "
                 f"Last {len(self.stderr_tail)} lines of its stderr:", "", "```", *self.stderr_tail, "```", ""]
        if self.stdout.strip():
            lines += ["Its stdout:", "", "```", self.stdout.strip(), "```", ""]
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.stdout.lstrip().startswith("## ")


# Benchmarks with a make target of their own.
SEPARATE = {"bench_scale"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("Example:"):])
    parser.add_argument("--results", type=Path, required=True, help="markdown file to write (atomically)")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script (fewer repeats, smaller inputs)")
    parser.add_argument("--only", metavar="NAME", help="run one script: bench_NAME.py, NAME.py or NAME")
    args = parser.parse_args()

    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    if not args.only:  # separate targets: too slow for one `make bench` (make bench-scale)
        scripts = [s for s in scripts if s.stem not in SEPARATE]
    if args.only:
        wanted = {args.only, f"bench_{args.only}.py", f"{args.only}.py", f"bench_{args.only}"}
        scripts = [s for s in scripts if s.name in wanted or s.stem in wanted]
        if not scripts:
            names = ", ".join(s.stem.removeprefix("bench_") for s in sorted(BENCH_DIR.glob("bench_*.py")))
            parser.error(f"--only {args.only}: no such benchmark; choose one of {names}")

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = _load_average()
    runs = []
    for index, script in enumerate(scripts, 1):
        _progress(f"[{index}/{len(scripts)}] {script.name}{' --quick' if args.quick else ''}")
        run = run_script(script, args.quick)
        _progress(f"[{index}/{len(scripts)}] {script.name}: {'ok' if run.ok else 'FAILED'} in {run.seconds:.1f} s")
        runs.append(run)
    header = results_header(started, args, runs, load_before, _load_average())
    write_atomic(args.results, header + "\n" + "\n".join(run.section for run in runs))
    failed = [run.script.name for run in runs if not run.ok]
    _progress(f"wrote {args.results}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def run_script(script: Path, quick: bool) -> ScriptRun:
    """Run one benchmark; its stderr streams through (indented) and its last lines are kept."""
    command = [sys.executable, str(script)] + (["--quick"] if quick else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")  # quiet optional-dependency notices on every load
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            tail.append(line.rstrip("\n"))
            sys.stderr.write("    " + line)
            sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        stdout = process.stdout.read() if process.stdout is not None else ""
        returncode = process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        raise
    reader.join()
    return ScriptRun(script, returncode, time.perf_counter() - start, stdout, list(tail))


def results_header(started: datetime.datetime, args: argparse.Namespace, runs: list[ScriptRun], load_before: str, load_after: str) -> str:
    import torch

    rows = [f"| {run.script.name} | {'ok' if run.ok else 'FAILED'} | {run.seconds:.0f} |" for run in runs]
    lines = [
        "# diffquant benchmark results",
        "",
        f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: {_command(args)}",
        f"- machine: {_cpu_model()}, {os.cpu_count()} logical CPUs ({_usable_cpus()} usable), {_ram_gb():.1f} GB RAM, {platform.system()} {platform.release()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, torch default threads {torch.get_num_threads()} "
        "(each script sets its own count and says so; most use 1)",
        f"- load average (1, 5, 15 min) before: {load_before}; after: {load_after}",
        f"- source: {_git_revision()}",
        f"- mode: {'--quick (fewer repeats, smaller inputs: rough figures)' if args.quick else 'full'}",
        "",
        "Figures are ratios or rates measured side by side within one run of one script; no test asserts on timings. "
        "Each section names the command that produced it.",
        "",
        "| script | status | seconds |",
        "|---|---|---|",
        *rows,
        "",
    ]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _command(args: argparse.Namespace) -> str:
    script = os.path.relpath(Path(__file__).resolve(), PROJECT_ROOT)
    python = os.path.relpath(sys.executable, PROJECT_ROOT) if Path(sys.executable).is_relative_to(PROJECT_ROOT) else "python"
    own = f"`{shlex.join([python, script, *sys.argv[1:]])}`"
    from_make = "MAKELEVEL" in os.environ and not args.quick and not args.only
    return f"`make bench` (runs {own})" if from_make else own


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _ram_gb() -> float:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _load_average() -> str:
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _git_revision() -> str:
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"git {revision}" + (" with uncommitted changes" if dirty else "")


def _progress(message: str) -> None:
    print(f"run_all: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
