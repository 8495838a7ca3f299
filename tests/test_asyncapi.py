from __future__ import annotations

from typing import Any

import yaml

from heartbeat_consumer.bus.asyncapi import build, render
from heartbeat_consumer.core.topology import (
    TICK_KEY,
    agent_key,
    inbox_bindings,
    result_key,
    state_key,
    status_key,
)

from .conftest import ROOT


def test_committed_document_is_current() -> None:
    committed = (ROOT / "docs/asyncapi.yaml").read_text()
    assert committed == render(), "run: heartbeat-consumer asyncapi --output docs/asyncapi.yaml"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_reference_resolves_and_every_channel_has_an_operation() -> None:
    doc = yaml.safe_load(render("ex"))
    for ref in _refs(doc):
        assert _resolve(doc, ref) is not None, ref
    used = {op["channel"]["$ref"].rsplit("/", 1)[1] for op in doc["operations"].values()}
    assert used == set(doc["channels"])


def test_addresses_match_the_topology() -> None:
    addresses = {c["address"] for c in build("ex")["channels"].values()}
    assert TICK_KEY in addresses
    for command in ("tick", "run", "pause", "resume"):
        assert agent_key("{agent}", command) in addresses
    assert result_key("{agent}", "{check}", "{status}") in addresses
    assert status_key("{agent}", "{status}") in addresses
    assert state_key("{agent}", "{word}") in addresses
    assert build("ex")["channels"]["state"]["parameters"]["word"]["enum"] == [
        "_pauses",
        "_snapshot",
        "_sync",
    ]
    tick_text = build("ex")["channels"]["tick"]["description"]
    for binding in inbox_bindings("{agent}"):
        assert binding in tick_text, "the manually bound key is documented"
    assert {
        c["bindings"]["amqp"]["exchange"]["name"] for c in build("ex")["channels"].values()
    } == {"ex"}
