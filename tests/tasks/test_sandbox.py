"""The code-interpreter sandbox: ordinary programs work, hostile ones are contained, in both modes.

Every behavioural test runs twice: with kernel namespaces (skipped where this machine cannot make them) and in the
portable fallback (rlimits + audit hook). Hostile snippets catch their own error and print its type, so each test
asserts what the program saw as well as what happened on the host.
"""

from __future__ import annotations

import dis
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path
from types import CodeType

import pytest
from pydantic import ValidationError

from tasks.sft import sandbox
from tasks.sft.sandbox import LAYERS, SandboxConfig, SandboxResult, isolation_available, run_python


@pytest.fixture(params=["namespaces", "fallback"])
def mode(request: pytest.FixtureRequest) -> str:
    if request.param == "namespaces" and not isolation_available()["private_root"]:
        pytest.skip("this machine cannot make the kernel namespaces")
    return request.param


def run(mode: str, code: str, *, stdin: str = "", **limits: object) -> SandboxResult:
    cfg = SandboxConfig(namespaces=mode == "namespaces", **limits)
    return run_python(textwrap.dedent(code), cfg, stdin=stdin)


def attempt(action: str) -> str:
    """A snippet that tries `action` and prints "ok" or the type of the error it got."""
    return f"try:\n    {action}\n    print('ok')\nexcept Exception as exc:\n    print(type(exc).__name__)\n"


def our_children() -> set[tuple[int, int]]:
    """(pid, start time) of this process's descendants, zombies included, read from /proc."""
    parent_of, start_of = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:
            continue
        pid = int(stat.parent.name)
        parent_of[pid], start_of[pid] = int(fields[1]), int(fields[19])
    found, todo = set(), [os.getpid()]
    while todo:
        parent = todo.pop()
        for pid, ppid in parent_of.items():
            if ppid == parent:
                found.add((pid, start_of[pid]))
                todo.append(pid)
    return found


def exists(process: tuple[int, int]) -> bool:
    """Whether that process (zombie or not) is still in the process table, wherever it was reparented."""
    try:
        return int(Path(f"/proc/{process[0]}/stat").read_text().rsplit(")", 1)[1].split()[19]) == process[1]
    except (OSError, IndexError):
        return False


def nproc_binds() -> bool:
    """Whether RLIMIT_NPROC binds the fallback child here (the kernel ignores it for root)."""
    return os.geteuid() != 0


# ------------------------------------------------------------------------------------------- ordinary code


def test_normal_code_returns_stdout_and_exit_0(mode: str) -> None:
    result = run(mode, "import sys, math\nprint(math.factorial(10))\nprint(sys.stdin.read().upper())", stdin="hi")
    assert result.stdout == "3628800\nHI\n"
    assert (result.exit_code, result.ok, result.timed_out, result.truncated) == (0, True, False, False)
    assert result.text() == "3628800\nHI"


def test_an_exception_returns_the_traceback_tail_and_a_nonzero_exit(mode: str) -> None:
    result = run(mode, """
        def divide(a, b):
            return a / b
        divide(1, 0)
    """)
    assert result.exit_code == 1 and not result.ok
    assert result.stderr.splitlines()[-1] == "ZeroDivisionError: division by zero"
    assert 'File "<cell>", line 3, in divide' in result.stderr and "return a / b" in result.stderr
    assert "ZeroDivisionError: division by zero" in result.text()


def test_exit_status_and_syntax_errors_come_back(mode: str) -> None:
    assert run(mode, "import sys\nsys.exit(3)").exit_code == 3
    bad = run(mode, "def (")
    assert bad.exit_code == 1 and "SyntaxError" in bad.stderr


