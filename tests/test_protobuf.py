"""Protobuf bodies at the collect endpoint ([collect.protobuf]), on Apache Kafka:
each accepted message is read back and compared with json_format's mapping
of what was sent; each refused body gets its exact answer and leaves nothing.
Also the config errors of a bad schema (no broker)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.internal.encoder import _VarintBytes
from google.protobuf.message import Message

from brokers import Broker
from redirect_logger.config import ConfigError, parse_settings
from support import ROOT, ledger_counts, read_messages, service_config, start_service, unique_topic
from test_collect import event_outcomes, rejections

PROTOS = ROOT / "tests" / "protos"
GPS = "tutorial.REALTIMEGPS"
HEARTBEAT = "tutorial.Heartbeat"
PROTOBUF = "application/x-protobuf"


def gps_pool() -> descriptor_pool.DescriptorPool:
    files = descriptor_pb2.FileDescriptorSet.FromString((PROTOS / "gps.binpb").read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


POOL = gps_pool()
GpsMessage = message_factory.GetMessageClass(POOL.FindMessageTypeByName(GPS))
HeartbeatMessage = message_factory.GetMessageClass(POOL.FindMessageTypeByName(HEARTBEAT))


def gps(sequence: int, rng: random.Random | None = None) -> Message:
    """A GPS report with every kind of field set, varied by ``rng``."""
    rng = rng or random.Random(sequence)
    message = GpsMessage(
        device_id=f"tracker-{rng.randrange(1000):03d}-é",
        sequence=sequence,
        fix=rng.choice([0, 1, 2, 7]),  # 7: not a named value (proto3 enums are open)
        cell_ids=[rng.randrange(-(2**31), 2**31) for _ in range(rng.randrange(4))],
        odometer=rng.choice([0, 2**64 - 1, rng.randrange(2**40)]),
        raw_nmea=rng.randbytes(rng.randrange(12)),
    )
    message.fix_time.seconds = 1_790_000_000 + sequence
    message.fix_time.nanos = rng.choice([0, 1_000_000, 123_456_000, 987_654_321])
    position = message.position
    position.latitude = rng.uniform(-90, 90)
    position.longitude = rng.choice([rng.uniform(-180, 180), -0.0])
    position.altitude = rng.choice([rng.uniform(-400, 9000), float("nan"), float("inf")])
    position.speed = rng.uniform(0, 250)
    position.heading = rng.randrange(360)
    for prn in range(rng.randrange(5)):
        satellite = message.satellites.add(prn=prn + 1, snr=rng.uniform(0, 50))
        satellite.used = rng.random() < 0.5
    if rng.random() < 0.5:
        message.labels["fleet"] = rng.choice(["north", "süd", ""])
    if rng.random() < 0.5:
        message.battery = rng.randrange(101)  # optional: 0 is written too
    return message


def mapped(message: Message) -> Any:
    """What json_format writes for ``message``, read back as JSON."""
    return json.loads(json_format.MessageToJson(message, preserving_proto_field_name=True))


def delimited(*messages: Message) -> bytes:
    return b"".join(
        _VarintBytes(message.ByteSize()) + message.SerializeToString() for message in messages
    )


def protobuf_config(bootstrap: str, topic: str, events: str, **protobuf: Any) -> dict[str, Any]:
    schema = protobuf or {"descriptor_set": str(PROTOS / "gps.binpb")}
    return service_config(
        bootstrap,
        topic,
        collect={
            "enabled": True,
            "topic": events,
            "max_events": 100,
            "protobuf": {**schema, "messages": [GPS, HEARTBEAT]},
        },
        kafka={"bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": 60_000},
    )


@pytest.mark.parametrize("schema", ["descriptor_set", "proto_files"])
async def test_messages_are_events_as_json_format_maps_them(
    kafka_broker: Broker, schema: str
) -> None:
    """One message per body (the default type, and another by messageType),
    each content type, and a delimited stream of 100: one event each, whose
    data is json_format's mapping of the message sent."""
    topic, events = unique_topic(), unique_topic("events")
    paths = (
        {"descriptor_set": str(PROTOS / "gps.binpb")}
        if schema == "descriptor_set"
        else {"proto_files": [str(PROTOS / "gps.proto")]}
    )
    config = protobuf_config(kafka_broker.bootstrap, topic, events, **paths)
    heartbeat = HeartbeatMessage(device_id="tracker-hb")
    heartbeat.at.seconds = 1_790_000_001
    stream = [gps(1000 + n) for n in range(100)]
    posts = [
        ("application/x-protobuf", gps(1).SerializeToString()),
        ("application/protobuf", gps(2).SerializeToString()),
        ("application/vnd.google.protobuf", gps(3).SerializeToString()),
        (f"application/x-protobuf; messageType={HEARTBEAT}", heartbeat.SerializeToString()),
        (f"application/x-protobuf; messageType={GPS}; delimited=true", delimited(*stream)),
        ("application/x-protobuf;delimited=TRUE", b""),  # a stream of none
        ("application/x-protobuf", b""),  # one message, every field at its default
    ]
    stop = trio.Event()
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                answers = []
                for content_type, body in posts:
                    response = await client.post(
                        "/collect", content=body, headers={"content-type": content_type}
                    )
                    answers.append((response.status_code, response.json()))
            stop.set()
    assert codes == [0]
    assert answers == [(202, {"accepted": n}) for n in (1, 1, 1, 1, 100, 0, 1)]
    assert service.ledger_snapshot() == ledger_counts(received=105, delivered=105)
    assert event_outcomes(service) == {"accepted": 105, "dropped": 0, "shed": 0}
    assert rejections(service) == {}

    read = await trio.to_thread.run_sync(read_messages, kafka_broker.bootstrap, events, 60.0, 105)
    records = [message.record for message in read]
    assert all(record["kind"] == "event" for record in records)
    assert len({record["id"] for record in records}) == 105
    by_key = {
        (record["data"].get("device_id"), record["data"].get("sequence")): record["data"]
        for record in records
    }
    sent = [gps(1), gps(2), gps(3), *stream]
    expected = {(message.device_id, str(message.sequence)): mapped(message) for message in sent}
    expected[("tracker-hb", None)] = mapped(heartbeat)
    expected[(None, None)] = {}
    assert by_key == expected
    assert by_key[("tracker-hb", None)] == {"device_id": "tracker-hb", "at": "2026-09-21T14:13:21Z"}


