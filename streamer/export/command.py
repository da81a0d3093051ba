"""`ctstream ipfix`: its entry point (the options are the command line's,
streamer/cli.py; the rows are streamer/settings.py's)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from ..errors import ConfigError
from ..settings import Config, check_kafka_timeout, kafka_settings
from .collector import CollectorAddress
from .exporter import check_options, export

log = logging.getLogger(__name__)


def ipfix_main(cfg: Config) -> int:
    try:
        if not cfg.kafka or not cfg.topic or not cfg.collector:
            raise ConfigError("ipfix needs --kafka HOST:PORT, --topic NAME and "
                              "--collector HOST:PORT")
        address = CollectorAddress.parse(cfg.collector, cfg.transport)
        check_options(cfg.group, cfg.observation_domain, cfg.template_interval,
                      cfg.until_idle, cfg.session_timeout)
        check_kafka_timeout(cfg.kafka_timeout)
        settings = kafka_settings(cfg.values)
    except ConfigError as exc:
        raise _located(cfg, exc) from exc
    stats = asyncio.run(_export(cfg, settings, address))
    print(f"ctstream: exported {stats.exported} DESTROYs in {stats.messages} IPFIX messages "
          f"({stats.template_messages} of templates) from {stats.records} records: "
          f"{stats.skipped} of other types, {stats.rejected} rejected"
          + (f", {stats.commits_failed} commits lost to a rebalance" if stats.commits_failed
             else ""), file=sys.stderr)
    return 0


async def _export(cfg: Config, settings, address: CollectorAddress):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Logged (-v), not printed: a collector that cannot be reached leaves one line.
    log.info("exporting the DESTROYs of topic %s from %s as IPFIX to %s (group %s, observation "
             "domain %d)%s", cfg.topic, cfg.kafka, address, cfg.group, cfg.observation_domain,
             f" until idle for {cfg.until_idle:g}s" if cfg.until_idle else "")
    return await export(settings, address, group=cfg.group, domain=cfg.observation_domain,
                        template_interval_s=cfg.template_interval, stop=stop,
                        until_idle=cfg.until_idle, connect_timeout_s=cfg.kafka_timeout,
                        session_timeout_s=cfg.session_timeout)


def _located(cfg: Config, exc: ConfigError) -> ConfigError:
    """The message with where the value came from (--name, FILE:LINE)."""
    name = getattr(exc, "setting", None)
    if name is None or name not in cfg.origins or str(exc).startswith("--"):
        return exc
    return ConfigError(f"{cfg.where(name)}: {exc}", setting=name)