def test_the_work_dir_is_private_writable_and_removed(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args: object, **kwargs: object) -> str:
        made.append(real_mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    result = run(mode, """
        import os, tempfile
        open("notes.txt", "w").write("kept?")
        os.makedirs("sub/dir")
        print(sorted(os.listdir(".")), os.environ["TMPDIR"] == os.getcwd(), os.path.isdir(tempfile.mkdtemp()))
    """)
    assert result.stdout == "['notes.txt', 'sub'] True True\n"
    assert made and not any(os.path.exists(path) for path in made)


def test_site_packages_are_off_unless_asked_for(mode: str) -> None:
    pytest.importorskip("numpy")
    assert run(mode, attempt("import numpy")).stdout == "ModuleNotFoundError\n"
    assert run(mode, "import numpy\nprint(numpy.arange(5).sum())", site_packages=True).stdout == "10\n"


# ------------------------------------------------------------------------------------------- hostile code


def test_reading_a_host_file_is_refused(mode: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN-4f1c")
    result = run(mode, attempt(f"print(open({str(secret)!r}).read())") + attempt("print(open('/etc/passwd').read())"))
    assert result.stdout == "PermissionError\nPermissionError\n"
    assert "TOKEN-4f1c" not in result.stdout + result.stderr and "root:" not in result.stdout


def test_namespaces_hide_the_host_file_system(tmp_path: Path) -> None:
    if not isolation_available()["private_root"]:
        pytest.skip("this machine cannot make the kernel namespaces")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN-4f1c")
    # os.stat is not audited: this asks the kernel, past the audit hook
    result = run("namespaces", f"import os\nprint([os.path.exists(p) for p in ({str(secret)!r}, '/etc', '/home', "
                               f"'/proc/1', {os.path.realpath(sys.executable)!r})])")
    assert result.stdout == "[False, False, False, False, True]\n"


def test_writing_outside_the_work_dir_is_refused(mode: str, tmp_path: Path) -> None:
    target = tmp_path / "pwned.txt"
    result = run(mode, "import os\n" + attempt(f"open({str(target)!r}, 'w').write('x')") + attempt("os.chdir('/')")
                 + attempt("open('../escape.txt', 'w')"))
    assert result.stdout == "PermissionError\nPermissionError\nPermissionError\n"
    assert not target.exists()


def test_symlinks_out_of_the_work_dir_are_refused(mode: str) -> None:
    result = run(mode, "import os\n" + attempt("os.symlink('/etc/passwd', 'link')")
                 + attempt("os.link('/etc/passwd', 'hard')"))
    assert result.stdout == "PermissionError\nPermissionError\n"


def test_network_connect_to_a_local_port_fails(mode: str) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        result = run(mode, "import socket\n" + attempt(f"socket.create_connection(('127.0.0.1', {port}), timeout=2)")
                     + attempt(f"socket.socket().connect(('127.0.0.1', {port}))"))
        assert result.stdout == "PermissionError\nPermissionError\n"
        with pytest.raises(TimeoutError):
            server.accept()


def test_network_namespace_has_only_a_loopback() -> None:
    if not isolation_available()["net_ns"]:
        pytest.skip("this machine cannot make a network namespace")
    result = run("namespaces", "import socket\nprint(socket.if_nameindex())")
    assert result.stdout == "[(1, 'lo')]\n"


def test_network_true_allows_a_local_connection(mode: str) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(10)
        port = server.getsockname()[1]
        accepted: list[bytes] = []
        thread = threading.Thread(target=lambda: accepted.append(server.accept()[0].recv(5)))
        thread.start()
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))\ns.sendall(b'hello')\nprint('sent')"
        result = run(mode, code, network=True)
        thread.join(timeout=10)
    assert result.stdout == "sent\n" and accepted == [b"hello"]
    assert "net_ns" not in result.isolation.split("+")


def test_a_fork_bomb_is_refused_and_leaves_no_process(mode: str) -> None:
    before = our_children()
    result = run(mode, "import os\nwhile True:\n    os.fork()\n")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "PermissionError: sandbox: os.fork is not allowed"
    assert our_children() <= before


def test_multiprocessing_is_refused(mode: str) -> None:
    result = run(mode, """
        import multiprocessing
        def work():
            pass
        try:
            process = multiprocessing.Process(target=work)
            process.start()
            print("started")
        except PermissionError as exc:
            print(exc)
    """)
    assert result.stdout == "sandbox: os.fork is not allowed\n"


def test_the_process_limit_stops_threads(mode: str) -> None:
    if mode == "fallback" and not nproc_binds():
        pytest.skip("RLIMIT_NPROC does not bind root, and the fallback child runs as root here")
    result = run(mode, """
        import threading, time
        started = 0
        try:
            while started < 100:
                threading.Thread(target=time.sleep, args=(2,), daemon=True).start()
                started += 1
        except RuntimeError:
            pass
        print(started)
    """, max_procs=4, memory_mb=2048)
    assert result.stdout == "4\n"


def test_an_infinite_loop_hits_the_cpu_limit(mode: str) -> None:
    result = run(mode, "while True:\n    pass\n", cpu_s=1, wall_s=60)
    assert result.timed_out and result.exit_code == -signal.SIGXCPU and not result.ok
    assert result.text() == "[stopped: CPU time limit reached]"


