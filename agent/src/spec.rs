//! Turning a host-supplied OCI spec into the one the guest runs: parse it, refuse what would
//! escape or cannot work, and pin what the agent owns (rootfs path, cgroup path, terminal).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxResources, Mount, Process, Spec};

use crate::error::AgentError;
use crate::validate;

/// Largest spec or process JSON accepted.
pub const MAX_JSON: usize = 1 << 20;

fn parse<T: serde::de::DeserializeOwned>(what: &str, json: &[u8]) -> Result<T, AgentError> {
    if json.len() > MAX_JSON {
        return Err(AgentError::InvalidArgument(format!("{what} is larger than {MAX_JSON} bytes")));
    }
    serde_json::from_slice(json).map_err(|e| AgentError::InvalidArgument(format!("malformed {what}: {e}")))
}

/// Parses and checks `json`, then points it at `rootfs` and the agent's cgroup path.
/// `bind_roots` are the only host-visible trees bind-mount sources may come from.
pub fn prepare(
    json: &[u8],
    container_id: &str,
    rootfs: &Path,
    terminal: bool,
    bind_roots: &[PathBuf],
) -> Result<Spec, AgentError> {
    let mut spec: Spec = parse("OCI spec", json)?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| AgentError::InvalidArgument("the spec has no process".into()))?;
    check_process(process)?;
    let mut process = process.clone();
    process.set_terminal(Some(terminal));
    normalize_no_new_privileges(&mut process);
    spec.set_process(Some(process));

    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs.to_path_buf());
    spec.set_root(Some(root));

    for m in spec.mounts().iter().flatten() {
        check_mount(m, bind_roots)?;
    }
    let mut linux = spec.linux().clone().unwrap_or_default();
    if let Some(r) = linux.resources() {
        check_resources(r)?;
    }
    linux.set_cgroups_path(Some(PathBuf::from(crate::cgroup::cgroups_path(container_id))));
    if let Some(p) = linux.rootfs_propagation().clone() {
        linux.set_rootfs_propagation(Some(rootfs_propagation(&p)?.to_string()));
    }
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// runc's names for the root's propagation (containerd sends `rshared` for a bidirectional
/// volume, `rslave` for host-to-container) mapped to what the container library takes; the
/// root mount is changed recursively either way. Propagation ends at the VM: mounts reach
/// other containers of the pod, never the host.
fn rootfs_propagation(p: &str) -> Result<&'static str, AgentError> {
    Ok(match p {
        "shared" | "rshared" => "shared",
        "slave" | "rslave" => "slave",
        "private" | "rprivate" => "private",
        "unbindable" | "runbindable" => "unbindable",
        other => {
            return Err(AgentError::InvalidArgument(format!(
                "linux.rootfsPropagation {other:?} cannot be honoured: not one of \
                 [r]shared, [r]slave, [r]private, [r]unbindable"
            )))
        }
    })
}

/// `noNewPrivileges: false` means the same as leaving it out; the container library only
/// loads a seccomp profile before dropping capabilities (which an unprivileged process needs)
/// when it is left out.
fn normalize_no_new_privileges(p: &mut Process) {
    if p.no_new_privileges() == Some(false) {
        p.set_no_new_privileges(None);
    }
}

/// Parses an exec request's process object. What it leaves unset of the container process's
/// confinement (capabilities, no_new_privileges, rlimits, AppArmor, SELinux label, OOM score)
/// is the container's, as runc does it: an exec never runs looser than the container.
pub fn exec_process(json: &[u8], terminal: bool, container: &Process) -> Result<Process, AgentError> {
    let mut process: Process = parse("OCI process", json)?;
    check_process(&process)?;
    process.set_terminal(Some(terminal));
    if process.capabilities().is_none() {
        process.set_capabilities(container.capabilities().clone());
    }
    // Never looser: a container under no_new_privileges keeps it in every exec.
    if process.no_new_privileges().is_none() || container.no_new_privileges() == Some(true) {
        process.set_no_new_privileges(container.no_new_privileges());
    }
    if process.rlimits().as_ref().is_none_or(|r| r.is_empty()) {
        process.set_rlimits(container.rlimits().clone());
    }
    if process.apparmor_profile().as_ref().is_none_or(|a| a.is_empty()) {
        process.set_apparmor_profile(container.apparmor_profile().clone());
    }
    if process.selinux_label().as_ref().is_none_or(|a| a.is_empty()) {
        process.set_selinux_label(container.selinux_label().clone());
    }
    if process.oom_score_adj().is_none() {
        process.set_oom_score_adj(container.oom_score_adj());
    }
    normalize_no_new_privileges(&mut process);
    Ok(process)
}

