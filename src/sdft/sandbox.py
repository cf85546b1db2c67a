"""Run untrusted Python programs (model-written code plus its tests) in a child process.

Used by the HumanEval benchmark:

    sdft eval --benchmarks humaneval --limit 20 --output-dir runs/e

Every program runs in a fresh temporary folder, which is its working directory,
``HOME`` and ``TMPDIR``, and which is deleted afterwards. Two isolation levels
exist, chosen once per process by ``isolation_level()``:

``namespaces`` needs Linux, root, and working ``unshare`` and ``setpriv`` from
util-linux. The child gets its own network namespace, where no interface is up,
so it has no network at all. Its own PID namespace means that killing the
namespace's first process kills every process the program started. Its own
mount namespace puts empty tmpfs mounts over ``/tmp``, ``/var/tmp``,
``/dev/shm`` and ``/run/lock``, with only its working folder bound back. It runs
as an unprivileged user ID of its own, so it cannot write to files owned by
other users.

``rlimits`` (anything else): the child runs as the calling user, protected only
by the resource limits and the Python guard below.

At both levels the child has resource limits (CPU time, address space,
processes, file size, open files), a new session whose process group is killed
with SIGKILL when the wall-clock limit passes, and a Python guard: a short
preamble that disables sockets, process creation, file removal and writes outside
the working folder before the program runs.

NOTE: the Python guard stops honest mistakes and careless model output, not
an attacker: ``ctypes`` is blocked, but any Python code can recover the
originals (for example through ``gc``). The namespaces level is the real
boundary. The rlimits level can be escaped by a deliberate program, and there
RLIMIT_NPROC does not apply to root.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

ISOLATION_LEVELS = ("namespaces", "rlimits")
STDERR_TAIL = 2000
"""Characters of the child's stderr kept in a result."""

# Exit codes of the preambles. Any other code, or a signal, counts as an error.
EXIT_FAILED = 65
EXIT_ERROR = 66
EXIT_CALLED_EXIT = 67
EXIT_CPU_LIMIT = 68
EXIT_SETUP_FAILED = 97
"""Exit code of the namespace setup script when a mount fails."""

SANDBOX_UID_BASE = 1_990_000_000
SANDBOX_UID_COUNT = 4096
"""Unprivileged user IDs for the namespaces level. Each run takes its own, so the
process limit counts only that run's processes. IDs this high are unused on
ordinary systems. A container whose user namespace does not map them falls back
to the rlimits level."""

PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
"""World-writable folders that get an empty, private tmpfs at the namespaces level."""


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program it ran)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one program run."""

    timeout: float = 10.0
    """Wall-clock seconds before the whole process group is killed."""
    cpu_seconds: int = 10
    """RLIMIT_CPU: the kernel sends SIGXCPU after this much CPU time."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS: address space in bytes. Larger allocations raise MemoryError."""
    processes: int = 16
    """RLIMIT_NPROC: processes and threads of the sandbox user (namespaces level)."""
    file_bytes: int = 16 << 20
    """RLIMIT_FSIZE: largest file the program may write, stdout and stderr included."""
    open_files: int = 64
    """RLIMIT_NOFILE."""
    python_guard: bool = True
    """Run the guard preamble. Turning it off is meant for testing the OS layers alone."""


@dataclass
class SandboxResult:
    """Outcome of one program run.

    Attributes:
        passed: The program ran to its end without an exception.
        status: ``passed``, ``failed`` (an AssertionError), ``timeout`` (wall-clock
            or CPU limit, or SIGKILL) or ``error`` (any other exception, exit or signal).
        stderr: The last ``STDERR_TAIL`` characters of the program's stderr.
        returncode: Exit code of the child; negative for a signal; None after a timeout.
        seconds: Wall-clock time of the run.
    """

    passed: bool
    status: str
    stderr: str
    returncode: int | None
    seconds: float


