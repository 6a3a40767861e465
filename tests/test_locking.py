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
from fsspec.implementations.memory import MemoryFileSystem

from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.location import ArtifactLocation
from diffquant.artifacts.locking import LEASE_NAME, OutputLock, lock_path
from diffquant.errors import ArtifactError
from tests.helpers.reliability import copy_artifact, edit_json, run_cli, store_on_local_filesystem

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


HOLD_LEASE = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.helpers.reliability import store_on_local_filesystem
from diffquant.artifacts.locking import OutputLock
lock = OutputLock(store_on_local_filesystem(Path({directory!r})))
lock.__enter__()
print("held", flush=True)
time.sleep(120)
"""


def test_store_lease_on_a_local_fsspec_filesystem_excludes_another_process_and_is_taken_over_after_kill(tmp_path: Path) -> None:
    import signal

    directory = tmp_path / "calib"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE.format(root=str(ROOT), directory=str(directory))], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        lease = json.loads((directory / LEASE_NAME).read_text())
        assert lease["pid"] == holder.pid and lease["expires"] > time.time()
        with pytest.raises(ArtifactError, match=f"being written by pid {holder.pid} on host {socket.gethostname()}") as refused:
            OutputLock(store_on_local_filesystem(directory)).__enter__()
        assert "\n" not in str(refused.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (directory / LEASE_NAME).exists()  # kill -9 left it; its holder is a dead process of this host
    with OutputLock(store_on_local_filesystem(directory)) as lock:
        assert lock.stale_holder["pid"] == holder.pid
        assert json.loads((directory / LEASE_NAME).read_text())["pid"] == os.getpid()
        assert ArtifactLocation(directory).names() == []  # neither the lease nor a takeover marker is an artifact file
    assert sorted(p.name for p in directory.iterdir()) == []


@pytest.mark.parametrize("backend", ["file", "memory"])
def test_writers_racing_for_one_stale_lease_give_exactly_one_holder(backend: str, tmp_path: Path) -> None:
    import threading

    location = store_on_local_filesystem(tmp_path / "calib") if backend == "file" else ArtifactLocation(f"memory://race-{os.getpid()}/calib")
    location.make()
    stale = {"pid": 1, "host": "elsewhere", "token": "0" * 32, "expires": time.time() - 1}
    for _ in range(5):  # five rounds, each with a fresh stale lease and six racing writers
        location.fs.pipe_file(location._key(LEASE_NAME), json.dumps(stale).encode())
        start, done = threading.Barrier(6), threading.Barrier(6)
        outcomes: list[str] = []

        def writer() -> None:
            lock = OutputLock(location)
            start.wait()
            try:
                lock.__enter__()
            except ArtifactError as exc:
                outcomes.append(f"refused: {exc}")
                done.wait()
                return
            outcomes.append("held")
            done.wait()  # hold the lease until every writer has tried
            lock.release()

        threads = [threading.Thread(target=writer) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert outcomes.count("held") == 1, outcomes
        assert all("being written by pid" in o or "keeps being taken" in o for o in outcomes if o != "held"), outcomes
        assert not location.fs.exists(location._key(LEASE_NAME))


def test_an_interrupted_takeover_is_refused_in_one_line_naming_what_to_delete(tmp_path: Path) -> None:
    location = store_on_local_filesystem(tmp_path / "calib")
    location.make()
    stale = {"pid": 1, "host": "elsewhere", "token": "ab" * 16, "expires": time.time() - 1}
    (tmp_path / "calib" / LEASE_NAME).write_text(json.dumps(stale))
    (tmp_path / "calib" / f"{LEASE_NAME}.takeover-{'ab' * 16}").write_text("{}")  # its taker died mid-way
    with pytest.raises(ArtifactError, match="keeps being taken") as refused:
        OutputLock(location).__enter__()
    assert f"delete {location}/{LEASE_NAME}" in refused.value.fix


class _NoCreateFileSystem(MemoryFileSystem):
    """A store whose `pipe_file(mode="create")` is fsspec's generic check-then-write."""

    protocol = "nocreate-test"

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        from fsspec.spec import AbstractFileSystem

        return AbstractFileSystem.pipe_file(self, path, value, mode=mode, **kwargs)


def test_a_store_without_exclusive_create_is_refused_in_one_line_before_anything_is_written() -> None:
    import fsspec

    fsspec.register_implementation("nocreate-test", _NoCreateFileSystem, clobber=True)
    url = f"nocreate-test://lease-{os.getpid()}/calib"
    with pytest.raises(ArtifactError, match=r"_NoCreateFileSystem \(nocreate-test://\), which cannot create a file exclusively"):
        OutputLock(url).__enter__()
    result = run_cli(["calibrate", "--model", "tiny-sd15", "--num-prompts", "1", "--steps", "2", "--out", url, "--json"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "cannot create a file exclusively" in lines[0], result.output
    assert not ArtifactLocation(url).fs.exists(f"/lease-{os.getpid()}")
