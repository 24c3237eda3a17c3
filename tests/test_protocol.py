"""The server↔site protocol: typed payloads round-trip through a real Flower ConfigRecord, a missing or
malformed key is a clear `ProtocolError`, a misspelt field is caught where it is built, and every query
action has a client handler."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from braing3n_core.federation.protocol import (
    DECLINED, Action, AppSettings, FaultDrill, Hello, PrivacyAuditQuery, ProtocolError, Query, RoundParams,
    SecureRound, SiteReply, TrainRequest,
)

ROOT = Path(__file__).resolve().parents[1]


def _through_flower(config: dict) -> ConfigRecord:
    """What the other side reads: the values after a real ConfigRecord (and its serialisation types)."""
    return ConfigRecord(config)


def test_a_train_request_round_trips_with_its_wire_keys() -> None:
    request = TrainRequest(stage="decoder", server_round=3, local_steps=5, batch_size=2, lr=1e-3, weight_decay=0.0,
                           seed=7, rounds=10, run="r", preset="tiny", model_config={"width": 8, "depth": [1, 2]},
                           encoder_sha256="ab" * 32)
    wire = request.to_config()
    # The keys Flower's own strategies and mods read or add are spelt as they expect.
    assert {"server-round", "local-steps", "batch-size", "weight-decay", "proximal-mu", "model-config"} <= set(wire)
    back = TrainRequest.from_config(_through_flower(wire))
    assert back == request and isinstance(back, RoundParams)
    # A payload reads only its own keys: several payloads share one config record.
    drill = FaultDrill(fault="delay", fault_factor=2.5, fault_site="site-a")
    shared = _through_flower({**wire, **drill.to_config()})
    assert TrainRequest.from_config(shared) == request and FaultDrill.from_config(shared) == drill
    assert drill.applies_to("site-a") and not drill.applies_to("site-b") and not FaultDrill().applies_to("site-a")


def test_missing_and_malformed_keys_name_the_payload_and_the_key() -> None:
    wire = RoundParams(stage="mae", server_round=1, local_steps=1, batch_size=1, lr=0.1, weight_decay=0.0).to_config()
    del wire["local-steps"]
    with pytest.raises(ProtocolError, match=r"RoundParams message lacks \['local-steps'\]"):
        RoundParams.from_config(wire)
    with pytest.raises(ProtocolError, match=r"Query: key 'action' holds 'no_such_action'"):
        Query.from_config({"action": "no_such_action", "preset": "tiny"})
    with pytest.raises(ProtocolError, match=r"Hello: key 'scans' holds"):
        Hello.from_config({"site-id": "a", "has-encoder": True, "scans": "{not json"})


def test_a_misspelt_field_fails_where_the_payload_is_built() -> None:
    with pytest.raises(TypeError):
        Query(action=Action.HELLO, preset="tiny", encoder_sha=" ")  # the field is encoder_sha256
    with pytest.raises(AttributeError, match="SiteReply has no field 'site'"):
        SiteReply.key("site")
    assert SiteReply.key("site_id") == "site-id"


def test_optional_and_list_fields_travel_as_json() -> None:
    without = PrivacyAuditQuery.from_config(_through_flower(PrivacyAuditQuery(n_synthetic=4).to_config()))
    assert without.dit_config is None
    secure = SecureRound(secagg_array_names=["a.weight", "b"], secagg_clipping_range=8.0, secagg_max_weight=1e4)
    assert SecureRound.from_config(_through_flower(secure.to_config())).secagg_array_names == ["a.weight", "b"]


def test_app_settings_are_the_keys_pyproject_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) == set(AppSettings().to_config())
    settings = AppSettings(run_config="/r.yaml", run_dir="/out", site_configs="/a.yaml, /b.yaml", expected_sites=2)
    assert settings.site_config_paths() == ["/a.yaml", "/b.yaml"]
    assert settings.flwr_run_config() == "run-config='/r.yaml' run-dir='/out' site-configs='/a.yaml, /b.yaml' expected-sites=2"


def test_every_action_has_a_handler_and_an_unknown_one_is_declined(tmp_path: Path) -> None:
    from client.app import QUERIES
    from client.app import app as client_app

    assert set(QUERIES) == set(Action)
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                        created_at=0.0, ttl=3600.0, message_type="query")
    site = tmp_path / "site.yaml"
    site.write_text(f"site_id: site-x\ndata_root: {tmp_path}\napproval: {{required: false}}\n")
    context = Context(run_id=1, node_id=1, node_config={"site-config": str(site)}, state=RecordDict(), run_config={})
    message = Message(RecordDict({"config": ConfigRecord({"action": "telemetry", "preset": "tiny"})}), metadata=metadata)
    reply = client_app(message, context)
    assert reply.has_error() and reply.error.code == DECLINED
    assert reply.error.reason.startswith("site site-x: Query: key 'action' holds 'telemetry'")
