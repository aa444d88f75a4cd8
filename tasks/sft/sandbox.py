"""A sandbox for code a language model writes: the Python behind InternLM2's ``<|interpreter|>`` tool.

`run_python(code, cfg)` runs `code` in a fresh interpreter in a separate process and returns its stdout, stderr and
exit status, cut to `max_output_chars`, with a note when it was stopped (`SandboxResult.text` is what the model
sees). It raises `SandboxError` only when the sandbox itself cannot run. Layers, outermost first; a result's
``isolation`` names the ones that were in force, and `isolation_available()` says which this machine allows:

- Kernel namespaces (Linux, made by util-linux's `unshare`; bubblewrap would do the same job, but is not installed
  here). As root we make ``mount_ns``, ``pid_ns``, ``net_ns``, ``ipc_ns`` and ``uts_ns`` directly; other users need
  unprivileged user namespaces (``user_ns``). ``private_root``: the program sees a read-only tmpfs holding
  read-only bind mounts of ``/usr`` (and ``/lib*``, ``/bin``, ``/sbin``), of the Python installation and, with
  ``site_packages=True``, of the site-packages directories; ``/dev/{null,zero,random,urandom}``; and its work
  directory ``/sandbox``, a tmpfs of 4 × `max_file_mb` mounted ``noexec``. No ``/etc``, ``/home``, ``/proc``,
  ``/sys`` or ``/tmp`` of the host, nothing of the directory the Python installation lives in but that
  installation: the host's files are not there to read, whatever the code does, native code included. No network
  device but a loopback that is down. Its own process tree, so it cannot see or signal the host's processes; pid 1
  is a small init that ends the namespace (killing everything in it) when the program ends, when we send it
  SIGTERM, or `wall_s` + 5 s after the start if our process is gone. Before the program starts, every capability
  is dropped (empty bounding set, ``no_new_privs``) and, when we are root, the uid becomes ``nobody`` (65534):
  ``unprivileged``. This is the wall.
- ``rlimits``: CPU seconds (``SIGXCPU``, reported as ``timed_out``), address space (`memory_mb`: big allocations
  raise `MemoryError`), file size (`max_file_mb`: writes past it fail with ``EFBIG``), tasks (`max_procs`
  processes + threads; the kernel counts them per uid, so for ``nobody`` and in the fallback we add the tasks that
  uid already runs, and two sandboxes running at once share the allowance; in a user namespace the count is that
  namespace's), 256 open files, no core dumps.
- ``audit_hook`` (PEP 578), installed by a small bootstrap before the program runs, refuses: opening files for
  writing outside the work directory; reading outside it and Python's own library (plus the site-packages
  directories when allowed); opening directories outside it, changing into them, relative paths with ``..``,
  symlinks and hard links; sqlite files outside it; socket ``connect``/``bind``/``sendto`` and name look-ups
  (unless ``network=True``); starting programs (``subprocess``, ``os.system``, ``os.exec*``, ``os.posix_spawn``,
  ``_posixsubprocess.fork_exec``), ``os.fork``, signalling any process but itself; ``ctypes`` and ``cffi``, native
  modules from the work directory, sub-interpreters; ``gc.get_objects``/``get_referrers`` (they would reach the
  interpreter's hook list) and replacing a function's ``__code__``. Its policy lives in immutable objects, and its
  code looks up no global or builtin name (a test checks), so a program that rebinds builtins, ``os.path`` or
  module globals, or digs the hook's frame out of a traceback, changes nothing. It runs in both modes and is what
  the model meets when it tries something: a `PermissionError` or `ImportError` in its traceback.
- Always: its own session, and at the wall clock (`wall_s`), or once a stream passes 256 × `max_output_chars` bytes
  (output is read incrementally and only `max_output_chars` of each stream is kept), the run is stopped with
  SIGKILL to its process group (namespaced: SIGTERM to the init, then SIGKILL if that did not end it); an
  environment with nothing of ours in it (``PATH``, ``LANG``, ``HOME`` and ``TMPDIR`` = the work directory, BLAS on
  one thread); ``python -I -S -B -u``: no ``PYTHON*`` variables, no site-packages (standard library only unless
  ``site_packages=True``), no byte-code files; a private temporary work directory, removed afterwards.

The fallback, where namespaces are not available (or ``namespaces=False``), is rlimits + audit hook + the rest.
It does not isolate the file system or the network at the kernel level. The audit hook stops Python's own ways to
reach them, but PEP 578 hooks are not a security boundary: native code (a C extension from site-packages, or a bug
in one) gets past it, and so do interpreter paths no event covers (``signal.pidfd_send_signal``; ``os.stat`` of
host paths, so their existence and metadata leak). As root, the fallback child stays root (the interpreter may
live where ``nobody`` cannot read it, as here under ``/root``) and root ignores ``RLIMIT_NPROC``. The work directory
is on the host's disk: each file's size is bounded, not their number. A process that escaped by native ``fork`` +
``setsid`` would survive the kill, and if our process dies, nothing enforces the wall clock (the CPU limit still
holds). Run untrusted code in the fallback only on a machine you can throw away.
"""

