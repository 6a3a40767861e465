"""The `diffquant` command group: one verb per stage, each in its own module."""

from __future__ import annotations

import logging
import os

# transformers warns at import that torchvision is missing (diffquant never needs it).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# torchao (present for the torchao export) is imported by diffusers and warns that its CUDA
# extensions do not load on a CPU machine, and diffusers that torchao 0.18 moved its tensor
# classes; neither concerns a diffquant command.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)

import click  # noqa: E402

from diffquant import __version__  # noqa: E402
from diffquant.cli.calibrate import calibrate_command  # noqa: E402
from diffquant.cli.convert import convert_command  # noqa: E402
from diffquant.cli.errors import ErrorMappingGroup  # noqa: E402
from diffquant.cli.eval import eval_command
from diffquant.cli.export import export_command
from diffquant.cli.generate import generate_command
from diffquant.cli.inspect import inspect_command
from diffquant.cli.quantize import quantize_command
from diffquant.cli.sweep import sweep_command
from diffquant.cli.verify import verify_command


@click.group(cls=ErrorMappingGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="diffquant")
def main() -> None:
    """Quantize diffusion models from on-disk calibration artifacts.

    \b
    Stage one:  diffquant calibrate --model tiny-sdxl --out artifacts/calib/demo
    Stage two:  diffquant quantize --calib artifacts/calib/demo --recipe int8_w8a8 --out artifacts/quantized/demo
    """


main.add_command(calibrate_command)
main.add_command(quantize_command)
main.add_command(generate_command)
main.add_command(inspect_command)
main.add_command(convert_command)
main.add_command(sweep_command)
main.add_command(eval_command)
main.add_command(export_command)
main.add_command(verify_command)
