#!/usr/bin/env bash
# Fresh-machine set-up for ctstream (Debian 12, root). Idempotent: a second run
# only checks and takes a second or two.
#
#   - Debian packages (BCC, kernel headers, network tools, JDK + Maven)
#   - /lib/modules/$(uname -r)/{build,source} -> Debian's linux-headers, so that
#     BCC can compile BPF C for a kernel that has no headers of its own
#   - bpffs mounted at /sys/fs/bpf
#   - .venv from Debian's /usr/bin/python3 with --system-site-packages (bcc is
#     not on PyPI), with the project installed editable with its [test] extra,
#     which takes in [postgres] and [validate] (a daemon node needs neither:
#     `pip install .`; tests/unit/test_packaging.py checks the lowest pins)
#   - the Kafka broker's jars from Maven Central (scripts/kafka.sh fetch), for
#     the demo and tests/kafka
#
# Quiet: one line per step that does something; full apt/pip output goes to
# .cache/setup.log, whose tail is printed on failure.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
ROOT=$PWD

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must be run as root (BPF, bpffs, apt); try: sudo $0" >&2
    exit 1
fi

# The Python that can import bcc is Debian's, not whatever is first on PATH
# (e.g. pyenv's).
SYS_PY=/usr/bin/python3
VENV=$ROOT/.venv
STAMP=$VENV/.ctstream-installed
LOG_DIR=$ROOT/.cache
LOG=$LOG_DIR/setup.log

PACKAGES=(
    python3-bpfcc bpfcc-tools libbpf1 linux-headers-amd64 python3-venv
    iproute2 conntrack iperf3 hping3 ethtool nftables tcpdump netcat-openbsd
    default-jdk-headless maven postgresql mosquitto mosquitto-clients
    python3-fusepy  # tests/crashfs.py: the power-cut filesystem (FUSE, libfuse2)
    nfdump          # tests/ipfix: nfcapd, a real IPFIX collector, and nfdump to read it
    libfixbuf-tools # tests/ipfix: ipfixDump, an independent IPFIX decoder (the TCP stream)
)

unset PYTHONHOME PYTHONPATH
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off

mkdir -p "$LOG_DIR"
# One set-up at a time (e.g. `make test` and `make demo` started together).
exec 9>"$LOG_DIR/setup.lock"
flock 9
: >"$LOG"

say() { echo "setup: $*"; }

fail() {
    echo "setup: FAILED: $*" >&2
    if [ -s "$LOG" ]; then
        echo "setup: last lines of $LOG:" >&2
        tail -n 40 "$LOG" | sed 's/^/  | /' >&2
    fi
    exit 1
}

trap 'fail "unexpected error at line $LINENO (exit $?)"' ERR

# run CMD...: run with output to the log; on failure show the log's tail.
run() {
    echo "+ $*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 || fail "$*"
}

# --- Debian packages ----------------------------------------------------------
missing=()
installed=$(dpkg-query -W -f='${Package} ${Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)
for p in "${PACKAGES[@]}"; do
    grep -qx "$p install ok installed" <<<"$installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    apt_opts=(-q -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300)
    run apt-get "${apt_opts[@]}" update
    run apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}"
fi

# --- kernel headers for BCC ---------------------------------------------------
# BCC looks for /lib/modules/$(uname -r)/build (the arch part of the headers)
# and .../source (the common part; without it: "./include/linux/kconfig.h not
# found"). Debian-packaged kernels already have both; for any other kernel point
# them at the newest installed Debian linux-headers-*-amd64.
KREL=$(uname -r)
MODDIR=/lib/modules/$KREL
if [ ! -d "/usr/src/linux-headers-$KREL" ] && ! { [ -d "$MODDIR/build" ] && [ ! -L "$MODDIR/build" ]; }; then
    hdr_build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$hdr_build" ] || fail "no /usr/src/linux-headers-*-amd64 (is linux-headers-amd64 installed?)"
    hdr_source=${hdr_build%-amd64}-common
    [ -d "$hdr_source" ] || fail "$hdr_source is missing (next to $hdr_build)"
    if [ "$(readlink "$MODDIR/build" || true)" != "$hdr_build" ] ||
       [ "$(readlink "$MODDIR/source" || true)" != "$hdr_source" ]; then
        say "linking kernel headers for $KREL: $(basename "$hdr_build")"
        mkdir -p "$MODDIR"
        ln -sfnT "$hdr_build" "$MODDIR/build"
        ln -sfnT "$hdr_source" "$MODDIR/source"
    fi
fi

# --- bpffs --------------------------------------------------------------------
if ! mountpoint -q /sys/fs/bpf; then
    say "mounting bpffs at /sys/fs/bpf"
    mkdir -p /sys/fs/bpf
    run mount -t bpf bpf /sys/fs/bpf
