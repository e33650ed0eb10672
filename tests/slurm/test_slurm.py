"""contrib/slurm against a real single-node Slurm (tests/slurm/cluster.sh), keepgpu's fake engine.

Each test proves one promise of docs/slurm.md with real jobs of non-root users:
pinning to the job's GPUs, the Epilog after scancel / normal end / time limit, the job-script
start/stop pattern, the Prolog keep-until-the-first-step mode (sbatch and salloc), and isolation
between concurrent jobs of the same and of different users. Root only (it installs Slurm and
creates users); KEEPGPU_SKIP_SLURM=1 skips it; KEEPGPU_SLURM_KEEP=1 leaves the cluster up.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

if not sys.platform.startswith("linux") or os.geteuid() != 0:
    pytest.skip("the Slurm tests install Slurm, create users and start daemons: run them as root "
                "(e.g. in .ci/run)", allow_module_level=True)
if os.environ.get("KEEPGPU_SKIP_SLURM") == "1":
    pytest.skip("KEEPGPU_SKIP_SLURM=1", allow_module_level=True)

import slurm_harness as h  # noqa: E402 - after the skips: it imports keepgpu's client

# One cluster, one scheduler: under pytest-xdist every Slurm test runs on one worker, in order.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240), pytest.mark.xdist_group("slurm")]


@pytest.fixture(scope="module")
def timelimit_job(cluster: None) -> Iterator[h.Job]:
    """Submitted first (time limits are whole minutes), checked by the last test."""
    job = h.submit("kgtest2", "timelimit", "--time=1", "--gres=gpu:1",
                   env={"BOX_LIFETIME": "400"})
    yield job
    h.scancel(job)


@pytest.fixture(scope="module")
def gres2_job(cluster: None, timelimit_job: h.Job) -> Iterator[h.Job]:
    job = h.submit("kgtest", "gres2", "--gres=gpu:2")
    status = h.wait_holding("kgtest", job.name, 2, timeout=60)
    h.TIMINGS["sbatch_to_holding_s"] = time.monotonic() - job.submitted_at
    job.extra["status"] = status
    yield job
    h.scancel(job)


def test_gres2_batch_job_keeper_is_pinned_to_the_jobs_gpus(gres2_job: h.Job) -> None:
    job = gres2_job
    out = job.wait_started()
    assert "2/2 GPU(s) holding" in out
    expected = h.expand_idx(h.job_info(job.job_id)["_gpu_idx"])
    assert len(expected) == 2
    status = job.extra["status"]
    assert sorted(g["device_entry"] for g in status["gpus"]) == sorted(expected)
    uid = h.uid_of("kgtest")
    sup = status["supervisor"]["pid"]
    assert h.proc_uid(sup) == uid
    assert h.proc_environ(sup)["SLURM_JOB_ID"] == str(job.job_id)
    for gpu in status["gpus"]:
        env = h.proc_environ(gpu["pid"])
        assert env["CUDA_VISIBLE_DEVICES"] == gpu["device_entry"], gpu
        assert env["SLURM_JOB_ID"] == str(job.job_id)
        assert h.proc_uid(gpu["pid"]) == uid
    # The runtime dir is the job user's own, private one.
    st = os.stat(h.runtime_dir("kgtest"))
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o700)
    # The TaskProlog's exports make plain keepgpu-ctl inside the job find the job's keeper.
    rc, text = job.run("keepgpu-ctl status --json")
    assert rc == 0, text
    assert json.loads(text)["supervisor"]["name"] == job.name


def test_scancel_leaves_no_keeper_process_after_the_epilog(gres2_job: h.Job) -> None:
    job = gres2_job
    before = h.job_keeper_procs(job.job_id)
    assert len(before) == 3, before  # supervisor + 2 workers
    t0 = time.monotonic()
    h.root_slurm(["scancel", str(job.job_id)])
    h.wait_until(lambda: not h.job_keeper_procs(job.job_id), 30, "no keeper process of the job")
    h.TIMINGS["scancel_to_no_keeper_s"] = time.monotonic() - t0
    info = h.wait_job_done(job.job_id, 30)
    assert info["JobState"] == "CANCELLED"
    assert not any(h.proc_alive(p) for p in before)
    assert not list(h.runtime_dir("kgtest").glob(f"{job.name}.*"))


def test_epilog_kills_a_hung_keeper_after_scancel(cluster: None) -> None:
    """The TaskEpilog's polite stop cannot help a keeper that does not answer: the Epilog's
    SIGKILL sweep is what guarantees the GPUs are free."""
    job = h.submit("kgtest", "hung", "--gres=gpu:1")
    try:
        job.wait_started()
        status = h.wait_holding("kgtest", job.name, 1)
        pids = h.job_keeper_procs(job.job_id)
        assert len(pids) == 2, pids
        os.kill(status["supervisor"]["pid"], signal.SIGSTOP)  # a hung supervisor
        t0 = time.monotonic()
        h.root_slurm(["scancel", str(job.job_id)])
        h.wait_until(lambda: not h.job_keeper_procs(job.job_id), 40, "no keeper of the job")
        h.TIMINGS["scancel_hung_keeper_to_no_keeper_s"] = time.monotonic() - t0
        assert h.wait_job_done(job.job_id, 30)["JobState"] == "CANCELLED"
        assert f"job={job.job_id} info: SIGKILL keepgpu processes" in h.slurm_log()
        assert not list(h.runtime_dir("kgtest").glob(f"{job.name}.*"))
    finally:
        h.scancel(job)


def test_job_stop_kills_a_keeper_that_does_not_answer(cluster: None) -> None:
    job = h.submit("kgtest", "stopkill", "--gres=gpu:1")
    try:
        job.wait_started()
        status = h.wait_holding("kgtest", job.name, 1)
        pids = h.job_keeper_procs(job.job_id)
        os.kill(status["supervisor"]["pid"], signal.SIGSTOP)
        rc, text = job.run("keepgpu-job stop")
        assert rc == 1 and "does not answer; killing" in text, text
        assert not any(h.proc_alive(p) for p in pids)
        job.finish(0)
        assert h.wait_job_done(job.job_id, 30)["JobState"] == "COMPLETED"
    finally:
        h.scancel(job)


JOB_SCRIPT = r"""#!/bin/bash
# The documented pattern: hold the job's GPUs while preparing, release them before training.
set -u
now() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
alive() {  # exists and is not a zombie
    local s
    read -r s 2>/dev/null </proc/$1/stat || return 1
    s=${s##*) }
    [[ ${s%% *} != Z ]]
}

t=$(now)
keepgpu-job start || exit 10
echo "start_ms=$(($(now) - t))"
sup=$(head -n1 "$KEEPGPU_RUNTIME_DIR/$(keepgpu-job name).pid")  # line 2 is the endpoint
workers=$(keepgpu-job status --json | python3 -c \
    'import json, sys; print(" ".join(str(g["pid"]) for g in json.load(sys.stdin)["gpus"]))')
echo "keeper=$sup workers=$workers"

sleep 1  # data preparation, debugging, waiting for a pipeline stage ...

t=$(now)
keepgpu-job stop || exit 11
echo "stop_ms=$(($(now) - t))"
for p in $sup $workers; do alive "$p" && echo "survivor=$p"; done
keepgpu-job stop || exit 12  # idempotent
srun -n1 bash -c 'echo "training on GPU(s) $CUDA_VISIBLE_DEVICES"' || exit 13
echo done
"""


def test_job_script_start_stop_pattern_as_a_non_root_user(cluster: None) -> None:
    box = h.new_box("kgtest2", "pattern")
    script = box / "pattern.sh"
    script.write_text(JOB_SCRIPT)
    os.chmod(script, 0o755)
    res = h.as_user("kgtest2", ["sbatch", "--parsable", "--gres=gpu:2", f"--chdir={box}",
                                f"--output={box}/slurm.out", str(script)])
    job_id = int(res.stdout.strip())
    try:
        info = h.wait_job_done(job_id, 60)
        out = (box / "slurm.out").read_text()
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out
        assert "2/2 GPU(s) holding" in out
        assert "survivor=" not in out
        assert "no keeper job-" in out  # the second stop
        assert "training on GPU(s) " in out and out.rstrip().endswith("done")
        values = dict(line.split("=", 1) for line in out.splitlines()
                      if line.split("=", 1)[0] in ("start_ms", "stop_ms"))
        h.TIMINGS["job_script_start_s"] = int(values["start_ms"]) / 1000
        h.TIMINGS["job_script_stop_s"] = int(values["stop_ms"]) / 1000
        assert not h.job_keeper_procs(job_id)
    finally:
        h.scancel_id(job_id)


def test_prolog_keeps_the_gpus_until_the_first_step(cluster: None) -> None:
    job = h.submit("kgtest", "prolog", "--gres=gpu:1", "--comment=keepgpu",
                   env={"NOSTART": "1"})
    try:
        status = h.wait_holding("kgtest", job.name, 1, timeout=60)
        h.TIMINGS["sbatch_to_holding_prolog_s"] = time.monotonic() - job.submitted_at
        expected = h.expand_idx(h.job_info(job.job_id)["_gpu_idx"])
        assert [g["device_entry"] for g in status["gpus"]] == expected
        assert h.proc_uid(status["supervisor"]["pid"]) == h.uid_of("kgtest")
        # The batch script sees the keeper and runs with it (the batch step is not a step).
        rc, text = job.run("keepgpu-job status --json")
        assert rc == 0, text
        # The first srun step: its task starts only after the keeper released the GPUs.
        rc, text = job.run("srun -n1 bash -c 'keepgpu-ctl --name job-$SLURM_JOB_ID ping; "
                           "echo ctl_rc=$?'")
        assert rc == 0 and "ctl_rc=3" in text, text
        assert not h.job_keeper_procs(job.job_id)
        job.finish(0)
        assert h.wait_job_done(job.job_id, 30)["JobState"] == "COMPLETED"
    finally:
        h.scancel(job)


SALLOC = r"""
set -u
until [[ -e $GO ]]; do sleep 0.05; done
srun -n1 bash -c 'keepgpu-ctl --name job-$SLURM_JOB_ID ping; echo ctl_rc=$?'
"""


def test_salloc_with_a_prolog_keeper(cluster: None) -> None:
    box = h.new_box("kgtest", "salloc")
    go = box / "go"
    argv = ["salloc", "--gres=gpu:1", "--comment=keepgpu", "--job-name=salloc-test",
            "bash", "-c", SALLOC]
    env = h.user_env("kgtest") | {"GO": str(go)}
    cmd = ["runuser", "-u", "kgtest", "--", "env", "-i",
           *(f"{k}={v}" for k, v in env.items()), *argv]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=box, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    job_id = 0
    try:
        def find_job() -> int:
            out = h.root_slurm(["squeue", "-h", "-u", "kgtest", "-n", "salloc-test", "-o", "%i"],
                               check=False).stdout.split()
            return int(out[0]) if out else 0

        job_id = h.wait_until(find_job, 30, "the salloc job")
        h.wait_holding("kgtest", f"job-{job_id}", 1, timeout=60)
        h.TIMINGS["salloc_to_holding_s"] = time.monotonic() - t0
        go.touch()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "ctl_rc=3" in out, out
        h.wait_job_done(job_id, 30)
        assert not h.job_keeper_procs(job_id)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        if job_id:
            h.scancel_id(job_id)


def test_concurrent_one_gpu_jobs_hold_only_their_gpu_and_cannot_stop_each_other(
    cluster: None,
) -> None:
    a = h.submit("kgtest", "iso-a", "--gres=gpu:1")
    b = h.submit("kgtest2", "iso-b", "--gres=gpu:1")
    c = h.submit("kgtest", "iso-c", "--gres=gpu:1")
    jobs = (a, b, c)
    try:
        entries = {}
        for job in jobs:
            job.wait_started()
            st = h.wait_holding(job.user, job.name, 1)
            entries[job.job_id] = [g["device_entry"] for g in st["gpus"]]
            assert entries[job.job_id] == h.expand_idx(h.job_info(job.job_id)["_gpu_idx"])
            job.extra["pid"] = st["supervisor"]["pid"]
        assert len({e[0] for e in entries.values()}) == 3, entries

        def holding(job: h.Job) -> bool:
            st = h.keeper_status(job.user, job.name)
            return bool(st) and all(g["state"] == "holding" for g in st["gpus"])  # type: ignore[index]

        # Another user's job can neither reach nor kill the keeper: by name, by its socket path,
        # through its runtime dir, by signal.
        for attacker, victim in ((b, a), (a, b)):
            vdir = h.runtime_dir(victim.user)
            for cmd in (f"keepgpu-ctl --name {victim.name} stop",
                        f"keepgpu-ctl --endpoint ipc://{vdir}/{victim.name}.ctl stop",
                        f"KEEPGPU_RUNTIME_DIR={vdir} keepgpu-ctl --name {victim.name} stop"):
                rc, text = attacker.run(cmd)
                assert rc == 3, (cmd, rc, text)
            rc, text = attacker.run(f"kill -KILL {victim.extra['pid']}")
            assert rc != 0, text
            assert holding(victim)

        # The same user's other job: its own `keepgpu-job stop` stops only its own keeper ...
        rc, text = c.run("keepgpu-job stop")
        assert rc == 0, text
        assert h.keeper_status(c.user, c.name) is None
        assert holding(a) and holding(b)
        # ... and `keepgpu-ctl --name job-A stop` stops job A's keeper and nothing else.
        rc, text = c.run("keepgpu-job start")
        assert rc == 0, text
        rc, text = c.run(f"keepgpu-ctl --name {a.name} stop")
        assert rc == 0, text
        assert h.keeper_status(a.user, a.name) is None
        assert holding(c) and holding(b)

        # Job A's Epilog sweeps user kgtest's processes: job C's keeper is not job A's.
        a.finish(0)
        assert h.wait_job_done(a.job_id, 30)["JobState"] == "COMPLETED"
        assert holding(c) and holding(b)
        for job in (b, c):
            job.finish(0)
        for job in jobs:
            assert h.wait_job_done(job.job_id, 30)["JobState"] == "COMPLETED"
            assert not h.job_keeper_procs(job.job_id)
    finally:
        for job in jobs:
            h.scancel(job)


def test_normal_end_epilog_kills_unnamed_keepers_of_the_job_only(cluster: None) -> None:
    user = "kgtest2"
    # The same user's keeper outside Slurm must survive the job's Epilog.
    outside = h.as_user(user, ["keepgpu-supervise", "--name", "outside", "--detach"],
                        env={"CUDA_VISIBLE_DEVICES": "7"})
    assert "1/1 GPU(s) holding" in outside.stdout, outside.stdout + outside.stderr
    job = h.submit(user, "leftover", "--gres=gpu:1")
    try:
        job.wait_started()
        # A second keeper the Epilog cannot find by name: own name, own runtime dir.
        rc, text = job.run("KEEPGPU_RUNTIME_DIR=$HOME/kg-private keepgpu-supervise "
                           "--name private --detach")
        assert rc == 0, text
        assert len(h.job_keeper_procs(job.job_id)) == 4
        t0 = time.monotonic()
        job.finish(0)
        h.wait_until(lambda: not h.job_keeper_procs(job.job_id), 30, "no keeper of the job")
        h.TIMINGS["normal_end_to_no_keeper_s"] = time.monotonic() - t0
        assert h.wait_job_done(job.job_id, 30)["JobState"] == "COMPLETED"
        assert f"job={job.job_id} info: SIGKILL keepgpu processes" in h.slurm_log()
        st = h.keeper_status(user, "outside")
        assert st and st["gpus"][0]["state"] == "holding"
    finally:
        h.scancel(job)
        h.stop_keeper(user, "outside")
        outside_files = [str(p) for p in h.runtime_dir(user).glob("outside.*")]
        h.as_user(user, ["rm", "-rf", "--", f"{h.user_env(user)['HOME']}/kg-private",
                         *outside_files], check=False)


def test_cluster_scripts_are_idempotent(cluster: None) -> None:
    for _ in range(2):
        res = subprocess.run([str(h.CLUSTER), "status"], capture_output=True, text=True,
                             timeout=30)
        assert res.returncode == 0 and "slurmd: running" in res.stdout, res.stdout
    res = subprocess.run([str(h.CLUSTER), "up"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, KEEPGPU_SLURM_BUILD_PYTHON=sys.executable))
    assert res.returncode == 0, res.stderr
    assert Path(h.SLURM_CONF).is_file()


def test_time_limit_leaves_no_keeper_process(timelimit_job: h.Job) -> None:
    job = timelimit_job
    job.wait_started()
    assert h.job_keeper_procs(job.job_id)
    # The limit is one minute after the start; slurmctld checks limits every 30 s or so.
    h.wait_until(lambda: h.job_state(job.job_id) != "RUNNING", 150, "the time limit", 0.1)
    t0 = time.monotonic()
    h.wait_until(lambda: not h.job_keeper_procs(job.job_id), 30, "no keeper of the job")
    h.TIMINGS["time_limit_to_no_keeper_s"] = time.monotonic() - t0
    assert h.wait_job_done(job.job_id, 30)["JobState"] == "TIMEOUT"
