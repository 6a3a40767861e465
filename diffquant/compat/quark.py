"""AMD Quark's `get_calib_dataloader`, backed by a diffquant calibration artifact.

Quark's diffusion guide collects calibration data with
`quark.torch.utils.diffusers.get_calib_dataloader(pipe, pipe.unet, prompts, n_steps=20, **pipe_kwargs)`,
which holds every captured call in memory and runs the pipeline again on every call. This one
takes the same arguments and returns a DataLoader of the same contract (batch size 1, each batch
one `dict` keyed by the target's forward parameter names, tensors on `device`, consumed by
`ModelQuantizer(qconfig).quantize_model(module, dataloader)` as `module(**batch)`), but the samples
live in a diffquant artifact on disk: captured once, resumed after an interruption, reused by the
next call with the same arguments (and by `diffquant.quantize`, `loader.dataset.artifact`), read
back memory-mapped one sample at a time.

One difference: prompt i runs with a generator seeded from (seed, i), so each prompt gets its own
noise (Quark seeds every prompt's generator with `seed` alone).

Example:
    >>> import tempfile
    >>> from diffusers import DiffusionPipeline
    >>> from diffquant.models.tiny import tiny_pipeline_dir
    >>> pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sdxl"))
    >>> work = tempfile.TemporaryDirectory()
    >>> loader = get_calib_dataloader(pipe, pipe.unet, ["a cat", "a dog"], n_steps=2, out=work.name + "/calib",
    ...                               height=64, width=64, show_progress=False)
    >>> len(loader), sorted(next(iter(loader)))[:3]
    (4, ['added_cond_kwargs', 'cross_attention_kwargs', 'encoder_hidden_states'])
    >>> work.cleanup()
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from diffquant.api import calibrate
from diffquant.artifacts.calibration_reader import CalibrationArtifact, CalibrationDataset, move_to_device


def get_calib_dataloader(
    pipe: Any,
    target_module: torch.nn.Module | str,
    prompts: Sequence[str],
    n_steps: int = 20,
    seed: int = 42,
    device: str | torch.device | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    **pipe_kwargs: Any,
) -> DataLoader:
    """Calibrate `target_module` over `prompts` (or reuse the artifact of an earlier call) and
    return a DataLoader of its forward kwargs (see the module docstring).

    device: where batches go (default: the target's device). out: the artifact directory
    (default `artifacts/calib/<model>-<hash of the arguments>`). Other keywords go to `pipe(...)`,
    `prompt_kwargs=` as in `diffquant.calibrate`.
    """
    result = calibrate(pipe, target_module, prompts, out, num_inference_steps=n_steps, seed=seed, overwrite=overwrite,
                       show_progress=show_progress, **pipe_kwargs)
    module = getattr(pipe, result.record.model["target"])
    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    dataset = ArtifactSamples(CalibrationArtifact(result.out), torch.device(device))
    return DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=_only_item)


class ArtifactSamples(Dataset):
    """Every sample of a calibration artifact, in capture order, as forward kwargs on `device`."""

    def __init__(self, artifact: CalibrationArtifact, device: torch.device) -> None:
        self.artifact = artifact
        self.samples = CalibrationDataset(artifact)
        self.device = device

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        return sample if self.device.type == "cpu" else move_to_device(sample, self.device)


def _only_item(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """A sample already holds the pipeline's batch: batches of one are handed on unchanged."""
    return batch[0]