async def test_a_stream_at_the_limits_is_read_whole_or_refused_naming_its_message(
    kafka_broker: Broker,
) -> None:
    """100 messages in one stream, with length prefixes of 1 to 3 bytes (one
    message of 20,000 bytes, mostly a field the schema does not know) and one
    message whose JSON is exactly the size limit: every event read back from
    Kafka is json_format's mapping of its message. The same stream with one
    byte of message 50 garbled, or cut inside its last message: the 400
    naming the message and the byte, and nothing recorded."""
    topic, events = unique_topic(), unique_topic("events")
    config = protobuf_config(kafka_broker.bootstrap, topic, events)
    limit = 60_000 - 48 * 1024  # message.max.bytes less the envelope's bytes
    stream = [gps(2000 + n) for n in range(100)]
    stream[10] = GpsMessage(device_id="tracker-big", sequence=10)
    # {"device_id":"...","sequence":"20"}: exactly the limit as JSON
    padding = limit - len('{"device_id":"","sequence":"20"}')
    stream[20] = GpsMessage(device_id="x" * padding, sequence=20)
    datas = [message.SerializeToString() for message in stream]
    datas[10] += b"\xa2\x06" + _VarintBytes(20_000) + bytes(20_000)  # field 100: unknown
    body = b"".join(_VarintBytes(len(data)) + data for data in datas)
    assert {len(_VarintBytes(len(data))) for data in datas} == {1, 2, 3}
    offsets = [0]  # where each message's length prefix begins
    for data in datas:
        offsets.append(offsets[-1] + len(_VarintBytes(len(data))) + len(data))
    garbled_at = offsets[50] + len(_VarintBytes(len(datas[50])))  # message 50's first byte
    assert body[garbled_at] == 0x0A  # field 1 (device_id), length-delimited
    garbled = body[:garbled_at] + b"\x0e" + body[garbled_at + 1 :]  # field 1, wire type 6
    cut = body[:-1]
    last = offsets[99]
    content_type = f"{PROTOBUF}; delimited=true"
    stop = trio.Event()
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                answers = []
                for sent in (body, garbled, cut):
                    response = await client.post(
                        "/collect", content=sent, headers={"content-type": content_type}
                    )
                    answers.append((response.status_code, response.json()))
            stop.set()
    assert codes == [0]
    size = len(datas[99])
    assert answers == [
        (202, {"accepted": 100}),
        (
            400,
            {
                "error": f"Message 50 (at byte {garbled_at}) is not a valid {GPS}: at byte "
                f"{garbled_at}, field device_id: wire type 6, which does not exist",
                "type": GPS,
                "event": 50,
                "offset": garbled_at,
                "field": "device_id",
            },
        ),
        (
            400,
            {
                "error": f"Message 99 (at byte {last}) is not a valid {GPS}: at byte {last}: "
                f"its length prefix says {size} bytes, {size - 1} follow",
                "type": GPS,
                "event": 99,
                "offset": last,
            },
        ),
    ]
    assert service.ledger_snapshot() == ledger_counts(received=100, delivered=100)
    assert rejections(service) == {"malformed": 2}

    read = await trio.to_thread.run_sync(read_messages, kafka_broker.bootstrap, events, 60.0, 100)
    records = [message.record for message in read]
    assert len({record["id"] for record in records}) == 100
    by_sequence = {record["data"]["sequence"]: record["data"] for record in records}
    assert by_sequence == {str(message.sequence): mapped(message) for message in stream}
    assert by_sequence["10"] == {"device_id": "tracker-big", "sequence": "10"}
    assert len(json.dumps(by_sequence["20"], separators=(",", ":"))) == limit