from __future__ import annotations

import functools
import json
import math
import os
import selectors
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field

from infra.settings import get_logger

log = get_logger(__name__)

WORK_IN_NS = "/sandbox"
NOBODY = 65534
MARKER = "lmforge-sandbox"
OUTPUT_KILL_FACTOR = 256  # a stream past this many × max_output_chars bytes stops the run
MAX_OPEN_FILES = 256
WORK_DISK_FACTOR = 4  # the namespaced work dir is a tmpfs of this many × max_file_mb
LAYERS = ("rlimits", "audit_hook", "user_ns", "mount_ns", "pid_ns", "net_ns", "ipc_ns", "uts_ns", "private_root",
          "unprivileged")
_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
_DEVICES = ("null", "zero", "random", "urandom")
_TOOL_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
_GRACE_S = 2.0  # after a kill, how long to wait for the pipes to close
WATCHDOG_SLACK_S = 5  # a namespaced init stops its program this long after the wall clock if we could not
STDERR_TAIL_LINES, STDERR_TAIL_CHARS = 15, 1500  # how much of stderr `SandboxResult.text` shows on failure


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the code in it): could not start, or its namespace setup broke."""


class SandboxConfig(BaseModel):
    """Limits for one run of model-written code."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    wall_s: float = Field(10.0, gt=0, le=3600, description="wall-clock limit in seconds: the process group is killed")
    cpu_s: float = Field(5.0, gt=0, le=3600, description="CPU limit in seconds (RLIMIT_CPU, rounded up)")
    memory_mb: int = Field(512, ge=32, le=1 << 20, description="address-space limit (RLIMIT_AS) in MiB")
    max_file_mb: int = Field(16, ge=1, le=1 << 20, description="largest file the code may write (RLIMIT_FSIZE), MiB")
    max_procs: int = Field(64, ge=1, le=4096, description="processes + threads the code may add (RLIMIT_NPROC)")
    max_output_chars: int = Field(4000, ge=1, le=10_000_000, description="stdout/stderr kept, in characters, each")
    network: bool = Field(False, description="allow sockets and the host network (off: no network at all)")
    namespaces: bool = Field(True, description="use kernel namespaces where available; False forces the fallback")
    site_packages: bool = Field(False, description="let the code import this environment's installed packages")


