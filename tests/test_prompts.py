"""Prompt sources: built-in list, text file, MLCommons COCO caption TSV, seeded selection, errors."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest

from diffquant.errors import ConfigError
from diffquant.prompts import (
    COCO_TSV_COLUMNS,
    DEFAULT_PROMPTS,
    PromptSet,
    load_prompts,
    load_prompts_list,
)
from tests.helpers.coco import write_coco_fixture

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "  Two dogs playing in the snow.  ",
    "NA",
    "007",
    'A sign that says "stop"\there.',
    "",
    "A plate of food with broccoli and rice.",
]


@pytest.fixture
def coco_tsv(tmp_path: Path) -> Path:
    return write_coco_fixture(tmp_path / "captions" / "captions.tsv", CAPTIONS)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# calibration prompts\n\na red cube\n   \n  # indented comment\n  a blue sphere  \n")
    return path


def test_builtin_is_the_default_and_holds_about_32_distinct_prompts():
    assert load_prompts(None).prompts == DEFAULT_PROMPTS
    assert load_prompts("builtin").source == "builtin"
    assert 28 <= len(DEFAULT_PROMPTS) <= 40
    assert len(set(DEFAULT_PROMPTS)) == len(DEFAULT_PROMPTS)
    assert all(p == p.strip() and p and "\n" not in p for p in DEFAULT_PROMPTS)


def test_sha256_is_of_prompts_joined_by_newline():
    ps = PromptSet(source="list", prompts=("a", "b c"))
    assert ps.sha256 == hashlib.sha256(b"a\nb c").hexdigest()


def test_text_file_skips_blank_and_comment_lines(text_file: Path):
    ps = load_prompts(text_file)
    assert ps.prompts == ("a red cube", "a blue sphere")
    assert ps.source == str(text_file)


def test_text_file_with_utf8_bom_does_not_leak_into_first_prompt(tmp_path: Path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffcafé au lait\n".encode())
    assert load_prompts(path).prompts == ("café au lait",)


def test_coco_tsv_fixture_has_the_mlcommons_header(coco_tsv: Path):
    header = coco_tsv.read_text(encoding="utf-8").splitlines()[0]
    assert header == "id\timage_id\tcaption\theight\twidth\tfile_name\tcoco_url"
    assert tuple(header.split("\t")) == COCO_TSV_COLUMNS


def test_coco_tsv_reads_stripped_nonempty_captions_as_text(coco_tsv: Path):
    ps = load_prompts(coco_tsv)
    assert ps.source == f"coco:{coco_tsv}"
    assert ps.prompts == (
        "A man riding a wave on top of a surfboard.",
        "Two dogs playing in the snow.",
        "NA",  # not turned into a missing value
        "007",  # not turned into the number 7
        'A sign that says "stop"\there.',  # quoted field with a tab survives
        "A plate of food with broccoli and rice.",
    )


def test_coco_prefix_reads_a_tsv_whatever_its_extension(tmp_path: Path):
    path = write_coco_fixture(tmp_path / "captions_source.txt", ["a cat", "a dog"])
    assert load_prompts(f"coco:{path}").prompts == ("a cat", "a dog")
    assert load_prompts(f"coco:{path}").source == f"coco:{path}"


def test_coco_tsv_load_never_touches_the_network(coco_tsv: Path, monkeypatch: pytest.MonkeyPatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_prompts tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert len(load_prompts(coco_tsv).prompts) == 6


def test_coco_tsv_load_leaves_no_cache_in_hf_home(
    coco_tsv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import datasets.config

    hf_cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
    load_prompts(coco_tsv)
    assert not hf_cache.exists() or not any(hf_cache.rglob("*"))


def test_list_source_is_stripped():
    assert load_prompts([" a cat ", "a dog"]).prompts == ("a cat", "a dog")
    assert load_prompts_list(("x",)).source == "list"


def test_num_prompts_takes_the_first_n_in_order():
    assert load_prompts(None, num_prompts=3).prompts == DEFAULT_PROMPTS[:3]


def test_seeded_shuffle_is_deterministic_and_differs_from_file_order():
    a = load_prompts(None, num_prompts=8, seed=123, shuffle=True)
    b = load_prompts(None, num_prompts=8, seed=123, shuffle=True)
    c = load_prompts(None, num_prompts=8, seed=124, shuffle=True)
    assert a == b and a.sha256 == b.sha256
    assert a.prompts != DEFAULT_PROMPTS[:8]
    assert a.prompts != c.prompts
    full = load_prompts(None, seed=123, shuffle=True)
    assert sorted(full.prompts) == sorted(DEFAULT_PROMPTS)  # a permutation, nothing lost
    assert full.prompts[:8] == a.prompts  # shuffle happens before the cut


def test_seeded_shuffle_order_is_pinned():
    # Fisher-Yates over Random(0).random(): this order must never change between releases,
    # or recorded calibration sets could not be reproduced.
    ps = load_prompts(["p0", "p1", "p2", "p3", "p4", "p5"], seed=0, shuffle=True)
    assert ps.prompts == ("p2", "p4", "p0", "p1", "p3", "p5")


def test_seed_without_shuffle_keeps_order():
    assert load_prompts(None, num_prompts=4, seed=7).prompts == DEFAULT_PROMPTS[:4]


# --- errors: one line, naming the problem and the fix -------------------------------------------


def _message(exc_info: pytest.ExceptionInfo[ConfigError]) -> str:
    message = exc_info.value.message
    assert "\n" not in message
    assert " — " in message  # `<what> — <fix>`
    return message


def test_missing_file_names_the_path_and_the_builtin_alternative(tmp_path: Path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError) as exc_info:
        load_prompts(missing)
    message = _message(exc_info)
    assert str(missing) in message and "does not exist" in message and "--prompts builtin" in message


def test_missing_tsv_is_reported_like_a_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError) as exc_info:
        load_prompts(f"coco:{tmp_path / 'captions.tsv'}")
    assert "does not exist" in _message(exc_info)


def test_directory_source_points_at_the_tsv_inside(coco_tsv: Path):
    with pytest.raises(ConfigError) as exc_info:
        load_prompts(f"coco:{coco_tsv.parent.parent}")
    message = _message(exc_info)
    assert "is a directory" in message and str(coco_tsv) in message


def test_text_file_with_only_comments_has_no_prompts(tmp_path: Path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing here\n\n   \n")
    with pytest.raises(ConfigError) as exc_info:
        load_prompts(path)
    message = _message(exc_info)
    assert "holds no prompts" in message and "one prompt per line" in message


def test_empty_tsv_file(tmp_path: Path):
    path = tmp_path / "captions.tsv"
    path.write_text("")
    with pytest.raises(ConfigError) as exc_info:
        load_prompts(path)
    message = _message(exc_info)
    assert "is empty" in message and "header row" in message


def test_tsv_with_header_only_has_no_prompts(tmp_path: Path):
    path = write_coco_fixture(tmp_path / "captions.tsv", [])
    with pytest.raises(ConfigError) as exc_info:
        load_prompts(path)
    assert "holds no prompts" in _message(exc_info)


def test_tsv_with_only_empty_captions_has_no_prompts(tmp_path: Path):
    path = write_coco_fixture(tmp_path / "captions.tsv", ["", "   "])
    with pytest.raises(ConfigError) as exc_info:
        load_prompts(path)
    assert "every caption is empty" in _message(exc_info)


def test_tsv_without_caption_column_names_the_columns_it_has(tmp_path: Path):
    path = tmp_path / "captions.tsv"
    path.write_text("id\ttext\tfile_name\n1\ta cat\tx.jpg\n")
    with pytest.raises(ConfigError) as exc_info:
        load_prompts(path)
    message = _message(exc_info)
    assert "no 'caption' column" in message
    assert "id, text, file_name" in message
    assert "header names a 'caption' column" in message


@pytest.mark.parametrize("n", [0, -3])
def test_num_prompts_below_one(n: int):
    with pytest.raises(ConfigError) as exc_info:
        load_prompts(None, num_prompts=n)
    assert "--num-prompts must be >= 1" in _message(exc_info)


def test_num_prompts_above_available_names_the_count(coco_tsv: Path):
    with pytest.raises(ConfigError) as exc_info:
        load_prompts(coco_tsv, num_prompts=50)
    message = _message(exc_info)
    assert "holds only 6 prompts" in message and "--num-prompts 6 or less" in message


def test_shuffle_without_seed_asks_for_a_seed():
    with pytest.raises(ConfigError) as exc_info:
        load_prompts(None, shuffle=True)
    assert "--seed" in _message(exc_info)


def test_list_with_an_empty_prompt():
    with pytest.raises(ConfigError) as exc_info:
        load_prompts(["a cat", "  "])
    assert "prompt 1 is empty" in _message(exc_info)


def test_list_with_a_multiline_prompt():
    with pytest.raises(ConfigError) as exc_info:
        load_prompts_list(["a cat\non a mat"])
    assert "one line" in _message(exc_info)
