"""The one rich console every part of the tool prints through (stderr, so stdout stays clean)."""

from rich.console import Console

console = Console(stderr=True, highlight=False)
