"""The pipeline: stage functions, the runner that orders them, the run state, preflight and the report."""
