"""SAM-2 model construction: which packaged Hydra config each model name uses, and how it is built.

Kept free of Celery and settings so the benchmark, the tests and the GPU script build models exactly
the way the worker does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Hydra config names inside the installed `sam2` package (absolute paths do not work with build_sam2).
MODEL_CONFIGS: dict[str, str] = {
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


class ModelLoadError(RuntimeError):
    """The checkpoint is missing, unreadable or does not match the model's config."""


def config_for(model_name: str) -> str:
    try:
        return MODEL_CONFIGS[model_name]
    except KeyError:
        raise ModelLoadError(f"unknown SAM-2 model {model_name!r}; choose one of {', '.join(MODEL_CONFIGS)}") from None


def build_model(
    model_name: str, checkpoint: Path | None, device: str, *, malloc_tuning: bool = True
) -> torch.nn.Module:
    """Build SAM-2 from its packaged config and load `checkpoint` (strict, as upstream does).

    On CPU this is also where the process's malloc thresholds are set (samseg.runtime.allocator), so every
    entry point that runs the model gets them; `malloc_tuning=False` (SAMSEG_MALLOC_TUNING=false) keeps glibc's.
    """
    from sam2.build_sam import build_sam2

    from samseg.runtime.allocator import tune_allocator

    if device == "cpu":
        tune_allocator(malloc_tuning)

    config = config_for(model_name)
    if checkpoint is not None and not checkpoint.is_file():
        raise ModelLoadError(
            f"checkpoint {checkpoint} does not exist; run `samseg weights download {model_name}` "
            f"or place the file there by hand"
        )
    try:
        model: torch.nn.Module = build_sam2(config, str(checkpoint) if checkpoint else None, device=device, mode="eval")
    except (RuntimeError, KeyError, OSError, EOFError) as exc:
        raise ModelLoadError(f"cannot load {checkpoint} as {model_name}: {exc!r}") from exc
    return model


def write_random_checkpoint(model_name: str, path: Path, seed: int = 0) -> Path:
    """Write a randomly initialised checkpoint in the `{"model": state_dict}` format build_sam2 loads.

    Real SAM-2 weights cannot be downloaded in CI; this exercises the real loading code and model.
    """
    import torch

    torch.manual_seed(seed)
    model = build_model(model_name, None, "cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": model.state_dict()}, tmp)
    tmp.replace(path)
    return path
