#!/usr/bin/env bash
# Epilog of the local SLURM (env/slurm.sh), also run when it starts and stops: removes the MPICH
# shared-memory segments in /dev/shm that no live process holds.
#
# MPICH names a job step's segment after a hash of its PMI job id, which under srun is the SLURM
# job and step id; a step killed mid-run (scancel, a time limit, a requeue) leaves its segment
# behind. A later step with the same ids (the requeued job's rerun, or a job of a restarted local
# SLURM, whose ids start again at 1) attaches to the stale segment and dies in MPI_Init with
# "Message truncated" while its other ranks hang. On a cluster the site's epilog or job container
# usually clears /dev/shm; this one does it for one machine.
#
# A segment is stale when it was created (ctime) before this scan began and no process maps it or
# holds it open: MPICH's creator keeps the file open from shm_open until it has mapped it, and the
# mapping lives as long as the job. Times are compared in nanoseconds (a job cancelled in the
# second it started would otherwise keep its segment), with 50 ms to spare for the kernel's coarse
# file clock. A failing epilog drains the node, so this always exits 0.

start="$(($(date +%s%N) - 50000000))"
held="$(
    {
        cat /proc/[0-9]*/maps 2>/dev/null
        ls -l /proc/[0-9]*/fd 2>/dev/null
    } | grep -o '/dev/shm/mpich_[^ ]*' | sort -u
)"
for seg in /dev/shm/mpich_shm_* /dev/shm/mpich_vci_*; do
    [[ -f "$seg" ]] || continue
    grep -qxF "$seg" <<<"$held" && continue
    ctime="$(stat -c %.9Z "$seg" 2>/dev/null)" || continue
    ((${ctime/./} < start)) && rm -f "$seg"
done
exit 0
