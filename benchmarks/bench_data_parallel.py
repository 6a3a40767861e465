"""Data-parallel calibration: `--num-processes 2` against one process on this machine.

Both runs are whole `diffquant calibrate` commands (process start, model load and the launcher
included), tiny-sdxl at 128 px, each rank with one intra-op thread, into fresh directories.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from harness import command_line, markdown_table, parse_args, progress


def run(args: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "diffquant", "calibrate", *args], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise SystemExit(result.stderr[-2000:])
    return time.perf_counter() - start


def main() -> None:
    args = parse_args(__doc__)
    prompts, steps = (4, 3) if args.quick else (16, 10)
    base = ["--model", "tiny-sdxl", "--num-prompts", str(prompts), "--steps", str(steps), "--device", "cpu",
            "--set", "height=128", "--set", "width=128", "--json"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for processes in (1, 2):
            progress(f"calibrating with {processes} process(es)")
            times[processes] = run([*base, "--num-processes", str(processes), "--out", f"{tmp}/p{processes}"])
            rows.append([processes, f"{times[processes]:.1f}"])
    print("## Data-parallel calibration\n")
    print(f"tiny-sdxl, {prompts} prompts x {steps} steps at 128 px, whole commands (startup and model load "
          f"included), 1 intra-op thread per rank, {os.cpu_count()} cores.\n")
    print(markdown_table(["processes", "wall s"], rows))
    print(f"\nspeed-up with 2 processes: {times[1] / times[2]:.2f}x\n")
    print(command_line("bench_data_parallel.py", args.quick))


if __name__ == "__main__":
    main()