def test_sleeping_past_the_wall_clock_is_killed_with_its_processes(mode: str) -> None:
    results: list[SandboxResult] = []
    code = "import time\nprint('started', flush=True)\ntime.sleep(600)\n"
    before = our_children()
    thread = threading.Thread(target=lambda: results.append(run(mode, code, wall_s=3)))
    thread.start()
    tree = 3 if mode == "namespaces" else 1  # unshare, the init and the program; or the program alone
    seen: set[tuple[int, int]] = set()
    while thread.is_alive() and len(seen) < tree:
        seen = our_children() - before
        time.sleep(0.01)
    thread.join(timeout=30)
    (result,) = results
    assert result.timed_out and result.exit_code is None and result.stdout == "started\n"
    assert result.text() == "started\n[stopped: wall-clock limit reached]"
    assert len(seen) == tree and not any(exists(process) for process in seen)


def test_closing_stdout_does_not_escape_the_wall_clock(mode: str) -> None:
    result = run(mode, "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(600)\n", wall_s=1)
    assert result.timed_out and result.exit_code is None


def test_a_memory_bomb_raises_memory_error(mode: str) -> None:
    result = run(mode, "block = bytearray(4 * 1024 ** 3)\n", memory_mb=256)
    assert result.exit_code == 1 and result.stderr.splitlines()[-1] == "MemoryError"


