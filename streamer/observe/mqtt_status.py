"""MQTT status and alerts (`--mqtt HOST:PORT`), with aiomqtt.

Topics, all retained, under ctstream/<node>/ (node: the Kafka sink's node id,
or the host name):

- online: "1" once connected; "0" on a clean stop, and as the will the
  broker publishes when the daemon vanishes (SIGKILL, a lost link).
- status: JSON every `interval` seconds: table fill, entries, outbox depth,
  spool depth, Kafka connected, events/s, the active alerts, time.
- alert/<name>: JSON {"active", "since", "detail", ...} published when the
  alert changes; names in ALERTS.

The Kafka path never waits for MQTT. The daemon's status loop hands every
snapshot to observe(), which only computes and appends to a bounded queue
(the oldest message goes when it is full; a newer status replaces a queued
one). One task owns the connection: it connects, publishes the queue in
order, and on any failure (broker gone, refused, a publish not acknowledged
within PUBLISH_TIMEOUT) drops the connection and tries again after a
jittered, growing delay. After each connect it publishes online and the
current state of every topic again, since a restarted broker may have lost
its retained messages.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import os
import random
import re
import ssl
import time
from dataclasses import dataclass

import aiomqtt

from ..errors import ConfigError

log = logging.getLogger(__name__)

ALERTS = ("table_high", "early_drops", "ring_overflow", "kafka_down", "spool_high",
          "spool_unwritable", "syn_cookies")
DEFAULT_PORT = 1883
QUEUE_MAX = 256           # messages waiting for the broker; the oldest go first
CONNECT_TIMEOUT = 5.0     # TCP connect + CONNACK
PUBLISH_TIMEOUT = 5.0     # a QoS 1 publish not acknowledged by then: reconnect
STOP_TIMEOUT = 1.0        # the last "offline" on a clean stop
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0
QUIET_S = 60.0            # early_drops/ring_overflow clear after this long without growth
SPOOL_HIGH, SPOOL_LOW = 0.8, 0.7   # spool_high on at 80 % of the bound, off below 70 %


@dataclass
class MqttSettings:
    host: str
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    interval: float = 5.0          # seconds between status messages
    kafka_down_s: float = 30.0     # kafka_down after this long disconnected
    keepalive: int = 10


def parse_broker(text: str) -> tuple[str, int]:
    """HOST[:PORT] (IPv6: [ADDR]:PORT or a bare ADDR); ConfigError if malformed."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text)
    if m:
        host, port = m.group(1) or m.group(3), m.group(2) or m.group(4)
    else:
        host, port = text, None
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            host = None
    if not host or (port is not None and not 1 <= int(port) <= 65535):
        raise ConfigError(f"--mqtt expects HOST[:PORT] like 127.0.0.1:1883, got {text!r}")
    return host, int(port) if port else DEFAULT_PORT


def check_node(node: str) -> str:
    if not node or any(c in node for c in "/+#\0"):
        raise ConfigError(f"node id {node!r} cannot be an MQTT topic level "
                          f"(no '/', '+', '#'); choose another with --node-id")
    return node


# ---- alerts --------------------------------------------------------------------------------


@dataclass
class Alert:
    name: str
    active: bool = False
    since: float = 0.0     # wall time the current state began
    detail: str = ""


