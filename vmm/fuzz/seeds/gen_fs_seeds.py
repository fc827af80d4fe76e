#!/usr/bin/env python3
"""Writes a few starting inputs for the virtio_fs_request target (its script format is
documented in fuzz_targets/virtio_fs_request.rs) into seeds/virtio_fs_request/."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "virtio_fs_request")

NAME = {"hello.txt": 0, "sub": 1, "nested.txt": 2, "escape": 3, "link": 4, "fifo": 5,
        "big.bin": 6, "empty": 7, "..": 8, ".": 9, "new": 10}


def raw(b):
    return (0, bytes([len(b)]) + b)


def name(n):
    return (1, bytes([NAME[n]]))


def handle(k):
    return (2, bytes([k]))


def node(n):
    return (3, bytes([n]))


def req(op, nodeid, parts, replies=(0,), read_parts=1, indirect=False):
    """One request command (command byte 0)."""
    kinds = 0
    body = b""
    for i, (kind, data) in enumerate(parts):
        kinds |= kind << (2 * i)
        body += data
    shape = (read_parts - 1) | (len(replies) << 2) | (0x80 if indirect else 0)
    return (bytes([0, op, nodeid, 0, 0, len(parts) - 1, kinds]) + body
            + bytes([0, shape]) + bytes(replies))


def read_in(size=4096, offset=0):  # ReadIn after its fh
    return struct.pack("<QIIQII", offset, size, 0, 0, 0, 0)


PREAMBLE = bytes([2, 0]) + struct.pack("<I", 0)  # read-only share, cache=auto, minor 31
SEEDS = {
    "getattr_statfs": [req(3, 1, [raw(bytes(16))]), req(17, 1, [raw(b"")])],
    "readdir": [req(1, 1, [name("sub")]), req(27, 3, [raw(bytes(8))]),
                req(28, 3, [handle(1), raw(read_in())]),
                req(44, 1, [handle(0), raw(read_in())])],
    "open_read": [req(14, 2, [raw(struct.pack("<II", os.O_RDONLY, 0))]),
                  req(15, 2, [handle(1), raw(read_in(64))], replies=(2, 0)),
                  req(25, 2, [handle(1), raw(struct.pack("<IIQ", 0, 0, 0))]),
                  req(18, 2, [handle(1), raw(struct.pack("<IIQ", 0, 0, 0))])],
    "big_read_indirect": [req(1, 1, [name("big.bin")]),
                          req(14, 3, [raw(struct.pack("<II", os.O_RDONLY, 0))]),
                          req(15, 3, [handle(1), raw(read_in(0x20000))], replies=(3, 3), indirect=True)],
    "links": [req(1, 1, [name("link")]), req(5, 3, [raw(b"")]), req(1, 1, [name("escape")]),
              req(1, 3, [name("..")]), req(1, 1, [name("..")]), req(1, 1, [name("fifo")]),
              req(14, 4, [raw(struct.pack("<II", os.O_RDONLY, 0))])],
    "xattr": [req(22, 2, [raw(struct.pack("<II", 64, 0)), name("hello.txt")]),
              req(23, 2, [raw(struct.pack("<II", 64, 0))])],
    "forget": [req(1, 1, [name("sub")]), req(1, 3, [name("nested.txt")]),
               req(2, 4, [raw(struct.pack("<Q", 1))], replies=()),
               req(42, 0, [raw(struct.pack("<II", 1, 0)), node(3), raw(struct.pack("<Q", 1))], replies=())],
    "write_ops_refused": [req(9, 1, [raw(struct.pack("<II", 0o755, 0)), name("new")]),
                          req(35, 1, [raw(struct.pack("<IIII", 0o101, 0o644, 0, 0)), name("new")]),
                          req(10, 1, [name("hello.txt")]),
                          req(12, 1, [node(1), name("hello.txt"), name("new")])],
}

os.makedirs(OUT, exist_ok=True)
for n, cmds in SEEDS.items():
    with open(os.path.join(OUT, n), "wb") as f:
        f.write(PREAMBLE + b"".join(cmds))
print(f"wrote {len(SEEDS)} seeds to {OUT}")
