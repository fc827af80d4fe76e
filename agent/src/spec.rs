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
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// Parses an exec request's process object.
pub fn exec_process(json: &[u8], terminal: bool) -> Result<Process, AgentError> {
    let mut process: Process = parse("OCI process", json)?;
    check_process(&process)?;
    process.set_terminal(Some(terminal));
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
