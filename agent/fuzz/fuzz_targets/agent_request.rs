//! husk-agent's request checks and OCI spec conversion from a hostile (or broken) host: the
//! input's first byte picks what the rest is.
//!
//! - 0-3: a protobuf-encoded `CreateContainerRequest`, `ExecProcessRequest`,
//!   `UpdateContainerRequest` or `CreateSandboxRequest` (prost decode of arbitrary bytes);
//! - 4-6: the JSON of a CreateContainer spec, an ExecProcess process or an UpdateContainer
//!   resources object directly, with the request's other fields fixed (the fuzzer spends its
//!   mutations on the JSON, which is where the conversion is);
//!
//! and the request goes through what the agent does with it before anything touches the guest
//! (agent.rs `create_container`, `exec`, `update`, `create_sandbox` up to the first mount or
//! helper): `validate` on ids, share tags, paths and stdio names, `spec::prepare`,
//! `spec::exec_process`, `spec::resources`, `network::check`, then `confine::take_seccomp`,
//! `confine::lift_for_seccomp` and `propagation::wanted` on what was accepted, and the JSON the
//! agent writes for the container library (`config.json`, the exec's process file, the helper's
//! `ConfinedExec`), which must read back as what was written.
//!
//! What was accepted is checked independently of the code that accepted it: the rootfs and
//! cgroup path are the agent's, the terminal is the request's, `noNewPrivileges` is never
//! `false` and an exec never drops the container's, mount destinations are absolute without
//! `..`, bind sources resolve inside the shares, limits are in range, checked interfaces and
//! routes are what the request asked for and within the bounds.
//!
//! Bind sources resolve against a small tree at `/tmp/husk-fuzz-agent-shares` (made at start:
//! `a/`, `a/f`, `b/c/`, `link -> a`, `esc -> /`, `up -> ..`); the agent only stats and resolves
//! paths here, it never writes.

#![no_main]

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use husk_agent::confine::{lift_for_seccomp, take_seccomp, ConfinedExec};
use husk_agent::{network, propagation, spec, validate};
use husk_proto as pb;
use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{Capability, LinuxCapabilities, LinuxResources, Mount, Process, Spec};
use prost::Message;

const SHARES: &str = "/tmp/husk-fuzz-agent-shares";

/// The share tree bind sources may come from (made once; the agent never writes to it).
fn shares() -> &'static PathBuf {
    static S: OnceLock<PathBuf> = OnceLock::new();
    S.get_or_init(|| {
        let root = PathBuf::from(SHARES);
        std::fs::create_dir_all(root.join("a")).expect("share a");
        std::fs::create_dir_all(root.join("b/c")).expect("share b/c");
        std::fs::write(root.join("a/f"), b"x").expect("share a/f");
        for (link, to) in [("link", "a"), ("esc", "/"), ("up", "..")] {
            let p = root.join(link);
            if std::fs::symlink_metadata(&p).is_err() {
                std::os::unix::fs::symlink(to, &p).expect("share symlink");
            }
        }
        root.canonicalize().expect("share root")
    })
}

fn debug() -> bool {
    static D: OnceLock<bool> = OnceLock::new();
    *D.get_or_init(|| std::env::var_os("HUSK_FUZZ_DEBUG").is_some_and(|v| v == "1"))
}

macro_rules! log {
    ($($t:tt)*) => {
        if debug() {
            eprintln!($($t)*);
        }
    };
}

/// The container processes an exec may run under (what `spec::prepare` kept of a spec).
fn container_process(which: u8) -> Process {
    let caps = r#"{"bounding":["CAP_KILL","CAP_CHOWN"],"effective":["CAP_KILL"],"permitted":["CAP_KILL"]}"#;
    let json = match which % 4 {
        0 => r#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_string(),
        1 => format!(
            r#"{{"args":["sh"],"cwd":"/","user":{{"uid":1000,"gid":1000}},"capabilities":{caps},
            "noNewPrivileges":true,"rlimits":[{{"type":"RLIMIT_NOFILE","hard":64,"soft":64}}],
            "apparmorProfile":"p","selinuxLabel":"l","oomScoreAdj":5}}"#
        ),
        2 => format!(r#"{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}},"capabilities":{caps}}}"#),
        _ => r#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},"capabilities":{}}"#.to_string(),
    };
    serde_json::from_str(&json).expect("container process")
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind") || m.options().iter().flatten().any(|o| o == "bind" || o == "rbind")
}