fi

# --- Kafka jars ---------------------------------------------------------------
# kafka.sh keeps its own stamp (the pom's checksum): quick when nothing changed.
if ! scripts/kafka.sh fetch --check 2>/dev/null; then
    say "fetching the Kafka broker's jars from Maven Central (scripts/kafka.sh fetch)"
    run scripts/kafka.sh fetch
fi

# --- Docker Compose (deployment checks) ---------- BEGIN compose section -------
# tests/unit/test_deploy.py validates docker/compose.yaml with `docker compose
# config`; the machine has the docker CLI but not the compose plugin. Compose
# v2 is a Go module: build the pinned version with the installed Go into
# Docker's plugin directory (about 3 minutes and 1.4 GB of downloads and build
# cache the first time, deleted afterwards; later runs only compare the
# installed version). `go install pkg@version` refuses the module (its go.mod
# has exclude directives), so it is built inside its downloaded copy. Without
# a Go new enough for its go.mod, fall back to Debian's docker-compose (v1),
# which validates the same file.
COMPOSE_VERSION=v2.40.3
COMPOSE_PLUGIN=/usr/local/lib/docker/cli-plugins/docker-compose
compose_ok() {
    [ -x "$COMPOSE_PLUGIN" ] &&
        [ "$("$COMPOSE_PLUGIN" version --short 2>/dev/null)" = "${COMPOSE_VERSION#v}" ]
}
build_compose() {
    local work=$LOG_DIR/compose-build mod=github.com/docker/compose/v2
    command -v go >/dev/null || return 1
    rm -rf "$work"
    mkdir -p "$work"
    (
        export GOMODCACHE=$work/mod GOCACHE=$work/cache GOPATH=$work/gopath
        export GOFLAGS="-mod=readonly -buildvcs=false" GOTOOLCHAIN=local CGO_ENABLED=0
        echo "+ go mod download $mod@$COMPOSE_VERSION && go build ./cmd" >>"$LOG"
        go mod download "$mod@$COMPOSE_VERSION" >>"$LOG" 2>&1 &&
            cd "$GOMODCACHE/$mod@$COMPOSE_VERSION" &&
            go build -trimpath -ldflags "-s -w -X $mod/internal.Version=$COMPOSE_VERSION" \
                -o "$work/docker-compose" ./cmd >>"$LOG" 2>&1
    ) && install -D -m 0755 "$work/docker-compose" "$COMPOSE_PLUGIN"
    local rc=$?
    # The module cache is read-only: make it writable to delete it.
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
    return $rc
}
if ! compose_ok; then
    say "building Docker Compose $COMPOSE_VERSION from the Go module proxy into $(dirname "$COMPOSE_PLUGIN") (a few minutes)"
    if ! build_compose || ! compose_ok; then
        if ! command -v docker-compose >/dev/null; then
            say "building Compose failed (see $LOG); installing Debian's docker-compose (v1) instead"
            run apt-get -q -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300 update
            run apt-get -q -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300 install -y --no-install-recommends docker-compose
        fi
    fi
fi
# --- Docker Compose ------------------------------ END compose section ---------

# --- Python virtualenv --------------------------------------------------------
venv_ok() {
    [ -x "$VENV/bin/python" ] &&
        grep -qsx 'include-system-site-packages = true' "$VENV/pyvenv.cfg" &&
        "$VENV/bin/python" -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null
}
if ! venv_ok; then
    if [ -e "$VENV" ]; then
        say "re-creating broken .venv"
        rm -rf "$VENV"
    else
        say "creating .venv (Debian python3, system site-packages)"
    fi
    run "$SYS_PY" -m venv --system-site-packages "$VENV"
fi

pip_install() {
    say "installing ctstream into .venv (pip install -e '.[test]')"
    rm -f "$STAMP"
    run "$VENV/bin/python" -m pip install -e "$ROOT[test]"
    touch "$STAMP"
}
if [ pyproject.toml -nt "$STAMP" ]; then
    pip_install
fi

# --- final check --------------------------------------------------------------
# The daemon's dependencies, then the extras' ([postgres], [validate], [test]).
IMPORTS="bcc, pyroute2, msgpack, aiokafka, aiomqtt, prometheus_client, cramjam, psycopg, jsonschema, pytest, pytest_asyncio, scapy, paho.mqtt.client"
check_imports() {
    echo "+ import check" >>"$LOG"
    "$VENV/bin/python" -c "import $IMPORTS" >>"$LOG" 2>&1
}
if ! check_imports; then
    # Something was uninstalled behind our back: reinstall once, then give up.
    pip_install
    check_imports || fail ".venv/bin/python cannot import $IMPORTS (try: make clean)"
fi

trap - ERR
say "ok"
