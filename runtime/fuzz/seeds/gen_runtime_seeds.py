#!/usr/bin/env python3
"""Writes seeds/runtime_spec/ and seeds/image_unpack/ (input formats: see the targets' doc
comments) and dict/runtime_spec.dict."""
import io
import json
import os
import struct
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLE = "/tmp/husk-fuzz-runtime-spec/bundle"


def write(sub, name, data):
    d = os.path.join(HERE, sub)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- runtime_spec: flags, memory (u16), vcpus (u8), VM memory (u16) and vCPUs (u8), config.json
BASE = {
    "ociVersion": "1.0.2",
    "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "terminal": True,
                "apparmorProfile": "p", "selinuxLabel": "l"},
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "h",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/d", "type": "bind", "source": "src-dir", "options": ["rbind", "ro"]},
        {"destination": "/f", "source": BUNDLE + "/src-file", "options": ["bind"]},
        {"destination": "/l", "type": "bind", "source": "link-dir"},
        {"destination": "/o", "type": "bind", "source": "link-out/etc"},
    ],
    "linux": {
        "namespaces": [{"type": "network", "path": "/proc/self/ns/net"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
                       {"type": "uts"}, {"type": "pid"}, {"type": "mount"}],
        "resources": {"memory": {"limit": 1 << 30}, "cpu": {"quota": 200000, "period": 100000}},
        "cgroupsPath": "/x", "mountLabel": "m",
    },
    "hooks": {"prestart": [{"path": "/bin/true"}], "poststop": [{"path": "/bin/true", "timeout": 1}]},
    "annotations": {"io.husk.vm.memory-mib": "512", "io.husk.vm.vcpus": "2",
                    "io.kubernetes.cri.sandbox-memory": "268435456",
                    "io.kubernetes.cri.sandbox-cpu-quota": "100000", "io.kubernetes.cri.sandbox-cpu-period": "100000"},
}


def spec_seed(name, flags, spec, memory=0, vcpus=0, vm=(256, 1)):
    pre = bytes([flags]) + struct.pack("<H", memory) + bytes([vcpus]) + struct.pack("<H", vm[0]) + bytes([vm[1]])
    write("runtime_spec", name, pre + json.dumps(spec).encode())


spec_seed("base", 0, BASE)
spec_seed("base-bind-rootfs", 1, BASE, vm=(128, 1))
spec_seed("opts", 6, BASE, memory=1024, vcpus=4)
minimal = {"ociVersion": "1.0.2", "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
           "root": {"path": "rootfs"}}
spec_seed("minimal", 1, minimal)
fifo = json.loads(json.dumps(minimal))
fifo["linux"] = {"namespaces": [{"type": "network", "path": BUNDLE + "/fifo"}]}
spec_seed("fifo-namespace", 0, fifo)
hooks = json.loads(json.dumps(minimal))
hooks["hooks"] = {"createContainer": [{"path": "/bin/true"}]}
spec_seed("container-hook", 0, hooks)

with open(os.path.join(HERE, "..", "dict", "runtime_spec.dict"), "w") as f:
    words = set()

    def collect(v):
        if isinstance(v, dict):
            for k, x in v.items():
                words.add(k)
                collect(x)
        elif isinstance(v, list):
            for x in v:
                collect(x)
        elif isinstance(v, str):
            words.add(v)

    collect(BASE)
    for w in ["rootfs-link", "fifo", "src-file", BUNDLE, BUNDLE + "/fifo", "/proc/7/ns/net", "/proc/42/ns/net",
              "cgroup", "user", "time", "createRuntime", "poststart", "createContainer", "startContainer",
              "rslave", "rshared", "..", "/dev/null", "/proc/self/ns/uts", "/proc/self/ns/ipc"]:
        words.add(w)
    for w in sorted(words):
        f.write(json.dumps(json.dumps(w)) + "\n")


# ---- image_unpack, raw mode: pre, then per layer: compression, mode >= 0xe0, u16 length, tar
def tar_bytes(build, fmt=tarfile.PAX_FORMAT):
    buf = io.BytesIO()
    # latin-1: PAX values are written back byte for byte (the capability is binary).
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="latin-1") as t:
        build(t)
    return buf.getvalue()


def add(t, name, kind=tarfile.REGTYPE, data=b"", link="", mode=0o644, pax=None):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = 1600000000
    ti.linkname = link
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    if pax:
        ti.pax_headers = pax
    t.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


# A v2 file capability (cap_net_raw in permitted), as the 20 bytes of the xattr.
CAP = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0).decode("latin-1")


def layer(tar, compression=0):
    assert len(tar) < 65536
    return bytes([compression, 0xE0]) + struct.pack("<H", len(tar)) + tar


lower = tar_bytes(lambda t: [
    add(t, "a", tarfile.DIRTYPE, mode=0o755),
    add(t, "a/f", data=b"hello\n", mode=0o4755),
    add(t, "a/s", tarfile.SYMTYPE, link="../../outside/secret"),
    add(t, "a/h", tarfile.LNKTYPE, link="a/f"),
    add(t, "b/c/d", data=b"x", pax={"SCHILY.xattr.user.x": "1", "SCHILY.xattr.security.capability": CAP}),
    add(t, "n" * 150 + "/long", data=b"l"),
    add(t, "link", tarfile.SYMTYPE, link="/tmp/husk-fuzz-image-unpack/outside"),
    add(t, "fifo", tarfile.FIFOTYPE),
])
upper = tar_bytes(lambda t: [
    add(t, "a/.wh..wh..opq"),
    add(t, "b/.wh.c"),
    add(t, "a", tarfile.DIRTYPE, mode=0o500),
    add(t, "link/x", data=b"escape?"),
    add(t, "a/s/x", data=b"escape?"),
], fmt=tarfile.GNU_FORMAT)
write("image_unpack", "raw-two-layers", bytes([1]) + layer(lower) + layer(upper, 3))
write("image_unpack", "raw-diff-ids", bytes([1 | 4]) + layer(lower, 5) + layer(upper))
write("image_unpack", "raw-v7", bytes([0]) + layer(tar_bytes(lambda t: [add(t, "x/", tarfile.DIRTYPE), add(t, "x/y", data=b"y")], fmt=tarfile.USTAR_FORMAT)))
