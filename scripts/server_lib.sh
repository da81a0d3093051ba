# What scripts/kafka.sh, mosquitto.sh and postgres.sh share: messages, the
# per-directory start/stop lock, process and port checks, and stopping a
# broker. Sourced after the script sets NAME (its messages' prefix), HOST and
# STOP_TIMEOUT; terminate_broker also reads KILL and calls the script's
# broker_alive PID.

say() { echo "$NAME: $*" >&2; }
die() { echo "$NAME: error: $*" >&2; exit 1; }

# One start or stop at a time per directory: FILE locked on fd 7 (the server
# started under it does not inherit it), waiting up to SECONDS.
lock_file() {
    exec 7>"$1"
    flock -w "$2" 7 || die "another $NAME.sh start/stop holds $1"
}

# PID is a live process (zombies count as gone) whose command line, with
# spaces for its NULs, contains PATTERN.
proc_running() {
    local pid=$1 pattern=$2 state
    [ -r "/proc/$pid/stat" ] || return 1
    state=$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
    [ "$state" != Z ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pattern"
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# SIGTERM (SIGKILL with KILL=true), SIGKILL after STOP_TIMEOUT seconds; returns
# once broker_alive says it is gone.
terminate_broker() {
    local pid=$1 waited=0
    if $KILL; then
        kill -KILL "$pid" 2>/dev/null || true
    else
        kill -TERM "$pid" 2>/dev/null || true
    fi
    while broker_alive "$pid"; do
        if [ "$waited" -ge $((STOP_TIMEOUT * 10)) ]; then
            say "broker $pid ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            while broker_alive "$pid"; do sleep 0.05; done
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    # Reap it if it is our own child (a failed start); otherwise init does.
    wait "$pid" 2>/dev/null || true
}
