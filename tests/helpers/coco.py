"""A caption TSV shaped like MLCommons' COCO2014 calibration captions, for tests of the COCO source."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from diffquant.prompts import COCO_TSV_COLUMNS


def write_coco_fixture(path: Path, captions: Sequence[str]) -> Path:
    """Write `captions` as a caption TSV in the MLCommons COCO2014 layout (`COCO_TSV_COLUMNS`).

    Ids, image ids, sizes and file names are made up but shaped like the real ones
    (`COCO_val2014_000000000001.jpg`, 640x480). Quoting follows pandas' `to_csv` default
    (QUOTE_MINIMAL), as the MLCommons tools write it. The file is written atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
            writer.writerow(COCO_TSV_COLUMNS)
            for i, caption in enumerate(captions, start=1):
                image_id = 100_000 + i
                file_name = f"COCO_val2014_{image_id:012d}.jpg"
                coco_url = f"http://images.cocodataset.org/val2014/{file_name}"
                writer.writerow([i, image_id, caption, 480, 640, file_name, coco_url])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --- helpers -------------------------------------------------------------------------------------