async def test_refused_bodies_get_their_answer_and_leave_nothing(kafka_broker: Broker) -> None:
    """A wrong type, a truncated body, garbage, a bad stream, an unknown or
    unlisted messageType, too many messages, a message too large as JSON:
    each its status and error, counted by reason; no record, no ledger entry."""
    topic, events = unique_topic(), unique_topic("events")
    config = protobuf_config(kafka_broker.bootstrap, topic, events)
    whole = gps(7).SerializeToString()
    head = GpsMessage(device_id=gps(7).device_id, sequence=7, fix_time=gps(7).fix_time)
    position_at = head.ByteSize()  # fields are written in order: 4 (position) comes next
    assert whole[position_at] == 0x22  # field 4, length-delimited
    # Heartbeat's field 2 (a Timestamp) sent as GPS: field 2 there is an int64.
    # Parsed as such it is an unknown field; but a string in field 4 is not a Position.
    wrong = HeartbeatMessage(device_id="hb").SerializeToString() + b"\x22\x05north"
    large = gps(8)
    large.raw_nmea = bytes(9_000)  # 12,000 bytes as base64
    oversize = 60_000 - 48 * 1024
    cases: list[tuple[str, bytes, int, dict[str, Any]]] = [
        (
            PROTOBUF,
            wrong,
            400,
            {
                "error": f"Is not a valid {GPS}: at byte {len(wrong) - 5}, field position: "
                "wire type 6, which does not exist",
                "type": GPS,
                "offset": len(wrong) - 5,
                "field": "position",
            },
        ),
        (
            PROTOBUF,
            whole[: position_at + 5],
            400,
            {
                "error": f"Is not a valid {GPS}: at byte {position_at}, field position: "
                f"a length of {whole[position_at + 1]} bytes, 3 left",
                "type": GPS,
                "offset": position_at,
                "field": "position",
            },
        ),
        (
            PROTOBUF,
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
            400,
            {
                "error": f"Is not a valid {GPS}: at byte 0: a field's tag is not a valid varint",
                "type": GPS,
                "offset": 0,
            },
        ),
        (
            f"{PROTOBUF}; delimited=true",
            delimited(gps(1), gps(2)) + b"\x80",
            400,
            {
                "error": f"Message 2 (at byte {len(delimited(gps(1), gps(2)))}) is not a valid "
                f"{GPS}: at byte {len(delimited(gps(1), gps(2)))}: its length prefix is not a "
                "valid varint",
                "type": GPS,
                "event": 2,
                "offset": len(delimited(gps(1), gps(2))),
            },
        ),
        (
            f"{PROTOBUF}; delimited=true",
            delimited(gps(1)) + b"\x10" + bytes(4),
            400,
            {
                "error": f"Message 1 (at byte {len(delimited(gps(1)))}) is not a valid {GPS}: "
                f"at byte {len(delimited(gps(1)))}: its length prefix says 16 bytes, 4 follow",
                "type": GPS,
                "event": 1,
                "offset": len(delimited(gps(1))),
            },
        ),
        (
            f"{PROTOBUF}; messageType=tutorial.Unknown",
            whole,
            415,
            {
                "error": "messageType 'tutorial.Unknown' is not a message type of the schema; "
                f"accepted: {GPS}, {HEARTBEAT}",
                "type": "tutorial.Unknown",
            },
        ),
        (
            f"{PROTOBUF}; messageType=tutorial.REALTIMEGPS.Position",
            whole,
            415,
            {
                "error": "messageType 'tutorial.REALTIMEGPS.Position' is not accepted here; "
                f"accepted: {GPS}, {HEARTBEAT}",
                "type": "tutorial.REALTIMEGPS.Position",
            },
        ),
        (
            f"{PROTOBUF}; delimited=yes",
            whole,
            415,
            {"error": "delimited must be true or false"},
        ),
        (
            f"{PROTOBUF}; delimited=true",
            delimited(*(gps(n) for n in range(101))),
            413,
            {"error": "more than 100 events"},
        ),
        (
            f"{PROTOBUF}; delimited=true",
            delimited(gps(1), large),
            413,
            {
                "error": f"event 1 is larger than {oversize} bytes as JSON",
                "event": 1,
            },
        ),
    ]
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            answers = []
            for content_type, body, _, _ in cases:
                async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                    response = await client.post(
                        "/collect", content=body, headers={"content-type": content_type}
                    )
                    answers.append((response.status_code, response.json()))
            stop.set()
    assert codes == [0]
    assert answers == [(status, body) for _, _, status, body in cases]
    assert rejections(service) == {
        "malformed": 5,
        "content_type": 3,
        "too_many_events": 1,
        "event_too_large": 1,
    }
    assert service.ledger_snapshot() == ledger_counts()
    assert event_outcomes(service) == {"accepted": 0, "dropped": 0, "shed": 0}