def run_programs(
    sources: list[str],
    limits: Limits | None = None,
    labels: list[str] | None = None,
    workers: int | None = None,
    isolation: str | None = None,
    description: str = "executing",
) -> list[SandboxResult]:
    """Run each program in its own sandbox, a few at a time, with a progress bar.

    Args:
        sources: Python source texts.
        limits: Limits of every run, ``Limits()`` when None.
        labels: Text added to each child's command line, so ``ps`` shows which
            program runs (e.g. a task id).
        workers: Programs run at once; ``min(4, os.cpu_count())`` when None.
        isolation: ``namespaces``, ``rlimits`` or None for ``isolation_level()``.
        description: Label of the progress bar.

    Returns:
        Results in the order of ``sources``.
    """
    labels = labels or [""] * len(sources)
    workers = workers or min(4, os.cpu_count() or 1)
    level = isolation or isolation_level()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(run_program, s, limits, label, level) for s, label in zip(sources, labels)
        ]
        with tqdm(total=len(futures), desc=description, unit="program") as progress:
            for future in futures:
                future.add_done_callback(lambda _: progress.update(1))
            results = [future.result() for future in futures]
    return results


def run_program(
    source: str, limits: Limits | None = None, label: str = "", isolation: str | None = None
) -> SandboxResult:
    """Run one Python program in a fresh sandbox and classify how it ended.

    Raises:
        SandboxError: the sandbox could not be set up (not a failure of the program).
    """
    limits = limits or Limits()
    level = isolation or isolation_level()
    if level not in ISOLATION_LEVELS:
        raise ValueError(
            f"isolation: unknown level {level!r}; valid levels: {', '.join(ISOLATION_LEVELS)}"
        )
    base = Path(tempfile.mkdtemp(prefix="sdft-sandbox-"))
    uid = next_sandbox_uid() if level == "namespaces" else None
    try:
        workdir = prepare_workdir(base, source, uid)
        started = time.perf_counter()
        returncode, timed_out = execute(base, workdir, limits, label, level, uid)
        seconds = time.perf_counter() - started
        stderr = read_tail(base / "stderr")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if returncode == EXIT_SETUP_FAILED:
        raise SandboxError(f"sandbox setup failed at the {level} level: {stderr.strip()}")
    status = classify(returncode, timed_out)
    return SandboxResult(
        status == "passed", status, stderr, None if timed_out else returncode, seconds
    )


def prepare_workdir(base: Path, source: str, uid: int | None) -> Path:
    """Create the program's working folder inside ``base`` and write the program there.

    ``base`` also receives the child's stdout and stderr files, which the child
    writes through inherited descriptors.
    """
    workdir = base / "work"
    workdir.mkdir()
    (workdir / "program.py").write_text(source, encoding="utf-8")
    if uid is not None:
        # The sandbox user owns its folder. It may pass through base (0711) to
        # reach it, which matters when base is not under a folder that gets a
        # private tmpfs, but it cannot list base.
        os.chown(workdir, uid, uid)
        os.chown(workdir / "program.py", uid, uid)
        os.chmod(base, 0o711)
    return workdir


def execute(
    base: Path, workdir: Path, limits: Limits, label: str, level: str, uid: int | None
) -> tuple[int, bool]:
    """Start the child, wait up to the wall-clock limit, kill its process group.

    Returns:
        The child's return code and whether the wall-clock limit ended it.
    """
    command = build_command(workdir, limits, label, level, uid)
    processes = limits.processes if level == "namespaces" else process_allowance(limits.processes)
    with open(base / "stdout", "wb") as stdout, open(base / "stderr", "wb") as stderr:
        try:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env=child_environment(workdir),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                # prepare_child makes only setrlimit and prctl calls, which take
                # no lock another thread could hold at fork time.
                preexec_fn=functools.partial(prepare_child, limits, processes),  # noqa: PLW1509
            )
        except OSError as err:
            raise SandboxError(f"could not start {command[0]}: {err}") from err
        timed_out = False
        try:
            process.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            if level == "namespaces":
                kill_namespace(process)
        # Kill the group even after a normal exit, so no background child stays.
        kill_group(process.pid)
        process.wait()
    returncode = process.returncode
    if level == "namespaces" and 128 < returncode < 128 + signal.NSIG:
        returncode = 128 - returncode  # the shell's 128 + N becomes -N, as from Popen
    return returncode, timed_out