@dataclass(frozen=True)
class SandboxResult:
    """What a run produced. ``exit_code`` is None when the sandbox stopped the run (wall clock, output limit); a
    negative value is a signal (``-24``: the CPU limit)."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    truncated: bool
    isolation: str  # the layers in force, "+"-joined (see LAYERS)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def text(self) -> str:
        """The tool result a model sees: stdout, then (on failure) the end of stderr, then a note on how it ended."""
        parts = [self.stdout.rstrip("\n")] if self.stdout.strip() else []
        if self.stderr.strip() and not self.ok:
            tail = self.stderr.rstrip("\n").splitlines()[-STDERR_TAIL_LINES:]
            parts.append("\n".join(tail)[-STDERR_TAIL_CHARS:])
        note = self._note()
        if note:
            parts.append(note)
        return "\n".join(parts)

    def _note(self) -> str:
        if self.timed_out and self.exit_code is None:
            return "[stopped: wall-clock limit reached]"
        if self.timed_out:
            return "[stopped: CPU time limit reached]"
        if self.exit_code is None:
            return "[stopped: output limit reached]"
        notes = []
        if self.exit_code < 0:
            notes.append(f"[killed by signal {_signal_name(-self.exit_code)}]")
        elif self.exit_code > 0:
            notes.append(f"[exit status {self.exit_code}]")
        if self.truncated:
            notes.append("[output truncated]")
        return " ".join(notes)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# ------------------------------------------------------------------------------------------- running


def run_python(code: str, cfg: SandboxConfig | None = None, *, stdin: str = "") -> SandboxResult:
    """Run `code` (a Python program) in the sandbox; `stdin` is what it reads from standard input. Raises
    `SandboxError` when the sandbox cannot run (not when the program fails: that is in the result)."""
    if not isinstance(code, str) or not isinstance(stdin, str):
        raise ValueError(f"code and stdin must be str, got {type(code).__name__} and {type(stdin).__name__}")
    cfg = cfg or SandboxConfig()
    layers = _layers(cfg)
    host_dir = Path(tempfile.mkdtemp(prefix=f"{MARKER}-"))
    try:
        if "private_root" in layers:
            launch = _ns_launch(cfg, host_dir, userns="user_ns" in layers)
        else:
            launch = _plain_launch(cfg, host_dir)
        return _execute(launch, _payload(code, stdin), cfg, "+".join(layers))
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def _payload(code: str, stdin: str) -> bytes:
    """What the bootstrap reads on fd 0: the program's length in bytes, a newline, the program, then its stdin."""
    encoded = code.encode("utf-8")
    return b"%d\n" % len(encoded) + encoded + stdin.encode("utf-8")


def _layers(cfg: SandboxConfig) -> list[str]:
    available = isolation_available() if cfg.namespaces else _fallback_layers()
    layers = [name for name in LAYERS if available[name]]
    return [name for name in layers if not (cfg.network and name == "net_ns")]


@dataclass(frozen=True)
class _Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    status: tuple[int, int] | None = None  # namespaced runs: (read, write) ends of the pipe the init reports on


def _interpreter() -> str:
    """The real interpreter binary (a venv's `python` is a symlink to it; -I -S then leaves the venv out)."""
    return os.path.realpath(sys.executable)


def _site_dirs() -> list[str]:
    return sorted({os.path.realpath(p) for p in site.getsitepackages() if os.path.isdir(p)})


def _env(work: str) -> dict[str, str]:
    """Nothing of ours: no credentials, tokens or HOME. Threads are kept cheap: BLAS libraries stay on one (threads
    count as processes for RLIMIT_NPROC) and glibc keeps two malloc arenas (each new one reserves 64 MiB of the
    address space that RLIMIT_AS counts)."""
    threads = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work,
            "MALLOC_ARENA_MAX": "2", **threads}


