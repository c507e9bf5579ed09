#!/usr/bin/env bash
# Sourced by the m2das sbatch templates: run the trainer under srun, forward the
# warning signal to it, and requeue the job when the trainer says "resume me".
#
# Protocol (see README "Cluster launch"): SLURM signals the batch shell
# (--signal=B:USR1@120); we forward SIGUSR1 to the srun step, the trainer saves
# RUN/last.pth at the next optimizer step and exits 75; we then requeue the job
# with `scontrol requeue`, and the next start resumes (--resume auto) in the
# same run folder. A step killed by SIGKILL (OOM killer, kill -9) exits 137 and
# is requeued as well; node failures are requeued by SLURM itself (--requeue).
# A finished run, exit 3 (loss diverged) and other errors are never requeued.
#
# Variables a template sets before calling m2das_run:
#   M2DAS_RUN           run folder (fixed for the life of the run; required)
#   M2DAS_MAX_REQUEUES  stop requeueing after this many restarts (default 100)

m2das_log() {
    printf '[m2das-sbatch %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2
}

m2das_forward() {
    # $1: signal name. Forward to every task of the running step, once.
    m2das_log "received SIG$1; asking the trainer to save and stop"
    m2das_signalled=1
    if [ -n "${m2das_srun_pid:-}" ]; then
        # srun passes SIGUSR1/SIGUSR2/SIGTERM on to all tasks of the step.
        kill -s "$1" "$m2das_srun_pid" 2>/dev/null || true
    fi
}

m2das_record() {
    # $1: event, $2: reason. One JSON line in RUN/launcher.jsonl.
    printf '{"by": "sbatch-template", "event": "%s", "job_id": "%s", "reason": "%s", "restart_count": %s, "time": "%s"}\n' \
        "$1" "${SLURM_JOB_ID:-}" "$2" "${SLURM_RESTART_COUNT:-0}" "$(date -u +%Y-%m-%dT%H:%M:%S+00:00)" \
        >>"$M2DAS_RUN/launcher.jsonl"
}

m2das_run() {
    # Usage: m2das_run COMMAND... (the srun line, e.g. srun ... m2das train ...).
    : "${M2DAS_RUN:?set M2DAS_RUN to the run folder before m2das_run}"
    local max="${M2DAS_MAX_REQUEUES:-100}" restart="${SLURM_RESTART_COUNT:-0}" rc
    mkdir -p "$M2DAS_RUN"
    m2das_record start "job start"
    trap 'm2das_forward USR1' USR1
    trap 'm2das_forward USR2' USR2
    trap 'm2das_forward TERM' TERM
    "$@" &
    m2das_srun_pid=$!
    # `wait` returns early when a trapped signal arrives: keep waiting for srun.
    while true; do
        wait "$m2das_srun_pid"
        rc=$?
        if ! kill -0 "$m2das_srun_pid" 2>/dev/null; then
            break
        fi
    done
    trap - USR1 USR2 TERM
    # The trainer's own record says how this start ended ("stopped" on a signal after
    # saving, "finished", "diverged"). Once one task exits 75, srun --kill-on-bad-exit
    # may terminate a slower one (exit 143), so srun's code alone is not enough.
    local event
    event="$(tail -n 1 "$M2DAS_RUN/restarts.jsonl" 2>/dev/null | sed -n 's/.*"event": *"\([a-z_]*\)".*/\1/p')"
    if [ "$rc" -eq 3 ] || [ "$event" = diverged ]; then
        m2das_log "loss diverged (exit 3); not requeued. See $M2DAS_RUN/log.jsonl"
    elif [ "$event" = finished ]; then
        m2das_log "training finished"
    elif [ -n "${m2das_signalled:-}" ] || [ "$rc" -eq 75 ] || [ "$rc" -eq 137 ]; then
        if [ "$restart" -ge "$max" ]; then
            m2das_log "exit $rc but $restart restarts reached M2DAS_MAX_REQUEUES=$max; not requeued." \
                "Resubmit this script to continue in $M2DAS_RUN"
            m2das_record requeue_cap "exit $rc after $restart restarts"
        else
            m2das_log "stopped (exit $rc, last trainer event: ${event:-none}); requeueing job $SLURM_JOB_ID"
            m2das_record requeue "exit $rc"
            scontrol requeue "$SLURM_JOB_ID"
        fi
    elif [ "$rc" -eq 0 ]; then
        m2das_log "trainer exited 0"
    else
        m2das_log "trainer failed with exit $rc; not requeued. See the job's output"
    fi
    return "$rc"
}
