#!/bin/sh
# Container entry point: m2das commands go to the m2das CLI (prepare, train and
# submit with the container's folders filled in), anything else runs as given
# (`docker run m2das bash`). The command list is the CLI's own
# (`m2das --commands`), not kept here. Every command is exec'd so that the
# signals a scheduler sends before a preemption (SIGTERM, SIGUSR1) reach the
# trainer itself.
set -eu

audio_dir=${M2DAS_AUDIO_DIR:-/audio}
data_dir=${M2DAS_DATA_DIR:-/data}
runs_dir=${M2DAS_RUNS_DIR:-/runs}
metadata_dir=${M2DAS_METADATA_DIR:-/metadata}
launch_dir=${M2DAS_LAUNCH_DIR:-/opt/m2das/launch}

# The CLI's commands, `NAME  description` a line (empty when m2das is missing).
cli_commands() {
    m2das --commands 2>/dev/null || true
}

# is_cli_command NAME: NAME is one of the CLI's commands.
is_cli_command() {
    commands=$(cli_commands)
    while read -r name _; do
        [ "$name" = "$1" ] && return 0
    done <<EOF
$commands
EOF
    return 1
}

usage() {
    echo "m2das container: COMMAND [ARGS]"
    echo
    echo "m2das commands (COMMAND --help shows its options):"
    cli_commands | sed 's/^/  /'
    cat <<EOF

Container folders (docker run -e M2DAS_AUDIO_DIR=... to move them):
  prepare [AUDIO DATA]  default $audio_dir -> $data_dir; AudioSet lists
                        from $metadata_dir when present
  train                 --data_path $data_dir, run folders under $runs_dir
  submit                python $launch_dir/submit.py, --runs-dir $runs_dir;
                        --cluster local runs in the foreground
  help                  this text
  COMMAND [ARGS]        any other program runs as given (bash, python, ...)
EOF
}

# has_option NAME ARGS...: true when ARGS set option NAME (`NAME V` or `NAME=V`).
has_option() {
    name=$1
    shift
    for arg in "$@"; do
        case $arg in
            "$name" | "$name"=*) return 0 ;;
        esac
    done
    return 1
}

# local_cluster ARGS...: the launcher flags (before `--`) choose `--cluster local`.
local_cluster() {
    cluster=
    previous=
    for arg in "$@"; do
        [ "$arg" = -- ] && break
        case $arg in
            --cluster=*) cluster=${arg#--cluster=} ;;
        esac
        if [ "$previous" = --cluster ]; then
            cluster=$arg
        fi
        previous=$arg
    done
    [ "$cluster" = local ]
}

if [ $# -eq 0 ]; then
    set -- help
fi

command=$1
shift
case $command in
    prepare)
        # Folders come first; with none given (no arguments, or options only)
        # the container's folders are used.
        if [ $# -eq 0 ] || [ "${1#-}" != "$1" ]; then
            set -- "$audio_dir" "$data_dir" "$@"
        fi
        # Mounted AudioSet lists spare the download (which needs internet).
        if [ -f "$metadata_dir/class_labels_indices.csv" ] && ! has_option --metadata "$@"; then
            set -- "$@" --metadata "$metadata_dir"
        fi
        exec m2das prepare "$@"
        ;;
    train)
        # The container's folders go first: the caller's own flags come later
        # and win (the last value of an option counts).
        exec m2das train --data_path "$data_dir" --runs_dir "$runs_dir" "$@"
        ;;
    submit)
        if [ ! -f "$launch_dir/submit.py" ]; then
            echo "m2das entrypoint: $launch_dir/submit.py not found (set M2DAS_LAUNCH_DIR)" >&2
            exit 2
        fi
        # --runs-dir is a launcher flag (first, so the caller's wins); the
        # trainer's --data_path goes last, where the launcher hands it on.
        set -- --runs-dir "$runs_dir" "$@"
        # A detached supervisor would end with the entry point, and the
        # container with it: the launcher itself supervises the ranks.
        if local_cluster "$@" && ! has_option --foreground "$@"; then
            set -- --foreground "$@"
        fi
        if ! has_option --data_path "$@" && ! has_option --data-path "$@"; then
            set -- "$@" --data_path "$data_dir"
        fi
        exec python "$launch_dir/submit.py" "$@"
        ;;
    help | -h | --help)
        usage
        ;;
    *)
        if is_cli_command "$command"; then
            exec m2das "$command" "$@"
        fi
        exec "$command" "$@"
        ;;
esac