pub fn resources(json: &[u8]) -> Result<LinuxResources, AgentError> {
    let r: LinuxResources = parse("OCI linux.resources", json)?;
    check_resources(&r)?;
    Ok(r)
}

fn check_process(p: &Process) -> Result<(), AgentError> {
    if p.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(AgentError::InvalidArgument("process.args is empty".into()));
    }
    if !p.cwd().is_absolute() {
        return Err(AgentError::InvalidArgument(format!(
            "process.cwd {} is not absolute",
            p.cwd().display()
        )));
    }
    Ok(())
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind") || m.options().iter().flatten().any(|o| o == "bind" || o == "rbind")
}

fn check_mount(m: &Mount, bind_roots: &[PathBuf]) -> Result<(), AgentError> {
    validate::absolute_path("mount destination", m.destination())?;
    if !is_bind(m) {
        return Ok(());
    }
    let source = m.source().as_ref().ok_or_else(|| {
        AgentError::InvalidArgument(format!("bind mount on {} has no source", m.destination().display()))
    })?;
    validate::absolute_path("bind mount source", source)?;
    // Resolve symlinks before the containment check: a link inside a share may point anywhere.
    let real = source
        .canonicalize()
        .map_err(|e| AgentError::InvalidArgument(format!("bind mount source {}: {e}", source.display())))?;
    if bind_roots.iter().any(|r| real.starts_with(r)) {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "bind mount source {} is outside the sandbox's shares",
            source.display()
        )))
    }
}