def test_huge_output_is_cut_and_read_in_bounded_memory(mode: str) -> None:
    tracemalloc.start()
    try:
        result = run(mode, "import sys\nchunk = 'x' * 1_000_000\nfor _ in range(100):\n    sys.stdout.write(chunk)\n",
                     wall_s=120, max_output_chars=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not result.timed_out and result.truncated and result.exit_code is None
    assert result.stdout == "x" * 1000
    assert result.text().endswith("[stopped: output limit reached]")
    assert peak < 8 << 20  # bytes held by this process while 100 MB went by


def test_stderr_keeps_its_tail(mode: str) -> None:
    result = run(mode, "import sys\nfor i in range(3000):\n    print(i, file=sys.stderr)\nsys.exit(2)\n",
                 max_output_chars=100)
    assert result.truncated and result.exit_code == 2
    assert result.stderr.endswith("2998\n2999\n") and len(result.stderr) == 100


def test_a_file_over_the_size_limit_fails(mode: str) -> None:
    result = run(mode, """
        try:
            with open("big.bin", "wb") as f:
                f.write(b"x" * (2 << 20))
        except OSError as exc:
            print(type(exc).__name__, exc.errno)
    """, max_file_mb=1)
    assert result.stdout == "OSError 27\n"  # EFBIG


def test_the_namespaced_work_dir_has_a_size_limit() -> None:
    if not isolation_available()["private_root"]:
        pytest.skip("this machine cannot make the kernel namespaces")
    result = run("namespaces", """
        written = 0
        try:
            for i in range(100):
                with open(f"part{i}", "wb") as f:
                    f.write(b"x" * (1 << 20))
                written += 1
        except OSError as exc:
            print(written, exc.errno)
    """, max_file_mb=1)
    assert result.stdout == f"{sandbox.WORK_DISK_FACTOR} 28\n"  # ENOSPC: the tmpfs holds 4 × max_file_mb


def test_killing_the_parent_or_others_is_refused(mode: str) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        result = run(mode, "import os, signal\n" + attempt("os.kill(os.getppid(), signal.SIGKILL)")
                     + attempt(f"os.kill({bystander.pid}, signal.SIGKILL)")
                     + attempt("os.killpg(os.getpgid(0), signal.SIGKILL)") + attempt("os.kill(-1, signal.SIGKILL)"))
        assert result.stdout == "PermissionError\n" * 4
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_spawning_a_shell_is_refused(mode: str) -> None:
    result = run(mode, "import os, subprocess\n" + attempt("subprocess.run(['sh', '-c', 'echo pwned'])")
                 + attempt("os.system('echo pwned')") + attempt("os.execv('/bin/sh', ['sh', '-c', 'echo pwned'])")
                 + attempt("os.posix_spawn('/bin/sh', ['sh', '-c', 'echo pwned'], {})")
                 + attempt("import _posixsubprocess; _posixsubprocess.fork_exec()") + attempt("import ctypes"))
    assert result.stdout == "PermissionError\n" * 5 + "ImportError\n"


def test_environment_secrets_are_absent(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_TEST_SECRET", "TOKEN-9b2e")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "TOKEN-9b2e")
    result = run(mode, "import json, os\nprint(json.dumps(dict(os.environ)))")
    env = json.loads(result.stdout)
    assert "TOKEN-9b2e" not in result.stdout
    assert set(env) == {"PATH", "LANG", "HOME", "TMPDIR", "MALLOC_ARENA_MAX", "OPENBLAS_NUM_THREADS",
                        "OMP_NUM_THREADS", "MKL_NUM_THREADS"}


def test_rebinding_what_the_hook_uses_does_not_open_it(mode: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN-77aa")
    result = run(mode, f"""
        import builtins, os, posix, posixpath, sys
        try:
            open("/etc/passwd")
        except PermissionError as exc:
            tb = exc.__traceback__
            while tb.tb_next:
                tb = tb.tb_next
            frame = tb.tb_frame  # the hook's own frame
            for name in ("decide", "check", "resolve"):
                frame.f_globals[name] = lambda *args: None
        builtins.isinstance = lambda *args: True
        builtins.type = lambda *args: str
        posix.getcwd = os.getcwd = lambda: "/"
        posixpath.realpath = os.path.realpath = lambda path, **kw: os.getcwd()
        posix.lstat = None
        try:
            print(open({str(secret)!r}).read())
        except PermissionError:
            print("refused")
    """)
    assert result.stdout == "refused\n" and "TOKEN-77aa" not in result.stderr


def test_native_code_from_the_work_dir_is_refused(mode: str) -> None:
    result = run(mode, """
        import glob, importlib.util, os, shutil, sys
        library = next(path for path in sys.path if path.endswith("lib-dynload"))
        native = sorted(glob.glob(library + "/*.so"))[0]  # any extension module of the standard library
        copy = os.path.basename(native)
        shutil.copyfile(native, copy)
        spec = importlib.util.spec_from_file_location(copy.split(".")[0], copy)
        try:
            importlib.util.module_from_spec(spec)
            print("loaded")
        except ImportError as exc:
            print(exc)
    """)
    assert result.stdout.startswith("sandbox: loading native code from ")


def test_the_hook_looks_up_no_global_names() -> None:
    """User code can rebind builtins and module globals; the hook and its helpers must not depend on either."""
    module = compile(sandbox._BOOTSTRAP, "<bootstrap>", "exec")
    functions = {c.co_name: c for c in module.co_consts if isinstance(c, CodeType)}

    def globals_used(code: CodeType) -> set[str]:
        names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
        for inner in code.co_consts:
            if isinstance(inner, CodeType):
                names |= globals_used(inner)
        return names

    hook = next(c for c in functions["make_hook"].co_consts if isinstance(c, CodeType) and c.co_name == "hook")
    for code in (functions["resolve"], functions["check"], functions["decide"], hook):
        assert globals_used(code) == set(), code.co_name


# ------------------------------------------------------------------------------------------- config and layers


@pytest.mark.parametrize(("field", "value"), [("wall_s", 0), ("cpu_s", -1), ("memory_mb", 8), ("max_file_mb", 0),
                                              ("max_procs", 0), ("max_output_chars", 0)])
def test_config_errors_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        SandboxConfig(**{field: value})


def test_config_is_frozen_and_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="wall_seconds"):
        SandboxConfig(wall_seconds=3)
    with pytest.raises(ValidationError, match="frozen"):
        SandboxConfig().wall_s = 1
    with pytest.raises(ValueError, match="must be str"):
        run_python(b"print(1)")


def test_isolation_names_the_layers_in_force(mode: str) -> None:
    available = isolation_available()
    assert set(available) == set(LAYERS) and available["rlimits"] and available["audit_hook"]
    layers = run(mode, "pass").isolation.split("+")
    if mode == "fallback":
        assert layers == ["rlimits", "audit_hook"] + (["unprivileged"] if os.geteuid() != 0 else [])
    else:
        assert layers == [name for name in LAYERS if available[name]]
        assert "private_root" in layers and "net_ns" in layers
    assert run(mode, "pass", network=True).isolation.split("+") == [name for name in layers if name != "net_ns"]


def test_text_notes_how_a_run_ended() -> None:
    def result(**kw: object) -> SandboxResult:
        base = {"stdout": "out\n", "stderr": "Traceback\nValueError: x\n", "exit_code": 0, "timed_out": False,
                "truncated": False, "isolation": "rlimits"}
        return SandboxResult(**{**base, **kw})

    assert result().text() == "out"
    assert result(exit_code=1).text() == "out\nTraceback\nValueError: x\n[exit status 1]"
    assert result(exit_code=None, timed_out=True, stderr="").text() == "out\n[stopped: wall-clock limit reached]"
    assert result(exit_code=-9, stderr="").text() == "out\n[killed by signal SIGKILL]"
    assert result(exit_code=None, truncated=True, stderr="").text() == "out\n[stopped: output limit reached]"
    assert result(truncated=True).text() == "out\n[output truncated]"
