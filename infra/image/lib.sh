# Shared by infra/image/build and .ci/image (sourced, not run): the container engine
# with the options this machine kind needs, and the local base image.
#
# podman (Debian's) as root, with:
#   - runc: crun rejects the hybrid cgroup v1/v2 hierarchy of these machines;
#   - the host network: no iptables/bridge set-up is needed, and pip reaches the
#     package index the way the host does;
#   - ulimits no higher than this session's hard limits (podman's defaults are
#     higher and runc then fails with "error setting rlimit ... operation not permitted");
#   - image format "docker": the OCI format has no HEALTHCHECK and buildah drops it.

# shellcheck disable=SC2034 # PODMAN_LIMITS, LOCAL_BASE: for the scripts that source this file
PODMAN=(podman --runtime runc)
_nofile=$(ulimit -Hn)
[[ $_nofile == unlimited || $_nofile -gt 65536 ]] && _nofile=65536
# The service needs a handful of processes; podman's own NPROC limit can be below the session's.
PODMAN_LIMITS=(--network host --ulimit "nofile=$_nofile:$_nofile" --ulimit nproc=4096:4096)
unset _nofile

CACHE_DIR=${ORDERS_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orders-ci}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

log() { printf '==> %s\n' "$*" >&2; }

# Installs the Debian packages behind the given commands when one is missing.
ensure_commands() { # pairs: command package ...
    local missing=()
    while (($#)); do
        command -v "$1" >/dev/null 2>&1 || missing+=("$2")
        shift 2
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_podman() {
    ensure_commands podman podman runc runc
}

# A Debian bookworm root filesystem with CPython 3.11 from Debian's packages, made with
# mmdebstrap and imported as an image: the stand-in for python:3.11-slim-bookworm
# where no container registry is reachable. Same layout for the Dockerfile's purpose
# (python3 with venv, CA certificates, passwd tools). Kept in $CACHE_DIR as a tarball
# and in podman's storage, named by a hash of this recipe: a change of recipe makes a
# new one; deleting the cache makes it again (about 2-3 minutes).
# Sets LOCAL_BASE to the image name.
LOCAL_BASE_PACKAGES=python3,python3-venv,ca-certificates,netbase,tzdata
local_base_image() {
    local recipe key tar image old
    recipe=$(printf '%s\n' "bookworm minbase merged-usr no-recommends" "$LOCAL_BASE_PACKAGES" \
        "$DEBIAN_MIRROR" "$DEBIAN_SECURITY_MIRROR" "nodoc v1")
    key=$(sha256sum <<<"$recipe" | cut -c1-12)
    image="localhost/orders-base:bookworm-$key"
    tar="$CACHE_DIR/orders-base-bookworm-$key.tar"
    mkdir -p "$CACHE_DIR"
    (
        flock 9 # one maker at a time; the others wait and then find it made
        if "${PODMAN[@]}" image exists "$image"; then
            exit 0
        fi
        if [[ ! -s $tar ]]; then
            ensure_commands mmdebstrap mmdebstrap
            log "making the local base with mmdebstrap (Debian bookworm; cached in $CACHE_DIR)"
            rm -f "$CACHE_DIR"/orders-base-bookworm-*.tar # older recipes
            rm -f "$tar.part"
            mmdebstrap --quiet --format=tar --variant=minbase --include="$LOCAL_BASE_PACKAGES" \
                --aptopt='APT::Install-Recommends "false"' \
                --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
                --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
                --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
                --dpkgopt='path-exclude=/usr/share/locale/*' \
                bookworm "$tar.part" \
                "deb $DEBIAN_MIRROR bookworm main" \
                "deb $DEBIAN_MIRROR bookworm-updates main" \
                "deb $DEBIAN_SECURITY_MIRROR bookworm-security main"
            mv "$tar.part" "$tar"
        fi
        log "importing $tar as $image"
        "${PODMAN[@]}" import --quiet --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
            "$tar" "$image" >/dev/null
        for old in $("${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}}' localhost/orders-base); do
            [[ $old == "$image" ]] || "${PODMAN[@]}" rmi "$old" >/dev/null || true
        done
    ) 9>"$CACHE_DIR/lock"
    LOCAL_BASE=$image
}
