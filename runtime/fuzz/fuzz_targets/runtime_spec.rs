//! A bundle's config.json on its way to the guest: the input is a preamble (whether the
//! rootfs is bind-mounted into the share, the caller's memory and vCPU options, the size of the
//! VM a later container must fit in) and the bytes of `config.json`.
//!
//! What `husk create` does with a bundle before any VM is involved runs on it: `Bundle::load`
//! (size cap, parse, rootfs, bind sources, namespace paths, hooks), `lifecycle::shape::vm_shape`
//! (annotations and limits to the VM's size), `check_fits` (a container joining a VM), and
//! `bundle::to_guest` (bind mounts under the sandbox share, host-only settings dropped, namespace
//! paths mapped), whose JSON is what the agent receives.
//!
//! Checked: errors only, never a panic or a hang; an accepted bundle has a process with args and
//! a rootfs directory; the VM shape is within bounds; the guest spec parses and survives
//! another encoding, points every bind mount at its own directory in the share, keeps every other mount,
//! has no hooks, LSM labels or cgroup path, maps namespace paths only to a peer's guest PID or the
//! VM's network namespace; the host mounts `to_guest` reports are all there are, and after
//! unmounting them (or after `to_guest` failed) nothing stays mounted under the share.
//!
//! The bundle lives in the target's sandbox (see `confine`): `/tmp/husk-fuzz-runtime-spec/
//! bundle` with `rootfs/`, `src-dir/`, `src-file`, `link-dir -> src-dir`, `link-out -> /`,
//! `fifo` and `rootfs-link -> rootfs`. Bind sources and a rootfs that resolve outside the
//! sandbox are pointed back at `src-dir` and `rootfs` before `to_guest` mounts anything, so the
//! target never bind-mounts a host directory.

#![no_main]

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use husk_core::bundle::{to_guest, Bundle, GUEST_POD_NETNS};
use husk_core::config::{Config, MAX_MEMORY_MIB, MAX_VCPUS};
use husk_core::lifecycle::shape::{check_fits, vm_shape};
use husk_core::lifecycle::CreateOpts;
use husk_core::state::SandboxRecord;
use husk_core::stdio::StdioStrategy;
use husk_core::{mounts, share};
use husk_runtime_fuzz::{confine, Input};
use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

const CID: &str = "c1";
/// Pod peers: host PID 42 is guest PID 7.
const PEER_HOST: i32 = 42;
const PEER_GUEST: u32 = 7;

struct Env {
    sandbox: PathBuf,
    bundle: PathBuf,
    shared: PathBuf,
    cfg: Config,
}

fn env() -> &'static Env {
    static E: OnceLock<Env> = OnceLock::new();
    E.get_or_init(|| {
        let sandbox = confine("runtime-spec");
        let bundle = sandbox.join("bundle");
        let shared = sandbox.join("shared");
        for d in ["rootfs/etc", "src-dir"] {
            std::fs::create_dir_all(bundle.join(d)).expect("bundle dir");
        }
        std::fs::create_dir_all(&shared).expect("shared dir");
        std::fs::write(bundle.join("rootfs/etc/hostname"), b"x\n").expect("rootfs file");
        std::fs::write(bundle.join("src-dir/f"), b"x").expect("src-dir file");
        std::fs::write(bundle.join("src-file"), b"x").expect("src-file");
        for (link, to) in [("link-dir", "src-dir"), ("link-out", "/"), ("rootfs-link", "rootfs")] {
            std::os::unix::fs::symlink(to, bundle.join(link)).expect("bundle symlink");
        }
        let fifo = CString::new(bundle.join("fifo").as_os_str().as_bytes()).expect("fifo path");
        // SAFETY: `fifo` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
        let mut cfg = Config::load().expect("husk config");
        cfg.memory_mib = 256;
        cfg.vcpus = 1;
        let bundle = bundle.canonicalize().expect("bundle");
        Env { sandbox, bundle, shared, cfg }
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

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind") || m.options().iter().flatten().any(|o| o == "bind" || o == "rbind")
}

/// Points bind sources and the rootfs that resolve outside the sandbox back into it, so that
/// `to_guest` only ever mounts the target's own files.
fn keep_inside(b: &mut Bundle, e: &Env) {
    if !b.rootfs.starts_with(&e.sandbox) {
        b.rootfs = e.bundle.join("rootfs");
    }
    let Some(mounts) = b.spec.mounts().clone() else { return };
    let fixed: Vec<Mount> = mounts
        .into_iter()
        .map(|mut m| {
            if let Some(src) = m.source().clone().filter(|_| is_bind(&m)) {
                let abs = if src.is_absolute() { src } else { b.dir.join(src) };
                if abs.canonicalize().is_ok_and(|real| !real.starts_with(&e.sandbox)) {
                    m.set_source(Some(e.bundle.join("src-dir")));
                }
            }
            m
        })
        .collect();
    b.spec.set_mounts(Some(fixed));
}

fn check_guest_spec(b: &Bundle, json: &[u8], host_mounts: usize, bind_rootfs: bool) {
    let out: Spec = serde_json::from_slice(json)
        .unwrap_or_else(|err| panic!("guest spec does not parse: {err}: {}", String::from_utf8_lossy(json)));
    let again: Spec =
        serde_json::from_slice(&serde_json::to_vec(&out).expect("re-encode")).expect("re-parse");
    assert_eq!(again, out, "the guest spec does not survive a second encoding");
    assert!(out.hooks().is_none(), "hooks reach the guest");
    if let Some(p) = out.process() {
        assert!(p.apparmor_profile().is_none() && p.selinux_label().is_none(), "LSM labels reach the guest");
    }
    let own_uts = out
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|nss| nss.iter().any(|n| n.typ() == LinuxNamespaceType::Uts && n.path().is_none()));
    if !own_uts {
        assert!(out.hostname().is_none(), "a hostname without a UTS namespace of its own");
    }
    if let Some(l) = out.linux() {
        assert!(l.mount_label().is_none() && l.cgroups_path().is_none());
        for ns in l.namespaces().iter().flatten() {
            let Some(p) = ns.path() else { continue };
            let peer = p.to_str().and_then(|s| s.strip_prefix(&format!("/proc/{PEER_GUEST}/ns/")));
            let netns = ns.typ() == LinuxNamespaceType::Network && p == Path::new(GUEST_POD_NETNS);
            assert!(peer.is_some() || netns, "namespace {:?} path {p:?} reaches the guest", ns.typ());
        }
    }
    let given = b.spec.mounts().clone().unwrap_or_default();
    let got = out.mounts().clone().unwrap_or_default();
    assert_eq!(given.len(), got.len(), "mounts added or dropped");
    let mut binds = 0;
    for (i, (g, o)) in given.iter().zip(&got).enumerate() {
        if !is_bind(g) {
            assert_eq!(g, o, "a non-bind mount changed");
            continue;
        }
        binds += 1;
        let dir = share::guest_path(&Path::new(CID).join("mounts").join(i.to_string()));
        let src = o.source().as_ref().expect("a bind source");
        assert_eq!(src.parent(), Some(dir.as_path()), "bind {i} source {src:?}");
        assert_eq!((g.destination(), g.typ(), g.options()), (o.destination(), o.typ(), o.options()));
    }
    assert_eq!(host_mounts, binds + usize::from(bind_rootfs), "host mounts reported");
}