fn clean_absolute(p: &Path) -> bool {
    p.is_absolute() && p.components().all(|c| !matches!(c, Component::ParentDir | Component::Prefix(_)))
}

/// What an accepted process must look like, whichever path accepted it.
fn check_process(p: &Process, terminal: bool) {
    assert!(p.args().as_ref().is_some_and(|a| !a.is_empty()), "accepted a process without args");
    assert!(p.cwd().is_absolute(), "accepted a relative cwd {:?}", p.cwd());
    assert_eq!(p.terminal(), Some(terminal), "the terminal is the request's");
    assert_ne!(p.no_new_privileges(), Some(false), "noNewPrivileges false is left as unset");
}

/// What an accepted resources object must look like (what the cgroup files take).
fn check_resources(r: &LinuxResources) {
    if let Some(m) = r.memory() {
        for v in [m.limit(), m.reservation(), m.swap()].into_iter().flatten() {
            assert!(v == -1 || v > 0, "memory value {v}");
        }
    }
    if let Some(p) = r.pids() {
        assert!(p.limit() >= -1, "pids limit {}", p.limit());
    }
    if let Some(c) = r.cpu() {
        if let Some(q) = c.quota() {
            assert!(q == -1 || q > 0, "cpu quota {q}");
        }
        if let Some(p) = c.period() {
            assert!((1_000..=1_000_000).contains(&p), "cpu period {p}");
        }
        if let Some(s) = c.shares() {
            assert!((2..=262_144).contains(&s), "cpu shares {s}");
        }
    }
}

/// JSON the agent writes for another process must read back as what was written.
fn round_trip<T>(v: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_vec(v).expect("the agent's JSON encoding");
    let back: T = serde_json::from_slice(&json)
        .unwrap_or_else(|e| panic!("{e}: written {}", String::from_utf8_lossy(&json)));
    assert_eq!(&back, v, "written {}", String::from_utf8_lossy(&json));
}

fn caps_superset(lifted: &LinuxCapabilities, own: &LinuxCapabilities) {
    let sets = |c: &LinuxCapabilities| [c.bounding().clone(), c.effective().clone(), c.permitted().clone()];
    for (l, o) in sets(lifted).into_iter().zip(sets(own)) {
        if let Some(o) = o {
            let l: HashSet<Capability> = l.expect("a lifted set is kept");
            assert!(o.is_subset(&l), "lifting dropped capabilities");
            assert!(l.contains(&Capability::SysAdmin) && l.contains(&Capability::Setpcap));
        }
    }
}

/// agent.rs `create_container` up to the bundle: ids, rootfs, stdio, then the spec.
fn create_container(req: pb::CreateContainerRequest) {
    if validate::name("container id", &req.container_id).is_err() {
        return;
    }
    let Some(rootfs) = req.rootfs else { return };
    if validate::name("share tag", &rootfs.share_tag).is_err()
        || validate::relative_path("rootfs path", &rootfs.path).is_err()
    {
        return;
    }
    let stdio = req.stdio.unwrap_or_default();
    if stdio_names(&stdio).is_err() {
        return;
    }
    // What `rootfs::resolve` would give (it needs the mounted share).
    let lower = Path::new(pb::SHARES_DIR).join(&rootfs.share_tag).join(&rootfs.path);
    assert!(lower.starts_with(pb::SHARES_DIR) && !lower.components().any(|c| c == Component::ParentDir));
    prepare(&req.oci_spec_json, &req.container_id, &lower, stdio.terminal);
}

fn stdio_names(s: &pb::Stdio) -> Result<(), ()> {
    if s.terminal && !s.stderr.is_empty() {
        return Err(());
    }
    for name in [&s.stdin, &s.stdout, &s.stderr, &s.lifeline] {
        if !name.is_empty() {
            validate::name("stdio stream name", name).map_err(drop)?;
            assert!(!name.contains('/') && name != "." && name != "..");
        }
    }
    Ok(())
}

