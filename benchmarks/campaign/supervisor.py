"""Run one command to a deadline: its output goes straight into the campaign log (so a call cut off still returns
what it printed), and at the deadline it gets SIGINT (a `cntk run` stops between tiles, pytest prints its summary),
then SIGKILL when it has not exited after a grace period. The clock is a parameter: tests drive it by the command's
progress (what it has written to the log), never by the wall clock."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

GRACE_S = 20     # an interrupted command gets this long to finish (a `cntk run` its in-flight tile records)
POLL_S = 0.2     # how often the supervisor looks at the command and the clock


class OutOfTime(RuntimeError):
    """The command was stopped at its deadline; `output` holds what it printed."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


class CommandFailed(RuntimeError):
    """The command exited non-zero, or a command that cannot resume was stopped at its deadline."""


@dataclass
class Supervisor:
    """Runs commands from `cwd`, appending each command line and its output to `log`."""
    log: Path
    cwd: Path
    clock: Callable[[], float] = time.monotonic
    grace_s: float = GRACE_S
    poll_s: float = POLL_S

    def note(self, text: str) -> None:
        with open(self.log, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def run(self, args: list[str], *, seconds: float, env: dict | None = None, resumable: bool = False) -> str:
        """Run `args` for at most `seconds` on the clock; return its stdout and stderr (as written to the log).

        At the deadline: SIGINT to the command's process group, SIGKILL `grace_s` later if still running; then
        OutOfTime (resumable: the caller records it and carries on) or CommandFailed. A command that still exits 0
        after the SIGINT counts as finished. A non-zero exit raises CommandFailed with the last output line.
        """
        self.note(f"$ {' '.join(map(str, args))}")
        start = self.log.stat().st_size
        deadline = self.clock() + max(seconds, 0)
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(list(map(str, args)), cwd=self.cwd, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            interrupted_at = None
            while proc.poll() is None:
                now = self.clock()
                if interrupted_at is None and now >= deadline:
                    self._signal(proc, signal.SIGINT)
                    interrupted_at = now
                elif interrupted_at is not None and now >= interrupted_at + self.grace_s:
                    self._signal(proc, signal.SIGKILL)
                time.sleep(self.poll_s)
        with open(self.log, "rb") as f:
            f.seek(start)
            output = f.read().decode(errors="replace")
        if proc.returncode != 0 and interrupted_at is not None:
            message = f"stopped at its {seconds:.0f} s deadline (budget)"
            if resumable:
                raise OutOfTime(message, output)
            raise CommandFailed(message)
        if proc.returncode != 0:
            last = [line for line in output.splitlines() if line.strip()][-1:] or ["(no output)"]
            raise CommandFailed(f"exit {proc.returncode}: {last[0][:300]}")
        return output

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:   # exited between the poll and the signal
            pass
