#!/usr/bin/env bash
# Opt-in, slow (not in CI): build the image on a machine that has neither a
# Docker engine nor access to a container registry, then run `m2das prepare`
# inside it.
#
#   sudo docker/build-local.sh           # everything
#   sudo docker/build-local.sh base      # only the Debian base image
#   sudo docker/build-local.sh build     # (re)build the image
#   sudo docker/build-local.sh test      # prepare, a tiny training run, status in the image
#   sudo docker/build-local.sh demo      # `m2das demo` in the image
#
# The CUDA base cannot be pulled here, so a Debian bookworm minbase made with
# debootstrap stands in for it through the BASE_IMAGE build argument (its
# Python 3.11 matches cp311 wheels). pip inside the build uses this machine's
# CA bundle, constraints and local wheel folders, mounted read-only and passed
# as PIP_* build arguments. `podman run` does not work here either, so the test
# mounts the image and chroots into it, with the image's own user, environment
# and entry point.
#
# Needs root and: apt-get install -y podman debootstrap
# Settings (environment): M2DAS_BUILD_DIR (default /var/tmp/m2das-build; holds
# the rootfs, podman storage and test folders, keep it outside the repo),
# M2DAS_IMAGE, DEBIAN_MIRROR, M2DAS_TEST_CLIPS, M2DAS_METADATA (AudioSet lists).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=${M2DAS_BUILD_DIR:-/var/tmp/m2das-build}
image=${M2DAS_IMAGE:-localhost/m2das:local}
base_image=localhost/m2das-base:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
clips=${M2DAS_TEST_CLIPS:-6}
metadata=${M2DAS_METADATA:-$repo/../shared/audioset}
# The build mounts this machine's CA bundle at a path of its own: the image
# installs ca-certificates, which must be free to write the standard path.
ca_in_build=/run/build-ca/ca-certificates.crt

die() {
    echo "build-local: $*" >&2
    exit 1
}

podman_() {
    podman --root "$work/storage" --runroot "$work/runroot" "$@"
}

elapsed() {
    echo "build-local: $1 took $(($(date +%s) - $2)) s"
}

# The pip settings of this machine, for the build: a value from the
# environment, else from pip's own configuration.
pip_setting() {
    local env_name=$1 key=$2 value
    value=${!env_name:-}
    if [ -z "$value" ]; then
        # `pip config list` merges every configuration file (`get` reads one).
        value=$(python3 -m pip config list 2>/dev/null | sed -n "s/^$key='\\(.*\\)'\$/\\1/p" | tail -n 1)
    fi
    printf '%s' "$value"
}

stage_base() {
    if podman_ image exists "$base_image"; then
        echo "build-local: $base_image exists (remove it to bootstrap again)"
        return
    fi
    local start
    start=$(date +%s)
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror"
    tar -C "$work/rootfs" -c . | podman_ import - "$base_image"
    rm -rf "$work/rootfs"
    elapsed "base image (debootstrap + import)" "$start"
}

