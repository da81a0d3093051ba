#!/usr/bin/env bash
# A private Mosquitto MQTT broker for ctstream's tests and demo: its own
# config, pid file and log in DIR, listening on 127.0.0.1 only, nothing
# persisted (a restart starts with no retained messages).
#
#   mosquitto.sh start [--dir DIR] [--port PORT] [--timeout S]
#                      [--user NAME --password-file FILE]
#                                           write the config, start, wait until
#                                           the port answers; prints HOST:PORT
#   mosquitto.sh stop [--dir DIR] [--timeout S] [--kill]
#                                           SIGTERM, then SIGKILL after S seconds
#                                           (--kill: SIGKILL at once); idempotent
#   mosquitto.sh status [--dir DIR]         exit 0 running, 3 not running
#
# With --user, clients must log in as NAME with the password in FILE
# (anonymous clients are refused); without it, anonymous clients are allowed.
# Defaults (environment): CTSTREAM_MQTT_DIR=/tmp/ctstream-mosquitto,
# CTSTREAM_MQTT_PORT=11883, CTSTREAM_MQTT_TIMEOUT=10. The port is not MQTT's
# usual 1883, so a system broker on the same machine is left alone.
# DIR holds mosquitto.conf, passwd, mosquitto.log and mosquitto.pid. Only the
# address goes to stdout; messages go to stderr.
set -euo pipefail

HOST=127.0.0.1
DIR=${CTSTREAM_MQTT_DIR:-/tmp/ctstream-mosquitto}
PORT=${CTSTREAM_MQTT_PORT:-11883}
TIMEOUT=${CTSTREAM_MQTT_TIMEOUT:-10}
STOP_TIMEOUT=10
KILL=false
USER_NAME=
PASSWORD_FILE=

NAME=mosquitto
# shellcheck source=server_lib.sh
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/server_lib.sh"