fn prepare(json: &[u8], id: &str, lower: &Path, terminal: bool) {
    let roots = [shares().clone()];
    let mut spec = match spec::prepare(json, id, lower, terminal, &roots) {
        Ok(s) => s,
        Err(e) => {
            log!("prepare: {e}");
            return;
        }
    };
    log!("prepare: accepted");
    assert_eq!(spec.root().as_ref().map(|r| r.path().as_path()), Some(lower), "the rootfs is the agent's");
    let linux = spec.linux().as_ref().expect("prepare sets linux");
    assert_eq!(linux.cgroups_path().as_deref(), Some(Path::new(&format!("/husk/{id}"))));
    if let Some(p) = linux.rootfs_propagation() {
        assert!(["shared", "slave", "private", "unbindable"].contains(&p.as_str()), "propagation {p}");
    }
    if let Some(r) = linux.resources() {
        check_resources(r);
    }
    check_process(spec.process().as_ref().expect("a process"), terminal);
    for m in spec.mounts().iter().flatten() {
        assert!(clean_absolute(m.destination()), "mount destination {:?}", m.destination());
        if is_bind(m) {
            let src = m.source().as_ref().expect("a bind mount has a source");
            let real = src.canonicalize().expect("an accepted bind source exists");
            assert!(real.starts_with(&roots[0]), "bind source {src:?} resolves to {real:?}");
        }
    }

    // create_in_bundle: the seccomp profile moves to the executor, config.json is written.
    let before = spec.clone();
    let start = take_seccomp(&mut spec);
    let had = before.linux().as_ref().and_then(|l| l.seccomp().clone());
    let has = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
    match &start.seccomp {
        Some(taken) => {
            assert_eq!(Some(taken), had.as_ref());
            assert!(has.is_none(), "a profile both taken and left for the library");
        }
        None => assert_eq!(has, had, "a profile left with the library is unchanged"),
    }
    if let Some(own) = &start.drop_to {
        let p = spec.process().as_ref().expect("a process");
        assert_ne!(p.no_new_privileges(), Some(true));
        assert_eq!(Some(own), before.process().as_ref().and_then(|p| p.capabilities().as_ref()));
        caps_superset(p.capabilities().as_ref().expect("lifted capabilities"), own);
    }
    for (dest, mode) in propagation::wanted(&spec) {
        assert!(spec.mounts().iter().flatten().any(|m| is_bind(m) && m.destination() == &dest));
        assert!(
            ["shared", "rshared", "slave", "rslave", "private", "rprivate", "unbindable", "runbindable"]
                .contains(&mode.as_str()),
            "{mode}"
        );
    }
    round_trip::<Spec>(&spec);
    round_trip_confined(&start);
}

fn round_trip_confined(c: &ConfinedExec) {
    let json = serde_json::to_string(c).expect("ConfinedExec encoding");
    let back: ConfinedExec = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!((&back.seccomp, &back.drop_to), (&c.seccomp, &c.drop_to), "{json}");
}

/// agent.rs `exec` up to the helper.
fn exec(req: pb::ExecProcessRequest, container: u8) {
    if validate::name("container id", &req.container_id).is_err()
        || validate::name("exec id", &req.exec_id).is_err()
    {
        return;
    }
    let stdio = req.stdio.unwrap_or_default();
    if stdio_names(&stdio).is_err() {
        return;
    }
    exec_process(&req.oci_process_json, stdio.terminal, container);
}

