"""Helpers for the Slurm tests: submit jobs as test users, drive them, look at their keepers.

Everything here waits with a bound. Jobs run a small "mailbox" script (MAILBOX): the test hands
it shell commands one at a time and reads back their exit code and output, so every check runs
inside the job, as the job user, with the job's own environment.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keepgpu.client import Client, CommandFailed, NoSupervisor

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
STATE = Path(os.environ.get("KEEPGPU_SLURM_STATE", "/tmp/keepgpu-slurm-ci"))
SCRIPTS = STATE / "slurm-scripts"
VENV_BIN = STATE / "venv" / "bin"
JOBS = STATE / "jobs"
SLURM_LOG = STATE / "log" / "keepgpu-slurm.log"
SLURM_CONF = STATE / "slurm.conf"
USERS = ("kgtest", "kgtest2")

KEEPER_ARGV = ("keepgpu.worker", "keepgpu.cli.supervise")

MAILBOX = r"""#!/bin/bash
# Test job: start a keeper (unless NOSTART), then run the commands the test drops into $BOX.
set -u
BOX=$1
if [[ -z ${NOSTART:-} ]]; then
    keepgpu-job start >"$BOX/start.out" 2>&1
    echo $? >"$BOX/start.rc"
fi
n=0
end=$((SECONDS + ${BOX_LIFETIME:-150}))
while ((SECONDS < end)); do
    if [[ -e $BOX/cmd.$n ]]; then
        bash "$BOX/cmd.$n" >"$BOX/out.$n" 2>&1
        echo $? >"$BOX/rc.$n.tmp" && mv "$BOX/rc.$n.tmp" "$BOX/rc.$n"
        n=$((n + 1))
        continue
    fi
    [[ -e $BOX/exit ]] && exit "$(cat "$BOX/exit")"
    sleep 0.05
