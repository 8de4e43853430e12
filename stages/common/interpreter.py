"""A stage started by DVC runs with the Python of the environment `dvc` came from.

DVC runs a stage's `cmd` (`python -m stages.<name> ...`) with `$SHELL -c`, so `python` is whatever comes first on
PATH: `.venv/bin/dvc repro` without the environment activated starts the system Python, which lacks torch, and it
does so after DVC has already removed the stage's old outputs. stages/__init__.py calls `use_dvc_interpreter()`
before anything else of a stage is imported; under DVC (DVC_STAGE set) it looks among this process's ancestors
for the `dvc` process (Linux /proc) and, when that runs on another environment's Python, replaces this process
with the same command under that Python (os.execv, one line on stderr). With no such ancestor (another OS, a
standalone dvc binary) and an interpreter that lacks the project's packages, the stage stops at once (exit 2)
with a message saying to activate the environment. Outside DVC it does nothing.

Imported by every stage before its dependencies: stdlib only, and no syntax newer than Python 3.6 (the `python`
first on PATH may be old).
"""
import importlib.util
import os
import subprocess
import sys

PROJECT_MODULES = ("torch", "yaml")  # what the stages import first; a system Python lacks torch at least
REEXEC_ENV = "CIRFLOW_STAGE_REEXEC"  # the pid that re-executed itself under DVC's Python: no second switch
MAX_ANCESTORS = 32


def use_dvc_interpreter():
    """Under DVC, make sure this stage runs with DVC's Python: switch to it, or stop (exit 2) with a message."""
    stage = os.environ.get("DVC_STAGE")
    if not stage or sys.argv[:1] != ["-m"]:  # outside DVC, or not the package import of `python -m stages.x`
        return
    argv = _orig_argv()
    module = main_module(argv)
    if module is None or module.split(".")[0] != __name__.split(".")[0]:
        return
    if os.environ.get(REEXEC_ENV) == str(os.getpid()):  # this process is the switched one: never loop
        return
    dvc_python = find_dvc_python()
    if dvc_python is not None and same_environment(dvc_python):
        return
    if dvc_python is not None and _runs_project_modules(dvc_python):
        sys.stderr.write(
            "{0}: `dvc` runs on {1}, but the stage command's `python` is {2}, another environment: running the "
            "stage with {1} instead (activate the environment to skip this step)\n"
            .format(module, dvc_python, sys.executable))
        sys.stderr.flush()
        os.environ[REEXEC_ENV] = str(os.getpid())
        os.execv(dvc_python, [dvc_python] + argv[1:])
    # no dvc Python above (another OS, a standalone dvc binary), or one whose environment lacks the project (dvc
    # installed with pipx, say): this interpreter runs the stage if it has the project's packages
    missing = [m for m in PROJECT_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        sys.stderr.write(
            "{0} (DVC stage {1}): this python ({2}) lacks the project's packages ({3}); DVC ran the stage with the "
            "`python` first on PATH. Activate the project's environment (`source .venv/bin/activate`) and run dvc "
            "again; no output of the stage was written.\n".format(module, stage, sys.executable, ", ".join(missing)))
        sys.stderr.flush()
        raise SystemExit(2)


def main_module(argv):
    """The module `python [options] -m MODULE ...` runs (argv as sys.orig_argv), or None (a script, -c, stdin)."""
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None)
        if arg in ("-W", "-X", "--check-hash-based-pycs"):  # an option with a separate value
            next(args, None)
        elif arg == "--" or not arg.startswith("-") or arg.startswith("-c"):
            return None
        elif "m" in arg[1:] and not arg.startswith(("-W", "-X", "--")):  # combined flags: -um stages.x, -mstages.x
            rest = arg[arg.index("m", 1) + 1:]
            return rest or next(args, None)
    return None


