#!/usr/bin/env bash
# A private PostgreSQL 15 server for ctstream's accounting tests and demo: its
# own cluster (initdb) in DIR, listening on 127.0.0.1 only, run as a non-root
# user (PostgreSQL refuses root).
#
#   postgres.sh start [--dir DIR] [--port PORT] [--timeout S] [--user NAME]
#                                           initdb on first use, start, wait
#                                           until it accepts connections;
#                                           prints the database URL
#   postgres.sh stop [--dir DIR] [--timeout S] [--kill]
#                                           fast shutdown, SIGKILL after S
#                                           seconds (--kill: at once); idempotent
#   postgres.sh status [--dir DIR]          exit 0 running, 3 not running
#   postgres.sh url [--dir DIR]             the database URL of DIR's cluster
#
# The cluster has one role and one database, both named ctstream, with a
# random password (DIR/password, mode 0600) that the URL carries:
# postgresql://ctstream:PASSWORD@127.0.0.1:PORT/ctstream. Connections are
# allowed from 127.0.0.1 with that password (scram-sha-256) and over the Unix
# socket in DIR/socket.
#
# Run as root, the server runs as --user (default: postgres, else nobody),
# which then owns DIR; every directory above DIR must be searchable by it
# (/tmp/... is, pytest's tmp_path is not). Run as anyone else, it runs as that
# user. Defaults (environment): CTSTREAM_PG_DIR=/tmp/ctstream-postgres,
# CTSTREAM_PG_PORT=15432, CTSTREAM_PG_TIMEOUT=30, CTSTREAM_PG_USER,
# CTSTREAM_PG_BIN=/usr/lib/postgresql/15/bin. The port is not PostgreSQL's
# usual 5432, so a system server on the same machine is left alone.
# DIR holds data/ (the cluster), socket/, password and postgres.log. Only the
# URL goes to stdout; messages go to stderr.
set -euo pipefail

HOST=127.0.0.1
DB=ctstream
ROLE=ctstream
DIR=${CTSTREAM_PG_DIR:-/tmp/ctstream-postgres}
PORT=${CTSTREAM_PG_PORT:-15432}
TIMEOUT=${CTSTREAM_PG_TIMEOUT:-30}
RUN_USER=${CTSTREAM_PG_USER:-}
BIN=${CTSTREAM_PG_BIN:-/usr/lib/postgresql/15/bin}
STOP_TIMEOUT=15
KILL=false

NAME=postgres
# shellcheck source=server_lib.sh
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/server_lib.sh"

