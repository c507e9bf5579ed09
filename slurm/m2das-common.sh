#!/usr/bin/env bash
# Sourced by the m2das sbatch templates: run the trainer under srun, forward the
# warning signal to it, and ask the requeue policy what to do when srun returns.
#
# Protocol (see README "Cluster launch"): SLURM signals the batch shell
# (--signal=B:USR2@120, the signal and lead time of m2das/cluster/requeue.py); we
# forward it to the srun step, the trainer saves RUN/last.pth at the next
# optimizer step and exits 75. Then `python -m m2das.cluster.requeue decide` (the one
# policy, shared with the submitit launcher and the local supervisor) says
# requeue, and we run `scontrol requeue`; the next start resumes (--resume auto)
# in the same run folder. Node failures are requeued by SLURM itself (--requeue).
#
# Set by a template before calling m2das_run:
#   M2DAS_RUN           run folder (fixed for the life of the run; required)
#   M2DAS_MAX_REQUEUES  stop requeueing after this many restarts (empty: the policy's default)
#   m2das_python        a function running the Python that has m2das (venv, container, ...)

m2das_log() {
    printf '[m2das-sbatch %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2
}

m2das_forward() {
    # $1: signal name. Forwarded to every task of the step now, and again every few
    # seconds until srun ends: a task still starting up ignores it.
    m2das_log "received SIG$1; asking the trainer to save and stop"
    m2das_signal=$1
    if [ -n "${m2das_srun_pid:-}" ]; then
        kill -s "$1" "$m2das_srun_pid" 2>/dev/null || true
    fi
}

m2das_run() {
    # Usage: m2das_run COMMAND... (the srun line, e.g. srun ... m2das train ...).
    : "${M2DAS_RUN:?set M2DAS_RUN to the run folder before m2das_run}"
    local rc action
    mkdir -p "$M2DAS_RUN"
    m2das_signal=
    trap 'm2das_forward USR1' USR1
    trap 'm2das_forward USR2' USR2
    trap 'm2das_forward TERM' TERM
    "$@" &
    m2das_srun_pid=$!
    while kill -0 "$m2das_srun_pid" 2>/dev/null; do
        if [ -n "$m2das_signal" ]; then
            kill -s "$m2das_signal" "$m2das_srun_pid" 2>/dev/null || true
        fi
        sleep 3 &
        wait "$!"  # returns early when a trapped signal arrives
    done
    wait "$m2das_srun_pid"
    rc=$?
    trap - USR1 USR2 TERM
    # The policy also reads the trainer's own record of this start: once one task
    # exits 75, srun --kill-on-bad-exit may kill a slower one, so rc alone is not enough.
    local signalled=()
    [ -n "$m2das_signal" ] && signalled=(--signalled)
    action="$(m2das_python -m m2das.cluster.requeue decide --by sbatch-template --run "$M2DAS_RUN" \
        --max-requeues "${M2DAS_MAX_REQUEUES:-}" "${signalled[@]}" "$rc")"
    if [ "$action" = requeue ]; then
        m2das_log "requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
