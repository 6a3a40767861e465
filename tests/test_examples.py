"""Every script in examples/ runs as a user runs it (a subprocess in a fresh directory) against the tiny twins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.coco import write_coco_fixture

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# (script, image it writes, artifact directory, scheduler it sets, code lines of the guide's version:
# its examples 1-4 count 24, 37, 26 and 43 lines without blanks and comments; its COCO section adds
# 11 lines to example 1 in place of the 5-line prompt list, 30)
CASES = [
    ("sdxl_int8_weight_only.py", "sdxl_int8.png", "sdxl-calib", "EulerAncestralDiscreteScheduler", 24),
    ("sd3_svdquant_w4a4.py", "sd3_svdquant_w4a4.png", "sd3-calib", "FlowMatchEulerDiscreteScheduler", 37),
    ("sdxl_int8_w8a8.py", "sdxl_int8_w8a8.png", "sdxl-calib-5", "EulerAncestralDiscreteScheduler", 26),
    ("flux_svdquant_w4a16.py", "flux_svdquant_w4a16.png", "flux-calib", "FlowMatchEulerDiscreteScheduler", 43),
    ("coco_prompts.py", "sdxl_coco_w8a8.png", "sdxl-coco", "DPMSolverMultistepScheduler", 30),
]


def code_lines(path: Path) -> int:
    """Lines of code outside the module docstring, blank lines and comment-only lines."""
    source = path.read_text()
    body = source.split('"""', 2)[2] if source.startswith('"""') else source
    return sum(1 for line in body.splitlines() if line.strip() and not line.strip().startswith("#"))


def run_example(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(("script", "image", "artifact", "scheduler", "guide_lines"), CASES, ids=[case[0] for case in CASES])
def test_example_runs_on_a_changed_live_pipe(script, image, artifact, scheduler, guide_lines, tmp_path):
    args = []
    if script == "coco_prompts.py":
        args = [str(write_coco_fixture(tmp_path / "captions.tsv", ["a red bus on a street", "two dogs on a beach", "a bowl of fruit"]))]
    done = run_example(script, tmp_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Image.open(tmp_path / image).size == (64, 64)
    manifest = json.loads((tmp_path / "artifacts" / "examples" / artifact / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["pipeline"]["scheduler"]["class"] == scheduler
    assert manifest["model"]["target_state_sha256"]  # the live (edited) weights are what was calibrated
    assert "64 px noise" in done.stdout
    assert code_lines(EXAMPLES / script) <= guide_lines