fuzz_target!(|data: &[u8]| {
    let e = env();
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let bind_rootfs = flags & 1 != 0;
    let memory = inp.u16();
    let vcpus = inp.u8();
    let vm = (inp.u16(), inp.u8());
    std::fs::write(e.bundle.join("config.json"), inp.rest()).expect("config.json");

    let mut b = match Bundle::load(&e.bundle) {
        Ok(b) => b,
        Err(err) => {
            log!("load: {err}");
            return;
        }
    };
    log!("load: ok");
    assert!(b.spec.process().as_ref().and_then(|p| p.args().as_ref()).is_some_and(|a| !a.is_empty()));
    assert!(b.rootfs.is_absolute() && b.rootfs.is_dir(), "rootfs {:?}", b.rootfs);

    // The VM a first container boots.
    let mut opts = CreateOpts::new(StdioStrategy::Held { size: None });
    opts.memory_mib = (flags & 2 != 0).then_some(u32::from(memory));
    opts.vcpus = (flags & 4 != 0).then_some(u32::from(vcpus));
    let shape = vm_shape(&e.cfg, &b, &opts);
    log!("vm_shape: {:?}", shape.as_ref().map(|s| (s.memory_mib, s.vcpus)));
    if let Ok(shape) = shape {
        let max_vcpus: u32 = MAX_VCPUS;
        assert!((1..=max_vcpus).contains(&shape.vcpus), "vcpus {}", shape.vcpus);
        match opts.memory_mib {
            Some(m) => assert_eq!(shape.memory_mib, m),
            None => assert!(shape.memory_mib >= 1 && u64::from(shape.memory_mib) <= MAX_MEMORY_MIB.max(256)),
        }
        let want = b.spec.hostname().clone().unwrap_or_else(|| "husk".into());
        assert_eq!(shape.hostname, want);
    }
    // A later container joining a VM of the recorded size.
    let record: SandboxRecord = serde_json::from_value(serde_json::json!({
        "id": "s1", "vmm_pid": 1, "vmm_start": 0, "vsock": "/nonexistent", "containers": [],
        "memory_mib": vm.0, "vcpus": vm.1,
    }))
    .expect("sandbox record");
    let res = b.spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    log!("check_fits: {:?}", check_fits(CID, res, &record).map_err(|err| err.to_string()));

    keep_inside(&mut b, e);
    let peers = HashMap::from([(PEER_HOST, PEER_GUEST)]);
    let result = to_guest(&b, CID, &e.shared, &peers, bind_rootfs);
    log!("to_guest: {:?}", result.as_ref().map(|g| g.host_mounts.len()).map_err(|err| err.to_string()));
    let left = match &result {
        Ok(g) => {
            assert_eq!(g.rootfs_rel, format!("{CID}/rootfs"));
            check_guest_spec(&b, &g.spec_json, g.host_mounts.len(), bind_rootfs);
            mounts::unmount_all(&g.host_mounts);
            mounts::first_mount_under(&e.shared).expect("mountinfo")
        }
        Err(_) => {
            let left = mounts::first_mount_under(&e.shared).expect("mountinfo");
            assert!(left.is_some() || !e.shared.join(CID).exists(), "a failed to_guest left its directory");
            left
        }
    };
    // Never remove a directory with something still mounted in it.
    assert!(
        left.is_none(),
        "{left:?} is still mounted after {}",
        if result.is_ok() { "unmounting" } else { "an error" }
    );
    if result.is_ok() {
        // (Nothing was made there when nothing was mounted.)
        match std::fs::remove_dir_all(e.shared.join(CID)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => panic!("cleaning the share: {err}"),
            _ => {}
        }
    }
});
