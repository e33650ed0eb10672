"""contrib/slurm on a real 4-node Slurm simulated on one machine (cluster.sh up --nodes 4).

Nodes n1..n4 are slurmds with 2 fake GPUs each, each in its own mount and pid namespace (own
/tmp, own /proc), so a keeper, its runtime dir and the Epilog's process scan are per node as on
a real cluster. The tests look into a node through /proc/<its pid 1>/root and tell processes'
nodes apart by their pid namespace. Root only, like test_slurm.py.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Iterator

import pytest

if not sys.platform.startswith("linux") or os.geteuid() != 0:
    pytest.skip("the Slurm tests install Slurm, create users and start daemons: run them as root "
                "(e.g. in .ci/run)", allow_module_level=True)
if os.environ.get("KEEPGPU_SKIP_SLURM") == "1":
    pytest.skip("KEEPGPU_SKIP_SLURM=1", allow_module_level=True)

import slurm_harness as h  # noqa: E402 - after the skips: it imports keepgpu's client

# One cluster, one scheduler: under pytest-xdist every Slurm test runs on one worker, in order.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240), pytest.mark.xdist_group("slurm")]

ALL = h.NODES
MULTI = ("--partition=multi",)


def submit4(user: str, tag: str, *args: str, env: dict[str, str] | None = None) -> h.Job:
    return h.submit(user, tag, *MULTI, "--nodes=4", *args, env=env)


def step_name(job: h.Job) -> str:
    """The node keepers' name: job-<id>.<step> of the background step (the job's first: 0)."""
    return f"{job.name}.0"


def assert_pinned(job: h.Job, statuses: dict[str, dict[str, object]], per_node: int) -> None:
    """Each node's keeper holds exactly that node's entries of the job, as the job user."""
    idx = h.node_gpu_idx(job.job_id)
    assert sorted(idx) == sorted(statuses), idx
    uid = h.uid_of(job.user)
    for node, st in statuses.items():
        gpus = st["gpus"]
        assert isinstance(gpus, list) and len(gpus) == per_node
        assert sorted(g["device_entry"] for g in gpus) == sorted(idx[node]), (node, gpus)
        # Status pids are the node's own (pid namespace): host pids are found by environment.
        for g in gpus:
            assert g["state"] == "holding", (node, g)
    by_node = h.job_keepers_by_node(job.job_id)
    assert sorted(by_node) == sorted(statuses), by_node
    for node, pids in by_node.items():
        assert len(pids) == 1 + per_node, (node, pids)  # supervisor + one worker per GPU
        entries = []
        for pid in pids:
            assert h.proc_uid(pid) == uid
            env = h.proc_environ(pid)
            assert env["SLURM_JOB_ID"] == str(job.job_id) and env["SLURMD_NODENAME"] == node
            if "keepgpu.worker" in h._read(f"/proc/{pid}/cmdline").decode(errors="replace"):
                entries.append(env["CUDA_VISIBLE_DEVICES"])
        assert sorted(entries) == sorted(idx[node]), (node, entries)


@pytest.fixture(scope="module")
def timelimit4(cluster: None) -> Iterator[h.Job]:
    """Submitted first (time limits are whole minutes). It holds one GPU of every node, so the
    tests until its end use one GPU per node; the 2-GPU and two-job tests come after it."""
    job = submit4("kgtest2", "timelimit4", "--time=1", "--gres=gpu:1",
                  env={"BOX_LIFETIME": "400"})
    yield job
    h.scancel(job)


def test_nodes_subset_and_a_failing_node_is_named(timelimit4: h.Job) -> None:
    job = submit4("kgtest2", "subset", "--gres=gpu:1", env={"NOSTART": "1"})
    try:
        h.wait_until(lambda: h.job_state(job.job_id) == "RUNNING", 60, "the job to run")
        rc, text = job.run("keepgpu-job start --nodes n[2-3]", timeout=120)
        assert rc == 0, text
        assert f"{job.name}: 2/2 node(s) holding, 2/2 GPU(s)" in text, text
        assert sorted(h.job_keepers_by_node(job.job_id)) == ["n2", "n3"]
        rc, text = job.run("keepgpu-job start")
        assert rc == 1 and "already has keepers on n[2-3]" in text, text
        rc, text = job.run("keepgpu-job stop")
        assert rc == 0 and "2 node(s) released" in text, text
        assert not h.job_keeper_procs(job.job_id)

        # n3's runtime dir is unusable (group/other accessible): keepgpu refuses it there only.
        bad = h.node_runtime_dir("kgtest2", "n3")
        os.chmod(bad, 0o755)
        try:
            rc, text = job.run("keepgpu-job start", timeout=120)
        finally:
            os.chmod(bad, 0o700)
        assert rc == 1, text
        assert "n3: error (exit 78)" in text, text
        assert "3/4 node(s) holding, 3/3 GPU(s)" in text and "failed: n3" in text, text
        assert sorted(h.job_keepers_by_node(job.job_id)) == ["n1", "n2", "n4"]
        rc, text = job.run("keepgpu-job stop")
        assert rc == 0 and "n3: no keeper (it had not started)" in text, text
        assert not h.job_keeper_procs(job.job_id)
        job.finish(0)
        h.wait_job_done(job.job_id, 30)
    finally:
        h.scancel(job)


def test_prolog_mode_on_four_nodes(cluster: None) -> None:
    job = submit4("kgtest", "prolog4", "--gres=gpu:1", "--comment=keepgpu", env={"NOSTART": "1"})
    try:
        statuses = h.wait_holding_nodes("kgtest", job.name, ALL, 1, timeout=90)
        h.TIMINGS["multi_prolog_sbatch_to_holding_s"] = time.monotonic() - job.submitted_at
        idx = h.node_gpu_idx(job.job_id)
        for node in ALL:
            assert [g["device_entry"] for g in statuses[node]["gpus"]] == idx[node]
        # Every node's Prolog logs, with its node name (once its keeper start returned).
        marks = [f"] node={node} job={job.job_id} info: keeper {job.name} holds" for node in ALL]
        h.wait_until(lambda: all(m in h.slurm_log() for m in marks), 30, "the Prologs' log lines")
        # A first step on ONE node releases that node only.
        rc, text = job.run("srun -N1 -n1 -w n2 true", timeout=60)
        assert rc == 0, text
        assert h.node_keeper_status("kgtest", "n2", job.name) is None
        for node in ("n1", "n3", "n4"):
            assert h.holding_on("kgtest", node, job.name, 1), node
        # keepgpu-job stop in the batch script releases every node.
        rc, text = job.run("keepgpu-job stop", timeout=60)
        assert rc == 0, text
        assert f"{job.name}: 4/4 node(s) released" in text, text
        assert not h.job_keeper_procs(job.job_id)
        job.finish(0)
        assert h.wait_job_done(job.job_id, 30)["JobState"] == "COMPLETED"
    finally:
        h.scancel(job)


def test_time_limit_leaves_no_keeper_on_any_node(timelimit4: h.Job) -> None:
    job = timelimit4
    job.wait_started(timeout=90)
    assert sorted(h.job_keepers_by_node(job.job_id)) == list(ALL)
    h.wait_until(lambda: h.job_state(job.job_id) != "RUNNING", 150, "the time limit", 0.1)
    t0 = time.monotonic()
    h.wait_until(lambda: not h.job_keeper_procs(job.job_id), 40, "no keeper on any node")
    h.TIMINGS["multi_time_limit_to_no_keeper_s"] = time.monotonic() - t0
    assert h.wait_job_done(job.job_id, 40)["JobState"] == "TIMEOUT"
    for node in ALL:
        assert not list(h.node_runtime_dir(job.user, node).glob(f"{job.name}.*")), node


def test_four_node_job_holds_all_8_gpus_and_stop_frees_every_node(cluster: None) -> None:
    # The single-node reference, same partition and moment: start and stop of one node.
    one = h.submit("kgtest", "one", *MULTI, "--nodes=1", "--gres=gpu:2")
    try:
        one.wait_started(timeout=60)
        st = h.wait_holding_nodes("kgtest", one.name, (h.job_info(one.job_id)["NodeList"],), 2)
        h.TIMINGS["multi_1node_sbatch_to_holding_s"] = time.monotonic() - one.submitted_at
        assert len(st) == 1
        rc, text, took = h.timed(one, "keepgpu-job stop")
        assert rc == 0, text
        h.TIMINGS["multi_1node_stop_s"] = took
        one.finish(0)
    finally:
        h.scancel(one)

    job = submit4("kgtest", "four", "--gres=gpu:2")
    try:
        statuses = h.wait_holding_nodes("kgtest", step_name(job), ALL, 2, timeout=90)
        h.TIMINGS["multi_4node_sbatch_to_holding_s"] = time.monotonic() - job.submitted_at
        out = job.wait_started()
        assert f"keepgpu-job: {job.name}: 4/4 node(s) holding, 8/8 GPU(s) (step 0)" in out, out
        for node in ALL:
            assert f"{node}: keepgpu supervisor '{step_name(job)}'" in out, out
        assert_pinned(job, statuses, 2)
        # Each node's runtime dir is its own (private /tmp), the job user's, 0700.
        for node in ALL:
            rd = os.stat(h.node_runtime_dir("kgtest", node))
            assert (rd.st_uid, stat.S_IMODE(rd.st_mode)) == (h.uid_of("kgtest"), 0o700)
        # status --json shows every node's keeper.
        rc, text = job.run("keepgpu-job status --json")
        assert rc == 0, text
        data = json.loads(text)
        assert sorted(data["nodes"]) == list(ALL) and data["job"] == job.name
        for node in ALL:
            assert data["nodes"][node]["supervisor"]["name"] == step_name(job)
            assert [g["state"] for g in data["nodes"][node]["gpus"]] == ["holding"] * 2
        rc, text = job.run("keepgpu-job status")
        assert rc == 0 and all(f"== {n}: {step_name(job)} ==" in text for n in ALL), text

        # The job's own steps still run while the keepers hold (they share, --overlap).
        rc, text = job.run("srun -N4 --ntasks-per-node=1 bash -c 'echo ran-on-$SLURMD_NODENAME'",
                           timeout=60)
        assert rc == 0 and all(f"ran-on-{n}" in text for n in ALL), text

        pids = [p for ps in h.job_keepers_by_node(job.job_id).values() for p in ps]
        assert len(pids) == 12
        rc, text, took = h.timed(job, "keepgpu-job stop")
        h.TIMINGS["multi_4node_stop_s"] = took
        assert rc == 0, text
        assert f"keepgpu-job: {job.name}: 4 node(s) released" in text, text
        for node in ALL:
            assert f"{node}: keeper {step_name(job)}: 2 GPU(s) released" in text, text
        # When stop returns, every node's workers are gone.
        assert not any(h.proc_alive(p) for p in pids)
        rc, text = job.run("keepgpu-job stop")  # idempotent
        assert rc == 0 and "no keeper" in text, text
        job.finish(0)
        assert h.wait_job_done(job.job_id, 30)["JobState"] == "COMPLETED"
    finally:
        h.scancel(job)


def test_scancel_leaves_no_keeper_on_any_node(cluster: None) -> None:
    job = submit4("kgtest", "scancel4", "--gres=gpu:2")
    try:
        h.wait_holding_nodes("kgtest", step_name(job), ALL, 2, timeout=90)
        job.wait_started()
        assert sorted(h.job_keepers_by_node(job.job_id)) == list(ALL)
        t0 = time.monotonic()
        h.root_slurm(["scancel", str(job.job_id)])
        h.wait_until(lambda: not h.job_keeper_procs(job.job_id), 40, "no keeper on any node")
        h.TIMINGS["multi_scancel_to_no_keeper_s"] = time.monotonic() - t0
        assert h.wait_job_done(job.job_id, 40)["JobState"] == "CANCELLED"
        for node in ALL:  # each node's Epilog removed the job's files there
            assert not list(h.node_runtime_dir("kgtest", node).glob(f"{job.name}.*")), node
    finally:
        h.scancel(job)


def test_two_users_multi_node_jobs_are_isolated(cluster: None) -> None:
    a = submit4("kgtest", "iso4-a", "--gres=gpu:1")
    b = submit4("kgtest2", "iso4-b", "--gres=gpu:1")
    jobs = (a, b)
    try:
        st = {}
        for job in jobs:
            st[job.job_id] = h.wait_holding_nodes(job.user, step_name(job), ALL, 1, timeout=90)
            job.wait_started()
            assert_pinned(job, st[job.job_id], 1)
        for node in ALL:  # the two jobs hold different GPUs on every node
            ea = st[a.job_id][node]["gpus"][0]["device_entry"]
            eb = st[b.job_id][node]["gpus"][0]["device_entry"]
            assert ea != eb, node
        # B cannot reach A's node keepers (nor A B's), from a step on every node.
        for attacker, victim in ((b, a), (a, b)):
            vdir = f"/tmp/keepgpu-{h.uid_of(victim.user)}"
            rc, text = attacker.run(
                "srun -N4 --ntasks-per-node=1 bash -c "
                f"'keepgpu-ctl --endpoint ipc://{vdir}/{step_name(victim)}.ctl stop; "
                "echo rc=$SLURMD_NODENAME:$?'", timeout=60)
            assert all(f"rc={n}:3" in text for n in ALL), text
            for node in ALL:
                assert h.holding_on(victim.user, node, step_name(victim), 1), node
        # A's stop releases A only.
        rc, text = a.run("keepgpu-job stop")
        assert rc == 0, text
        assert not h.job_keeper_procs(a.job_id)
        for node in ALL:
            assert h.holding_on(b.user, node, step_name(b), 1), node
        # B ends normally while holding: every node's Epilog leaves nothing.
        t0 = time.monotonic()
        b.finish(0)
        h.wait_until(lambda: not h.job_keeper_procs(b.job_id), 40, "no keeper of job B")
        h.TIMINGS["multi_normal_end_to_no_keeper_s"] = time.monotonic() - t0
        a.finish(0)
        for job in jobs:
            assert h.wait_job_done(job.job_id, 40)["JobState"] == "COMPLETED"
            assert not h.job_keeper_procs(job.job_id)
    finally:
        for job in jobs:
            h.scancel(job)