usage() {
    sed -n '6,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

pid_file() { echo "$DIR/mosquitto.pid"; }

lock_dir() { lock_file "$DIR/mosquitto.lock" 30; }

# A live process that is the broker of DIR's config.
broker_alive() { proc_running "$1" "-c $DIR/mosquitto.conf"; }

running_pid() {
    local pid
    pid=$(cat "$(pid_file)" 2>/dev/null || true)
    if [ -n "$pid" ] && broker_alive "$pid"; then echo "$pid"; fi
}

dir_port() { sed -n 's/^listener \([0-9]*\) .*/\1/p' "$DIR/mosquitto.conf" 2>/dev/null; }

check_port() {
    [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ] || die "--port must be a port number 1..65535, got '$1'"
}

write_config() {
    local auth
    if [ -n "$USER_NAME" ]; then
        auth="allow_anonymous false
password_file $DIR/passwd"
    else
        auth="allow_anonymous true"
    fi
    cat >"$DIR/mosquitto.conf" <<EOF
# Written by scripts/mosquitto.sh start; rewritten on every start.
per_listener_settings false
# Started as root, mosquitto would switch to the "mosquitto" user, which
# cannot write DIR; it stays who started it.
user $(id -un)
listener $PORT $HOST
$auth
persistence false
log_dest file $DIR/mosquitto.log
log_type error
log_type warning
log_type notice
log_timestamp_format %Y-%m-%dT%H:%M:%S
EOF
}

write_passwd() {
    [ -r "$PASSWORD_FILE" ] || die "cannot read the password file '$PASSWORD_FILE'"
    command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd not found (Debian: mosquitto)"
    local password
    password=$(head -n 1 "$PASSWORD_FILE")
    [ -n "$password" ] || die "the password file '$PASSWORD_FILE' is empty"
    rm -f "$DIR/passwd"
    (umask 077 && : >"$DIR/passwd")
    mosquitto_passwd -b "$DIR/passwd" "$USER_NAME" "$password" >/dev/null 2>&1 \
        || die "mosquitto_passwd could not write $DIR/passwd"
}

explain_log() {
    local log=$DIR/mosquitto.log
    if [ -s "$log" ]; then
        echo "mosquitto: last lines of $log:" >&2
        tail -n 15 "$log" | sed 's/^/  | /' >&2
    fi
    if [ -s "$DIR/stderr.log" ]; then
        echo "mosquitto: its stderr:" >&2
        tail -n 15 "$DIR/stderr.log" | sed 's/^/  | /' >&2
    fi
}

# --- start --------------------------------------------------------------------
STARTED_PID=
abort_start() {
    if [ -n "$STARTED_PID" ]; then
        KILL=true terminate_broker "$STARTED_PID"
        rm -f "$(pid_file)"
    fi
}

cmd_start() {
    while [ $# -gt 0 ]; do
        case $1 in
            --dir) DIR=$2; shift 2 ;;
            --port) PORT=$2; shift 2 ;;
            --timeout) TIMEOUT=$2; shift 2 ;;
            --user) USER_NAME=$2; shift 2 ;;
            --password-file) PASSWORD_FILE=$2; shift 2 ;;
            *) usage ;;
        esac
    done
    DIR=$(realpath -m "$DIR")
    check_port "$PORT"
    [[ $TIMEOUT =~ ^[0-9]+$ ]] && [ "$TIMEOUT" -gt 0 ] || die "--timeout must be a positive number of seconds"
    if [ -n "$USER_NAME" ] && [ -z "$PASSWORD_FILE" ]; then die "--user needs --password-file"; fi
    if [ -z "$USER_NAME" ] && [ -n "$PASSWORD_FILE" ]; then die "--password-file needs --user"; fi
    [[ $USER_NAME != *:* ]] || die "--user must not contain ':'"
    command -v mosquitto >/dev/null || die "mosquitto not found (Debian: apt-get install mosquitto)"
    mkdir -p "$DIR"
    lock_dir

    local pid
    pid=$(running_pid)
    if [ -n "$pid" ]; then
        if [ "$(dir_port)" = "$PORT" ] && port_open "$PORT"; then
            say "already running in $DIR (pid $pid)"
            echo "$HOST:$PORT"
            return 0
        fi
        die "a broker already runs in $DIR (pid $pid) on port $(dir_port); stop it first: $0 stop --dir $DIR"
    fi
    rm -f "$(pid_file)"
    if port_open "$PORT"; then
        die "port $HOST:$PORT is already in use by another process; choose another with --port"
    fi
    if [ -n "$USER_NAME" ]; then write_passwd; else rm -f "$DIR/passwd"; fi
    write_config
    : >"$DIR/mosquitto.log"

    trap abort_start EXIT
    # In the foreground of a background job (not -d), so that $! is its pid.
    mosquitto -c "$DIR/mosquitto.conf" </dev/null >/dev/null 2>"$DIR/stderr.log" 7>&- &
    STARTED_PID=$!
    echo "$STARTED_PID" >"$(pid_file)"

    local deadline=$((SECONDS + TIMEOUT)) rc
    while ! port_open "$PORT"; do
        if ! broker_alive "$STARTED_PID"; then
            wait "$STARTED_PID" 2>/dev/null && rc=0 || rc=$?
            STARTED_PID=
            rm -f "$(pid_file)"
            echo "mosquitto: error: the broker exited (status $rc) before it listened on $HOST:$PORT (dir $DIR)" >&2
            explain_log
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            abort_start
            STARTED_PID=
            echo "mosquitto: error: the broker did not listen on $HOST:$PORT within ${TIMEOUT}s; killed it" >&2
            explain_log
            exit 1
        fi
        sleep 0.05
    done
    STARTED_PID=
    trap - EXIT
    say "ready on $HOST:$PORT (pid $(cat "$(pid_file)"), dir $DIR${USER_NAME:+, user $USER_NAME})"
    echo "$HOST:$PORT"
}

# --- stop / status ------------------------------------------------------------
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
        terminate_broker "$pid"
        say "$($KILL && echo killed || echo stopped) the broker in $DIR (pid $pid)"
    fi
    rm -f "$(pid_file)"
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
    if port_open "$port"; then
        echo "running: pid $pid, $HOST:$port, listening ($DIR)"
    else
        echo "running: pid $pid, $HOST:$port, NOT listening ($DIR)"
    fi
}

case ${1:-} in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    -h|--help|help) usage ;;
    *) usage ;;
esac
