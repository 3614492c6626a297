"""env/slurm.sh: a single-node SLURM started and stopped by PID runs a 2-task MPI job and clears
the MPI segments its killed jobs leave."""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.submit import TERMINAL, free_port_pair

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "env" / "slurm.sh"
PYTHON = sys.executable

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(shutil.which("slurmctld") is None or shutil.which("munged") is None,
                                 reason="slurm-wlm / munge not installed (env/setup.sh installs them)")]




def _wait_done(jid: str, env: dict, timeout: float) -> str:
    """The job's final state; a controller slow to answer (a busy machine) is asked again."""
    deadline = time.time() + timeout
    state = "UNKNOWN"
    while time.time() < deadline:
        r = subprocess.run(["scontrol", "-o", "show", "job", jid], env=env, capture_output=True,
                           text=True, timeout=30)
        for field in r.stdout.split():
            if field.startswith("JobState="):
                state = field.split("=", 1)[1]
        if state in TERMINAL:
            return state
        time.sleep(0.3)
    return state


def test_local_slurm_runs_an_mpi_job_and_stops_by_pid(tmp_path):
    state = tmp_path / "slurm"
    env = {**os.environ, "SCOREDA_SLURM_DIR": str(state), "SCOREDA_SLURM_PORT": str(free_port_pair())}
    up = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True,
                        timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.strip() == f"export SLURM_CONF={state / 'slurm.conf'}"
        env["SLURM_CONF"] = str(state / "slurm.conf")
        job = tmp_path / "job.sh"
        job.write_text(f"""#!/bin/bash
#SBATCH -n 2
#SBATCH -o {tmp_path}/out-%j.txt
srun {PYTHON} -c "from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.Get_rank(), c.Get_size())"
""")
        jid = subprocess.run(["sbatch", "--parsable", str(job)], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout.strip()
        state_ = _wait_done(jid, env, 180)
        logs = "\n".join(f.read_text()[-1500:] for f in sorted((state / "log").glob("*.log")))
        assert state_ == "COMPLETED", f"job {jid}: {state_}\n{logs}"
        out = (tmp_path / f"out-{jid}.txt").read_text().split("\n")
        assert sorted(line for line in out if line) == ["0 2", "1 2"]  # one MPI world of 2 under srun
        # a second start finds it running and changes nothing
        again = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0 and "already running" in again.stderr
    finally:
        pids = [int((state / f"{n}.pid").read_text()) for n in ("munged", "slurmctld", "slurmd")
                if (state / f"{n}.pid").exists()]
        down = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True,
                              text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert len(pids) == 3
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_epilog_clears_the_mpi_segments_of_killed_jobs_and_keeps_live_ones(tmp_path):
    """A cancelled srun step leaves its MPICH segment, named by its SLURM job and step id; a later
    job with those ids (a requeue, a restarted local SLURM) would attach to it and die in MPI_Init.
    The node's epilog removes it, and stale ones of earlier runs, but keeps any a process holds."""
    shm = Path("/dev/shm")
    stale = shm / f"mpich_shm_scoredatest{os.getpid()}_0"
    held = shm / f"mpich_shm_scoredatest{os.getpid()}_1"
    stale.write_bytes(b"\0" * 4096)
    held.write_bytes(b"\0" * 4096)
    state = tmp_path / "slurm"
    env = {**os.environ, "SCOREDA_SLURM_DIR": str(state), "SCOREDA_SLURM_PORT": str(free_port_pair())}
    with held.open("r+b") as f, mmap.mmap(f.fileno(), 4096) as live:
        time.sleep(1.1)  # both older than any scan from here on
        try:
            up = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True,
                                text=True, timeout=120)
            assert up.returncode == 0, up.stderr
            assert not stale.exists() and held.exists()  # start clears what earlier runs left
            stale.write_bytes(b"\0" * 4096)
            time.sleep(0.2)  # older than the epilog's scan by more than its 50 ms margin
            env["SLURM_CONF"] = str(state / "slurm.conf")
            out = tmp_path / "out.txt"
            rank = tmp_path / "rank.py"  # each rank prints the segment it maps, then waits
            rank.write_text("import time\nfrom mpi4py import MPI\nMPI.COMM_WORLD.Barrier()\n"
                            "maps = open('/proc/self/maps').read().split()\n"
                            "print('segment', *{m for m in maps if m.startswith('/dev/shm/mpich_shm')},"
                            " flush=True)\ntime.sleep(300)\n")
            job = tmp_path / "job.sh"
            job.write_text(f"#!/bin/bash\n#SBATCH -n 2\n#SBATCH -o {out}\nsrun {PYTHON} {rank}\n")
            jid = subprocess.run(["sbatch", "--parsable", str(job)], env=env, capture_output=True,
                                 text=True, timeout=60, check=True).stdout.strip()
            deadline = time.time() + 120
            while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
                time.sleep(0.05)
            lines = out.read_text().splitlines()
            own = {Path(p) for line in lines for p in line.split()[1:]}
            assert len(lines) == 2 and len(own) == 1, lines  # both ranks share one segment
            # cancelled at once: in the second it started, which a one-second clock would miss
            subprocess.run(["scancel", jid], env=env, check=True, timeout=30)
            assert _wait_done(jid, env, 60) == "CANCELLED"
            deadline = time.time() + 30  # the epilog runs as the job completes
            while time.time() < deadline and (stale.exists() or any(p.exists() for p in own)):
                time.sleep(0.3)
            assert not stale.exists() and not any(p.exists() for p in own)
            assert held.exists() and live[:4] == b"\0" * 4
        finally:
            subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60)
            stale.unlink(missing_ok=True)
            held.unlink(missing_ok=True)