# --- config errors (no broker) ---


def settings_with(protobuf: dict[str, Any], **collect: Any) -> None:
    parse_settings(
        {
            "kafka": {"bootstrap.servers": "kafka:9092"},
            "collect": {"enabled": True, "protobuf": protobuf, **collect},
        }
    )


def test_a_bad_schema_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    gps_set = str(PROTOS / "gps.binpb")
    bad_proto = tmp_path / "bad.proto"
    bad_proto.write_text('syntax = "proto3";\npackage x;\nmessage A { Missing m = 1; }\n')
    not_a_set = tmp_path / "not-a-set.binpb"
    not_a_set.write_bytes(b"\xff\xff\xff")
    no_imports = tmp_path / "no-imports.binpb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"--descriptor_set_out={no_imports}",
            str(PROTOS / "gps.proto"),
        ],
        check=True,
    )
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {
                "descriptor_set": gps_set,
                "proto_files": [str(PROTOS / "gps.proto")],
                "messages": [GPS],
            },
            "collect.protobuf: set descriptor_set (a FileDescriptorSet) or proto_files "
            "(.proto sources), one of the two",
        ),
        ({"messages": [GPS]}, "collect.protobuf: set descriptor_set"),
        ({"descriptor_set": gps_set}, "collect.protobuf.messages: required key is missing"),
        ({"descriptor_set": gps_set, "messages": []}, "collect.protobuf.messages: List should"),
        (
            {"descriptor_set": str(tmp_path / "absent.binpb"), "messages": [GPS]},
            f"collect.protobuf.descriptor_set: cannot read '{tmp_path / 'absent.binpb'}': "
            "No such file or directory",
        ),
        (
            {"descriptor_set": str(not_a_set), "messages": [GPS]},
            "collect.protobuf.descriptor_set: not a FileDescriptorSet",
        ),
        (
            {"descriptor_set": str(no_imports), "messages": [GPS]},
            "collect.protobuf.descriptor_set: gps.proto does not load (",
        ),
        (
            {"descriptor_set": gps_set, "messages": [GPS, "REALTIMEGPS"]},
            "collect.protobuf.messages.1: 'REALTIMEGPS' is not a message type of the schema",
        ),
        (
            {"descriptor_set": gps_set, "messages": [GPS, GPS]},
            f"collect.protobuf.messages.1: '{GPS}' is listed twice",
        ),
        (
            {"proto_files": [str(bad_proto)], "messages": ["x.A"]},
            f'collect.protobuf.proto_files: protoc refused them: {bad_proto}:3:13: "Missing" '
            "is not defined.",
        ),
        (
            {"proto_files": [str(tmp_path / "absent.proto")], "messages": ["x.A"]},
            f"collect.protobuf.proto_files.0: '{tmp_path / 'absent.proto'}' is not a readable file",
        ),
        (
            {"descriptor_set": gps_set, "mesages": [GPS]},
            "collect.protobuf.messages: required key is missing; "
            "collect.protobuf.mesages: unknown key",
        ),
    ]
    for protobuf, message in cases:
        with pytest.raises(ConfigError) as info:
            settings_with(protobuf)
        assert str(info.value).startswith(f"config: {message}"), str(info.value)
    with pytest.raises(ConfigError) as info:
        settings_with(
            {"descriptor_set": gps_set, "messages": [GPS]},
            content_types=["application/json", "application/protobuf"],
        )
    assert str(info.value) == (
        "config: collect.content_types: 'application/protobuf' is a protobuf type, read as "
        "such when [collect.protobuf] is set and never as JSON: leave it out"
    )


def test_check_reports_a_bad_schema(tmp_path: Path) -> None:
    """``redirect-logger check`` names the key; a good schema passes, and
    relative paths are relative to the working directory."""
    shutil.copy(PROTOS / "gps.proto", tmp_path / "gps.proto")
    config = tmp_path / "config.toml"
    base = '[kafka]\n"bootstrap.servers" = "kafka:9092"\n\n[collect]\nenabled = true\n\n'
    config.write_text(
        base + f'[collect.protobuf]\nproto_files = ["gps.proto"]\nmessages = ["{GPS}"]\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "redirect_logger.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    config.write_text(
        base + f'[collect.protobuf]\ndescriptor_set = "gps.proto"\nmessages = ["{GPS}"]\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "redirect_logger.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert (
        f"error: {config}: collect.protobuf.descriptor_set: not a FileDescriptorSet "
        "(protoc --include_imports --descriptor_set_out=...)"
    ) in result.stderr
