#!/usr/bin/env python3
"""Writes seeds/agent_request/: inputs for the agent_request target (first byte: the kind, see
fuzz_targets/agent_request.rs), and dict/agent.dict, the JSON keys and values of OCI specs."""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "agent_request")
SHARES = "/tmp/husk-fuzz-agent-shares"


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, value):
    """A protobuf field: bytes/str/nested message (length-delimited) or int (varint)."""
    if isinstance(value, int):
        return varint(num << 3) + varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def msg(*fields):
    return b"".join(field(n, v) for n, v in fields if v not in (None, b"", ""))


BASE = {
    "ociVersion": "1.0.2",
    "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]},
    "root": {"path": "ignored", "readonly": True},
    "hostname": "h",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "bind", "source": SHARES + "/a", "options": ["rbind", "rshared"]},
        {"destination": "/f", "source": SHARES + "/link/f", "options": ["bind", "ro", "rslave"]},
    ],
    "linux": {
        "cgroupsPath": "/host/choice",
        "rootfsPropagation": "rslave",
        "namespaces": [{"type": "pid"}, {"type": "mount"}],
        "resources": {
            "memory": {"limit": 1 << 28, "reservation": -1, "swap": 1 << 29},
            "pids": {"limit": 100},
            "cpu": {"quota": 50000, "period": 100000, "shares": 1024},
        },
        "seccomp": {
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
        },
        "maskedPaths": ["/proc/kcore"],
    },
    "annotations": {"a": "b"},
}
CAPS = {"bounding": ["CAP_KILL", "CAP_NET_RAW"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]}


def spec(**changes):
    s = json.loads(json.dumps(BASE))
    for path, value in changes.items():
        cur = s
        keys = path.split(".")
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        if value is None:
            cur.pop(keys[-1], None)
        else:
            cur[keys[-1]] = value
    return json.dumps(s).encode()


def write(name, data):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


os.makedirs(OUT, exist_ok=True)
specs = {
    "spec-base": spec(),
    "spec-caps-nnp-false": spec(**{"process.capabilities": CAPS, "process.noNewPrivileges": False}),
    "spec-notify": spec(**{"linux.seccomp.listenerPath": "/run/l.sock"}),
    "spec-escape-bind": spec(mounts=[{"destination": "/x", "type": "bind", "source": SHARES + "/esc/etc"}]),
    "spec-up-bind": spec(mounts=[{"destination": "/x", "type": "bind", "source": SHARES + "/up/etc"}]),
    "spec-minimal": b'{"ociVersion":"1.0.2","process":{"args":["a"],"cwd":"/","user":{"uid":0,"gid":0}}}',
}
for name, s in specs.items():
    write(name, b"\x04" + s)
    write(name + "-tty", b"\x84" + s)
procs = {
    "exec-bare": b'{"args":["id"],"cwd":"/","user":{"uid":0,"gid":0}}',
    "exec-own": json.dumps({"args": ["id"], "cwd": "/", "user": {"uid": 1, "gid": 1}, "capabilities": CAPS,
                            "noNewPrivileges": False, "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 1}],
                            "terminal": True, "env": ["A=b"]}).encode(),
}
for name, p in procs.items():
    for c in range(4):
        write(f"{name}-{c}", bytes([0x05 | c << 4]) + p)
write("resources", b"\x06" + json.dumps(BASE["linux"]["resources"]).encode())
write("resources-bad", b"\x06" + b'{"cpu":{"period":5},"memory":{"limit":0}}')

stdio = msg((1, "in-1"), (2, "out-1"), (3, "err-1"), (7, "life"))
write("pb-create", b"\x00" + msg((1, "c1"), (2, specs["spec-base"]), (3, msg((1, "s"), (2, "c1/rootfs"))), (4, stdio)))
write("pb-exec", b"\x21" + msg((1, "c1"), (2, "e1"), (3, procs["exec-own"]), (4, msg((2, "o"), (4, 1)))))
write("pb-update", b"\x02" + msg((1, "c1"), (2, json.dumps({"pids": {"limit": 5}}).encode())))
iface = msg((1, "eth0"), (2, bytes([2, 0, 0, 0, 0, 1])), (3, 1500), (4, msg((1, "10.0.0.2"), (2, 24))),
            (4, msg((1, "fd00::2"), (2, 64))))
route = msg((1, "0.0.0.0"), (2, 0), (3, "10.0.0.1"), (4, "eth0"))
route6 = msg((1, "::"), (2, 0), (3, "fd00::1"), (4, "eth0"))
write("pb-sandbox", b"\x03" + msg((1, "host"), (2, msg((1, "s"), (2, 1))), (3, 5), (4, iface), (5, route), (5, route6)))

keys = set()


def collect(v):
    if isinstance(v, dict):
        for k, x in v.items():
            keys.add(json.dumps(k))
            collect(x)
    elif isinstance(v, list):
        for x in v:
            collect(x)
    elif isinstance(v, str):
        keys.add(json.dumps(v))


collect(BASE)
collect(CAPS)
collect(json.loads(procs["exec-own"]))
extra = ["bind", "rbind", "shared", "rshared", "private", "rprivate", "slave", "unbindable", "runbindable",
         "SCMP_ACT_NOTIFY", "SCMP_ACT_KILL", "listenerPath", "CAP_SYS_ADMIN", "CAP_SETPCAP", "ambient",
         "inheritable", "apparmorProfile", "selinuxLabel", "oomScoreAdj", "readonly", "uidMappings", "user",
         "network", "cgroup", "ipc", "uts", "time", "path", "devices", "hooks", "prestart", "..", "/..",
         SHARES, SHARES + "/a", SHARES + "/esc", SHARES + "/up", SHARES + "/link", "/proc/self/cwd",
         -1, 0, 1, 2, 1000, 1000000, 262144, 9223372036854775807, -9223372036854775808, True, False, None]
for e in extra:
    keys.add(json.dumps(e))
os.makedirs(os.path.join(HERE, "..", "dict"), exist_ok=True)
with open(os.path.join(HERE, "..", "dict", "agent.dict"), "w") as f:
    for k in sorted(keys):
        f.write(json.dumps(k) + "\n")
