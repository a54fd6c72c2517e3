"""Stopping a training run cleanly on SIGINT / SIGTERM / SIGUSR1.

SLURM sends SIGTERM before it kills or preempts a job (and `--signal=USR1@SECONDS` sends SIGUSR1
ahead of the time limit); Ctrl-C sends SIGINT. The handler only records the signal: the training
loop asks `StopRequest.agreed()` once per step, a one-element all-reduce over the world, so that
every rank stops after the same step (a signal may reach the ranks at different times, or only
some of them), saves, and exits 0. A second signal while a stop is pending aborts at once
(exit 130 for SIGINT, 128 + signal number otherwise), except within `SAME_SIGNAL_S` of the
first: torchrun passes the terminal's Ctrl-C (and SLURM's SIGTERM) on to its workers, which
already received it themselves, and that copy is not a second request. megatron-tsp's own
launcher keeps its workers out of the terminal's process group and aborts them itself at a
second Ctrl-C, so there a second Ctrl-C aborts however soon it comes (docs/training.md).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)
SAME_SIGNAL_S = 1.0


class StopRequest:
    """Catches the stop signals while installed (a context manager; main thread only, a no-op
    elsewhere) and restores the previous handlers on exit."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None  # when this process itself got its first one
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received_at is None:
            self.signum = self.signum or signum
            self.received_at = time.monotonic()
            return
        if time.monotonic() - self.received_at < SAME_SIGNAL_S:
            return  # the launcher passing on the signal this process already has
        # A second request: abort now, without saving (a checkpoint being written stays a
        # temporary directory, removed at the next start).
        os._exit(130 if signum == signal.SIGINT else 128 + signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def agreed(self, device=None) -> Optional[int]:
        """The signal that any rank received (the largest number), or None: the same answer on
        every rank. A collective: call it on every rank at the same point of every step."""
        flag = torch.tensor([self.signum or 0], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        if signum and self.signum is None:  # another rank got it: this one stops as well
            self.signum = signum
        return signum or None
