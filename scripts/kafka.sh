#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft: one process that is broker and
# controller, no ZooKeeper) for ctstream's demo and tests, assembled from Maven
# Central jars and run with the JDK. It listens on 127.0.0.1 only.
#
#   kafka.sh fetch [--check]                jars into the cache (idempotent);
#                                           --check: exit 1 if they are missing
#   kafka.sh start [--dir DIR] [--port PORT] [--controller-port PORT]
#                  [--timeout S] [--auto-create-topics]
#                                           format, start, wait until it serves;
#                                           prints the bootstrap address
#   kafka.sh stop [--dir DIR] [--timeout S] SIGTERM, then SIGKILL (idempotent)
#   kafka.sh status [--dir DIR]             exit 0 running, 3 not running
#   kafka.sh topic create NAME [--partitions N] [--config K=V]... [--dir DIR]
#   kafka.sh topic list [--dir DIR]
#
# Defaults (environment): CTSTREAM_KAFKA_DIR=/tmp/ctstream-kafka,
# CTSTREAM_KAFKA_PORT=19092 (controller: port + 1), CTSTREAM_KAFKA_TIMEOUT=60,
# CTSTREAM_KAFKA_HEAP="-Xmx512m -Xms128m",
# CTSTREAM_KAFKA_CACHE=$HOME/.cache/ctstream/kafka-<version> (jars in libs/).
# The ports are not Kafka's usual 9092/9093, so an unrelated broker on the
# same machine is left alone.
#
# The Kafka version is pinned once, in scripts/kafka/pom.xml. DIR holds
# server.properties, data/, broker.log and kafka.pid. Only the bootstrap
# address goes to stdout; messages go to stderr.
set -euo pipefail

HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
POM=$HERE/kafka/pom.xml
PROBE=$HERE/kafka/probe.py
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")
CACHE=${CTSTREAM_KAFKA_CACHE:-${HOME:-/root}/.cache/ctstream/kafka-$KAFKA_VERSION}
LIBS=$CACHE/libs
STAMP=$CACHE/fetched.stamp
HEAP=${CTSTREAM_KAFKA_HEAP:--Xmx512m -Xms128m}
HOST=127.0.0.1

DIR=${CTSTREAM_KAFKA_DIR:-/tmp/ctstream-kafka}
PORT=${CTSTREAM_KAFKA_PORT:-19092}
CONTROLLER_PORT=
TIMEOUT=${CTSTREAM_KAFKA_TIMEOUT:-60}
STOP_TIMEOUT=30
AUTO_CREATE=false

KILL=false
NAME=kafka
# shellcheck source=server_lib.sh
. "$HERE/server_lib.sh"