usage() {
    sed -n '6,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

data_dir() { echo "$DIR/data"; }

lock_dir() { lock_file "$DIR/postgres.lock" 60; }

# A live process that is the postmaster of DIR's cluster.
server_alive() { proc_running "$1" "-D $(data_dir) "; }

# The postmaster's pid (first line of postmaster.pid) if it is running.
running_pid() {
    local pid
    pid=$(head -n 1 "$(data_dir)/postmaster.pid" 2>/dev/null || true)
    if [[ $pid =~ ^[0-9]+$ ]] && server_alive "$pid"; then echo "$pid"; fi
}

# The port the running cluster was started with (postmaster.pid, line 4).
dir_port() { sed -n '4p' "$(data_dir)/postmaster.pid" 2>/dev/null; }

check_port() {
    [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ] || die "--port must be a port number 1..65535, got '$1'"
}

url() { echo "postgresql://$ROLE:$(cat "$DIR/password")@$HOST:$1/$DB"; }

# The prefix that runs a command as the server's user (root cannot run
# PostgreSQL); setpriv execs the command, so a background job's $! is its pid.
AS_USER=()
as_user() { "${AS_USER[@]}" "$@"; }

pick_user() {
    if [ "$(id -u)" -ne 0 ]; then
        [ -z "$RUN_USER" ] || [ "$RUN_USER" = "$(id -un)" ] \
            || die "--user needs root; as $(id -un) the server runs as $(id -un)"
        RUN_USER=$(id -un)
        return
    fi
    if [ -z "$RUN_USER" ]; then
        if id postgres >/dev/null 2>&1; then RUN_USER=postgres; else RUN_USER=nobody; fi
    fi
    id "$RUN_USER" >/dev/null 2>&1 || die "no such user '$RUN_USER' (--user)"
    [ "$(id -u "$RUN_USER")" -ne 0 ] || die "PostgreSQL refuses to run as root: choose another --user"
    AS_USER=(setpriv --reuid="$RUN_USER" --regid="$(id -g "$RUN_USER")" --init-groups --)
}

# Every directory above DIR must let the server's user through.
check_reachable() {
    local d
    d=$(dirname "$DIR")
    while :; do
        as_user test -x "$d" || die "user $RUN_USER cannot enter $d (above $DIR); put DIR somewhere it can reach, e.g. under /tmp"
        [ "$d" != / ] || break
        d=$(dirname "$d")
    done
}

# SIGINT (fast shutdown: roll back open transactions, checkpoint), SIGKILL of
# the postmaster and every process it started after STOP_TIMEOUT seconds (at
# once with --kill); returns only when they are gone.
terminate() {
    local pid=$1 waited=0 children
    if ! $KILL; then
        kill -INT "$pid" 2>/dev/null || true
        while server_alive "$pid" && [ "$waited" -lt $((STOP_TIMEOUT * 10)) ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
    fi
    if server_alive "$pid"; then
        $KILL || say "postmaster $pid ignored the fast shutdown for ${STOP_TIMEOUT}s; sending SIGKILL"
        children=$(pgrep -P "$pid" || true)
        kill -KILL "$pid" $children 2>/dev/null || true
        while server_alive "$pid"; do sleep 0.05; done
        # Backends a killed postmaster leaves behind hold the shared memory.
        for c in $children; do
            while [ -d "/proc/$c" ] && [ "$(sed 's/.*) //' "/proc/$c/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]; do
                sleep 0.05
            done
        done
        remove_stale_locks
    fi
    wait "$pid" 2>/dev/null || true
}

# A killed server leaves its lock files; the next start would refuse them as
# long as the old pid exists, and a killed process whose parent is gone may
# stay a zombie for good where nothing reaps orphans. Only call this when no
# server of DIR is alive.
remove_stale_locks() {
    rm -f "$(data_dir)/postmaster.pid" "$DIR"/socket/.s.PGSQL.*
}

explain_log() {
    local log=$DIR/postgres.log first
    [ -s "$log" ] || { echo "  (the server log $log is empty)" >&2; return 0; }
    first=$(grep -m 1 -E '(FATAL|PANIC|ERROR): ' "$log" || true)
    [ -z "$first" ] || echo "postgres: first error in the server log: $first" >&2
    echo "postgres: last lines of $log:" >&2
    tail -n 20 "$log" | sed 's/^/  | /' >&2
}

# --- start --------------------------------------------------------------------
init_cluster() {
    local pwfile=$DIR/initdb.pw
    (umask 077 && head -c 18 /dev/urandom | base64 | tr '+/' '-_' >"$DIR/password")
    chown "$RUN_USER" "$DIR/password" 2>/dev/null || true
    # initdb sets the superuser's password from a file; it may only exist
    # while initdb runs.
    (umask 077 && cp "$DIR/password" "$pwfile")
    chown "$RUN_USER" "$pwfile" 2>/dev/null || true
    if ! as_user "$BIN/initdb" -D "$(data_dir)" -U "$ROLE" --pwfile="$pwfile" \
            --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 \
            >"$DIR/initdb.log" 2>&1; then
        rm -f "$pwfile"
        echo "postgres: error: initdb of $(data_dir) failed:" >&2
        tail -n 20 "$DIR/initdb.log" | sed 's/^/  | /' >&2
        rm -rf "$(data_dir)"
        exit 1
    fi
    rm -f "$pwfile"
}

STARTED_PID=
abort_start() {
    if [ -n "$STARTED_PID" ]; then
        KILL=true terminate "$STARTED_PID"
    fi
}

cmd_start() {
    while [ $# -gt 0 ]; do
        case $1 in
            --dir) DIR=$2; shift 2 ;;
            --port) PORT=$2; shift 2 ;;
            --timeout) TIMEOUT=$2; shift 2 ;;
            --user) RUN_USER=$2; shift 2 ;;
            *) usage ;;
        esac
    done
    DIR=$(realpath -m "$DIR")
    check_port "$PORT"
    [[ $TIMEOUT =~ ^[0-9]+$ ]] && [ "$TIMEOUT" -gt 0 ] || die "--timeout must be a positive number of seconds"
    [ -x "$BIN/postgres" ] || die "$BIN/postgres not found (Debian: apt-get install postgresql-15, or set CTSTREAM_PG_BIN)"
    pick_user
    mkdir -p "$DIR"
    lock_dir
    chown "$RUN_USER" "$DIR"
    chmod 0700 "$DIR"
    check_reachable

    local pid
    pid=$(running_pid)
    if [ -n "$pid" ]; then
        if [ "$(dir_port)" = "$PORT" ] && "$BIN/pg_isready" -q -h "$HOST" -p "$PORT" -t 2; then
            say "already running in $DIR (pid $pid)"
            url "$PORT"
            return 0
        fi
        die "a server already runs in $DIR (pid $pid) on port $(dir_port); stop it first: $0 stop --dir $DIR"
    fi
    if port_open "$PORT"; then
        die "port $HOST:$PORT is already in use by another process; choose another with --port"
    fi
    remove_stale_locks
    local fresh=false
    if [ ! -f "$(data_dir)/PG_VERSION" ] || [ ! -s "$DIR/password" ]; then
        rm -rf "$(data_dir)"
        init_cluster
        fresh=true
    fi
    mkdir -p "$DIR/socket"
    chown "$RUN_USER" "$DIR/socket"
    : >"$DIR/postgres.log"
    chown "$RUN_USER" "$DIR/postgres.log"

    trap abort_start EXIT
    # In the foreground of a background job, so that $! is the postmaster
    # (setpriv execs it). Settings on the command line: a restart on another
    # port needs no config file edit.
    "${AS_USER[@]}" "$BIN/postgres" -D "$(data_dir)" -p "$PORT" \
        -c listen_addresses="$HOST" -c unix_socket_directories="$DIR/socket" \
        -c max_connections=50 -c shared_buffers=32MB -c logging_collector=off \
        </dev/null >>"$DIR/postgres.log" 2>&1 7>&- &
    STARTED_PID=$!

    local deadline=$((SECONDS + TIMEOUT)) rc
    while ! "$BIN/pg_isready" -q -h "$HOST" -p "$PORT" -t 1; do
        if ! server_alive "$STARTED_PID"; then
            wait "$STARTED_PID" 2>/dev/null && rc=0 || rc=$?
            STARTED_PID=
            echo "postgres: error: the server exited (status $rc) before it accepted connections on $HOST:$PORT (dir $DIR)" >&2
            explain_log
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            abort_start
            STARTED_PID=
            echo "postgres: error: the server did not accept connections on $HOST:$PORT within ${TIMEOUT}s; killed it" >&2
            explain_log
            exit 1
        fi
        sleep 0.1
    done
    if $fresh; then
        if ! PGPASSWORD=$(cat "$DIR/password") "$BIN/createdb" -h "$HOST" -p "$PORT" -U "$ROLE" \
                "$DB" 2>>"$DIR/postgres.log"; then
            abort_start
            STARTED_PID=
            echo "postgres: error: could not create the database $DB" >&2
            explain_log
            exit 1
        fi
    fi
    STARTED_PID=
    trap - EXIT
    say "PostgreSQL $(cat "$(data_dir)/PG_VERSION") ready on $HOST:$PORT (pid $(running_pid), user $RUN_USER, dir $DIR)"
    url "$PORT"
}

