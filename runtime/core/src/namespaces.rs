//! Namespace entries of a spec: each path is checked to be a namespace of the entry's type
//! (even when husk does not join it), and paths of pod peers are mapped to the peers' guest
//! PIDs.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType};

use crate::error::RuntimeError;

/// `ioctl(NS_GET_NSTYPE)`: the CLONE_NEW* type of a namespace file (linux/nsfs.h).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

fn clone_flag(t: LinuxNamespaceType) -> libc::c_int {
    match t {
        LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
        LinuxNamespaceType::User => libc::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
        LinuxNamespaceType::Network => libc::CLONE_NEWNET,
        LinuxNamespaceType::Time => 0x80, // CLONE_NEWTIME
    }
}

/// The spec's name of a namespace type (as `linux.namespaces[].type` spells it).
fn spec_name(t: LinuxNamespaceType) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{t:?}"))
}

/// The name of a namespace type under `/proc/<pid>/ns/`.
fn proc_name(t: LinuxNamespaceType) -> &'static str {
    match t {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

/// What can be checked before the pod's peers are known: a `/proc/<pid>/ns/<kind>` path may
/// name a pod peer by a PID only the client knows (a shim's guest PIDs), so it is checked by
/// kind now and as a file only if it turns out not to be a peer's (see [`validate`]); every
/// other path is checked as a file now.
pub fn precheck(ns: &LinuxNamespace) -> Result<(), RuntimeError> {
    let Some(path) = ns.path() else { return Ok(()) };
    match proc_ns_path(path) {
        Some((_, kind)) if kind == proc_name(ns.typ()) => Ok(()),
        Some((_, kind)) => Err(RuntimeError::Namespace {
            kind: spec_name(ns.typ()),
            path: path.clone(),
            reason: format!("is a namespace of type {kind}"),
        }),
        None => validate(ns),
    }
}

/// Checks that `ns.path`, if any, exists and is a namespace of `ns.typ`.
pub fn validate(ns: &LinuxNamespace) -> Result<(), RuntimeError> {
    let Some(path) = ns.path() else { return Ok(()) };
    let fail =
        |reason: String| RuntimeError::Namespace { kind: spec_name(ns.typ()), path: path.clone(), reason };
    if !path.is_absolute() {
        return Err(fail("must be absolute".into()));
    }
    // Namespace files (nsfs) are regular files. Anything else is refused before it is opened:
    // opening a FIFO waits for a writer (`husk create` hung on one) and opening a device can act
    // (a watchdog starts counting). O_NONBLOCK in case the path changes after the check.
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("is not a namespace file".into()));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| fail(e.to_string()))?;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor, which `f` keeps
    // open for the call.
    let got = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    if got < 0 {
        return Err(fail("is not a namespace file".into()));
    }
    if got != clone_flag(ns.typ()) {
        let actual = [
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Cgroup,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::User,
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::Time,
        ]
        .into_iter()
        .find(|t| clone_flag(*t) == got)
        .map(spec_name)
        .unwrap_or_else(|| format!("type {got:#x}"));
        return Err(fail(format!("is a namespace of type {actual}")));
    }
    Ok(())
}

/// `/proc/<pid>/ns/<kind>` → (pid, kind).
pub fn proc_ns_path(p: &Path) -> Option<(i32, String)> {
    let mut c = p.components();
    if c.next() != Some(Component::RootDir) || c.next() != Some(Component::Normal("proc".as_ref())) {
        return None;
    }
    let pid = c.next()?.as_os_str().to_str()?.parse().ok()?;
    if c.next() != Some(Component::Normal("ns".as_ref())) {
        return None;
    }
    let kind = c.next()?.as_os_str().to_str()?.to_string();
    c.next().is_none().then_some((pid, kind))
}

/// The guest path of a namespace entry: a pod peer's (host PID → guest PID in `peers`), or
/// none (a host namespace such as a CNI netns file: the guest makes its own).
pub fn guest_path(ns: &LinuxNamespace, peers: &HashMap<i32, u32>) -> Option<PathBuf> {
    let (pid, kind) = ns.path().as_deref().and_then(proc_ns_path)?;
    peers.get(&pid).map(|g| PathBuf::from(format!("/proc/{g}/ns/{kind}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(t: &str, path: &str) -> LinuxNamespace {
        serde_json::from_value(serde_json::json!({"type": t, "path": path})).expect("ns")
    }

    #[test]
    fn ns_paths() {
        assert_eq!(proc_ns_path(Path::new("/proc/42/ns/net")), Some((42, "net".into())));
        assert_eq!(proc_ns_path(Path::new("/var/run/netns/cni-1")), None);
        assert_eq!(proc_ns_path(Path::new("/proc/x/ns/net")), None);
        assert_eq!(proc_ns_path(Path::new("/proc/42/ns/net/extra")), None);
        let peers = HashMap::from([(42, 7u32)]);
        assert_eq!(guest_path(&ns("ipc", "/proc/42/ns/ipc"), &peers), Some("/proc/7/ns/ipc".into()));
        assert_eq!(guest_path(&ns("ipc", "/proc/43/ns/ipc"), &peers), None);
    }

    #[test]
    fn paths_must_be_namespaces_of_their_type() {
        assert!(validate(&ns("ipc", "/proc/self/ns/ipc")).is_ok());
        assert!(validate(&ns("network", "/proc/self/ns/net")).is_ok());
        let e = validate(&ns("cgroup", "/proc/self/ns/ipc")).expect_err("wrong type").to_string();
        assert!(e.contains("cgroup") && e.contains("of type ipc"), "{e}");
        let e = validate(&ns("network", "/run/netns/does-not-exist")).expect_err("missing").to_string();
        assert!(e.contains("No such file"), "{e}");
        assert!(validate(&ns("uts", "/etc/hostname")).is_err());
        assert!(validate(&ns("uts", "/dev/null")).is_err());
        assert!(validate(&ns("uts", "proc/self/ns/uts")).is_err());
        // A peer's path by a PID only the client knows: checked by kind first, as a file later.
        assert!(precheck(&ns("pid", "/proc/999999/ns/pid")).is_ok());
        let e = precheck(&ns("pid", "/proc/999999/ns/ipc")).expect_err("kind").to_string();
        assert!(e.contains("of type ipc"), "{e}");
        assert!(precheck(&ns("cgroup", "/proc/self/ns/ipc")).is_err());
    }

    /// Found by the runtime_spec fuzz target: a namespace path naming a FIFO hung the bundle
    /// check in open(2), waiting for a writer that never came.
    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = std::env::temp_dir().join(format!("husk-ns-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR)
            .expect("mkfifo");
        let path = fifo.to_str().expect("utf-8 path").to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        // On its own thread, so that a regression fails the test instead of hanging it.
        std::thread::spawn(move || {
            let r = validate(&ns("network", &path)).map_err(|e| e.to_string());
            let _ = tx.send(r);
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("validate returned");
        let e = got.expect_err("a FIFO is not a namespace");
        assert!(e.contains("is not a namespace file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