/// Limits that cgroup files would reject with an opaque EINVAL, or that make no sense.
fn check_resources(r: &LinuxResources) -> Result<(), AgentError> {
    let bad = |what: &str, v: i64| {
        AgentError::InvalidArgument(format!("{what} {v} is invalid (positive, or -1 for unlimited)"))
    };
    if let Some(m) = r.memory() {
        for (what, v) in
            [("memory.limit", m.limit()), ("memory.reservation", m.reservation()), ("memory.swap", m.swap())]
        {
            if let Some(v) = v {
                if v < -1 || v == 0 {
                    return Err(bad(what, v));
                }
            }
        }
    }
    if let Some(p) = r.pids() {
        if p.limit() < -1 {
            return Err(bad("pids.limit", p.limit()));
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(q) = c.quota() {
            if q < -1 || q == 0 {
                return Err(bad("cpu.quota", q));
            }
        }
        if let Some(p) = c.period() {
            if !(1_000..=1_000_000).contains(&p) {
                return Err(AgentError::InvalidArgument(format!(
                    "cpu.period {p} is outside 1000..=1000000 µs"
                )));
            }
        }
        if let Some(s) = c.shares() {
            if !(2..=262_144).contains(&s) {
                return Err(AgentError::InvalidArgument(format!("cpu.shares {s} is outside 2..=262144")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "ignored"},
            "linux": {"cgroupsPath": "/host/choice"}
        })
    }

    fn prep(v: &serde_json::Value) -> Result<Spec, AgentError> {
        prepare(v.to_string().as_bytes(), "c1", Path::new("/rootfs"), false, &[std::env::temp_dir()])
    }

    #[test]
    fn pins_rootfs_and_cgroup() {
        let p = prep(&base()).expect("valid");
        assert_eq!(p.root().as_ref().map(|r| r.path().clone()), Some(PathBuf::from("/rootfs")));
        let linux = p.linux().as_ref().expect("linux");
        assert_eq!(linux.cgroups_path().as_deref(), Some(Path::new("/husk/c1")));
    }

    #[test]
    fn rootfs_propagation_takes_runcs_names() {
        for (given, want) in [("rshared", "shared"), ("rslave", "slave"), ("private", "private")] {
            let mut v = base();
            v["linux"]["rootfsPropagation"] = serde_json::json!(given);
            let p = prep(&v).expect("valid");
            assert_eq!(
                p.linux().as_ref().and_then(|l| l.rootfs_propagation().clone()).as_deref(),
                Some(want)
            );
        }
        let mut v = base();
        v["linux"]["rootfsPropagation"] = serde_json::json!("sideways");
        let e = prep(&v).expect_err("unknown mode").to_string();
        assert!(e.contains("sideways") && e.contains("cannot be honoured"), "{e}");
    }

    #[test]
    fn execs_inherit_the_containers_confinement() {
        let container: Process = serde_json::from_value(serde_json::json!({
            "args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]},
            "noNewPrivileges": true,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 64, "soft": 64}],
            "apparmorProfile": "p", "oomScoreAdj": 5
        }))
        .expect("process");
        let bare = br#"{"args":["id"],"cwd":"/","user":{"uid":0,"gid":0}}"#;
        let p = exec_process(bare, false, &container).expect("exec");
        assert_eq!(p.capabilities(), container.capabilities());
        assert_eq!(p.no_new_privileges(), Some(true));
        assert_eq!(p.rlimits(), container.rlimits());
        assert_eq!(p.apparmor_profile().as_deref(), Some("p"));
        assert_eq!(p.oom_score_adj(), Some(5));
        // What the exec sets itself stays.
        let own = br#"{"args":["id"],"cwd":"/","user":{"uid":0,"gid":0},"capabilities":{"bounding":[]},"noNewPrivileges":false}"#;
        let p = exec_process(own, true, &container).expect("exec");
        assert_eq!(p.capabilities().as_ref().and_then(|c| c.bounding().clone()).map(|b| b.len()), Some(0));
        assert_eq!(p.no_new_privileges(), Some(true), "an exec cannot drop no_new_privileges");
        assert_eq!(p.terminal(), Some(true));
        let loose: Process = serde_json::from_value(serde_json::json!({
            "args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}
        }))
        .expect("process");
        let p = exec_process(own, false, &loose).expect("exec");
        assert_eq!(p.no_new_privileges(), None, "false is normalized to unset");
    }

    #[test]
    fn refuses_bad_specs() {
        assert!(matches!(
            prepare(b"{not json", "c1", Path::new("/r"), false, &[]),
            Err(AgentError::InvalidArgument(_))
        ));
        let mut v = base();
        v["process"]["args"] = serde_json::json!([]);
        assert!(prep(&v).is_err());
        let mut v = base();
        v["mounts"] = serde_json::json!([{"destination": "/x", "type": "bind", "source": "/etc", "options": ["rbind"]}]);
        let e = prep(&v).expect_err("outside shares").to_string();
        assert!(e.contains("outside"), "{e}");
        let mut v = base();
        v["mounts"] = serde_json::json!([{"destination": "/../x", "type": "tmpfs", "source": "tmpfs"}]);
        assert!(prep(&v).is_err());
        let mut v = base();
        v["linux"]["resources"] = serde_json::json!({"memory": {"limit": -5}});
        assert!(prep(&v).is_err());
        let mut v = base();
        v["linux"]["resources"] = serde_json::json!({"pids": {"limit": -2}});
        assert!(prep(&v).is_err());
        let mut v = base();
        v["linux"]["resources"] = serde_json::json!({"cpu": {"period": 99999999999u64}});
        assert!(prep(&v).is_err());
    }
}
