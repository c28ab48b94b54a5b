"""What the `offseg` command sets before PyTorch loads: idle OpenMP threads sleep instead of spin.

PyTorch's CPU kernels run on an OpenMP thread pool (GNU libgomp in the PyPI wheels). Between
parallel regions its threads spin-wait, and every region waits for its slowest thread. On a
machine where another process is busy, one of our threads shares a core with it: the others spin
through whole scheduler time slices waiting for it, and a training iteration took about 10x as
long as on the idle machine. With OMP_WAIT_POLICY=PASSIVE idle threads sleep at once, the core
they leave free is used, and the slowdown stays near the share of the machine we lost.

libgomp reads the variable once, when it is loaded (when torch is imported), so it must be set
before that: the `offseg` command does it here, first thing in `import offseg`, unless the
environment already sets it. A program that imports offseg (or torch) itself keeps PyTorch's
default; set `OMP_WAIT_POLICY=PASSIVE` in its environment, or in `os.environ` before the first
`import torch` (docs/benchmarks.md, "Busy machines", measures both).
"""

from __future__ import annotations

import os
import sys

CLI_MODULE = "offseg.cli.main"


def launched_as_cli() -> bool:
    """True in the `offseg` console script and in `python -m offseg.cli.main` (also under torchrun)."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    if script in ("offseg", "offseg.exe", "offseg-script.py"):
        return True
    argv = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b == CLI_MODULE for a, b in zip(argv, argv[1:], strict=False))


def set_cli_defaults() -> None:
    """OMP_WAIT_POLICY=PASSIVE for the command line, unless set; only before torch is loaded."""
    if launched_as_cli() and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
