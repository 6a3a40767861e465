"""One writer per output: a second writer is refused with the holder's pid and host; stale locks are taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.location import ArtifactLocation
from diffquant.artifacts.locking import LEASE_NAME, OutputLock, lock_path
from diffquant.errors import ArtifactError
from tests.helpers.reliability import copy_artifact, edit_json, run_cli

ROOT = Path(__file__).parents[1]


def test_second_writer_is_refused_in_one_line_with_the_holders_pid_and_host(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with OutputLock(out):
        result = run_cli(["calibrate", "--model", "tiny-sd15", "--num-prompts", "1", "--steps", "2", "--out", str(out), "--json"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:")
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in lines[0]
    assert not out.exists() or not any(out.iterdir())
    assert not lock_path(out).exists()  # released and removed


def test_two_concurrent_quantize_runs_into_one_out_give_one_success_and_one_refusal(private_calib, tmp_path: Path) -> None:
    calib, out = private_calib("tiny-sdxl"), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen([sys.executable, "-m", "diffquant", "quantize", "--calib", str(calib), "--recipe", recipe, "--out", str(out),
                              "--device", "cpu", "--holdout", "2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for recipe in ("int8_weight_only", "int8_w8a8")]
    results = [(run.wait(timeout=300), run.stdout.read() + run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(text for code, text in results if code == 2)
    errors = [line for line in refusal.splitlines() if line.startswith("Error:")]  # stderr also holds torchao's import warnings
    assert len(errors) == 1 and "Traceback" not in refusal, refusal
    assert "being written by pid" in errors[0] or "already holds" in errors[0]


def test_stale_lock_of_a_killed_writer_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    script = f"import os, signal; from diffquant.artifacts.locking import OutputLock; OutputLock({str(out)!r}).__enter__(); os.kill(os.getpid(), signal.SIGKILL)"
    killed = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    assert killed.returncode == -9 and lock_path(out).exists()
    holder = json.loads(lock_path(out).read_text())
    with OutputLock(out) as lock:
        assert lock.stale_holder is not None and lock.stale_holder["pid"] == holder["pid"] != os.getpid()
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_store_lease_refuses_a_second_writer_and_takes_over_an_expired_one() -> None:
    url = f"memory://lease-test-{os.getpid()}/calib"
    with OutputLock(url):
        with pytest.raises(ArtifactError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            OutputLock(url).__enter__()
        assert LEASE_NAME not in ArtifactLocation(url).names()
    location = ArtifactLocation(url)
    assert not location.fs.exists(location._key(LEASE_NAME))
    expired = {"pid": 1, "host": "elsewhere", "token": "x", "expires": time.time() - 1}
    location.fs.pipe_file(location._key(LEASE_NAME), json.dumps(expired).encode())
    with OutputLock(url) as lock:
        assert lock.stale_holder["host"] == "elsewhere"
    live = {**expired, "expires": time.time() + 60}
    location.fs.pipe_file(location._key(LEASE_NAME), json.dumps(live).encode())
    with pytest.raises(ArtifactError, match="pid 1 on host elsewhere"):
        OutputLock(url).__enter__()


def test_reader_stops_when_its_artifact_is_replaced_under_it(calib_factory, tmp_path: Path) -> None:
    calib = copy_artifact(calib_factory("tiny-sdxl", num_prompts=3, steps=2, shard_size_mb=0.000001), tmp_path / "calib")
    artifact = CalibrationArtifact(calib)
    artifact.sample(0)
    edit_json(calib / "manifest.json", lambda m: m["settings"].update(seed=99))
    with pytest.raises(ArtifactError, match="was replaced or removed while it was being read"):
        artifact.sample(len(artifact) - 1)  # a shard not opened yet
    with pytest.raises(ArtifactError, match="replaced"):
        artifact.check_unchanged()