done
exit 3
"""


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `pred` until truthy; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def user_env(user: str) -> dict[str, str]:
    """A clean login-like environment for `user` (the job inherits it: sbatch --export=ALL)."""
    pw = pwd.getpwnam(user)
    return {
        "PATH": f"{SCRIPTS}:{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": pw.pw_dir,
        "USER": user,
        "LOGNAME": user,
        "LANG": "C.UTF-8",
        "SLURM_CONF": str(SLURM_CONF),
        "KEEPGPU_ENGINE": "fake",
    }


def as_user(user: str, argv: list[str], timeout: float = 30, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    full_env = user_env(user) | (env or {})
    cmd = ["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in full_env.items()),
           *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(JOBS))
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} as {user} exit {res.returncode}: {res.stderr}")
    return res


def root_slurm(argv: list[str], timeout: float = 30, check: bool = True
               ) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SLURM_CONF": str(SLURM_CONF),
           "LANG": "C.UTF-8"}
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exit {res.returncode}: {res.stderr}")
    return res


def uid_of(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def runtime_dir(user: str) -> Path:
    return Path(f"/tmp/keepgpu-{uid_of(user)}")


def job_info(job_id: int) -> dict[str, str]:
    """`scontrol show job -d -o` as a dict (JobState, ExitCode, GRES detail, ...)."""
    out = root_slurm(["scontrol", "show", "job", "-d", "-o", str(job_id)]).stdout
    info: dict[str, str] = {}
    for token in out.split():
        key, sep, value = token.partition("=")
        if sep and key not in info:
            info[key] = value
    idx = re.search(r"GRES=gpu[^ ]*\(IDX:([0-9,-]+)\)", out)
    info["_gpu_idx"] = idx.group(1) if idx else ""
    return info


def expand_idx(text: str) -> list[str]:
    """'1-2,5' -> ['1', '2', '5']."""
    out: list[str] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(str(i) for i in range(int(lo), int(hi or lo) + 1))
    return out


def job_state(job_id: int) -> str:
    return job_info(job_id).get("JobState", "")


ENDED = ("COMPLETED", "CANCELLED", "TIMEOUT", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY")


def wait_job_done(job_id: int, timeout: float) -> dict[str, str]:
    """Wait until the job ended AND its epilog finished (the node no longer lists it)."""
    def done() -> dict[str, str] | None:
        info = job_info(job_id)
        if info.get("JobState") in ENDED and "COMPLETING" not in info.get("JobState", ""):
            running = root_slurm(["squeue", "-h", "-j", str(job_id), "-o", "%T"],
                                 check=False).stdout.strip()
            return info if not running else None
        return None

    return wait_until(done, timeout, f"job {job_id} to end", 0.1)  # type: ignore[no-any-return]


def keeper_status(user: str, name: str) -> dict[str, Any] | None:
    """The keeper's status (root may talk to every user's supervisor), None when none answers."""
    path = runtime_dir(user) / f"{name}.ctl"
    try:
        result: dict[str, Any] = Client(f"ipc://{path}", timeout=1.0).call("status")
    except (NoSupervisor, CommandFailed):
        return None
    return result


def wait_holding(user: str, name: str, count: int, timeout: float = 30) -> dict[str, Any]:
    def holding() -> dict[str, Any] | None:
        st = keeper_status(user, name)
        if st and len(st["gpus"]) == count and all(g["state"] == "holding" for g in st["gpus"]):
            return st
        return None

    return wait_until(holding, timeout, f"keeper {name} of {user} holding {count} GPU(s)")  # type: ignore[no-any-return]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def proc_environ(pid: int) -> dict[str, str]:
    out = {}
    for item in _read(f"/proc/{pid}/environ").split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def proc_alive(pid: int) -> bool:
    """Exists and is not a zombie (this machine's pid 1 may not reap orphans)."""
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    if not stat:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def keepgpu_procs() -> list[int]:
    """Pids of every live keepgpu supervisor and worker on the machine."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _read(f"/proc/{entry}/cmdline").split(b"\0")[:6]
        words = [a.decode(errors="replace") for a in argv]
        if any(w in KEEPER_ARGV or w.endswith("/keepgpu-supervise") for w in words):
            if proc_alive(int(entry)):
                out.append(int(entry))
    return out


def job_keeper_procs(job_id: int) -> list[int]:
    """Live keepgpu processes that belong to the job (by their environment)."""
    marks = {f"SLURM_JOB_ID={job_id}", f"KEEPGPU_SLURM_JOB_ID={job_id}"}
    out = []
    for pid in keepgpu_procs():
        env = proc_environ(pid)
        if {f"{k}={v}" for k, v in env.items()} & marks:
            out.append(pid)
    return out


def proc_uid(pid: int) -> int:
    for line in _read(f"/proc/{pid}/status").decode().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return -1


def slurm_log() -> str:
    return _read(str(SLURM_LOG)).decode(errors="replace")


@dataclass
class Job:
    """A submitted mailbox job of `user`."""

    user: str
    box: Path
    job_id: int = 0
    submitted_at: float = 0.0
    sent: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"job-{self.job_id}"

    def wait_started(self, timeout: float = 30) -> str:
        """The keeper start's exit code file; returns keepgpu-job start's output."""
        rc = wait_until(lambda: _read(str(self.box / "start.rc")).strip(), timeout,
                        f"job {self.job_id} to start its keeper")
        out = _read(str(self.box / "start.out")).decode()
        assert rc == b"0", f"keepgpu-job start exit {rc!r}: {out}"
        return out

    def run(self, command: str, timeout: float = 30) -> tuple[int, str]:
        """Run `command` (bash) inside the job; (exit code, output)."""
        n = self.sent
        self.sent += 1
        tmp = self.box / f".cmd.{n}"
        tmp.write_text(command + "\n")
        os.chmod(tmp, 0o644)
        tmp.rename(self.box / f"cmd.{n}")
        rc = wait_until(lambda: _read(str(self.box / f"rc.{n}")).strip(), timeout,
                        f"job {self.job_id} to run {command!r}")
        return int(rc), _read(str(self.box / f"out.{n}")).decode()

    def finish(self, code: int = 0) -> None:
        # Written under another name, then renamed: the job polls for `exit` and must never
        # read it half written (an empty `exit ""` is bash's exit 2).
        tmp = self.box / ".exit"
        tmp.write_text(f"{code}\n")
        os.chmod(tmp, 0o644)
        tmp.rename(self.box / "exit")

    def output(self) -> str:
        return _read(str(self.box / "slurm.out")).decode(errors="replace")


def new_box(user: str, tag: str) -> Path:
    box = JOBS / f"{tag}-{uuid.uuid4().hex[:8]}"
    box.mkdir(mode=0o755)
    pw = pwd.getpwnam(user)
    os.chown(box, pw.pw_uid, pw.pw_gid)
    script = box / "job.sh"
    script.write_text(MAILBOX)
    os.chmod(script, 0o755)
    return box


def submit(user: str, tag: str, *sbatch_args: str, env: dict[str, str] | None = None) -> Job:
    """sbatch the mailbox script as `user`; returns once Slurm accepted it."""
    box = new_box(user, tag)
    job = Job(user, box)
    argv = ["sbatch", "--parsable", f"--job-name={tag}", f"--chdir={box}",
            f"--output={box}/slurm.out", *sbatch_args, str(box / "job.sh"), str(box)]
    job.submitted_at = time.monotonic()
    res = as_user(user, argv, env=env)
    job.job_id = int(res.stdout.strip().split(";")[0])
    return job


def cleanup_box(job: Job) -> None:
    shutil.rmtree(job.box, ignore_errors=True)


def ctl_json(out: str) -> dict[str, Any]:
    return json.loads(out)  # type: ignore[no-any-return]


def scancel_id(job_id: int) -> None:
    """Cancel a job if it still runs (cleanup path; never fails the test by itself)."""
    root_slurm(["scancel", str(job_id)], check=False)


def scancel(job: Job) -> None:
    if job.job_id:
        scancel_id(job.job_id)
    cleanup_box(job)


def stop_keeper(user: str, name: str) -> None:
    """Stop a keeper the test started outside Slurm (as its user, bounded)."""
    as_user(user, ["keepgpu-ctl", "--name", name, "stop"], check=False, timeout=30)


# Measured durations, printed by conftest.py's terminal summary and saved next to the cluster.
TIMINGS: dict[str, float] = {}


def write_timings() -> None:
    if TIMINGS:
        path = STATE / "log" / "timings.json"
        path.write_text(json.dumps(TIMINGS, indent=2, sort_keys=True) + "\n")


# ---- multi-node (cluster.sh up --nodes 4): nodes n1..n4 in their own mount + pid namespaces ----

NODES = ("n1", "n2", "n3", "n4")


def node_init_pid(node: str) -> int:
    """Host pid of the node's namespace pid 1 (the child of its unshare process)."""
    unshare = int(_read(str(STATE / "run" / f"node-{node}.pid")).strip() or 0)
    children = _read(f"/proc/{unshare}/task/{unshare}/children").split()
    assert children, f"node {node} is not running (unshare pid {unshare})"
    return int(children[0])


def node_root(node: str) -> Path:
    """The node's file system as it sees it (its private /tmp)."""
    return Path(f"/proc/{node_init_pid(node)}/root")


def node_runtime_dir(user: str, node: str) -> Path:
    return node_root(node) / "tmp" / f"keepgpu-{uid_of(user)}"


def node_keeper_status(user: str, node: str, name: str) -> dict[str, Any] | None:
    path = node_runtime_dir(user, node) / f"{name}.ctl"
    try:
        result: dict[str, Any] = Client(f"ipc://{path}", timeout=1.0).call("status")
    except (NoSupervisor, CommandFailed):
        return None
    return result


def holding_on(user: str, node: str, name: str, count: int) -> dict[str, Any] | None:
    st = node_keeper_status(user, node, name)
    if st and len(st["gpus"]) == count and all(g["state"] == "holding" for g in st["gpus"]):
        return st
    return None


def wait_holding_nodes(user: str, name: str, nodes: tuple[str, ...], count: int,
                       timeout: float = 60) -> dict[str, dict[str, Any]]:
    def all_holding() -> dict[str, dict[str, Any]] | None:
        out = {}
        for node in nodes:
            st = holding_on(user, node, name, count)
            if st is None:
                return None
            out[node] = st
        return out

    return wait_until(all_holding, timeout,  # type: ignore[no-any-return]
                      f"keeper {name} of {user} holding {count} GPU(s) on {','.join(nodes)}")


def pid_ns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def node_of(pid: int) -> str:
    """The simulated node a process runs in ("" for the host)."""
    ns = pid_ns(pid)
    for node in NODES:
        if ns and ns == pid_ns(node_init_pid(node)):
            return node
    return ""


def job_keepers_by_node(job_id: int) -> dict[str, list[int]]:
    """Live keepgpu processes of the job, by node."""
    out: dict[str, list[int]] = {}
    for pid in job_keeper_procs(job_id):
        out.setdefault(node_of(pid), []).append(pid)
    return out


def node_gpu_idx(job_id: int) -> dict[str, list[str]]:
    """The job's GPU indexes by node, from `scontrol show job -d` lines like
    `Nodes=n[1-4] CPU_IDs=0 Mem=0 GRES=gpu:2(IDX:0-1)`."""
    out = root_slurm(["scontrol", "show", "job", "-d", str(job_id)]).stdout
    idx: dict[str, list[str]] = {}
    pattern = r"Nodes=(\S+) CPU_IDs=\S+ Mem=\S+ GRES=gpu[^(]*\(IDX:([0-9,-]+)\)"
    for nodes, gres in re.findall(pattern, out):
        for node in root_slurm(["scontrol", "show", "hostnames", nodes]).stdout.split():
            idx[node] = expand_idx(gres)
    return idx


def timed(job: Job, command: str, timeout: float = 60) -> tuple[int, str, float]:
    """Run `command` in the job, timed inside it: (exit code, output, seconds)."""
    rc, text = job.run(f"t=${{EPOCHREALTIME/./}}; {command}; rc=$?; "
                       f"echo elapsed_us=$((${{EPOCHREALTIME/./}} - t)); exit $rc", timeout)
    m = re.search(r"elapsed_us=(\d+)", text)
    return rc, text, int(m.group(1)) / 1e6 if m else float("nan")
