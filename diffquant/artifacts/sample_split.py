"""Which calibration samples stage two calibrates on and which it holds out: the one definition.

`choose_samples` resolves a run's selection (each field from the run's overrides where given,
else the recipe's `calibration` block) and its holdout count, then `split_samples` applies the
`SampleSelection` to an artifact's records and holds out `holdout` evenly spaced samples of the selection (sample `chosen[floor((i + 0.5) * n / holdout)]` for
i < holdout) for the quality report; the observers never see them. `holdout_count` decides how
many: the one asked for (`--holdout`, or the recipe's `calibration.holdout`), else the default,
adapted to a small selection (`adaptive_holdout`). `--holdout 0` holds out nothing: the quality
report is off. The checkpoint records the held-out samples by id; `indices_of_ids` maps them back
to an artifact's records (`diffquant eval` re-measures on exactly those samples).

Example:
    >>> from diffquant.artifacts.calibration_reader import SampleRecord
    >>> records = [SampleRecord(id=10 + i, prompt=i // 2, step=i % 2, timestep=999.0 - i, shard="s", structure={}, tensors={})
    ...            for i in range(6)]
    >>> split = split_samples(records, SampleSelection(), holdout_count(None, recipe_default=4, recipe_sets_it=False, selected=6))
    >>> split.calibration, split.holdout
    ([1, 4], [0, 2, 3, 5])
    >>> holdout_count(None, recipe_default=4, recipe_sets_it=False, selected=3)  # a small selection: half of it
    1
    >>> split = split_samples(records, SampleSelection(), 2)
    >>> split.calibration, split.holdout, [records[i].id for i in split.holdout]
    ([0, 2, 3, 5], [1, 4], [11, 14])
    >>> indices_of_ids(records, [11, 14], "calib")
    [1, 4]
    >>> split_samples(records, SampleSelection(), 0).holdout
    []
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from diffquant.artifacts.calibration_reader import SampleRecord, SampleSelection
from diffquant.errors import ArtifactError, ConfigError

# The fields of a sample selection, in the order the command line, the Python API, the settings
# and the recipe's `calibration` block spell them (each also takes `holdout`).
SELECTION_FIELDS = tuple(field.name for field in dataclasses.fields(SampleSelection))
HOLDOUT_RULE = "the default holdout of 4, adapted to a selection of at most 4 samples: max(1, selected // 2)"


@dataclass(frozen=True)
class SampleSplit:
    """Record indices: `calibration` for the observers, `holdout` for the quality report (sorted)."""

    selection: SampleSelection
    calibration: list[int]
    holdout: list[int]
    holdout_rule: str | None = None  # set when the default holdout was adapted to a small selection


def choose_samples(records: Sequence[SampleRecord], overrides: Mapping[str, Any], recipe_calibration: Any,
                   recipe_sets_holdout: bool) -> SampleSplit:
    """The split of one run. `overrides`: the run's `SELECTION_FIELDS` and `holdout` (None: not
    given); `recipe_calibration`: the recipe's `calibration` block (a `CalibrationSelection`:
    the same fields, every one set); `recipe_sets_holdout`: whether the recipe file wrote
    `holdout` (if not, the default adapts to a small selection)."""
    selection = SampleSelection(**{name: getattr(recipe_calibration, name) if overrides.get(name) is None else overrides[name]
                                   for name in SELECTION_FIELDS})
    requested, default = overrides.get("holdout"), recipe_calibration.holdout
    held_out = holdout_count(requested, default, recipe_sets_holdout, len(selection.apply(records)))
    return dataclasses.replace(split_samples(records, selection, held_out),
                               holdout_rule=holdout_rule(requested, default, recipe_sets_holdout, held_out))


def split_samples(records: Sequence[SampleRecord], selection: SampleSelection, holdout: int) -> SampleSplit:
    """The selected samples minus `holdout` evenly spaced ones (module docstring); refused in one
    line when nothing would be left to calibrate on."""
    chosen = selection.apply(records)
    if len(chosen) <= holdout:
        raise ConfigError(
            f"{len(chosen)} calibration samples selected, but {holdout} are held out for evaluation",
            "calibrate more prompts or steps, widen the selection, or lower --holdout",
        )
    picks = {chosen[min(len(chosen) - 1, int((i + 0.5) * len(chosen) / holdout))] for i in range(holdout)}
    return SampleSplit(selection, [i for i in chosen if i not in picks], sorted(picks))


def holdout_count(requested: int | None, recipe_default: int, recipe_sets_it: bool, selected: int) -> int:
    """How many samples to hold out: `requested` (the command line's), else the recipe's when it
    sets one, else the default adapted to the selection's size (`adaptive_holdout`)."""
    if requested is not None:
        return requested
    return recipe_default if recipe_sets_it else adaptive_holdout(selected, recipe_default)


def holdout_rule(requested: int | None, recipe_default: int, recipe_sets_it: bool, held_out: int) -> str | None:
    """The rule to record when the default holdout was adapted (`HOLDOUT_RULE`), else None."""
    return HOLDOUT_RULE if requested is None and not recipe_sets_it and held_out != recipe_default else None


def adaptive_holdout(selected: int, default: int) -> int:
    """The held-out count when neither --holdout nor the recipe sets one: the default (4) while the
    selection has more samples than that (so every run that worked before holds out the same
    samples), else half the selection, at least 1: `default if selected > default else
    max(1, selected // 2)`. One selected sample is still refused (nothing left to calibrate on)."""
    return default if selected > default else max(1, selected // 2)


def indices_of_ids(records: Sequence[SampleRecord], ids: Sequence[int], artifact: str) -> list[int]:
    """The record indices of the sample `ids` a checkpoint recorded; refused in one line when the
    artifact (named by `artifact`) lacks any of them."""
    index_of = {record.id: index for index, record in enumerate(records)}
    missing = [i for i in ids if i not in index_of]
    if missing:
        raise ArtifactError(f"calibration artifact {artifact} lacks held-out samples {missing[:5]} of the checkpoint",
                            "pass the artifact the checkpoint was quantized from")
    return [index_of[i] for i in ids]
