"""Run `diffquant quantize` and SIGKILL the process at a named point of the checkpoint's publish step.

usage: python quantize_then_die.py STEP -- <quantize args>
STEP is `weights` (new weights written, not renamed), `manifest` (new weights renamed, manifest not
written), `switch` (new checkpoint complete beside the old, not switched in) or `cleanup` (switched
in, the old one's files not yet deleted).
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from diffquant.artifacts import checkpoint, replace
from diffquant.cli import main

torch.set_num_threads(1)
step = sys.argv[1]
args = sys.argv[sys.argv.index("--") + 1 :]
if step == "cleanup":
    replace._finish = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
else:
    checkpoint._publish_step = lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == step else None
main(["quantize", *args])
