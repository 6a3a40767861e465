"""Every malformed input is one line `Error: ...`, exit code 2, no traceback, nothing changed on disk.

One case per field family: calibration manifests, shard headers, shard data, the stats index,
checkpoint manifests, recipes, command-line values and prompt files. (Files are compared by
content; an empty output directory created before the failing check does not count.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.helpers.reliability import copy_artifact, edit_json, rewrite_shard, run_cli, tree_hash

QUANTIZE = ["quantize", "--device", "cpu", "--holdout", "2", "--json"]
CALIBRATE = ["calibrate", "--model", "tiny-sd15", "--num-prompts", "1", "--steps", "2", "--json"]


def _manifest(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda calib: edit_json(calib / "manifest.json", change)


def _set(path: str, value: object) -> Callable[[dict], None]:
    def change(document: dict) -> None:
        *parents, last = path.split(".")
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return change


def _drop(path: str) -> Callable[[dict], None]:
    def change(document: dict) -> None:
        *parents, last = path.split(".")
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]
    return change


MANIFEST_CASES = {
    "manifest-not-json": lambda c: (c / "manifest.json").write_text("{not json"),
    "manifest-a-list": lambda c: (c / "manifest.json").write_text("[1, 2]"),
    "manifest-not-utf8": lambda c: (c / "manifest.json").write_bytes(b"\xff\xfe{}"),
    "format-wrong": _manifest(_set("format", "other")),
    "version-99": _manifest(_set("version", 99)),
    "status-done": _manifest(_set("status", "done")),
    "status-incomplete": _manifest(_set("status", "in_progress")),
    "shards-a-dict": _manifest(_set("shards", {})),
    "shard-a-string": _manifest(_set("shards.0", "shard-000000.safetensors")),
    "shard-file-int": _manifest(_set("shards.0.file", 123)),
    "shard-file-empty": _manifest(_set("shards.0.file", "")),
    "shard-file-dotdot": _manifest(_set("shards.0.file", "../x.safetensors")),
    "shard-file-absolute": _manifest(_set("shards.0.file", "/etc/hostname")),
    "shard-bytes-str": _manifest(_set("shards.0.bytes", "12")),
    "shard-bytes-negative": _manifest(_set("shards.0.bytes", -1)),
    "shard-bytes-float": _manifest(_set("shards.0.bytes", 1.5)),
    "shard-num-samples-bool": _manifest(_set("shards.0.num_samples", True)),
    "shard-first-sample-wrong": _manifest(_set("shards.0.first_sample", 3)),
    "shard-sha-short": _manifest(_set("shards.0.sha256", "abc")),
    "shard-sha-missing": _manifest(_drop("shards.0.sha256")),
    "shard-duplicated": _manifest(lambda m: m["shards"].append(dict(m["shards"][0])) or m.update(num_samples=2 * m["num_samples"])),
    "num-samples-disagree": _manifest(_set("num_samples", 1000)),
    "num-samples-str": _manifest(_set("num_samples", "6")),
    "prompts-done-negative": _manifest(_set("num_prompts_done", -3)),
    "model-not-dict": _manifest(_set("model", "tiny-sdxl")),
    "model-class-missing": _manifest(_drop("model.target_class")),
    "model-class-int": _manifest(_set("model.target_class", 7)),
    "prompts-count-str": _manifest(_set("prompts.count", "3")),
    "schema-a-list": _manifest(_set("schema", [])),
    "schema-entry-str": _manifest(lambda m: m["schema"].update({next(iter(m["schema"])): "float32"})),
    "settings-a-list": _manifest(_set("settings", [])),
    "model-name-int": _manifest(_set("model.name", 5)),
    "shard-format-unknown": _manifest(_set("shard_format", {"name": "parquet", "compression": "none"})),
    "shard-missing": lambda c: next(c.glob("shard-*")).unlink(),
    "shard-truncated": lambda c: next(c.glob("shard-*")).write_bytes(next(c.glob("shard-*")).read_bytes()[:-7]),
}

SHARD_CASES = {
    "header-not-json": lambda c: rewrite_shard(c, raw_header="{oops"),
    "header-no-samples": lambda c: rewrite_shard(c, lambda h: h.pop("samples")),
    "header-prompt-str": lambda c: rewrite_shard(c, lambda h: h["samples"][0].update(prompt="x")),
    "header-structure-out-of-range": lambda c: rewrite_shard(c, lambda h: h["samples"][0].update(structure=40)),
    "header-timestep-str": lambda c: rewrite_shard(c, lambda h: h["samples"][0].update(timestep="nan")),
    "header-sample-count": lambda c: rewrite_shard(c, lambda h: h["samples"].pop()),
    "header-tensors-list": lambda c: rewrite_shard(c, lambda h: h["samples"][0].update(tensors=[])),
    "header-tensors-disagree": lambda c: rewrite_shard(c, lambda h: h["samples"][0]["tensors"].update(extra="0" * 32)),
    "schema-lacks-a-tensor": _manifest(lambda m: m["schema"].pop("sample")),
    "data-non-finite": lambda c: rewrite_shard(c, change_tensors=lambda t: [v.view(-1)[:1].fill_(float("nan")) for v in t.values() if v.is_floating_point()]),
    "data-wrong-dtype": lambda c: rewrite_shard(c, change_tensors=lambda t: t.update({k: v.double() for k, v in t.items()})),
}


def _stats(change: Callable[[dict], object] | None = None, raw: str | None = None) -> Callable[[Path], None]:
    def damage(calib: Path) -> None:
        index = calib / "stats" / "index.json"
        if raw is not None:
            index.write_text(raw)
        else:
            edit_json(index, change)
    return damage


def _entry(field: str, value: object) -> Callable[[dict], None]:
    return lambda index: [entry.__setitem__(field, value) for entry in index["entries"].values()] and None


STATS_CASES = {
    "stats-index-not-json": _stats(raw="{"),
    "stats-index-version": _stats(_set("version", 7)),
    "stats-index-list": _stats(raw="[]"),
    "stats-entries-list": _stats(_set("entries", [])),
    "stats-entry-file-dotdot": _stats(_entry("file", "../../x.safetensors")),
    "stats-entry-bytes-str": _stats(_entry("bytes", "1")),
    "stats-entry-sha-short": _stats(_entry("sha256", "00")),
    "stats-entry-key-mismatch": _stats(_entry("key", {"kind": "min_max"})),
    "stats-entry-layers-str": _stats(_entry("layers", "conv_in")),
    "stats-entry-not-dict": _stats(lambda index: index["entries"].update({k: 5 for k in index["entries"]})),
}


def _ckpt(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda out: edit_json(out / "quant_manifest.json", change)


CHECKPOINT_CASES = {
    "ckpt-not-json": lambda out: (out / "quant_manifest.json").write_text("]"),
    "ckpt-format": _ckpt(_set("format", "x")),
    "ckpt-files-missing": _ckpt(_drop("files")),
    "ckpt-files-bytes-str": _ckpt(lambda m: m["files"]["model.safetensors"].update(bytes="1")),
    "ckpt-files-sha-bad": _ckpt(lambda m: m["files"]["model.safetensors"].update(sha256="g" * 64)),
    "ckpt-extra-file": _ckpt(lambda m: m["files"].update({"../x": {"bytes": 1, "sha256": "0" * 64}})),
    "ckpt-layers-dict": _ckpt(_set("layers", {})),
    "ckpt-layer-shape-zero": _ckpt(lambda m: m["layers"][0].update(shape=[0, 4])),
    "ckpt-layer-type": _ckpt(lambda m: m["layers"][0].update(type="Dense")),
    "ckpt-layer-tensors-list": _ckpt(lambda m: m["layers"][0].update(tensors=["a"])),
    "ckpt-missing-tensor": _ckpt(lambda m: m["layers"][0]["tensors"].update(weight="no.such.tensor")),
    "ckpt-model-name-int": _ckpt(lambda m: m["model"].update(name=5)),
    "ckpt-weights-truncated": lambda out: (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:-3]),
}

RECIPE_CASES = {
    "recipe-symmetric-string": "global: {weight: {dtype: int8, symmetric: 'false'}}\n",
    "recipe-exclude-string": "global: {weight: {dtype: int8}}\nexclude: '*attn*'\n",
    "recipe-holdout-float": "global: {weight: {dtype: int8}}\ncalibration: {holdout: 1.5}\n",
    "recipe-holdout-zero": "global: {weight: {dtype: int8}}\ncalibration: {holdout: 0}\n",
    "recipe-limit-bool": "global: {weight: {dtype: int8}}\ncalibration: {limit: true}\n",
    "recipe-group-size-str": "global: {weight: {dtype: int4, granularity: per_group, group_size: '64'}}\n",
    "recipe-percentile-inf": "global: {weight: {dtype: int8}, input: {dtype: int8, observer: percentile, percentile: .inf}}\n",
    "recipe-svd-rank-str": "global: {weight: {dtype: int4}, input: {dtype: int4, dynamic: true}}\nalgorithms: [{name: svdquant, rank: '32'}]\n",
    "recipe-alpha-grid-str": "global: {weight: {dtype: int4}, input: {dtype: int4, dynamic: true}}\nalgorithms: [{name: svdquant, alpha_grid: '0.5'}]\n",
    "recipe-description-list": "description: [a, b]\nglobal: {weight: {dtype: int8}}\n",
    "recipe-name-int": "name: 5\nglobal: {weight: {dtype: int8}}\n",
    "recipe-a-list": "- global\n",
    "recipe-bad-yaml": "global: {weight: [\n",
    "recipe-alias-bomb": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
                         "description: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\nglobal: {weight: {dtype: int8}}\n",
    "recipe-layer-types-list": "global: {weight: {dtype: int8}}\nlayer_types: [Linear]\n",
}


@pytest.fixture(scope="module")
def checkpoint_dir(quantize_factory) -> Path:
    return quantize_factory("tiny-sdxl", "int8_w8a8").out


@pytest.fixture(scope="module")
def calib_with_stats(calib_factory, tmp_path_factory) -> Path:
    calib = copy_artifact(calib_factory(), tmp_path_factory.mktemp("stats-calib") / "calib")
    assert run_cli([*QUANTIZE, "--recipe", "int8_w8a8", "--calib", str(calib), "--out", str(calib.parent / "first")]).exit_code == 0
    return calib


def _assert_one_line_error(tmp_path: Path, args: list[str]) -> str:
    before = tree_hash(tmp_path)
    result = run_cli(args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, KeyError, TypeError))
    assert tree_hash(tmp_path) == before
    return lines[0]


@pytest.mark.parametrize("case", sorted({**MANIFEST_CASES, **SHARD_CASES}))
def test_malformed_calibration_artifact(case: str, calib_factory, tmp_path: Path) -> None:
    calib = copy_artifact(calib_factory(), tmp_path / "calib")
    {**MANIFEST_CASES, **SHARD_CASES}[case](calib)
    _assert_one_line_error(tmp_path, [*QUANTIZE, "--recipe", "int8_w8a8", "--calib", str(calib), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("case", sorted(STATS_CASES))
def test_malformed_stats_index(case: str, calib_with_stats: Path, tmp_path: Path) -> None:
    calib = copy_artifact(calib_with_stats, tmp_path / "calib", keep_stats=True)
    STATS_CASES[case](calib)
    _assert_one_line_error(tmp_path, [*QUANTIZE, "--recipe", "int8_w8a8", "--calib", str(calib), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_malformed_checkpoint(case: str, checkpoint_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, out)
    CHECKPOINT_CASES[case](out)
    _assert_one_line_error(tmp_path, ["verify", str(out)])


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_malformed_recipe(case: str, private_calib, tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(RECIPE_CASES[case])
    message = _assert_one_line_error(tmp_path, [*QUANTIZE, "--recipe", str(recipe), "--calib", str(private_calib()), "--out", str(tmp_path / "out")])
    assert "recipe" in message or "YAML" in message


def test_oversized_and_binary_recipes(private_calib, tmp_path: Path) -> None:
    big, binary = tmp_path / "big.yaml", tmp_path / "bin.yaml"
    big.write_text("global: {weight: {dtype: int8}}\n" + "#" * (2 << 20))
    binary.write_bytes(b"\xff\xfe\x00global")
    for recipe in (big, binary):
        _assert_one_line_error(tmp_path, [*QUANTIZE, "--recipe", str(recipe), "--calib", str(private_calib()), "--out", str(tmp_path / "out")])


CLI_CASES = {
    "shard-size-nan": [*CALIBRATE, "--shard-size-mb", "nan"],
    "shard-size-inf": [*CALIBRATE, "--shard-size-mb", "inf"],
    "shard-size-negative": [*CALIBRATE, "--shard-size-mb", "-1"],
    "set-height-abc": [*CALIBRATE, "--set", "height=abc"],
    "set-guidance-empty": [*CALIBRATE, "--set", "guidance_scale="],
    "set-height-63": [*CALIBRATE, "--set", "height=63"],
    "set-height-list": [*CALIBRATE, "--set", "height=[64, 64]"],
    "set-unknown": [*CALIBRATE, "--set", "no_such_keyword=1"],
    "set-no-equals": [*CALIBRATE, "--set", "height"],
    "out-one-slash": [*CALIBRATE, "--out", "s3:/bucket/x"],
    "quantize-calib-one-slash": [*QUANTIZE, "--recipe", "int8_w8a8", "--calib", "gs:/bucket/x"],
    "quantize-every-zero": None,
    "quantize-holdout-negative": None,
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_malformed_command_line_values(case: str, private_calib, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = CLI_CASES[case]
    if case == "quantize-every-zero":
        args = [*QUANTIZE, "--recipe", "int8_w8a8", "--calib", str(private_calib()), "--every", "0", "--out", str(tmp_path / "o")]
    elif case == "quantize-holdout-negative":  # 0 turns the quality report off; below is refused
        args = [*QUANTIZE[:-3], "--holdout", "-1", "--json", "--recipe", "int8_w8a8", "--calib", str(private_calib()), "--out", str(tmp_path / "o")]
    elif args[0] == "calibrate" and "--out" not in args:
        args = [*args, "--out", str(tmp_path / "run")]
    _assert_one_line_error(tmp_path, args)


@pytest.mark.parametrize("content", [b"a cat\x00 on a mat\n", b"\xff\xfeprompt\n"], ids=["nul", "not-utf8"])
def test_malformed_prompt_files(content: bytes, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    _assert_one_line_error(tmp_path, [*CALIBRATE, "--prompts", str(prompts), "--out", str(tmp_path / "run")])


def test_prompt_files_split_only_on_newlines() -> None:
    from diffquant.prompts import load_prompts
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.txt"
        path.write_bytes("one\u2028still one\fand still\r\ntwo\n".encode())
        assert load_prompts(str(path), None).prompts == ("one\u2028still one\fand still", "two")


def test_the_table_covers_at_least_sixty_cases() -> None:
    total = len(MANIFEST_CASES) + len(SHARD_CASES) + len(STATS_CASES) + len(CHECKPOINT_CASES) + len(RECIPE_CASES) + len(CLI_CASES) + 2 + 2
    assert total >= 60, total