def build_command(
    workdir: Path, limits: Limits, label: str, level: str, uid: int | None
) -> list[str]:
    """Return the child's argument list: the interpreter, wrapped in namespaces if chosen."""
    python = [sys.executable, "-I", "-B"]
    if limits.python_guard:
        python += ["-c", GUARD_PREAMBLE, "program.py"]
    else:
        python += ["-c", PLAIN_PREAMBLE, "program.py"]
    if label:
        python.append(label)
    if level == "rlimits":
        return python
    switch_user = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--no-new-privs",
        "--",
    ]
    return [
        "unshare",
        "--net",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--",
        "sh",
        "-c",
        NAMESPACE_SETUP,
        "sdft-sandbox",
        *switch_user,
        *python,
    ]


def child_environment(workdir: Path) -> dict[str, str]:
    """Return a small environment: no inherited secrets, HOME and TMPDIR in the folder."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "SDFT_SANDBOX_DIR": str(workdir),
    }


def prepare_child(limits: Limits, processes: int) -> None:
    """Run in the child between fork and exec: limits, then a parent-death signal."""
    apply_limits(limits, processes)
    kill_when_parent_exits()


def kill_when_parent_exits() -> None:
    """Ask Linux to SIGKILL the child when the thread that started it exits.

    This way a program does not outlive an sdft process that is killed. At the
    namespaces level this reaches unshare, whose --kill-child option passes it on.
    The worker thread that starts a child waits for it, so the signal only fires
    if that wait never ends.
    """
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def apply_limits(limits: Limits, processes: int) -> None:
    """Set the resource limits in the child between fork and exec.

    Soft and hard limits are equal, so the program cannot raise them. CPU time
    is the exception. SIGXCPU comes at the soft limit, and the preamble exits on
    it. SIGKILL follows one second later at the hard limit, for code that never
    returns to the interpreter loop. ``processes`` is the RLIMIT_NPROC value.
    """
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    for name, value in (
        (resource.RLIMIT_AS, limits.memory_bytes),
        (resource.RLIMIT_NPROC, processes),
        (resource.RLIMIT_FSIZE, limits.file_bytes),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(name, (value, value))


def process_allowance(extra: int) -> int:
    """Return RLIMIT_NPROC for a child that keeps the caller's user ID.

    RLIMIT_NPROC counts every process and thread of the user, so the limit must
    exceed what the user already runs. NOTE: the count is read from /proc and
    goes stale as other processes of the same user start or stop.
    """
    try:
        uid = os.getuid()
        tasks = 0
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                tasks += len(os.listdir(f"/proc/{entry.name}/task"))
    except OSError:
        return resource.RLIM_INFINITY
    return tasks + extra


def kill_namespace(process: subprocess.Popen) -> None:
    """Kill the first process of the child's PID namespace and wait for unshare to exit.

    The kernel then kills every other process of the namespace and reaps them
    before that first process is gone, so once unshare (its parent) has exited,
    nothing of the program is left. Killing unshare first instead would return
    while the program may still be running for a moment.
    """
    try:
        children = psutil.Process(process.pid).children()
    except psutil.NoSuchProcess:
        return
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        logger.warning(
            "sandbox: unshare (pid %d) still runs 10 s after its namespace was killed", process.pid
        )


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def classify(returncode: int, timed_out: bool) -> str:
    """Turn a return code into passed, failed, timeout or error."""
    # SIGKILL reaches the child from the CPU hard limit. The OOM killer could
    # send one too, but the address-space limit makes that unlikely.
    if timed_out or returncode in (EXIT_CPU_LIMIT, -signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == EXIT_FAILED:
        return "failed"
    return "error"


def read_tail(path: Path) -> str:
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        file.seek(max(0, file.tell() - 4 * STDERR_TAIL))
        text = file.read().decode("utf-8", errors="replace")
    return text[-STDERR_TAIL:]


PR_SET_PDEATHSIG = 1


def load_libc():
    """Load the C library for prctl before any fork, or return None outside Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_libc = load_libc()
_uid_counter = itertools.count()
_uid_lock = threading.Lock()


def next_sandbox_uid() -> int:
    """Return a user ID for one run, different for concurrent runs of this process."""
    with _uid_lock:
        step = next(_uid_counter)
    return SANDBOX_UID_BASE + (os.getpid() * 64 + step) % SANDBOX_UID_COUNT


