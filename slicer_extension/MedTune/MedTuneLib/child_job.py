"""The Slicer module's child processes: own process group, console output to a log file, its last line as the
one-line error, wait with a timeout, and cancel that kills the whole process tree.

:class:`ChildJob` is the base of the jobs that run one child at a time and are polled from a UI timer: fine-tuning
(:mod:`.finetune_logic`), a study (:mod:`.study_logic`) and the first-use installer (:mod:`.dependencies`);
``medtune export`` (:mod:`.run_logic`) starts its child with :func:`spawn` too. A child starts in its own process
group (POSIX session / Windows process group) so that :func:`kill_process_tree` reaches everything it started
(DataLoader workers, a study's run workers). Nothing here imports Qt or torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from medtune.errors import MedTuneError


def spawn(command: list[str], log: IO[bytes], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``command`` in its own process group, console output (stdout + stderr) to ``log``, no stdin."""
    kwargs: dict[str, Any] = {"stdout": log, "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL, "env": env}
    if os.name == "nt":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]  # Windows-only constant
    else:
        kwargs["start_new_session"] = True  # own process group: cancel kills workers too
    return subprocess.Popen(command, **kwargs)  # noqa: S603 - our own CLI / pip, never a string from data


def last_line(path: str | Path | None) -> str:
    """The last non-empty line of a log file (at most 300 characters; empty when there is none)."""
    if path is None:
        return ""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), "")[:300]


class ChildJob:
    """One child process at a time: ``start`` (subclass) -> ``poll`` (subclass, from a UI timer) -> finished.

    Subclasses hold a ``state`` with a ``finished`` flag, implement :meth:`poll`, and start their child through
    :meth:`_open_log` + :meth:`_spawn`. ``what`` names the job in messages (``"<what> exited with code 1"``).
    """

    what = "the job"
    state: Any

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self._log_fh: IO[bytes] | None = None
        self._log_file: Path | None = None

    @property
    def log_path(self) -> Path | None:
        """The current child's console log."""
        return self._log_file

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self.process is not None and self.process.poll() is None

    def _open_log(self, path: Path, mode: str = "ab", folder: str = "folder") -> None:
        """Open the child's console log (creating its folder); a one-line error when ``folder`` is not writable."""
        self._close_log()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(path, mode)  # noqa: SIM115 - closed in _close_log
        except OSError as exc:
            raise MedTuneError(f"{folder} is not writable ({exc.strerror})", path.parent) from exc
        self._log_file = path

    def _spawn(self, command: list[str], env: dict[str, str] | None = None) -> None:
        """Start ``command`` with its output going to the log opened by :meth:`_open_log`."""
        assert self._log_fh is not None, "_open_log first"
        self.command = command
        self.process = spawn(command, self._log_fh, env)

    def poll(self) -> Any:
        raise NotImplementedError

    def wait(self, timeout: float | None = None, interval: float = 0.5) -> Any:
        """Poll until the job finishes (for scripts and tests; the Widget polls from a timer instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll().finished:
            if deadline is not None and time.monotonic() > deadline:
                self._on_timeout()
                raise TimeoutError(f"{self.what} did not finish within {timeout} s")
            time.sleep(interval)
        return self.state

    def _on_timeout(self) -> None:
        """What :meth:`wait` does before raising ``TimeoutError`` (nothing: the child runs on)."""

    def last_log_line(self) -> str:
        """The last non-empty line of the child's console output (a one-line error for the UI)."""
        return last_line(self.log_path)

    def _exit_error(self, code: int) -> str:
        """The one-line error of a child that exited with ``code`` != 0."""
        return self.last_log_line() or f"{self.what} exited with code {code}"

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None


class CliJob(ChildJob):
    """A ``python -m medtune ...`` child (the CLI users run) working in the folder ``settings.out``; its console
    output goes to ``<folder>/<log_name>``, with the extension's own ``medtune`` first on ``PYTHONPATH``."""

    log_name: str  # the console log in the folder (each job names its own)

    def __init__(self, settings: Any, python: str | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.python = python or sys.executable

    @property
    def folder(self) -> Path:
        return Path(self.settings.out)

    @property
    def log_path(self) -> Path:
        return self.folder / self.log_name

    def _spawn_cli(self, command: list[str]) -> None:
        """Start ``command`` (after :meth:`_open_log`), unbuffered so that its last log line is current."""
        from .support import child_env

        self._spawn(command, dict(child_env(), PYTHONUNBUFFERED="1"))


# ------------------------------------------------------------------------------------------- process tree


def descendant_pids(pid: int) -> list[int]:
    """Pids of all processes below ``pid`` (psutil when available, else ``/proc`` on Linux)."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - process already gone
        return []
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = entry.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            text = stat.read_text()
        except OSError:
            return False
        return text[text.rfind(")") + 2 :].split()[0] != "Z"
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    except OSError:
        return False
    return True


def kill_process_tree(process: subprocess.Popen, grace: float = 5.0) -> None:
    """Terminate ``process`` and all its descendants; kill what is left after ``grace`` seconds."""
    if os.name == "nt":  # taskkill walks the tree on Windows
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        process.wait(timeout=grace + 5)
        return
    tree = descendant_pids(process.pid)
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        pgid = None
    own_group = pgid is not None and pgid != os.getpgid(0)
    _signal_all(process.pid, tree, pgid if own_group else None, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in tree):
        time.sleep(0.1)
    _signal_all(process.pid, tree + descendant_pids(process.pid), pgid if own_group else None, signal.SIGKILL)
    process.wait(timeout=grace + 5)


def _signal_all(pid: int, tree: list[int], pgid: int | None, sig: int) -> None:
    if pgid is not None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for p in [pid, *tree]:  # members that left the group (setsid) still belong to the tree
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass
