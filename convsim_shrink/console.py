"""The one rich console every part of the tool prints through (stderr, so stdout stays clean)."""

from rich.console import Console

# soft_wrap: a long line stays one line in a log file (rich would break it at 80 columns off a terminal)
console = Console(stderr=True, highlight=False, soft_wrap=True)