stage_build() {
    podman_ image exists "$base_image" || die "no base image; run: $0 base"
    local -a volumes=() build_args=()
    local cert find_links extra_index constraint folder start
    cert=$(pip_setting PIP_CERT global.cert)
    cert=${cert:-/etc/ssl/certs/ca-certificates.crt}
    [ -f "$cert" ] || die "CA bundle $cert not found"
    volumes+=(--volume "$cert:$ca_in_build:ro")
    build_args+=(--build-arg "PIP_CERT=$ca_in_build")

    find_links=$(pip_setting PIP_FIND_LINKS global.find-links)
    extra_index=$(pip_setting PIP_EXTRA_INDEX_URL global.extra-index-url)
    constraint=$(pip_setting PIP_CONSTRAINT global.constraint)
    # Local folders are mounted at the same paths so the settings stay valid; a
    # simple index links to files beside it (../../files), so its parent goes in.
    for folder in $find_links $extra_index $constraint; do
        folder=${folder#file://}
        folder=${folder%/}
        case $folder in
            /*/simple) folder=$(dirname "$folder") ;;
            /*) ;;
            *) continue ;;
        esac
        if [ -e "$folder" ]; then
            volumes+=(--volume "$folder:$folder:ro")
        fi
    done
    build_args+=(--build-arg "PIP_FIND_LINKS=$find_links"
        --build-arg "PIP_EXTRA_INDEX_URL=$extra_index"
        --build-arg "PIP_CONSTRAINT=$constraint")

    echo "build-local: podman build ${build_args[*]} ${volumes[*]}"
    start=$(date +%s)
    # docker format: OCI images drop SHELL (the Dockerfile's pipefail).
    podman_ build --isolation=chroot --network=host --format docker \
        --build-arg "BASE_IMAGE=$base_image" "${build_args[@]}" "${volumes[@]}" \
        --tag "$image" --file "$repo/Dockerfile" "$repo"
    elapsed "image build" "$start"
    # Layers of earlier builds of the tag: several GB each.
    podman_ image prune --force > /dev/null
    podman_ image ls "$image"
    podman_ history --format '{{.Size}}\t{{.CreatedBy}}' "$image" | cut -c1-140
}

# Everything below runs in a private mount namespace (see stage_test).
chroot_test() {
    local root=$1 test_dir=$2 what=$3 user env_file start
    for dir in audio data runs metadata tmp; do
        mount --bind "$test_dir/$dir" "$root/$dir"
    done
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    user=$(podman_ image inspect --format '{{.Config.User}}' "$image")
    local -a entrypoint=()
    mapfile -t entrypoint < <(podman_ image inspect --format '{{range .Config.Entrypoint}}{{println .}}{{end}}' "$image" | grep .)
    env_file=$test_dir/image.env
    podman_ image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$image" \
        | grep . > "$env_file"

    in_image() {
        # The image's environment, user and entry point, as `docker run` would.
        local -a env_args=()
        mapfile -t env_args < "$env_file"
        chroot --userspec="$user" "$root" /usr/bin/env -i "${env_args[@]}" HOME=/tmp \
            "${entrypoint[@]}" "$@"
    }

    if [ "$what" = demo ]; then
        # The whole job on its own synthetic corpus, SIGTERM and resume included.
        start=$(date +%s)
        in_image demo --out /runs/demo
        elapsed "m2das demo in the image" "$start"
        return
    fi

    echo "build-local: clips named after AudioSet YTIDs so the labels step finds them"
    in_image python - "$clips" <<'EOF'
import csv, sys
import numpy as np
import soundfile as sf

count = int(sys.argv[1])
rows = [r for r in csv.reader(open("/metadata/balanced_train_segments.csv"), skipinitialspace=True)
        if r and not r[0].startswith("#")][:count]
rng = np.random.default_rng(0)
for i, (ytid, start, *_rest) in enumerate(rows):
    sr = (16000, 32000, 44100)[i % 3]
    t = np.arange(10 * sr) / sr
    wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)[:, None] + 0.05 * rng.standard_normal((t.size, 2))
    sf.write(f"/audio/{ytid}_{float(start):.3f}.wav", wave.astype(np.float32), sr, subtype="PCM_16")
print(f"wrote {len(rows)} clips")
EOF
    in_image python -c 'import torch, torchaudio, timm, m2das; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchaudio", torchaudio.__version__, "timm", timm.__version__)'
    # Every command of the CLI, as the entry point's first word (the list is the CLI's own).
    local command
    while read -r command _; do
        in_image "$command" --help > /dev/null || die "'$command --help' failed in the image"
    done < <(in_image m2das --commands)

    start=$(date +%s)
    in_image prepare --workers 2 --no-progress
    elapsed "m2das prepare in the image ($clips clips)" "$start"

    local data=$test_dir/data npy
    npy=$(find "$data/audioset_lms" -name '*.npy' | wc -l)
    [ "$npy" -eq "$clips" ] || die "expected $clips LMS files, found $npy"
    for file in files_audioset.csv files_as_weighted.csv norm_stats.json; do
        [ -s "$data/$file" ] || die "missing $data/$file"
    done
    [ "$(stat -c %u "$data/norm_stats.json")" = "${user%%:*}" ] || die "outputs not owned by the image user"
    echo "build-local: prepare outputs OK: $npy LMS files, lists, norm_stats.json"

    # A few steps of a tiny model on CPU: the trainer, its data loader (one
    # worker) and its checkpoints work in the image, on the prepared data.
    start=$(date +%s)
    in_image train --model m2d_as_vit_tiny --device cpu --input_size 80x208 --epochs 1 \
        --batch_size 2 --num_workers 1 --warmup_epochs 1 --log_every 1 --save_freq 1 \
        --stats_files 6 --output_dir /runs/tiny
    elapsed "m2das train (tiny model, CPU, 1 epoch) in the image" "$start"
    [ -s "$test_dir/runs/tiny/checkpoint-1.pth" ] || die "no checkpoint-1.pth in $test_dir/runs/tiny"
    [ -s "$test_dir/runs/tiny/log.jsonl" ] || die "no log.jsonl in $test_dir/runs/tiny"
    in_image status /runs/tiny
    echo "build-local: train outputs OK: $(find "$test_dir/runs/tiny" -mindepth 1 -maxdepth 1 -printf "%f ")"
}

stage_test() {
    local what=${1:-test}
    podman_ image exists "$image" || die "no image $image; run: $0 build"
    [ -f "$metadata/balanced_train_segments.csv" ] || die "AudioSet lists not found in $metadata (set M2DAS_METADATA)"
    local test_dir=$work/test root uid
    rm -rf "$test_dir"
    mkdir -p "$test_dir"/{audio,data,runs,metadata,tmp}
    cp "$metadata"/*.csv "$test_dir/metadata/"
    uid=$(podman_ image inspect --format '{{.Config.User}}' "$image")
    uid=${uid%%:*}
    chown "$uid:$uid" "$test_dir"/{audio,data,runs,tmp}
    chmod 1777 "$test_dir/tmp"
    root=$(podman_ image mount "$image")
    local status=0
    # A private mount namespace: every bind mount disappears with it.
    unshare --mount --propagation private "$0" __chroot "$root" "$test_dir" "$what" || status=$?
    podman_ image unmount "$image" > /dev/null
    [ "$status" -eq 0 ] || die "chroot $what failed (exit $status)"
    echo "build-local: chroot $what passed"
}

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, podman image mount, chroot)"
for tool in podman debootstrap unshare chroot; do
    command -v "$tool" > /dev/null || die "$tool not found; apt-get install -y podman debootstrap"
done
mkdir -p "$work"

case ${1:-all} in
    base) stage_base ;;
    build) stage_build ;;
    test) stage_test ;;
    demo) stage_test demo ;;
    all)
        stage_base
        stage_build
        stage_test
        stage_test demo
        ;;
    __chroot) chroot_test "$2" "$3" "$4" ;;
    *) die "usage: $0 [base|build|test|demo|all]" ;;
esac
