#!/usr/bin/env bash
# Fresh-machine set-up for ctstream (Debian 12, root). Idempotent: a second run
# only checks and takes a second or two.
#
#   - Debian packages (BCC, kernel headers, network tools, JDK + Maven)
#   - /lib/modules/$(uname -r)/{build,source} -> Debian's linux-headers, so that
#     BCC can compile BPF C for a kernel that has no headers of its own
#   - bpffs mounted at /sys/fs/bpf
#   - .venv from Debian's /usr/bin/python3 with --system-site-packages (bcc is
#     not on PyPI), with the project installed editable with its test extras
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
check_imports() {
    echo "+ import check" >>"$LOG"
    "$VENV/bin/python" -c 'import bcc, pyroute2, msgpack, aiokafka, jsonschema, aiomqtt, psycopg, prometheus_client, cramjam' >>"$LOG" 2>&1
}
if ! check_imports; then
    # Something was uninstalled behind our back: reinstall once, then give up.
    pip_install
    check_imports || fail ".venv/bin/python cannot import bcc, pyroute2, msgpack, aiokafka, jsonschema, aiomqtt, psycopg, prometheus_client, cramjam (try: make clean)"
fi

trap - ERR
say "ok"
