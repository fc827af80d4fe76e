#!/usr/bin/env python3
"""Writes a few starting inputs for the net_tx target (its script format is documented in
fuzz_targets/net_tx.rs) into seeds/net_tx/. Every seed runs clean: none reaches the endless
worker loops of README bug 3 (their reproducers are at the end, not written as seeds)."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "net_tx")

# Preamble: a set bit drops a feature (CSUM, HOST_TSO4, HOST_TSO6, HOST_ECN, MRG_RXBUF,
# EVENT_IDX, GUEST_CSUM, GUEST_TSO*); then the queue sizes (low nibble TX, high RX: 256 >> n).
ALL_FEATURES = bytes([0x00, 0x00])
NO_MERGEABLE = bytes([0x10, 0x00])

# Header kinds (tx_header): plain, csum TCP, csum UDP, TSO4, TSO6, TSO4+ECN, UFO, USO.
PLAIN, CSUM_TCP, CSUM_UDP, TSO4, TSO6, TSO4_ECN = range(6)
# Common packet sizes (tx_payload selector 0): 60, 1514, 9014, 65535.
P60, P1514, P9014, P65535 = range(4)


def tx(size, kind, layout, over=b"\x00"):
    """A TX frame (command 0) of a common size; `over` is the override byte and its fields."""
    return bytes([0, 0, size, kind]) + over + bytes([layout])


def rx_buffers(n, len_sel, shape=0):
    """n RX buffers (command 6); len_sel 0 = 4096 bytes, 0x40 = 64 KiB + header."""
    return bytes([6, n - 1, len_sel, shape])


def tap_frames(n, len_sel, hsel=1):
    """n frames from the tap (command 9); len_sel 1 = 1514 bytes, 2 = 64 KiB; hsel 1 = the
    header the kernel writes for the negotiated offloads."""
    return bytes([9, n - 1, len_sel, hsel])


def turns(budget=1, events=0):
    """Event-loop turns (command 14); events 0 = every event."""
    return bytes([14, 0, budget - 1, events])


SEEDS = {
    # Checksum and TSO frames in the layouts Linux uses, one at the edge of the checksum
    # bounds, then one worker turn.
    "offloads": ALL_FEATURES + tx(P1514, CSUM_TCP, 0x01) + tx(P65535, TSO4, 0x03)
    + tx(P60, TSO6, 0x08, over=b"\x80\x02") + tx(P9014, TSO4_ECN, 0x00) + turns(),
    # Mergeable RX buffers: two 64 KiB frames (17 buffers each) and four MTU-sized ones.
    "rx_mergeable": ALL_FEATURES + rx_buffers(32, 0) + rx_buffers(32, 0)
    + tap_frames(2, 2) + tap_frames(4, 1) + turns(2),
    # Without mergeable buffers: big-packet buffers (header in its own descriptor), and TX
    # while the tap would block, then takes writes again.
    "big_packets_blocked_tap": NO_MERGEABLE + rx_buffers(4, 0x40, shape=0x13) + tap_frames(3, 2)
    + bytes([13, 1]) + tx(P1514, PLAIN, 0x01) + turns() + bytes([13, 0]) + turns(2),
}

# Reproducers for README bug 3 (crash the target unless HUSK_FUZZ_NET_ALLOW_SPIN=1):
# TX: all features, 256-entry queues, TX avail index moved one past what the ring holds.
TX_SPIN = ALL_FEATURES + bytes([12, 0])
# RX: one 4 KiB mergeable buffer, one 64 KiB frame from the tap.
RX_SPIN = ALL_FEATURES + rx_buffers(1, 0) + bytes([9, 0, 2, 0])

if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for n, data in SEEDS.items():
        with open(os.path.join(OUT, n), "wb") as f:
            f.write(data)
    print(f"wrote {len(SEEDS)} seeds to {OUT}")
