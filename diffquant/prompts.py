"""Prompt sources for calibration: a built-in list, a text file, or an MLCommons COCO2014 caption TSV.

`load_prompts` is the one entry point. Whatever the source, the result is a `PromptSet`: the
prompts in the order they will be fed to the pipeline, the source they came from, and a sha256 of
the exact text, so that a calibration run can record what it saw and a later run can check that it
sees the same.

Sources (`source` argument):

* `None` or `"builtin"` — `DEFAULT_PROMPTS`, 32 hand-written prompts.
* `"coco:<path>"`, or any path ending in `.tsv` — the caption TSV written by MLCommons inference
  (`text_to_image/tools/coco.py` → `captions/captions.tsv`, `coco_calibration.py` →
  `calibration/captions.tsv`; `captions_source.tsv` has the same layout): tab-separated, one header
  row, columns `id image_id caption height width file_name coco_url`. Only `caption` is read.
* any other path — a UTF-8 text file, one prompt per line (lines end at `\n` or `\r\n` only; a NUL
  byte is refused); blank lines and lines whose first non-blank character is `#` are ignored.
* a list or tuple of strings (Python API only) — taken as given, each stripped.

Selection: with `shuffle=True` the prompts are shuffled with `seed` first, then the first
`num_prompts` are kept. Asking for more prompts than the source holds is an error, never a silent
cap: a calibration set smaller than asked for would change every downstream scale.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffquant.errors import ConfigError

__all__ = [
    "COCO_TSV_COLUMNS",
    "DEFAULT_PROMPTS",
    "PromptSet",
    "load_prompts",
    "load_prompts_list",
]

DEFAULT_PROMPTS: tuple[str, ...] = (
    # scenes
    "a misty pine forest at dawn, sunbeams cutting through the fog, wide angle photograph",
    "a busy night market in Taipei with neon signs reflected in puddles after rain",
    "an alpine lake surrounded by snow-capped mountains, crystal clear water, midday",
    "a cozy reading nook with a window seat, rain on the glass, warm lamp light",
    "aerial view of terraced rice fields in Bali, lush green, golden hour",
    "a lighthouse on a rocky cliff during a storm, crashing waves, dramatic sky",
    "an abandoned train station overgrown with ivy, shafts of light through a broken roof",
    "a quiet Parisian street cafe in the morning, wet cobblestones, people with umbrellas",
    "the surface of Mars with a small rover and a dust storm on the horizon",
    "a coral reef teeming with tropical fish, underwater photograph, vivid colors",
    # portraits and people
    "portrait of an elderly fisherman with a weathered face and a knit cap, 85mm, shallow focus",
    "a young woman laughing in a sunflower field, candid photo, soft backlight",
    "a chef plating a dessert in a busy restaurant kitchen, motion blur in the background",
    "studio portrait of a jazz saxophonist in a dark room, dramatic rim lighting",
    "a child in a yellow raincoat jumping into a puddle, black and white photograph",
    "a medieval knight in ornate armor standing in a throne room, cinematic lighting",
    # animals
    "a red fox curled up asleep in fresh snow, close-up wildlife photograph",
    "a tabby cat sitting on a windowsill looking out at birds, afternoon sun",
    "a herd of elephants crossing a dusty savanna at sunset",
    "a golden retriever puppy playing with a tennis ball on a green lawn",
    # objects and still life
    "a steaming cup of coffee on a rustic wooden table next to an open notebook",
    "a vintage film camera on a stack of old travel books, soft natural light",
    "a bowl of ripe lemons and figs on a marble countertop, still life",
    "a pair of worn leather hiking boots on a mossy log",
    "product photo of a minimalist wristwatch on a white background, studio lighting",
    "a glass terrarium with succulents and small stones on a desk",
    # styles
    "a watercolor painting of a small fishing village by the sea",
    "an oil painting in the style of the Dutch golden age of a kitchen interior",
    "a cyberpunk city skyline at night, flying cars, digital art",
    "a low-poly 3D render of a floating island with a waterfall",
    "an ink sketch of an old oak tree, cross-hatching, on parchment",
    "a Japanese woodblock print of a great wave and Mount Fuji at dusk",
)

# The columns, in order, that MLCommons inference writes with
# `df[["id", "image_id", "caption", "height", "width", "file_name", "coco_url"]].to_csv(sep="\t",
# index=False)` (text_to_image/tools/coco.py and coco_calibration.py, "Finalize annotations").
COCO_TSV_COLUMNS: tuple[str, ...] = (
    "id", "image_id", "caption", "height", "width", "file_name", "coco_url",
)

_COCO_PREFIX = "coco:"
_BUILTIN = "builtin"
_LIST_SOURCE = "list"


@dataclass(frozen=True)
class PromptSet:
    """Prompts in feeding order and where they came from.

    `source` is `"builtin"`, `"list"`, a text-file path, or `"coco:<path>"` for a caption TSV.
    """

    source: str
    prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.prompts, tuple):
            raise ValueError(
                f"PromptSet.prompts must be a tuple of str, got {type(self.prompts).__name__} — "
                "pass tuple(prompts)"
            )
        for i, prompt in enumerate(self.prompts):
            # A newline inside a prompt would make the '\n'-joined digest ambiguous.
            if not isinstance(prompt, str) or not prompt.strip() or "\n" in prompt:
                raise ValueError(
                    f"PromptSet.prompts[{i}] = {prompt!r} is not a non-empty one-line string — "
                    "strip it and remove newlines"
                )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def sha256(self) -> str:
        """Hex sha256 of the prompts joined by '\\n', UTF-8: identifies the exact text fed."""
        return hashlib.sha256("\n".join(self.prompts).encode("utf-8")).hexdigest()


def load_prompts(
    source: str | os.PathLike[str] | Sequence[str] | None,
    num_prompts: int | None = None,
    seed: int | None = None,
    shuffle: bool = False,
) -> PromptSet:
    """Load prompts from `source`, optionally shuffle them with `seed`, and keep the first `num_prompts`.

    See the module docstring for the accepted sources. `seed` is used only when `shuffle` is true;
    shuffling without a seed is an error, since the set could not be repeated. Raises `ConfigError`
    for a missing or empty source, a TSV without a `caption` column, `num_prompts < 1`, or
    `num_prompts` larger than the number of prompts available.

    Example:
        >>> ps = load_prompts("builtin", num_prompts=4, seed=0, shuffle=True)
        >>> len(ps.prompts), ps.source
        (4, 'builtin')
    """
    if num_prompts is not None and num_prompts < 1:
        raise ConfigError(f"--num-prompts is {num_prompts}", "--num-prompts must be >= 1")
    if shuffle and seed is None:
        raise ConfigError(
            "shuffling prompts without a seed", "pass --seed N so the same prompts can be drawn again"
        )

    prompt_set = _read_source(source)
    prompts = prompt_set.prompts
    if shuffle:
        prompts = _seeded_shuffle(prompts, seed)  # type: ignore[arg-type]
    if num_prompts is not None:
        if num_prompts > len(prompts):
            raise ConfigError(
                f"--num-prompts {num_prompts} asked for, but {prompt_set.source} holds only "
                f"{len(prompts)} prompts",
                f"pass --num-prompts {len(prompts)} or less, or use a larger prompt source",
            )
        prompts = prompts[:num_prompts]
    return PromptSet(source=prompt_set.source, prompts=prompts)


def load_prompts_list(prompts: Sequence[str]) -> PromptSet:
    """Wrap an in-memory list of prompts, each stripped; empty ones are an error.

    Example:
        >>> load_prompts_list(["a red cube ", "a blue sphere"]).prompts
        ('a red cube', 'a blue sphere')
    """
    if isinstance(prompts, (str, bytes)):
        raise ConfigError(
            "load_prompts_list got a single string", "pass a list of prompts, e.g. [prompt]"
        )
    cleaned = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ConfigError(
                f"prompt {i} is a {type(prompt).__name__}, not a str", "pass a list of strings"
            )
        text = prompt.strip()
        if not text:
            raise ConfigError(f"prompt {i} is empty", "remove empty prompts from the list")
        if "\n" in text or "\r" in text:
            raise ConfigError(
                f"prompt {i} ({text[:40]!r}) spans several lines", "put each prompt on one line"
            )
        cleaned.append(text)
    if not cleaned:
        raise ConfigError("the prompt list is empty", "pass at least one prompt")
    return PromptSet(source=_LIST_SOURCE, prompts=tuple(cleaned))


def _read_source(source: str | os.PathLike[str] | Sequence[str] | None) -> PromptSet:
    if source is None or (isinstance(source, str) and source == _BUILTIN):
        return PromptSet(source=_BUILTIN, prompts=DEFAULT_PROMPTS)
    if isinstance(source, (list, tuple)):
        return load_prompts_list(source)
    if isinstance(source, str) and source.startswith(_COCO_PREFIX):
        return _read_coco_tsv(Path(source[len(_COCO_PREFIX):]))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix.lower() == ".tsv":
            return _read_coco_tsv(path)
        return _read_text_file(path)
    raise ConfigError(
        f"prompt source {source!r} has type {type(source).__name__}",
        "pass 'builtin', a file path, 'coco:<captions.tsv>', or a list of strings",
    )


def _check_file(path: Path, kind: str) -> None:
    if path.is_dir():
        tsvs = sorted(str(p) for p in path.glob("*/captions*.tsv")) + sorted(
            str(p) for p in path.glob("captions*.tsv")
        )
        hint = f"pass one of: {', '.join(tsvs)}" if tsvs else f"pass the {kind} file itself"
        raise ConfigError(f"prompt source {path} is a directory", hint)
    if not path.is_file():
        raise ConfigError(
            f"prompt file {path} does not exist",
            "check the path, or use --prompts builtin for the built-in prompts",
        )


def _read_text_file(path: Path) -> PromptSet:
    _check_file(path, "text")
    try:
        # utf-8-sig: editors on Windows prepend a BOM that would otherwise stick to prompt 0.
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"prompt file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
            "save it as UTF-8 with one prompt per line",
        ) from exc
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise ConfigError(f"prompt file {path} holds a NUL byte on line {line}", "save it as plain UTF-8 text with one prompt per line")
    # Lines end at \n (or \r\n) only: str.splitlines would also split at U+2028, form feeds and
    # other separators a caption may hold.
    prompts = tuple(
        line.strip()
        for line in (raw.removesuffix("\r") for raw in text.split("\n"))
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not prompts:
        raise ConfigError(
            f"prompt file {path} holds no prompts",
            "write one prompt per line (blank lines and lines starting with '#' are skipped)",
        )
    return PromptSet(source=str(path), prompts=prompts)


def _read_coco_tsv(path: Path) -> PromptSet:
    _check_file(path, "captions.tsv")
    source = f"{_COCO_PREFIX}{path}"
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter="\t"), None)
            has_rows = any(line.strip() for line in f)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"caption file {path} is not UTF-8 text", "pass the captions.tsv written by MLCommons"
        ) from exc
    if not header:
        raise ConfigError(
            f"caption file {path} is empty",
            f"pass a TSV with a header row ({' '.join(COCO_TSV_COLUMNS)})",
        )
    columns = [c.strip() for c in header]
    if "caption" not in columns:
        raise ConfigError(
            f"caption file {path} has no 'caption' column (columns: {', '.join(columns)})",
            "pass a tab-separated file whose header names a 'caption' column, as MLCommons "
            "captions.tsv does",
        )
    if not has_rows:
        raise ConfigError(f"caption file {path} holds no prompts", "pass a TSV with caption rows")

    captions = _load_caption_column(path)
    # Same cleaning as MLCommons' coco.py (`x.replace("\n", "").strip()`), so prompts match theirs.
    prompts = tuple(
        text for text in (c.replace("\r", "").replace("\n", "").strip() for c in captions) if text
    )
    if not prompts:
        raise ConfigError(
            f"caption file {path} holds no prompts (every caption is empty)",
            "fill the 'caption' column",
        )
    return PromptSet(source=source, prompts=prompts)


def _load_caption_column(path: Path) -> list[str]:
    """Read the `caption` column with `datasets`' local CSV builder: no Hub lookup, no lasting cache."""
    import datasets  # slow to import; only TSV sources need it

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        # Dataset.from_csv runs the packaged CSV builder directly (unlike load_dataset, which
        # resolves a module name first). Its Arrow cache lands in a temporary directory that is
        # removed at once; keep_in_memory reads it back before that.
        with tempfile.TemporaryDirectory(prefix="diffquant-prompts-") as cache_dir:
            dataset = datasets.Dataset.from_csv(
                str(path),
                sep="\t",
                cache_dir=cache_dir,
                keep_in_memory=True,
                # Captions such as "NA" or "None" must stay text, and "007" must not become 7.
                na_filter=False,
                converters={"caption": str},
            )
            return [str(c) for c in dataset["caption"]]
    except Exception as exc:  # datasets wraps pandas' parser errors in several exception types
        raise ConfigError(
            f"could not parse caption file {path} as a tab-separated table ({exc})",
            "pass the captions.tsv written by MLCommons inference text_to_image/tools/coco.py",
        ) from exc
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()


def _seeded_shuffle(prompts: tuple[str, ...], seed: int) -> tuple[str, ...]:
    """Fisher–Yates driven only by `Random.random()`.

    `random.shuffle` is not promised to give the same order across Python versions; the
    `random()` stream of a seeded `Random` is, so this order is stable wherever the code runs.
    """
    rng = random.Random(seed)
    items = list(prompts)
    for i in range(len(items) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        items[i], items[j] = items[j], items[i]
    return tuple(items)