class Alerts:
    """The alert states, moved on by one daemon snapshot at a time; update()
    returns the names of the alerts whose `active` changed."""

    def __init__(self, kafka_down_s: float, quiet_s: float = QUIET_S):
        self.kafka_down_s = kafka_down_s
        self.quiet_s = quiet_s
        now = time.time()
        self.state = {name: Alert(name, since=now) for name in ALERTS}
        self._prev: dict | None = None              # the previous snapshot's counters
        self._grew_at: dict[str, float] = {}        # alert -> monotonic time of last growth
        self._kafka_lost: tuple[float, float] | None = None   # (monotonic, wall)

    def update(self, snap: dict) -> list[str]:
        now, wall = snap["monotonic"], snap["time"]
        c = snap["counters"]
        changed = []

        def put(name: str, active: bool, detail: str, since: float | None = None) -> None:
            a = self.state[name]
            if active != a.active:
                a.active, a.since = active, wall if since is None else since
                changed.append(name)
            if active or name in changed:
                a.detail = detail

        entries, limit = c["entries"], snap["table_limit"]
        high = entries > snap["table_low"] if self.state["table_high"].active else \
            entries >= snap["table_high"]
        put("table_high", high, f"{entries} of {limit} entries (high watermark "
                                f"{snap['table_high']}, clears at {snap['table_low']})")

        # syn_cookies: auto mode answered SYNs with cookies (a flood, or a
        # full table) in the last QUIET_S seconds.
        for name, counter in (("early_drops", "early_drops"), ("ring_overflow", "ring_full"),
                              ("syn_cookies", "syn_cookie_auto")):
            if counter not in c:
                continue
            total = c[counter]
            grew = self._prev is not None and total > self._prev[counter]
            if grew:
                self._grew_at[name] = now
            quiet = now - self._grew_at[name] if name in self._grew_at else None
            if grew:
                detail = f"{counter} {total}, +{total - self._prev[counter]} since the last check"
            elif quiet is not None:
                detail = f"{counter} {total}, no growth for {quiet:.0f} s"
            else:
                detail = f"{counter} {total}"
            put(name, quiet is not None and quiet < self.quiet_s, detail)

        if "kafka_connected" in snap:
            if snap["kafka_connected"]:
                self._kafka_lost = None
                put("kafka_down", False, "connected")
            else:
                self._kafka_lost = self._kafka_lost or (now, wall)
                down = now - self._kafka_lost[0]
                put("kafka_down", down >= self.kafka_down_s,
                    f"down for {down:.0f} s: {snap.get('kafka_error') or 'not connected'}",
                    since=self._kafka_lost[1])

        if snap.get("spool_max"):
            fill = snap["spool_bytes"] / snap["spool_max"]
            on = fill >= SPOOL_LOW if self.state["spool_high"].active else fill >= SPOOL_HIGH
            put("spool_high", on, f"{snap['spool_bytes']} of {snap['spool_max']} bytes "
                                  f"({fill:.0%}), {snap['spool_records']} records")
        if "spool_write_error" in snap:
            why = snap["spool_write_error"]
            put("spool_unwritable", why is not None, why or "writing")
        self._prev = c
        return changed


# ---- the publisher -------------------------------------------------------------------------


