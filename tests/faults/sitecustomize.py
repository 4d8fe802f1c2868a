"""Test-only fault injection inside a real samseg worker process (loaded by Python at start-up).

tests/system/test_faults_callback.py puts this directory first on a worker's PYTHONPATH, so Python imports this
module in the worker and in every pool child. It does nothing unless SAMSEG_TEST_FAULT is set:

    SAMSEG_TEST_FAULT="oom_above_batch:N"

makes SAM-2's prompt encoder (`sam2.modeling.sam.prompt_encoder.PromptEncoder.forward`) raise
`torch.OutOfMemoryError("CUDA out of memory (injected)")` whenever it is called with more than N prompts
at once, i.e. at the start of every prompt batch the mask generator decodes (its `points_per_batch`). The
prompt encoder is the hook because both of samseg's generators call it once per batch: SAM-2's own
(`SAM2ImagePredictor._predict`, which then calls `MaskDecoder.forward`) and samseg.runtime.amg's fast one (which
runs the decoder's parts itself and never calls `MaskDecoder.forward`). That is the only fault the test
suite injects inside a process, because the real one — a GPU running out of memory during the batched
decode — cannot happen on a CPU-only machine.

    SAMSEG_TEST_FAULT="slow_prompt:SECONDS"

makes the same hook sleep SECONDS before every prompt batch (one marker line per sleep, as above): a segment
stage that runs past SAMSEG_SEGMENT_TIME_LIMIT_SECONDS while inside the model, the way a huge image or a
throttled GPU would (tests/system/test_faults_delivery.py). Celery's soft time limit interrupts the sleep.

The patch is applied when SAM-2 imports the module (an import hook), so torch is not imported early: the
worker's main process must not touch torch before Celery forks its pool.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any

TARGET = "sam2.modeling.sam.prompt_encoder"
MARKER = "samseg_test_fault_injected"


def _fault() -> tuple[str, float] | None:
    spec = os.environ.get("SAMSEG_TEST_FAULT", "")
    kind, _, value = spec.partition(":")
    if kind not in ("oom_above_batch", "slow_prompt"):
        return None
    return kind, float(value)


def _patch(module: ModuleType, fault: tuple[str, float]) -> None:
    kind, value = fault
    limit = int(value)
    encoder = module.PromptEncoder
    original = encoder.forward

    @functools.wraps(original)
    def forward(self: Any, points: Any = None, boxes: Any = None, masks: Any = None) -> Any:
        batch = int(self._get_batch_size(points, boxes, masks))
        if kind == "slow_prompt":
            import time

            sys.stderr.write(f"{MARKER} slow_prompt seconds={value} batch={batch} pid={os.getpid()}\n")
            sys.stderr.flush()
            time.sleep(value)
        elif batch > limit:
            import torch

            # One line per injected fault, so a test can tell the injection happened (stderr → worker log).
            sys.stderr.write(f"{MARKER} batch={batch} limit={limit} pid={os.getpid()}\n")
            sys.stderr.flush()
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (injected): prompt batch {batch} > {limit}. Tried to allocate 2.00 GiB"
            )
        return original(self, points, boxes, masks)

    encoder.forward = forward


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, fault: tuple[str, float]) -> None:
        self.fault = fault

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module
        fault = self.fault

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _patch(module, fault)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


_configured = _fault()
if _configured is not None:
    sys.meta_path.insert(0, _PatchOnImport(_configured))
