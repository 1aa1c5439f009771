"""QEMU 10.x's and QEMU 11.1's switchover-ack mechanisms, sans-IO.

What each side does is what QEMU 11.1.3 did on the wire (docs/qemu-versions.md,
recorded return paths in tests/data/qemu-11.1-rp-*.bin): with its own machine
type (``switchover-ack-legacy=off``) every INIT_DATA_SENT is answered by one
SWITCHOVER_ACK, a re-initialised device sends INIT_DATA_SENT again, and no ACK
goes at OPEN_RETURN_PATH; with ``pc-q35-10.0`` (legacy) one ACK answers all
devices and goes at OPEN_RETURN_PATH when no device has pre-copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from migrator._protocol import events as ev
from migrator._protocol.main import DestinationSettings
from migrator._protocol.switchover_ack import SourceSwitchoverAck
from migrator._wire import Marker
from migrator.config import MigrationConfig, QemuCompat
from migrator.errors import LocalProtocolError, RemoteProtocolError
from tests.migrator.test_protocol import MigrationPair, eos, section

DATA = Path(__file__).resolve().parent.parent / "data"


def settings(*, legacy: bool, idstrs: tuple[str, ...] = ("dev0",)) -> DestinationSettings:
    sizes = dict.fromkeys(idstrs, 3)
    return DestinationSettings(
        idstrs=list(idstrs), config_sizes=sizes, switchover_ack=True, switchover_ack_legacy=legacy
    )


def opening(idstrs: tuple[str, ...] = ("dev0",)) -> list[ev.MainEvent]:
    out: list[ev.MainEvent] = [
        ev.FileHeader(3),
        ev.Configuration("fakevfio"),
        ev.OpenReturnPath(),
        ev.Ping(b"\0\0\0\1"),
    ]
    for sid, idstr in enumerate(idstrs, 1):
        setup = ev.MarkerEvent(sid, Marker.DEV_SETUP_STATE)
        out += section(ev.SectionStart, sid, setup, eos(sid), idstr=idstr)
    return out


def init_data_sent(sid: int) -> list[ev.MainEvent]:
    return section(
        ev.SectionPart,
        sid,
        ev.DataHeader(sid, 2),
        ev.DataChunk(sid, b"ab"),
        ev.MarkerEvent(sid, Marker.DEV_INIT_DATA_SENT),
    )


def ack_all(pair: MigrationPair) -> int:
    """Send every due SWITCHOVER_ACK (as the destination adapter does); how many."""
    n = 0
    while pair.dst.ack_due:
        assert pair.reply(ev.SwitchoverAck()) == [ev.SwitchoverAck()]
        n += 1
    return n


# -- the source's accounting ------------------------------------------------------


def can(ack: SourceSwitchoverAck) -> bool:
    return ack.can_switchover


def test_source_legacy_waits_for_one_ack_and_takes_extra_ones() -> None:
    ack = SourceSwitchoverAck(legacy=True)
    assert not can(ack)  # 10.0: one ACK for the whole migration
    ack.acked()
    assert can(ack)
    ack.acked()  # QEMU 10.0 only sets a flag: a second ACK is harmless
    assert can(ack)
    with pytest.raises(LocalProtocolError, match="legacy mode"):
        ack.request("dev0")


def test_source_new_counts_requests_and_refuses_an_unrequested_ack() -> None:
    ack = SourceSwitchoverAck(legacy=False)
    assert can(ack)  # nobody asked: nothing to wait for
    ack.request("dev0")
    ack.request("dev1")
    assert not can(ack)
    ack.acked()
    assert not can(ack)
    ack.acked()
    assert can(ack)
    assert ack.requests == ["dev0", "dev1"]
    with pytest.raises(RemoteProtocolError, match="Switchover ack pending num underflowed"):
        ack.acked()


def test_config_default_is_qemu_10_behaviour() -> None:
    assert MigrationConfig().qemu_compat is QemuCompat.V10_0
    assert QemuCompat.V10_0.switchover_ack_legacy
    assert not QemuCompat.V11_1.switchover_ack_legacy
    assert QemuCompat("11.1") is QemuCompat.V11_1


# -- the destination --------------------------------------------------------------


@pytest.mark.parametrize("legacy", [True, False])
def test_destination_without_precopy_devices(legacy: bool) -> None:
    """Legacy: the ACK goes at OPEN_RETURN_PATH; 11.1: none at all."""
    pair = MigrationPair(settings(legacy=legacy))
    pair.dst.devices_ready([])
    pair.send(*opening())
    assert ack_all(pair) == (1 if legacy else 0)


def test_destination_new_acks_every_init_data_sent_also_after_reinit() -> None:
    pair = MigrationPair(settings(legacy=False, idstrs=("dev0", "dev1")))
    pair.dst.devices_ready(["dev0", "dev1"])
    pair.send(*opening(("dev0", "dev1")))
    assert ack_all(pair) == 0
    assert pair.dst.awaiting_init_data() == ["dev0", "dev1"]
    pair.send(*init_data_sent(1))
    assert ack_all(pair) == 1  # 11.1: dev0's approval goes at once
    assert pair.dst.awaiting_init_data() == ["dev1"]
    pair.send(*init_data_sent(1))  # dev0 re-initialised and sent its initial data again
    assert ack_all(pair) == 1
    pair.send(*init_data_sent(2))
    assert ack_all(pair) == 1
    assert pair.rp_bytes == bytes.fromhex("0007 0000") * 3


def test_destination_new_acks_queued_init_data_one_each() -> None:
    """Two INIT_DATA_SENT decoded before the adapter looked: two ACKs are due."""
    pair = MigrationPair(settings(legacy=False))
    pair.dst.devices_ready(["dev0"])
    pair.send(*opening(), *init_data_sent(1), *init_data_sent(1))
    assert ack_all(pair) == 2
    with pytest.raises(LocalProtocolError, match="not due"):
        pair.dst.send(ev.SwitchoverAck())


def test_destination_legacy_one_ack_for_all_and_refuses_a_second_init_data_sent() -> None:
    pair = MigrationPair(settings(legacy=True, idstrs=("dev0", "dev1")))
    pair.dst.devices_ready(["dev0", "dev1"])
    pair.send(*opening(("dev0", "dev1")), *init_data_sent(1))
    assert ack_all(pair) == 0  # 10.0: waits for dev1 too
    pair.send(*init_data_sent(2))
    assert ack_all(pair) == 1
    with pytest.raises(RemoteProtocolError, match=r"approved more times.*--qemu-compat 11\.1"):
        pair.send(*init_data_sent(1))


def test_destination_new_still_refuses_init_data_from_a_device_without_precopy() -> None:
    pair = MigrationPair(settings(legacy=False))
    pair.dst.devices_ready([])
    with pytest.raises(RemoteProtocolError, match="switchover ack is not used"):
        pair.send(*opening(), *init_data_sent(1))


def closing(sid: int) -> list[ev.MainEvent]:
    return [
        ev.SwitchoverStart(),
        *section(ev.SectionEnd, sid, ev.DataHeader(sid, 1), ev.DataChunk(sid, b"z"), eos(sid)),
        *section(
            ev.SectionFull,
            sid,
            ev.MarkerEvent(sid, Marker.DEV_CONFIG_STATE),
            ev.ConfigBlob(sid, b"cfg"),
            eos(sid),
        ),
        ev.EndOfFile(),
    ]


@pytest.mark.parametrize(
    ("legacy", "init_data_sents", "recorded"),
    [(False, 2, "qemu-11.1-rp-reinit.bin"), (True, 1, "qemu-11.1-legacy-rp-reinit.bin")],
)
def test_destination_return_path_is_qemu_11_1s_bytes(
    legacy: bool, init_data_sents: int, recorded: str
) -> None:
    """The return path QEMU 11.1.3's destination wrote for a device that re-initialised
    after its INIT_DATA_SENT (``reinit_after`` = its initial bytes): q35 (new: the
    source sent INIT_DATA_SENT twice) and pc-q35-10.0 (legacy: once). Ours, fed the
    same VFIO sequence, writes the same bytes: PONG 1, the ACKs, SHUT 0."""
    pair = MigrationPair(settings(legacy=legacy))
    pair.dst.devices_ready(["dev0"])
    pair.send(*opening())
    pair.reply(ev.Pong(b"\0\0\0\1"))
    for _ in range(init_data_sents):
        pair.send(*init_data_sent(1))
        ack_all(pair)
    pair.send(*closing(1))
    pair.reply(ev.Shut(0))
    assert pair.rp_bytes == (DATA / recorded).read_bytes()