usage() {
    sed -n '6,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# --- fetch --------------------------------------------------------------------
# The stamp holds the pom's checksum: editing the pin re-resolves.
cmd_fetch() {
    local sum check=false
    case ${1:-} in
        --check) check=true ;;
        "") ;;
        *) usage ;;
    esac
    sum=$(sha256sum "$POM" | cut -d' ' -f1)
    if [ -f "$LIBS/kafka_2.13-$KAFKA_VERSION.jar" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$sum" ]; then
        return 0
    fi
    if $check; then
        say "the jars of Kafka $KAFKA_VERSION are not in $LIBS (or the pom changed): run $0 fetch"
        return 1
    fi
    command -v mvn >/dev/null || die "mvn not found (Debian: apt-get install maven; or run scripts/setup.sh)"
    mkdir -p "$CACHE"
    # One fetch at a time per cache; the loser finds the stamp once it gets in.
    exec 8>"$CACHE/fetch.lock"
    flock 8
    if [ -f "$LIBS/kafka_2.13-$KAFKA_VERSION.jar" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$sum" ]; then
        exec 8>&-
        return 0
    fi
    local log=$CACHE/fetch.log tmp=$CACHE/libs.tmp
    rm -rf "$tmp"
    if ! (cd "$HERE/kafka" && mvn -B -q -Dstyle.color=never dependency:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$tmp") >"$log" 2>&1; then
        echo "kafka: error: could not resolve Kafka $KAFKA_VERSION from Maven Central; last lines of $log:" >&2
        tail -n 30 "$log" | sed 's/^/  | /' >&2
        exit 1
    fi
    [ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ] || die "Maven finished but kafka_2.13-$KAFKA_VERSION.jar is not in $tmp"
    rm -rf "$LIBS"
    mv "$tmp" "$LIBS"
    echo "$sum" >"$STAMP"
    exec 8>&-
}

# --- helpers ------------------------------------------------------------------
java_cmd() { command -v java >/dev/null || die "java not found (Debian: default-jdk-headless)"; }

# Run a Kafka command-line tool class quietly (warnings to stderr). These JVMs
# live a second or two: C1 only starts them faster.
run_tool() {
    java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$HERE/kafka/log4j2-tools.properties" \
        -cp "$LIBS/*" "$@"
}

pid_file() { echo "$DIR/kafka.pid"; }

lock_dir() { lock_file "$DIR/kafka.lock" 120; }

# A live process that is our broker for DIR.
broker_alive() { proc_running "$1" "kafka.Kafka $DIR/server.properties"; }

# The pid from DIR's pid file if that broker is running; empty otherwise.
running_pid() {
    local pid
    pid=$(cat "$(pid_file)" 2>/dev/null || true)
    if [ -n "$pid" ] && broker_alive "$pid"; then echo "$pid"; fi
}

probe() { python3 "$PROBE" "$HOST" "$1" 2; }

# Kafka's cluster id: 16 random bytes, base64url without padding. Kafka's own
# generator rejects ids starting with '-' (they read as options); so do we.
new_cluster_id() {
    local id
    while :; do
        id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
        [ "${id:0:1}" = - ] || break
    done
    echo "$id"
}

dir_port() { sed -n 's/^ctstream.bootstrap=.*:\([0-9]*\)$/\1/p' "$DIR/server.properties" 2>/dev/null; }

check_port() {
    [[ $2 =~ ^[0-9]+$ ]] && [ "$2" -ge 1 ] && [ "$2" -le 65535 ] || die "$1 must be a port number 1..65535, got '$2'"
}

write_properties() {
    cat >"$DIR/server.properties" <<EOF
# Written by scripts/kafka.sh start; rewritten on every start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$DIR/data
auto.create.topics.enable=$AUTO_CREATE
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# Two cores: few threads.
num.network.threads=2
num.io.threads=2
background.threads=4
num.recovery.threads.per.data.dir=1
# Read back by kafka.sh (status, topic); Kafka ignores unknown keys.
ctstream.bootstrap=$HOST:$PORT
EOF
}

# The first ERROR/FATAL line of the broker log and its tail, for failures.
explain_log() {
    local log=$DIR/broker.log first
    [ -s "$log" ] || { echo "  (the broker log $log is empty)" >&2; return 0; }
    first=$(grep -m 1 -E '(^|\] )(ERROR|FATAL) ' "$log" || true)
    if [ -n "$first" ]; then
        echo "kafka: first error in the broker log: $first" >&2
        grep -m 2 '^Caused by: ' "$log" | sed 's/^/kafka:   /' >&2 || true
    fi
    echo "kafka: last lines of $log:" >&2
    tail -n 25 "$log" | sed 's/^/  | /' >&2
}

# --- start --------------------------------------------------------------------
STARTED_PID=
abort_start() {
    if [ -n "$STARTED_PID" ]; then
        STOP_TIMEOUT=5 terminate_broker "$STARTED_PID"
        rm -f "$(pid_file)"
    fi
}

cmd_start() {
    while [ $# -gt 0 ]; do
        case $1 in
            --dir) DIR=$2; shift 2 ;;
            --port) PORT=$2; shift 2 ;;
            --controller-port) CONTROLLER_PORT=$2; shift 2 ;;
            --timeout) TIMEOUT=$2; shift 2 ;;
            --auto-create-topics) AUTO_CREATE=true; shift ;;
            *) usage ;;
        esac
    done
    DIR=$(realpath -m "$DIR")
    check_port --port "$PORT"
    CONTROLLER_PORT=${CONTROLLER_PORT:-$((PORT + 1))}
    check_port --controller-port "$CONTROLLER_PORT"
    [ "$PORT" != "$CONTROLLER_PORT" ] || die "--port and --controller-port must differ"
    [[ $TIMEOUT =~ ^[0-9]+$ ]] && [ "$TIMEOUT" -gt 0 ] || die "--timeout must be a positive number of seconds"
    java_cmd
    command -v python3 >/dev/null || die "python3 not found (needed for the readiness probe)"
    cmd_fetch
    mkdir -p "$DIR"
    lock_dir

    local pid
    pid=$(running_pid)
    if [ -n "$pid" ]; then
        if [ "$(dir_port)" = "$PORT" ] && probe "$PORT" >/dev/null 2>&1; then
            say "already running in $DIR (pid $pid)"
            echo "$HOST:$PORT"
            return 0
        fi
        die "a broker already runs in $DIR (pid $pid) on port $(dir_port); stop it first: $0 stop --dir $DIR"
    fi
    rm -f "$(pid_file)"
    local p
    for p in "$PORT" "$CONTROLLER_PORT"; do
        if port_open "$p"; then
            die "port $HOST:$p is already in use by another process; choose other ports with --port (the controller uses --port + 1 unless --controller-port is given)"
        fi
    done

    mkdir -p "$DIR/data"
    write_properties
    if [ ! -f "$DIR/data/meta.properties" ]; then
        if ! run_tool kafka.tools.StorageTool format --ignore-formatted \
                -t "$(new_cluster_id)" -c "$DIR/server.properties" >"$DIR/format.log" 2>&1; then
            echo "kafka: error: formatting $DIR/data failed:" >&2
            sed 's/^/  | /' "$DIR/format.log" >&2
            exit 1
        fi
    fi

    trap abort_start EXIT
    # shellcheck disable=SC2086  # HEAP is a list of JVM options
    java $HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
        -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$HERE/kafka/log4j2-broker.properties" \
        -cp "$LIBS/*" kafka.Kafka "$DIR/server.properties" \
        </dev/null >"$DIR/broker.log" 2>&1 7>&- 8>&- &
    STARTED_PID=$!
    echo "$STARTED_PID" >"$(pid_file)"

    local deadline=$((SECONDS + TIMEOUT)) why=
    while :; do
        if ! broker_alive "$STARTED_PID"; then
            wait "$STARTED_PID" 2>/dev/null && rc=0 || rc=$?
            STARTED_PID=
            rm -f "$(pid_file)"
            echo "kafka: error: the broker exited (status $rc) before it was ready (port $PORT, controller $CONTROLLER_PORT, dir $DIR)" >&2
            explain_log
            exit 1
        fi
        if port_open "$PORT" && why=$(probe "$PORT" 2>&1); then
            break
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            abort_start
            STARTED_PID=
            echo "kafka: error: the broker did not become ready within ${TIMEOUT}s on $HOST:$PORT${why:+ ($why)}; stopped it" >&2
            explain_log
            exit 1
        fi
        sleep 0.2
    done
    STARTED_PID=
    trap - EXIT
    say "Kafka $KAFKA_VERSION ready on $HOST:$PORT (pid $(cat "$(pid_file)"), $why, dir $DIR)"
    echo "$HOST:$PORT"
}

# --- stop / status ------------------------------------------------------------
parse_dir_only() {
    while [ $# -gt 0 ]; do
        case $1 in
            --dir) DIR=$2; shift 2 ;;
            --timeout) STOP_TIMEOUT=$2; shift 2 ;;
            *) usage ;;
        esac
    done
    DIR=$(realpath -m "$DIR")
}

cmd_stop() {
    parse_dir_only "$@"
    [ -d "$DIR" ] || return 0
    lock_dir
    local pid
    pid=$(running_pid)
    if [ -n "$pid" ]; then
        terminate_broker "$pid"
        say "stopped the broker in $DIR (pid $pid)"
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
    if probe "$port" >/dev/null 2>&1; then
        echo "running: pid $pid, bootstrap $HOST:$port, ready ($DIR)"
    else
        echo "running: pid $pid, bootstrap $HOST:$port, NOT answering metadata requests ($DIR)"
    fi
}

# --- topics -------------------------------------------------------------------
cmd_topic() {
    local action=${1:-} name= partitions=1 configs=()
    [ $# -gt 0 ] && shift
    case $action in
        create) [ $# -gt 0 ] && [ "${1:0:1}" != - ] || usage; name=$1; shift ;;
        list) ;;
        *) usage ;;
    esac
    while [ $# -gt 0 ]; do
        case $1 in
            --dir) DIR=$2; shift 2 ;;
            --partitions) partitions=$2; shift 2 ;;
            --config) configs+=(--config "$2"); shift 2 ;;
            *) usage ;;
        esac
    done
    DIR=$(realpath -m "$DIR")
    [ -n "$(running_pid)" ] || die "no broker runs in $DIR (start one: $0 start --dir $DIR)"
    java_cmd
    local bootstrap=$HOST:$(dir_port)
    if [ "$action" = list ]; then
        run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap" --list
        return
    fi
    [[ $partitions =~ ^[0-9]+$ ]] && [ "$partitions" -ge 1 ] || die "--partitions must be a positive integer"
    run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap" --create \
        --if-not-exists --topic "$name" --partitions "$partitions" --replication-factor 1 \
        "${configs[@]}" >/dev/null
    say "topic $name ($partitions partitions) on $bootstrap"
}

case ${1:-} in
    fetch) shift; cmd_fetch "$@" ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    topic) shift; cmd_topic "$@" ;;
    -h|--help|help) usage ;;
    *) usage ;;
esac