def dvc_python_of(cmdline):
    """For one process's argv: ("python", interpreter argv[0]) when it is Python running dvc (`<env>/bin/dvc`, a
    console script, or `-m dvc`); ("binary", None) when it is a dvc executable that is no Python script; None
    when it is no dvc."""
    if not cmdline:
        return None
    name = os.path.basename(cmdline[0])
    if name in ("dvc", "dvc.exe"):
        return ("binary", None)
    if not name.startswith(("python", "pypy")):
        return None
    args = iter(cmdline[1:])
    for arg in args:
        if arg == "-m":
            module = next(args, "")
            return ("python", cmdline[0]) if module == "dvc" or module.startswith("dvc.") else None
        if arg in ("-W", "-X", "--check-hash-based-pycs"):
            next(args, None)
        elif not arg.startswith("-") or arg == "-":
            return ("python", cmdline[0]) if os.path.basename(arg) in ("dvc", "dvc-script.py") else None
        elif arg.startswith("-c"):
            return None
    return None


def find_dvc_python(pid=None):
    """The absolute path (symlinks kept: a venv's python is one) of the Python running the nearest `dvc` process
    above `pid` (default: this process), or None: no /proc, no dvc ancestor, or a dvc that is no Python script."""
    pid = os.getppid() if pid is None else _parent(pid)
    for _ in range(MAX_ANCESTORS):
        if pid is None or pid <= 1:
            return None
        cmdline = _cmdline(pid)
        found = dvc_python_of(cmdline) if cmdline else None
        if found is not None:
            return _absolute(found[1], pid) if found[0] == "python" else None
        pid = _parent(pid)
    return None


def environment_prefix(python):
    """sys.prefix of the Python at `python`: the venv holding its pyvenv.cfg (symlinks not followed, as Python
    finds it), else the install two levels above the real executable (`/usr/bin/python3.11` -> `/usr`)."""
    bin_dir = os.path.dirname(os.path.abspath(python))
    for candidate in (bin_dir, os.path.dirname(bin_dir)):
        if os.path.isfile(os.path.join(candidate, "pyvenv.cfg")):
            return candidate
    return os.path.dirname(os.path.dirname(os.path.realpath(python)))


def same_environment(python):
    """Whether the Python at `python` has this interpreter's prefix (the environment, not the binary: a venv's
    python is a symlink to its base Python)."""
    return os.path.realpath(environment_prefix(python)) == os.path.realpath(sys.prefix)


def _orig_argv():
    if hasattr(sys, "orig_argv"):  # Python 3.10+
        return list(sys.orig_argv)
    return _cmdline("self") or [sys.executable] + sys.argv


def _runs_project_modules(python):
    """Whether `python` starts and finds the project's packages (one short child; only when switching)."""
    check = ("import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in {0!r}))"
             .format(PROJECT_MODULES))
    env = dict(os.environ)
    env.pop("DVC_STAGE", None)
    try:
        return subprocess.call([python, "-c", check], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0
    except OSError:
        return False


def _read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _cmdline(pid):
    raw = _read("/proc/{0}/cmdline".format(pid))
    if not raw:
        return None
    return [part.decode("utf-8", "surrogateescape") for part in raw.rstrip(b"\0").split(b"\0")]


def _parent(pid):
    raw = _read("/proc/{0}/stat".format(pid))
    if raw is None:
        return None
    try:  # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        return int(raw[raw.rindex(b")") + 2:].split()[1])
    except (ValueError, IndexError):
        return None


def _absolute(program, pid):
    """argv[0] of process `pid` as an absolute path: relative to its working directory, or searched on its PATH."""
    if os.path.isabs(program):
        return program
    if os.sep in program:
        try:
            return os.path.join(os.readlink("/proc/{0}/cwd".format(pid)), program)
        except OSError:
            return None
    environ = _read("/proc/{0}/environ".format(pid)) or b""
    path = next((entry[5:].decode("utf-8", "surrogateescape") for entry in environ.split(b"\0")
                 if entry.startswith(b"PATH=")), os.environ.get("PATH", ""))
    for folder in path.split(os.pathsep):
        candidate = os.path.join(folder or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate if os.path.isabs(candidate) else _absolute(candidate, pid)
    return None
