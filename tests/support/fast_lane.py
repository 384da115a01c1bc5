"""``pytest --fast-lane off`` (or TENSORWIRE_FAST_LANE=0): every client the tests make
keeps its calls on gRPC, so that CI runs the whole suite over both paths (the
fast lane is on by default: a plain run takes it; issue 33)."""

from __future__ import annotations

import os

import pytest

#: The client's own switch (tensorwire._transport.lane_pool.ENV), read where a client is made.
ENV = "TENSORWIRE_FAST_LANE"


def add_option(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast-lane",
        choices=("on", "off"),
        default=None,
        help="clients' fast lane: on (the default) or off (every call over gRPC)",
    )


def configure(config: pytest.Config) -> None:
    """Set the clients' switch for the whole run (servers started later inherit it)."""
    chosen = config.getoption("--fast-lane")
    if chosen is not None:
        os.environ[ENV] = "1" if chosen == "on" else "0"