class MqttStatus:
    """A Session part: start(session) registers observe() and starts the
    connection task; aclose() says offline and stops it."""

    def __init__(self, settings: MqttSettings, node: str):
        self.settings = settings
        self.node = check_node(node)
        self.prefix = f"ctstream/{node}"
        self.alerts = Alerts(settings.kafka_down_s)
        self.connected = False
        self.dropped = 0              # messages the full queue pushed out
        self.published = 0
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._wake = asyncio.Event()
        self._status: bytes | None = None
        self._last_status = None      # (monotonic, events delivered) at the last status
        self._session = None
        self._task: asyncio.Task | None = None
        self._client: aiomqtt.Client | None = None
        self._error: str | None = None
        self._was_connected = False

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    # ---- a Session part ----------------------------------------------------------------
    async def start(self, session) -> None:
        self._session = session
        session.observers.append(self.observe)
        self._task = asyncio.create_task(self._run(), name="ctstream-mqtt")

    async def aclose(self) -> None:
        if self._task is None:
            return
        if self.observe in self._session.observers:
            self._session.observers.remove(self.observe)
        client = self._client
        if client is not None:
            # A clean stop sends no will: say offline ourselves (bounded).
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await client.publish(f"{self.prefix}/online", b"0", qos=1, retain=True)
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    # ---- on the daemon's status loop: compute and queue, never wait ----------------------
    def observe(self, snap: dict) -> None:
        for name in self.alerts.update(snap):
            self._put(f"{self.prefix}/alert/{name}", self._alert_payload(name))
        now = snap["monotonic"]
        if self._last_status is None or now - self._last_status[0] >= self.settings.interval - 0.05:
            rate = 0.0
            if self._last_status is not None and now > self._last_status[0]:
                rate = (snap["events_delivered"] - self._last_status[1]) / (now - self._last_status[0])
            self._last_status = (now, snap["events_delivered"])
            self._status = self._status_payload(snap, rate)
            self._put(f"{self.prefix}/status", self._status)

    def _status_payload(self, snap: dict, rate: float) -> bytes:
        c = snap["counters"]
        st = {"node": self.node, "time": round(snap["time"], 3),
              "entries": c["entries"], "table_limit": snap["table_limit"],
              "table_fill": round(c["entries"] / snap["table_limit"], 6),
              "outbox": c["outbox"], "events_per_s": round(rate, 1),
              "events_delivered": snap["events_delivered"],
              "reader_paused": snap["reader_paused"],
              "alerts": [n for n in ALERTS if self.alerts.state[n].active]}
        for key in ("kafka_connected", "spool_records", "spool_bytes", "spool_max"):
            if key in snap:
                st[key] = snap[key]
        return json.dumps(st, separators=(",", ":")).encode()

    def _alert_payload(self, name: str) -> bytes:
        a = self.alerts.state[name]
        return json.dumps({"node": self.node, "alert": name, "active": a.active,
                           "since": round(a.since, 3), "detail": a.detail,
                           "time": round(time.time(), 3)}, separators=(",", ":")).encode()

    def _put(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/status"):
            # Only the newest status matters.
            self._queue = collections.deque(m for m in self._queue if m[0] != topic)
        if len(self._queue) >= QUEUE_MAX:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append((topic, payload))
        self._wake.set()

    # ---- the connection ----------------------------------------------------------------
    async def _run(self) -> None:
        delay = BACKOFF_MIN
        while True:
            self._was_connected = False
            try:
                await self._connected_session()
            except asyncio.CancelledError:
                raise
            except (aiomqtt.MqttError, OSError, TimeoutError, ValueError) as exc:
                self._lost(str(exc) or type(exc).__name__)
            except Exception as exc:  # never let MQTT trouble reach the daemon
                log.exception("MQTT: unexpected failure")
                self._lost(f"{type(exc).__name__}: {exc}")
            if self._was_connected:    # it had worked: start over quickly
                delay = BACKOFF_MIN
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, BACKOFF_MAX)

    def _new_client(self) -> aiomqtt.Client:
        s = self.settings
        return aiomqtt.Client(
            s.host, s.port, username=s.username, password=s.password,
            identifier=f"ctstream-{self.node}-{os.getpid()}",
            will=aiomqtt.Will(f"{self.prefix}/online", b"0", qos=1, retain=True),
            keepalive=s.keepalive, timeout=PUBLISH_TIMEOUT, tls_context=s.tls,
            max_queued_outgoing_messages=QUEUE_MAX)

    async def _connected_session(self) -> None:
        client = self._new_client()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await client.__aenter__()
        except BaseException:
            _abandon(client)
            raise
        self._client, self.connected, self._was_connected = client, True, True
        if self._error is not None:
            log.warning("MQTT broker %s is back", self.address)
        else:
            log.info("MQTT broker %s: connected", self.address)
        self._error = None
        try:
            await client.publish(f"{self.prefix}/online", b"1", qos=1, retain=True,
                                 timeout=PUBLISH_TIMEOUT)
            for name in ALERTS:
                self._put(f"{self.prefix}/alert/{name}", self._alert_payload(name))
            if self._status is not None:
                self._put(f"{self.prefix}/status", self._status)
            while True:
                while self._queue:
                    topic, payload = self._queue.popleft()
                    try:
                        await client.publish(topic, payload, qos=1, retain=True,
                                             timeout=PUBLISH_TIMEOUT)
                    except BaseException:
                        if len(self._queue) < QUEUE_MAX:
                            self._queue.appendleft((topic, payload))
                        raise
                    self.published += 1
                self._wake.clear()
                # Woken by new messages; the status interval bounds how late
                # a dead connection is noticed (the next publish fails).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.interval):
                        await self._wake.wait()
        finally:
            self._client, self.connected = None, False
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await client.__aexit__(None, None, None)

    def _lost(self, why: str) -> None:
        if why != self._error:
            what = "lost the connection" if self._was_connected else "cannot connect"
            log.warning("MQTT broker %s: %s (%s); status and alerts wait, Kafka is not "
                        "affected; retrying", self.address, what, why)
        self._error = why


def _abandon(client: aiomqtt.Client) -> None:
    """Close the socket of a connection attempt that timed out before its
    CONNACK (aiomqtt leaves it open); paho's own close, best effort."""
    with contextlib.suppress(Exception):
        client._client._sock_close()
