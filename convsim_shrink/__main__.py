"""``python -m convsim_shrink``: the command line (see :mod:`convsim_shrink.cli`)."""

from .cli import main

main()
