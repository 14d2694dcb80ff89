"""Compatibility only: the pipeline's names before it became stage functions and a runner.

The stages live in :mod:`convsim_shrink.stages`, their order, skipping and resuming in
:mod:`convsim_shrink.runner` (``Pipeline`` is its ``Runner``).  Nothing inside the package imports this
module.
"""

from .runner import STAGES, Pipeline, Runner, ShrinkResult, default_run_dir, shrink

__all__ = ["STAGES", "Pipeline", "Runner", "ShrinkResult", "default_run_dir", "shrink"]
