"""Library errors are plain exceptions; the command line alone maps them to one line and code 2."""

from __future__ import annotations

import errno
import pickle
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from diffquant.cli import main
from diffquant.cli.errors import ErrorMappingGroup, format_known_error
from diffquant.errors import ArtifactError, ConfigError, DiffquantError
from diffquant.quant import errors as quant_errors


def test_library_imports_do_not_load_click():
    code = (
        "import sys\n"
        "import diffquant.stages.calibrate, diffquant.stages.quantize, diffquant.stages.evaluate\n"
        "import diffquant.stages.sweep, diffquant.stages.convert, diffquant.stages.generate\n"
        "import diffquant.quant.kernels.select, diffquant.models.quantized, diffquant.quant.recipe, diffquant.artifacts.calibration_reader\n"
        "import diffquant.errors\n"
        "print(sorted(name for name in sys.modules if name == 'click' or name.startswith('click.')))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_errors_carry_what_and_fix_and_survive_pickling():
    error = ArtifactError("shard-00001 is missing", "restore it")
    assert (error.what, error.fix, error.message, str(error)) == (
        "shard-00001 is missing", "restore it", "shard-00001 is missing — restore it", "shard-00001 is missing — restore it"
    )
    assert ConfigError("bad value").message == "bad value"
    copy = pickle.loads(pickle.dumps(error))  # DataLoader workers send errors back pickled
    assert type(copy) is ArtifactError and (copy.what, copy.fix) == (error.what, error.fix)
    assert not isinstance(error, click.ClickException)


def test_quant_raises_the_config_error_everyone_catches():
    assert quant_errors.ConfigError is ConfigError and quant_errors.DiffquantError is DiffquantError
    from diffquant.quant.spec import TensorSpec

    with pytest.raises(ConfigError, match="granularity"):
        TensorSpec.from_dict({"dtype": "int8", "granularity": "per_row"}, "weight")


def test_known_errors_map_to_one_line_and_others_pass_through():
    assert format_known_error(ConfigError("x", "y")) == "x — y"
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors")
    assert format_known_error(full) == (
        "no space left on the device writing /data/out/model.safetensors — free space there, or write to another directory"
    )
    assert format_known_error(OSError(errno.EACCES, "Permission denied")) is None
    assert format_known_error(RuntimeError("a bug")) is None


def _group_raising(exc: BaseException) -> click.Group:
    @click.group(cls=ErrorMappingGroup)
    def group() -> None:
        pass

    @group.command()
    def run() -> None:
        raise exc

    return group


def test_cli_prints_error_line_with_exit_code_2():
    result = CliRunner().invoke(_group_raising(ArtifactError("the artifact is incomplete", "re-run calibrate")), ["run"])
    assert result.exit_code == 2
    assert result.output == "Error: the artifact is incomplete — re-run calibrate\n"


def test_cli_lets_unexpected_errors_through():
    result = CliRunner().invoke(_group_raising(RuntimeError("a bug")), ["run"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_real_command_maps_an_option_error(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'nothing'} has no manifest.json — pass a calibration artifact written by `diffquant calibrate`"
    ]