fn exec_process(json: &[u8], terminal: bool, container: u8) {
    let c = container_process(container);
    let mut p = match spec::exec_process(json, terminal, &c) {
        Ok(p) => p,
        Err(e) => {
            log!("exec_process: {e}");
            return;
        }
    };
    log!("exec_process: accepted");
    check_process(&p, terminal);
    if c.no_new_privileges() == Some(true) {
        assert_eq!(p.no_new_privileges(), Some(true), "an exec dropped the container's noNewPrivileges");
    }
    // (An object; serde also takes a struct's fields as an array, in order. And serde_json
    // skips unknown fields without checking their strings' UTF-8, which a `Value` does check.)
    let asked = serde_json::from_slice::<serde_json::Value>(json).ok().filter(|v| v.is_object());
    if asked.is_some_and(|v| v.get("capabilities").is_none_or(|c| c.is_null())) {
        assert_eq!(p.capabilities(), c.capabilities(), "an exec without capabilities gets the container's");
    }
    // With a container profile the capabilities are lifted for loading it.
    let before = p.clone();
    match lift_for_seccomp(&mut p) {
        Some(own) => {
            assert_eq!(Some(&own), before.capabilities().as_ref());
            caps_superset(p.capabilities().as_ref().expect("lifted"), &own);
        }
        None => assert_eq!(p, before),
    }
    round_trip::<Process>(&p);
}

fn update(req: pb::UpdateContainerRequest) {
    if validate::name("container id", &req.container_id).is_err() {
        return;
    }
    resources(&req.resources_json);
}

fn resources(json: &[u8]) {
    match spec::resources(json) {
        Ok(r) => {
            log!("resources: accepted");
            check_resources(&r);
        }
        Err(e) => log!("resources: {e}"),
    }
}

/// agent.rs `create_sandbox` up to the first mount.
fn create_sandbox(req: pb::CreateSandboxRequest) {
    for s in &req.shares {
        if validate::name("share tag", &s.tag).is_err() {
            return;
        }
    }
    let (ifaces, routes) = match network::check(&req.interfaces, &req.routes) {
        Ok(v) => v,
        Err(e) => {
            log!("network: {e}");
            return;
        }
    };
    log!("network: accepted {} interfaces, {} routes", ifaces.len(), routes.len());
    assert_eq!((ifaces.len(), routes.len()), (req.interfaces.len(), req.routes.len()));
    assert!(ifaces.len() <= 16 && routes.len() <= 256);
    for (i, asked) in ifaces.iter().zip(&req.interfaces) {
        assert_eq!((&i.name, i.mtu), (&asked.name, asked.mtu));
        assert!(!i.name.is_empty() && i.name.len() <= 15 && i.name != "lo", "{:?}", i.name);
        assert!(!i.name.contains('/') && !i.name.contains(char::is_whitespace) && !i.name.contains('\0'));
        assert_eq!(&i.mac[..], &asked.mac[..]);
        assert!(i.mac[0] & 1 == 0 && i.mac != [0; 6]);
        assert!((68..=65_535).contains(&i.mtu));
        assert!(i.addresses.len() <= 64);
        for ((a, len), asked) in i.addresses.iter().zip(&asked.addresses) {
            assert_eq!(Ok(*a), asked.address.parse::<IpAddr>());
            assert_eq!(u32::from(*len), asked.prefix_len);
            assert!(*len <= if a.is_ipv4() { 32 } else { 128 });
        }
    }
    let names: HashSet<&str> = ifaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names.len(), ifaces.len(), "an interface named twice");
    for r in &routes {
        assert!(names.contains(r.device.as_str()));
        assert!(r.prefix_len <= if r.destination.is_ipv4() { 32 } else { 128 });
        if let Some(g) = r.gateway {
            assert_eq!(g.is_ipv4(), r.destination.is_ipv4());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    let terminal = kind & 0x80 != 0;
    let container = (kind >> 4) & 7;
    match kind & 0xf {
        0 => {
            if let Ok(req) = pb::CreateContainerRequest::decode(rest) {
                create_container(req);
            }
        }
        1 => {
            if let Ok(req) = pb::ExecProcessRequest::decode(rest) {
                exec(req, container);
            }
        }
        2 => {
            if let Ok(req) = pb::UpdateContainerRequest::decode(rest) {
                update(req);
            }
        }
        3 => {
            if let Ok(req) = pb::CreateSandboxRequest::decode(rest) {
                create_sandbox(req);
            }
        }
        4 | 7..=9 => prepare(rest, "c1", Path::new("/run/husk/shares/s/c1/rootfs"), terminal),
        5 | 10..=12 => exec_process(rest, terminal, container),
        _ => resources(rest),
    }
});
