"""Federated training across sites with Flower: sites run DP stages on their own data (docs/federated.md)."""

import logging


def app_logging() -> None:
    """INFO logs of vlmtrain in the ServerApp/ClientApp process, without httpx's: Flower's app processes push their
    log lines to the SuperLink over HTTP (httpx), and httpx logs each such request at INFO, which would be pushed
    in turn (under the Simulation Engine, an endless loop of push-logs requests measured at ~4 per second)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
