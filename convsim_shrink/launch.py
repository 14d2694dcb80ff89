"""The command line's ``--nproc N``: start ``N`` processes of this command on this machine through
``torch.distributed.run`` (what the ``torchrun`` command runs).  What the processes do together once
started (the process group, all-reduces, DistributedDataParallel) is
:mod:`convsim_shrink.train.distributed`'s."""

from __future__ import annotations

import os


def strip_option(args: list[str], name: str) -> list[str]:
    """``args`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def launch(nproc: int, args: list[str]) -> int:
    """Run ``python -m convsim_shrink ARGS`` in ``nproc`` processes on this machine through
    ``torch.distributed.run`` (what the ``torchrun`` command runs, ``--standalone``).  Each process gets
    ``cpu_count / nproc`` threads unless ``OMP_NUM_THREADS`` is set.  Returns 0, or the first failing
    process's exit code after one line naming it (its own message, from rank 0, is printed above)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from .console import console

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    torchrun_args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "convsim_shrink", *args]
    )
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)  # its failure table repeats what the processes printed
    try:
        run(torchrun_args)
    except ChildFailedError as exc:
        rank_, first = exc.get_first_failure()
        code = first.exitcode if first.exitcode > 0 else 1
        console.print(f"[bold red]error:[/] process {rank_} of {nproc} failed first (exit code {code}); every process has stopped", soft_wrap=True)
        return code
    finally:
        agent_log.setLevel(level)
    return 0