def _tasks_of(uid: int) -> int:
    """Tasks (processes and threads) whose real uid is `uid`: what RLIMIT_NPROC counts."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


def _rlimits(cfg: SandboxConfig, nproc: int) -> list[tuple[str, int, int]]:
    cpu = math.ceil(cfg.cpu_s)
    memory, file_size = cfg.memory_mb << 20, cfg.max_file_mb << 20
    return [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", memory, memory), ("RLIMIT_FSIZE", file_size, file_size),
            ("RLIMIT_NPROC", nproc, nproc), ("RLIMIT_NOFILE", MAX_OPEN_FILES, MAX_OPEN_FILES), ("RLIMIT_CORE", 0, 0)]


def _child_argv(cfg: SandboxConfig, work: str, nproc: int) -> list[str]:
    """The sandboxed interpreter and its bootstrap (`_BOOTSTRAP`), configured by one JSON argument."""
    spec = {"work": work, "site": _site_dirs() if cfg.site_packages else [], "network": cfg.network,
            "rlimits": _rlimits(cfg, nproc)}
    return [_interpreter(), "-I", "-S", "-B", "-u", "-X", "utf8", "-c", _BOOTSTRAP, MARKER, json.dumps(spec)]


def _plain_launch(cfg: SandboxConfig, host_dir: Path) -> _Launch:
    work = os.path.realpath(host_dir)
    nproc = _tasks_of(os.getuid()) + cfg.max_procs + 1
    return _Launch(_child_argv(cfg, work, nproc), _env(work), work)


def _binds(cfg: SandboxConfig) -> tuple[list[tuple[str, str]], list[str]]:
    """(symlinks to recreate, directories to bind read-only) for the private root."""
    links, dirs = [], []
    for name in _SYSTEM_DIRS:
        path = f"/{name}"
        if os.path.islink(path):
            links.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            dirs.append(path)
    exe = _interpreter()
    extra = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)} | {os.path.dirname(exe)}
    if cfg.site_packages:
        extra |= set(_site_dirs())
    for path in sorted(extra, key=len):
        if not any(path == d or path.startswith(d + "/") for d in dirs):
            dirs.append(path)
    return links, dirs


def _ns_launch(cfg: SandboxConfig, host_dir: Path, *, userns: bool) -> _Launch:
    """`unshare` → `_STAGE1` (builds the private root, drops privileges, stays as init) → the bootstrap."""
    unshare = shutil.which("unshare", path=_TOOL_PATH)
    if unshare is None:
        raise SandboxError("unshare (util-linux) is not installed")
    as_nobody = not userns and os.geteuid() == 0
    # RLIMIT_NPROC counts the uid's tasks: nobody's across the host (plus our init and program); in a user namespace,
    # that namespace's only (unshare, the init and the program)
    base = _tasks_of(NOBODY) + 2 if as_nobody else 3
    links, dirs = _binds(cfg)
    read_end, write_end = os.pipe()
    spec = {"root": str(host_dir), "links": links, "binds": dirs, "devices": list(_DEVICES), "work": WORK_IN_NS,
            "work_mb": WORK_DISK_FACTOR * cfg.max_file_mb, "uid": NOBODY if as_nobody else None,
            "status_fd": write_end, "watchdog_s": math.ceil(cfg.wall_s) + WATCHDOG_SLACK_S,
            "argv": _child_argv(cfg, WORK_IN_NS, base + cfg.max_procs)}
    flags = ["--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]
    flags += [] if cfg.network else ["--net"]
    flags += ["--user", "--map-root-user"] if userns else []
    stage1 = [_interpreter(), "-I", "-S", "-B", "-c", _STAGE1, json.dumps(spec)]
    return _Launch([unshare, *flags, "--", *stage1], _env(WORK_IN_NS), "/", status=(read_end, write_end))


class _Stream:
    """One output pipe, read in chunks: the first (`keep="head"`) or last (`"tail"`) `cap` bytes are kept."""

    def __init__(self, cap: int, keep: str) -> None:
        self.cap, self.keep, self.total, self.data = cap, keep, 0, bytearray()

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.keep == "head":
            self.data += chunk[: max(0, self.cap - len(self.data))]
        else:
            self.data += chunk
            del self.data[: max(0, len(self.data) - self.cap)]

    def text(self, chars: int) -> tuple[str, bool]:
        """(decoded text cut to `chars`, whether anything was cut)."""
        text = self.data.decode("utf-8", errors="replace")
        cut = self.total > len(self.data) or len(text) > chars
        return (text[:chars] if self.keep == "head" else text[-chars:]), cut


def _feed_stdin(pipe: IO[bytes], payload: bytes) -> None:
    try:
        pipe.write(payload)
        pipe.close()
    except (BrokenPipeError, OSError, ValueError):
        pass  # the program ended (or was killed) without reading it all


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group we started (a program that left it by `setsid` escapes this in the fallback; in a
    namespace, the init's death takes everything)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.kill()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _stop(proc: subprocess.Popen, namespaced: bool) -> None:
    """Stop a run. Namespaced: SIGTERM the init (its handler exits, which takes the namespace down); unshare, left
    alive, reaps it and exits. Killing unshare too would leave the init a zombie for the host's pid 1, which may
    never reap it; SIGKILL would make unshare complain on stderr. If that does not end it, `_reap` kills the group."""
    inits = _children(proc.pid) if namespaced else []
    for pid in inits:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if not inits:
        _kill(proc)


def _collect(proc: subprocess.Popen, cfg: SandboxConfig, namespaced: bool) -> tuple[_Stream, _Stream, str | None]:
    """Read stdout (head) and stderr (tail) until both close; kill at the wall clock or past the output cap.
    Returns the streams and why we stopped the run ("wall", "output" or None)."""
    cap = 4 * cfg.max_output_chars  # bytes: enough for max_output_chars of UTF-8
    streams = {proc.stdout.fileno(): _Stream(cap, "head"), proc.stderr.fileno(): _Stream(cap, "tail")}
    kill_bytes = OUTPUT_KILL_FACTOR * cfg.max_output_chars
    deadline, stopped = time.monotonic() + cfg.wall_s, None
    with selectors.DefaultSelector() as sel:
        for fd in streams:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                if stopped is not None:
                    break  # killed, yet something still holds the pipes open: stop waiting
                stopped, deadline = "wall", time.monotonic() + _GRACE_S
                _stop(proc, namespaced)
                continue
            for key, _ in sel.select(timeout=left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                streams[key.fd].feed(chunk)
                if stopped is None and streams[key.fd].total > kill_bytes:
                    stopped, deadline = "output", time.monotonic() + _GRACE_S
                    _stop(proc, namespaced)
    if stopped is None:  # the pipes closed; the program may still run (it can close its stdout)
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stopped = "wall"
            _stop(proc, namespaced)
    return streams[proc.stdout.fileno()], streams[proc.stderr.fileno()], stopped


def _execute(launch: _Launch, payload: bytes, cfg: SandboxConfig, isolation: str) -> SandboxResult:
    pass_fds = () if launch.status is None else (launch.status[1],)
    try:
        proc = subprocess.Popen(launch.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=launch.cwd, env=launch.env, start_new_session=True, pass_fds=pass_fds)
    except OSError as exc:
        if launch.status is not None:
            os.close(launch.status[0])
        raise SandboxError(f"could not start the sandbox ({launch.argv[0]}): {exc}") from exc
    finally:
        for fd in pass_fds:
            os.close(fd)  # the child has its copy; ours would keep the pipe open
    writer = threading.Thread(target=_feed_stdin, args=(proc.stdin, payload), daemon=True)
    writer.start()
    try:
        out, err, stopped = _collect(proc, cfg, launch.status is not None)
    finally:
        _reap(proc)
        writer.join(timeout=_GRACE_S)
        proc.stdout.close()
        proc.stderr.close()
    exit_code = _exit_code(launch, proc, stopped, err)
    stdout, cut_out = out.text(cfg.max_output_chars)
    stderr, cut_err = err.text(cfg.max_output_chars)
    timed_out = stopped == "wall" or exit_code == -signal.SIGXCPU
    return SandboxResult(stdout, stderr, exit_code, timed_out, cut_out or cut_err or stopped == "output", isolation)


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=_GRACE_S)
    except subprocess.TimeoutExpired:
        _kill(proc)
        proc.wait(timeout=_GRACE_S)


def _exit_code(launch: _Launch, proc: subprocess.Popen, stopped: str | None, err: _Stream) -> int | None:
    """The program's exit status: on namespaced runs, from the init's report (unshare's own status is the init's)."""
    if launch.status is None:
        return None if stopped else proc.returncode
    os.set_blocking(launch.status[0], False)
    with os.fdopen(launch.status[0], "rb") as status:
        report = status.read() or b""
    if stopped:
        return None
    if not report.strip():
        tail = err.data.decode("utf-8", errors="replace")[-2000:]
        raise SandboxError(f"the sandbox's namespace setup failed (exit {proc.returncode}):\n{tail}")
    return os.waitstatus_to_exitcode(int(report))


# ------------------------------------------------------------------------------------------- probing


def _fallback_layers() -> dict[str, bool]:
    return {name: name in ("rlimits", "audit_hook") or (name == "unprivileged" and os.geteuid() != 0)
            for name in LAYERS}


def isolation_available() -> dict[str, bool]:
    """Which layers `run_python` puts in force on this machine (namespaces probed once per process, by running a
    real sandbox that checks each from the inside)."""
    return dict(_available())


@functools.cache
def _available() -> dict[str, bool]:
    layers = _fallback_layers()
    if not sys.platform.startswith("linux") or shutil.which("unshare", path=_TOOL_PATH) is None:
        return layers
    userns = os.geteuid() != 0
    try:
        facts = _probe(userns)
    except (SandboxError, OSError, ValueError) as exc:
        log.warning("sandbox: namespaces unavailable, using the fallback (rlimits + audit hook): %s", exc)
        return layers
    walls = {"pid_ns": facts["pid"] == 2 and facts["ppid"] == 1, "net_ns": facts["ifaces"] == ["lo"],
             "private_root": not facts["host_file_visible"], "uts_ns": facts["hostname"] == "sandbox"}
    if not all(walls.values()) or facts["privileged"]:
        log.warning("sandbox: namespace probe did not isolate (%s), using the fallback", facts)
        return layers
    return {**layers, **walls, "mount_ns": True, "ipc_ns": True, "user_ns": userns,
            "unprivileged": userns or facts["uid"] == NOBODY}


def _probe(userns: bool) -> dict:
    cfg = SandboxConfig(wall_s=20, cpu_s=10)
    with tempfile.NamedTemporaryFile(prefix=f"{MARKER}-probe-") as marker:
        code = _PROBE.replace("MARKER_PATH", json.dumps(marker.name))
        host_dir = Path(tempfile.mkdtemp(prefix=f"{MARKER}-"))
        try:
            result = _execute(_ns_launch(cfg, host_dir, userns=userns), _payload(code, ""), cfg, "probe")
        finally:
            shutil.rmtree(host_dir, ignore_errors=True)
    if not result.ok:
        raise SandboxError(f"probe failed: {result.text()}")
    return json.loads(result.stdout)


_PROBE = """
import json, os, socket
try:
    os.chroot("/")
    privileged = True