# --- stop / status / url ------------------------------------------------------
parse_dir_only() {
    while [ $# -gt 0 ]; do
        case $1 in
            --dir) DIR=$2; shift 2 ;;
            --timeout) STOP_TIMEOUT=$2; shift 2 ;;
            --kill) KILL=true; shift ;;
            *) usage ;;
        esac
    done
    DIR=$(realpath -m "$DIR")
    [[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"
}

cmd_stop() {
    parse_dir_only "$@"
    [ -d "$DIR" ] || return 0
    lock_dir
    local pid
    pid=$(running_pid)
    if [ -n "$pid" ]; then
        terminate "$pid"
        say "$($KILL && echo killed || echo stopped) the server in $DIR (pid $pid)"
    fi
}

cmd_status() {
    parse_dir_only "$@"
    local pid port
    pid=$(running_pid)
    if [ -z "$pid" ]; then
        echo "not running ($DIR)"
        return 3
    fi
    port=$(dir_port)
    if "$BIN/pg_isready" -q -h "$HOST" -p "$port" -t 2; then
        echo "running: pid $pid, $HOST:$port, accepting connections ($DIR)"
    else
        echo "running: pid $pid, $HOST:$port, NOT accepting connections ($DIR)"
    fi
}

cmd_url() {
    parse_dir_only "$@"
    [ -s "$DIR/password" ] || die "no cluster in $DIR (start one: $0 start --dir $DIR)"
    local port
    port=$(dir_port)
    url "${port:-$PORT}"
}

case ${1:-} in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    url) shift; cmd_url "$@" ;;
    -h|--help|help) usage ;;
    *) usage ;;
esac
