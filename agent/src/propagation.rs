//! Mount propagation of bind mounts (`rshared`, `rslave`, ...), which containerd sends for
//! bidirectional and host-to-container volumes.
//!
//! libcontainer 0.7 passes a bind mount's propagation option to the same mount(2) call as
//! MS_BIND, where the kernel ignores it, so every volume ends up private. The helper applies
//! them itself (the agent lists them from the spec) once the container is created and before it starts, from inside the
//! container's mount namespace, as runc does with a second call. Propagation ends at the VM:
//! it reaches the pod's other containers, never the host.

use std::path::PathBuf;

use nix::mount::{mount, MsFlags};
use nix::sched::{setns, CloneFlags};
use oci_spec::runtime::Spec;

/// What one propagation option asks for.
fn flags(option: &str) -> Option<MsFlags> {
    Some(match option {
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    })
}

/// The bind mounts of `spec` that ask for a propagation, with the last such option of each
/// (mount(2) takes one type at a time).
pub fn wanted(spec: &Spec) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let opts = m.options().clone().unwrap_or_default();
        let is_bind = m.typ().as_deref() == Some("bind") || opts.iter().any(|o| o == "bind" || o == "rbind");
        if !is_bind {
            continue;
        }
        if let Some(mode) = opts.iter().rev().find(|o| flags(o).is_some()) {
            out.push((m.destination().clone(), mode.clone()));
        }
    }
    out
}

/// Applies `wanted` inside the mount namespace of the container whose init is `pid`. The
/// helper is single-threaded, as setns into a mount namespace requires.
pub fn apply(pid: i32, wanted: &[(PathBuf, String)]) -> Result<(), String> {
    if wanted.is_empty() {
        return Ok(());
    }
    let own =
        std::fs::File::open("/proc/self/ns/mnt").map_err(|e| format!("opening our mount namespace: {e}"))?;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))
        .map_err(|e| format!("opening the container's mount namespace: {e}"))?;
    setns(&ns, CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("entering the container's mount namespace: {e}"))?;
    let result = wanted.iter().try_for_each(|(dest, name)| {
        let f = flags(name).ok_or_else(|| format!("{name:?} is not a mount propagation"))?;
        mount(None::<&str>, dest, None::<&str>, f, None::<&str>)
            .map_err(|e| format!("mount propagation {name} on {}: {e}", dest.display()))
    });
    // Back home, where the container library's state is (a failed create is deleted there).
    setns(&own, CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("leaving the container's mount namespace: {e}"))?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_bind_mounts_that_ask_and_their_last_mode() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "root": {"path": "/"},
            "mounts": [
                {"destination": "/a", "type": "bind", "source": "/x", "options": ["rbind", "rshared"]},
                {"destination": "/b", "type": "bind", "source": "/y", "options": ["rbind", "rprivate", "rslave"]},
                {"destination": "/c", "type": "bind", "source": "/z", "options": ["rbind", "ro"]},
                {"destination": "/proc", "type": "proc", "source": "proc", "options": ["shared"]}
            ]
        }))
        .expect("spec");
        let w = wanted(&spec);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0], (PathBuf::from("/a"), "rshared".into()));
        assert_eq!(w[1], (PathBuf::from("/b"), "rslave".into()));
        assert_eq!(flags("rshared"), Some(MsFlags::MS_SHARED | MsFlags::MS_REC));
        assert_eq!(flags("rslave"), Some(MsFlags::MS_SLAVE | MsFlags::MS_REC));
    }
}