except PermissionError:
    privileged = False
print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "uid": os.getuid(), "privileged": privileged,
                  "ifaces": [name for _, name in socket.if_nameindex()], "hostname": socket.gethostname(),
                  "host_file_visible": os.path.exists(MARKER_PATH)}))
"""

# ------------------------------------------------------------------------------------------- child-side code
# Both run with `python -I -S -c`, so they may use the standard library only.

# Stage 1 (namespaced runs only): pid 1 of the new pid namespace, still privileged inside its namespaces. Builds the
# private root on the host temp dir (the mounts exist only in this mount namespace), chroots into it, drops every
# capability (and becomes nobody when real root), then forks the bootstrap and waits as init: when the program
# ends, init reports its wait status on `status_fd` and exits, and the kernel kills whatever is left in the namespace.
_STAGE1 = r'''
import ctypes, json, os, signal, socket, sys

S = json.loads(sys.argv[1])
LIBC = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
ST_NOEXEC, ST_NOATIME, ST_NODIRATIME, ST_RELATIME, MS_RELATIME = 8, 1024, 2048, 4096, 1 << 21
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38


def check(ok, what):
    if not ok:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src, dst, fstype, flags, data=None):
    enc = [None if x is None else os.fsencode(x) for x in (src, dst, fstype, data)]
    check(LIBC.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]) == 0, f"mount {src} on {dst}")


def bind(src, dst, writable):
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    mount(src, dst, None, MS_BIND)
    if not writable:
        # flags the source mount has may be locked (user namespaces): keep them, add read-only
        f = os.statvfs(dst).f_flag
        keep = (f & (ST_NOEXEC | ST_NOATIME | ST_NODIRATIME)) | (MS_RELATIME if f & ST_RELATIME else 0)
        mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)


def build_root():
    root = S["root"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
    for path, target in S["links"]:
        os.symlink(target, root + path)
    for path in S["binds"]:
        bind(path, root + path, writable=False)
    for name in S["devices"]:
        bind("/dev/" + name, root + "/dev/" + name, writable=True)
    owner = S["uid"] if S["uid"] is not None else 0
    work = root + S["work"]
    os.makedirs(work)
    mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={S['work_mb']}m,mode=0700,uid={owner},gid={owner}")
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    socket.sethostname("sandbox")
    os.chroot(root)
    os.chdir(S["work"])


def drop_privileges():
    cap = 0
    while LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    check(ctypes.get_errno() == 22 and cap > 0, "emptying the capability bounding set")  # EINVAL: past the last
    if S["uid"] is not None:
        os.setgroups([])
        os.setresgid(S["uid"], S["uid"], S["uid"])
        os.setresuid(S["uid"], S["uid"], S["uid"])
    check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "no_new_privs")
    check(LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0, "pdeathsig")  # a uid change clears it


build_root()
drop_privileges()
status_fd = S["status_fd"]
child = os.fork()
if child == 0:
    try:
        os.close(status_fd)
        os.execv(S["argv"][0], S["argv"])
    finally:
        os._exit(127)
# SIGTERM: the parent stopping the run. SIGALRM: a watchdog in case the parent is gone and cannot enforce the wall
# clock. pid 1 ignores signals it has no handler for, hence the handlers; its exit takes the namespace down.
signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
signal.signal(signal.SIGALRM, lambda *_: os._exit(137))
signal.alarm(S["watchdog_s"])
while True:
    pid, status = os.waitpid(-1, 0)
    if pid == child:
        break
os.write(status_fd, b"%d\n" % status)
os._exit(0)
'''

# Stage 2, the bootstrap: reads the program from stdin, sets the rlimits, installs the audit hook, runs the program
# as __main__. The hook's helpers take everything they use through the tuple P and look up no global or builtin
# name (a test checks), so user code that rebinds builtins, os.path or this module's globals changes nothing; the
# only mutable objects they could reach are unreachable from Python (the hook itself is referenced only by the
# interpreter's hook list, which gc.get_objects would reveal: refused).
_BOOTSTRAP = r'''
import json, linecache, os, posix, resource, sys, traceback, types
import _posixsubprocess

CFG = json.loads(sys.argv[2])
READ_FILES = frozenset(["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"])
WRITE_FILES = frozenset(["/dev/null"])
PROCESS = frozenset(["os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.killpg",
                     "subprocess.Popen", "os.link", "os.symlink", "gc.get_objects", "gc.get_referrers",
                     "gc.get_referents", "cpython.PyInterpreterState_New", "sqlite3.enable_load_extension",
                     "sqlite3.load_extension"])
NETWORK = frozenset(["socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                     "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname"])
DENY_IMPORTS = frozenset(["ctypes", "_ctypes", "_cffi_backend", "cffi", "_posixsubprocess", "_xxsubinterpreters",
                          "_xxinterpchannels", "readline", "_dbm", "_gdbm"])
PATH_ARGS = types.MappingProxyType({
    "os.listdir": (0, False), "os.scandir": (0, False), "os.getxattr": (0, False), "os.listxattr": (0, False),
    "os.chdir": (0, True), "os.mkdir": (0, True), "os.rmdir": (0, True), "os.remove": (0, True),
    "os.rename": (0, True), "os.truncate": (0, True), "os.chmod": (0, True), "os.chown": (0, True),
    "os.utime": (0, True), "os.chflags": (0, True), "os.lchflags": (0, True), "os.lchmod": (0, True),
    "os.lchown": (0, True), "os.setxattr": (0, True), "os.removexattr": (0, True)})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def read_program():
    """The parent sends b"<length>\n" + program + stdin on fd 0: read the program only, leave the rest to sys.stdin."""
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            raise SystemExit("sandbox: no program on stdin")
        header += byte
    size, data = int(header), bytearray()
    while len(data) < size:
        chunk = os.read(0, size - len(data))
        if not chunk:
            raise SystemExit("sandbox: program cut short")
        data += chunk
    return data.decode("utf-8")


def set_limits():
    for name, soft, hard in CFG["rlimits"]:
        kind = getattr(resource, name)
        _, current = resource.getrlimit(kind)
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(kind, (soft, hard))


def resolve(path, P):
    """`path` absolute, with '.', '..' and symlinks resolved as the kernel will; None for a relative path with '..'
    (its meaning depends on a directory descriptor the hook cannot see) or a symlink loop."""
    (work, roots, rfiles, wfiles, refused, deny, mypid, getcwd, lstat, readlink, TYPE, STR, BYTES, INT, OSERR,
     writeflags, pathargs, resolve, check, decide) = P
    if TYPE(path) is BYTES:
        path = path.decode("utf-8", "surrogateescape")
    if not path.startswith("/"):
        if ".." in path.split("/"):
            return None
        path = getcwd() + "/" + path
    todo = path.split("/")
    todo.reverse()
    done, hops = "", 0
    while todo:
        name = todo.pop()
        if name == "" or name == ".":
            continue
        if name == "..":
            done = done[: done.rfind("/")]
            continue
        step = done + "/" + name
        try:
            mode = lstat(step).st_mode
        except OSERR:
            mode = 0
        if mode & 0o170000 != 0o120000:
            done = step
            continue
        hops += 1
        if hops > 40:
            return None
        target = readlink(step)
        if target.startswith("/"):
            done = ""
        parts = target.split("/")
        parts.reverse()
        todo.extend(parts)
    return done or "/"


def check(path, write, P):
    """(resolved path, None) if the path may be read (written), else (path, why not)."""
    (work, roots, rfiles, wfiles, refused, deny, mypid, getcwd, lstat, readlink, TYPE, STR, BYTES, INT, OSERR,
     writeflags, pathargs, resolve, check, decide) = P
    if path is None:
        path = "."
    kind = TYPE(path)
    if kind is INT:
        return None, None  # an open descriptor: checked when it was opened
    if kind is not STR and kind is not BYTES:
        return None, "a path that is not a plain str or bytes"
    full = resolve(path, P)
    if full is None:
        return None, "a relative path with '..'"
    if full == work or full.startswith(work + "/"):
        return full, None
    if write:
        return full, None if full in wfiles else f"writing {full} (only the work directory {work} is writable)"
    if full in rfiles:
        return full, None
    for root in roots:
        if full == root or full.startswith(root + "/"):
            return full, None
    return full, f"reading {full} (outside the work directory and Python's library)"


def decide(event, args, P):
    """Why `event` is refused, or None."""
    (work, roots, rfiles, wfiles, refused, deny, mypid, getcwd, lstat, readlink, TYPE, STR, BYTES, INT, OSERR,
     writeflags, pathargs, resolve, check, decide) = P
    if event in refused or event.startswith("ctypes."):
        return event + " is not allowed"
    spec = pathargs.get(event)
    if spec is not None:
        full, why = check(args[spec[0]], spec[1], P)
        if why is None and event == "os.rename":
            full, why = check(args[1], True, P)
        if why is not None and event == "os.chdir":
            return f"changing into {full} (only the work directory {work} is allowed)"
        return why
    if event == "open":
        path, mode, flags = args
        write = (TYPE(flags) is INT and flags & writeflags != 0) or (TYPE(mode) is STR and (
            "w" in mode or "a" in mode or "x" in mode or "+" in mode))
        full, why = check(path, write, P)
        if why is None and full is not None and not write and not (full == work or full.startswith(work + "/")):
            try:
                is_dir = lstat(full).st_mode & 0o170000 == 0o040000
            except OSERR:
                is_dir = False
            if is_dir:
                return f"opening the directory {full}"
        return why
    if event == "import":
        name, filename = args[0], args[1]
        if TYPE(name) is STR and name.partition(".")[0] in deny:
            return f"the module {name} is not available in the sandbox"
        if TYPE(filename) is STR:  # an extension module: native code
            full, why = check(filename, False, P)
            if why is not None or full == work or full.startswith(work + "/"):
                return f"loading native code from {full}"
        return None
    if event == "os.kill":
        return None if args[0] == mypid else f"signalling process {args[0]}"
    if event == "resource.prlimit":
        return None if args[0] == 0 or args[0] == mypid else f"changing the limits of process {args[0]}"
    if event == "object.__setattr__" and args[1] == "__code__":
        return "replacing a function's code"
    if event == "sqlite3.connect":
        db = args[0]
        if db == ":memory:" or db == "":
            return None
        if TYPE(db) is STR and db.startswith("file:"):
            return "sqlite URIs"
        return check(db, True, P)[1]
    return None


def make_hook(P):
    decide_, PERM, IMPORT = P[19], PermissionError, ImportError

    def hook(event, args):
        why = decide_(event, args, P)
        if why is not None:
            raise (IMPORT if event == "import" else PERM)("sandbox: " + why)

    return hook


def policy():
    roots = [os.path.realpath(p) for p in sys.path if os.path.exists(p)]
    roots += [os.path.realpath(p) for p in CFG["site"]]
    refused = PROCESS if CFG["network"] else PROCESS | NETWORK
    return (os.path.realpath(CFG["work"]), tuple(roots), READ_FILES, WRITE_FILES, refused, DENY_IMPORTS,
            os.getpid(), posix.getcwd, posix.lstat, posix.readlink, type, str, bytes, int, OSError, WRITE_FLAGS,
            PATH_ARGS, resolve, check, decide)


def refuse_fork_exec(*args, **kwargs):
    raise PermissionError("sandbox: starting programs is not allowed")


def run(source):
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    linecache.cache["<cell>"] = (len(source), None, source.splitlines(True), "<cell>")
    try:
        exec(compile(source, "<cell>", "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.exit(1)


SOURCE = read_program()
sys.path[:0] = [CFG["work"]]
sys.path += CFG["site"]
P = policy()
set_limits()
_posixsubprocess.fork_exec = refuse_fork_exec
sys.addaudithook(make_hook(P))
del P
run(SOURCE)
'''