@functools.lru_cache(maxsize=1)
def isolation_level() -> str:
    """Pick the strongest isolation level that works here, once per process.

    Probes the namespaces level with a trivial program. Any failure (not root,
    no ``unshare``, a container that forbids namespaces or mounts, an unmapped
    user ID, an interpreter the sandbox user cannot read) selects ``rlimits``
    and logs a warning with the reason.
    """
    reason = namespace_problem()
    if reason is None:
        return "namespaces"
    logger.warning(
        "sandbox: using the rlimits level (no network, mount or PID namespaces) because %s; "
        "run as root on Linux with util-linux installed for the namespaces level",
        reason,
    )
    return "rlimits"


def namespace_problem() -> str | None:
    """Return why the namespaces level cannot work here, or None when it does."""
    if not sys.platform.startswith("linux"):
        return f"the platform is {sys.platform}, not Linux"
    if os.geteuid() != 0:
        return "the process does not run as root"
    missing = [tool for tool in ("unshare", "setpriv", "sh", "mount") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH"
    try:
        result = run_program(
            "import os\nassert os.getuid() != 0\n", Limits(timeout=30), isolation="namespaces"
        )
    except SandboxError as err:
        return str(err)
    if not result.passed:
        return f"a probe program ended with status {result.status}: {result.stderr.strip()[-300:]}"
    return None


# Runs as root inside the new namespaces, before the user switch. Each world-
# writable folder gets an empty tmpfs, then the working folder is bound back to
# its own path. The shell's current directory is still the original folder, and
# /proc/self/cwd reaches it even once /tmp is covered; --no-canonicalize stops
# mount from turning that link into a path, which would name the new empty folder.
# The shell stays the namespace's first process and runs Python as its child:
# the kernel ignores SIGXCPU sent to a namespace's first process, and unshare
# does not report a child's signal, whereas the shell exits with 128 + signal.
NAMESPACE_SETUP = rf"""
fail() {{ echo "sdft sandbox setup: $1" >&2; exit {EXIT_SETUP_FAILED}; }}
for folder in {" ".join(PRIVATE_TMPFS)}; do
    if [ -d "$folder" ]; then
        mount -t tmpfs -o size=16m,mode=1777,nosuid,nodev sdft-sandbox "$folder" \
            || fail "tmpfs on $folder"
    fi
done
mkdir -p "$SDFT_SANDBOX_DIR" || fail "mkdir $SDFT_SANDBOX_DIR"
mount --no-canonicalize --bind /proc/self/cwd "$SDFT_SANDBOX_DIR" \
    || fail "bind mount of $SDFT_SANDBOX_DIR"
cd "$SDFT_SANDBOX_DIR" || fail "cd $SDFT_SANDBOX_DIR"
"$@"
exit $?
"""

# Runs the program without the guard, with the exit codes of GUARD_PREAMBLE.
PLAIN_PREAMBLE = rf"""
import os, signal, sys, traceback
signal.signal(signal.SIGXCPU, lambda *_: os._exit({EXIT_CPU_LIMIT}))
def _run(path):
    with open(path, encoding="utf-8") as file:
        code = compile(file.read(), path, "exec")
    exec(code, {{"__name__": "__main__"}})
try:
    _run(sys.argv[1])
    _code = 0
except AssertionError:
    traceback.print_exc(); _code = {EXIT_FAILED}
except SystemExit as exit:
    print(f"program called exit({{exit.code!r}}) before its end", file=sys.stderr)
    _code = {EXIT_CALLED_EXIT}
except BaseException:
    traceback.print_exc(); _code = {EXIT_ERROR}
sys.stdout.flush(); sys.stderr.flush()
os._exit(_code)
"""

# The Python guard: compile the program, disable dangerous functions, run it.
# Writes, removals, renames and permission changes are allowed only below the
# working folder. Reads stay allowed, since imports and the standard library
# need them. Process creation, signals to other processes and sockets are disabled.
GUARD_PREAMBLE = rf"""
import builtins, io, os, posix, shutil, signal, socket, _socket, subprocess, sys, traceback
_exit, _open, _os_open, _FileIO = os._exit, builtins.open, os.open, io.FileIO
signal.signal(signal.SIGXCPU, lambda *_: _exit({EXIT_CPU_LIMIT}))
_realpath, _getcwd = os.path.realpath, os.getcwd

def _disabled(name):
    def raise_disabled(*args, **kwargs):
        raise PermissionError(f"{{name}} is disabled in the sdft sandbox")
    return raise_disabled

def _check_write(path):
    if isinstance(path, int):
        return
    root = _realpath(_getcwd_at_start)
    target = _realpath(os.fsdecode(os.fspath(path)))
    if target != root and not target.startswith(root + os.sep):
        raise PermissionError(
            f"writing {{target}} is disabled in the sdft sandbox: "
            f"only files under {{root}} may be written"
        )

def _writes(mode):
    return not isinstance(mode, str) or any(flag in mode for flag in "wax+")

def _guarded_open(file, mode="r", *args, **kwargs):
    if _writes(mode):
        _check_write(file)
    return _open(file, mode, *args, **kwargs)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS:
        _check_write(path)
    return _os_open(path, flags, *args, **kwargs)

class _GuardedFileIO(_FileIO):
    def __init__(self, file, mode="r", *args, **kwargs):
        if _writes(mode):
            _check_write(file)
        super().__init__(file, mode, *args, **kwargs)

_PATH_FUNCTIONS = (
    "remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "truncate", "chmod", "lchmod",
    "chown", "lchown", "mkfifo", "mknod", "utime",
)
_TWO_PATH_FUNCTIONS = ("rename", "renames", "replace", "link", "symlink")
_DISABLED_OS = (
    "system", "popen", "fork", "forkpty", "kill", "killpg", "_exit", "abort", "fchmod", "fchown",
    "ftruncate", "chroot", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
    "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
    "spawnvpe", "posix_spawn", "posix_spawnp", "setuid", "seteuid", "setreuid", "setresuid",
    "setgid", "setegid", "setregid", "setresgid", "setsid", "setpgid", "setpgrp",
)
_DISABLED = {{
    subprocess: (
        "Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput",
    ),
    socket: (
        "socket", "socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo",
    ),
    _socket: ("socket", "socketpair", "fromfd", "getaddrinfo"),
}}

def _resolve(path, dir_fd):
    # shutil.rmtree removes entries relative to an open folder: check the real path.
    if dir_fd is None or isinstance(path, int):
        return path
    return os.path.join(os.readlink(f"/proc/self/fd/{{dir_fd}}"), os.fsdecode(path))

def _checked(function, count):
    def checked(*args, **kwargs):
        if count > 1 and {{"src_dir_fd", "dst_dir_fd"}} & set(kwargs):
            raise PermissionError("renames relative to a dir_fd are disabled in the sdft sandbox")
        for path in args[:count]:
            _check_write(_resolve(path, kwargs.get("dir_fd")))
        return function(*args, **kwargs)
    return checked

def _guard():
    builtins.open = io.open = _guarded_open
    os.open = posix.open = _guarded_os_open
    io.FileIO = _GuardedFileIO
    # os re-exports the functions of posix: replace them in both modules.
    for module in (os, posix):
        for names, count in ((_PATH_FUNCTIONS, 1), (_TWO_PATH_FUNCTIONS, 2)):
            for name in names:
                if hasattr(module, name):
                    setattr(module, name, _checked(getattr(module, name), count))
        for name in _DISABLED_OS:
            if hasattr(module, name):
                setattr(module, name, _disabled(f"os.{{name}}"))
    for module, names in _DISABLED.items():
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _disabled(f"{{module.__name__}}.{{name}}"))
    for name in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "resource"):
        sys.modules[name] = None

def _run(path):
    with _open(path, encoding="utf-8") as file:
        code = compile(file.read(), path, "exec")
    _guard()
    exec(code, {{"__name__": "__main__"}})

_getcwd_at_start = _getcwd()
try:
    _run(sys.argv[1])
    _code = 0
except AssertionError:
    traceback.print_exc(); _code = {EXIT_FAILED}
except SystemExit as exit:
    print(f"program called exit({{exit.code!r}}) before its end", file=sys.stderr)
    _code = {EXIT_CALLED_EXIT}
except BaseException:
    traceback.print_exc(); _code = {EXIT_ERROR}
sys.stdout.flush(); sys.stderr.flush()
_exit(_code)
"""
