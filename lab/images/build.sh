#!/usr/bin/env bash
# Build a lab image from Debian packages: debootstrap + docker import.
#   lab/images/build.sh NAME     prints the image reference (mlfleet-lab/NAME:<hash>)
#
# lab/images/NAME/image.conf sets PACKAGES, ENTRYPOINT (JSON) and optional CMD;
# lab/images/NAME/rootfs/ is copied over the root file system;
# an executable lab/images/NAME/customize.sh runs last with ROOTFS set.
#
# Cached by a hash of every input: an existing image with that tag is reused at
# once; otherwise a kept root file system tarball is imported (seconds);
# otherwise debootstrap runs (about a minute). MLFLEET_LAB_REBUILD=1 forces it.
set -euo pipefail
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"

name=${1:?usage: $0 IMAGE_NAME}
image_dir="$LAB_ROOT/images/$name"
[ -f "$image_dir/image.conf" ] || die "no image definition at $image_dir/image.conf"

PACKAGES="" ENTRYPOINT="" CMD=""
# shellcheck source=/dev/null
. "$image_dir/image.conf"

arch=$(dpkg --print-architecture)
input_hash=$(
    {
        printf 'suite=%s arch=%s\n' "$LAB_SUITE" "$arch"
        sha256sum < "$0"
        cd "$image_dir" && find . -type f -print0 | sort -z |
            xargs -0 -I{} sh -c 'stat -c "%n %a" "{}"; sha256sum "{}"'
    } | sha256sum | cut -c1-16
)
repo="mlfleet-lab/$name"
ref="$repo:$input_hash"

if [ "${MLFLEET_LAB_REBUILD:-0}" != 1 ] && docker image inspect "$ref" >/dev/null 2>&1; then
    log "image $ref is current (cached)"
    docker tag "$ref" "$repo:latest"
    echo "$ref"
    exit 0
fi

mkdir -p "$LAB_CACHE"
tarball="$LAB_CACHE/$name-$input_hash.tar"
if [ "${MLFLEET_LAB_REBUILD:-0}" = 1 ] || [ ! -s "$tarball" ]; then
    require_root "debootstrap"
    command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
    mirror=$(apt_mirror "$LAB_SUITE")
    work=$(mktemp -d "$LAB_CACHE/.build-$name.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    rootfs="$work/rootfs"
    log "debootstrap $LAB_SUITE for image '$name' (log: $work/debootstrap.log is removed on success)"
    include=$(echo "$PACKAGES" | tr -s ' ' ',')
    if ! debootstrap --variant=minbase --include="$include" "$LAB_SUITE" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
        tail -n 30 "$work/debootstrap.log" >&2
        cp "$work/debootstrap.log" "$LAB_CACHE/$name-debootstrap-failed.log"
        die "debootstrap failed for image '$name'; full log in $LAB_CACHE/$name-debootstrap-failed.log"
    fi
    if [ -d "$image_dir/rootfs" ]; then
        cp -a "$image_dir/rootfs/." "$rootfs/"
    fi
    # A template must not carry per-machine identity or build leftovers.
    rm -f "$rootfs"/etc/ssh/ssh_host_*
    : > "$rootfs/etc/machine-id"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
    if [ -x "$image_dir/customize.sh" ]; then
        ROOTFS="$rootfs" "$image_dir/customize.sh"
    fi
    tar --numeric-owner --xattrs -C "$rootfs" -cf "$tarball.partial" .
    mv "$tarball.partial" "$tarball"
    # Older tarballs of this image are superseded by this one.
    find "$LAB_CACHE" -maxdepth 1 -name "$name-*.tar" ! -name "$name-$input_hash.tar" -delete
fi

changes=(-c "LABEL io.mlfleet.lab.image=$name" -c "LABEL io.mlfleet.lab.input-hash=$input_hash")
[ -n "$ENTRYPOINT" ] && changes+=(-c "ENTRYPOINT $ENTRYPOINT")
[ -n "$CMD" ] && changes+=(-c "CMD $CMD")
log "importing $ref"
docker import "${changes[@]}" "$tarball" "$ref" >/dev/null
docker tag "$ref" "$repo:latest"
echo "$ref"
