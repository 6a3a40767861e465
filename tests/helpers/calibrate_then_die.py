"""Run `diffquant calibrate` and SIGKILL the process at a chosen point (for resume tests).

usage: python calibrate_then_die.py WHEN N -- <calibrate args>
WHEN is `prompt` (die when prompt N starts, mid-run, with samples queued), `publish` (die while
publishing shard N: the `.partial` file is written, not renamed), `published` (die right after
shard N is renamed into place, before the manifest lists it), `step` (die at the publish step
named N of an `--overwrite`, `replace._publish_step`) or `none` (do not die). The `sharedtest://`
store (tests/helpers/shared_store.py) is registered, so ranks can share a store.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2]))  # `tests.helpers` from a launched script

from diffquant.artifacts import replace, shard_formats
from diffquant.cli import main
from diffquant.stages import capture
from tests.helpers import shared_store


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# Same intra-op thread count as the test process (conftest): CPU kernels sum in a different order
# with another thread count, which would change the captured values in the last bits.
torch.set_num_threads(1)
shared_store.register()
when, n = sys.argv[1], (int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2])
args = sys.argv[sys.argv.index("--") + 1 :]
if when == "none":
    pass
elif when == "step":
    replace._publish_step = lambda name: _die() if name == n else None
elif when == "prompt":
    original_start = capture.SubmoduleInputCapture.start_prompt

    def start_prompt(self, prompt_index: int) -> None:
        if prompt_index == n:
            _die()
        original_start(self, prompt_index)

    capture.SubmoduleInputCapture.start_prompt = start_prompt
else:
    original_publish = shard_formats.publish_shard
    published = [0]

    def publish_shard(tmp, final) -> None:
        if when == "publish" and published[0] == n:
            _die()
        original_publish(tmp, final)
        if when == "published" and published[0] == n:
            _die()
        published[0] += 1

    shard_formats.publish_shard = publish_shard
main(["calibrate", *args])
