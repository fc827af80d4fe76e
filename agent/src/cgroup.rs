//! A container's cgroup v2 directory: stats, freeze/thaw, resource updates, kill-all, and
//! OOM-kill counting. Containers live under `/sys/fs/cgroup/husk/<id>` (the agent sets the
//! spec's cgroupsPath; the host's choice means nothing inside the VM).

use std::path::{Path, PathBuf};

use libcgroups::common::{CgroupManager, ControllerOpt, FreezerState};
use oci_spec::runtime::LinuxResources;

use crate::error::AgentError;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroupsPath the agent puts in every container's spec.
pub fn cgroups_path(container_id: &str) -> String {
    format!("/husk/{container_id}")
}

pub struct ContainerCgroup {
    dir: PathBuf,
    manager: libcgroups::v2::manager::Manager,
}

impl std::fmt::Debug for ContainerCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerCgroup").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl ContainerCgroup {
    pub fn new(container_id: &str) -> Result<Self, AgentError> {
        let rel = PathBuf::from(format!("husk/{container_id}"));
        let manager = libcgroups::v2::manager::Manager::new(CGROUP_ROOT.into(), rel.clone())
            .map_err(|e| AgentError::Internal(format!("cgroup of {container_id}: {e}")))?;
        Ok(Self { dir: Path::new(CGROUP_ROOT).join(rel), manager })
    }

    pub fn memory_events(&self) -> PathBuf {
        self.dir.join("memory.events")
    }

    pub fn freeze(&self, frozen: bool) -> Result<(), AgentError> {
        let state = if frozen { FreezerState::Frozen } else { FreezerState::Thawed };
        self.manager.freeze(state).map_err(|e| AgentError::Internal(format!("freezer: {e}")))
    }

    pub fn is_frozen(&self) -> bool {
        read_keyed(&self.dir.join("cgroup.events"), "frozen") == Some(1)
    }

    pub fn update(&self, resources: &LinuxResources) -> Result<(), AgentError> {
        let opt =
            ControllerOpt { resources, disable_oom_killer: false, oom_score_adj: None, freezer_state: None };
        self.manager.apply(&opt).map_err(|e| AgentError::InvalidArgument(format!("applying resources: {e}")))
    }

    /// PIDs in the cgroup (empty once it is gone).
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Sends `signal` to every process; SIGKILL goes through `cgroup.kill`, which also catches
    /// processes forked meanwhile.
    pub fn signal_all(&self, signal: nix::sys::signal::Signal) -> Result<(), AgentError> {
        if signal == nix::sys::signal::Signal::SIGKILL
            && std::fs::write(self.dir.join("cgroup.kill"), "1").is_ok()
        {
            return Ok(());
        }
        for pid in self.pids() {
            // A process may exit meanwhile; that is fine.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
        Ok(())
    }

    pub fn oom_kills(&self) -> u64 {
        read_keyed(&self.memory_events(), "oom_kill").unwrap_or(0)
    }

    pub fn stats(&self) -> husk_proto::ContainerStatsResponse {
        let max = std::fs::read_to_string(self.dir.join("memory.max")).unwrap_or_default();
        husk_proto::ContainerStatsResponse {
            memory_usage_bytes: read_u64(&self.dir.join("memory.current")).unwrap_or(0),
            memory_limit_bytes: max.trim().parse().unwrap_or(0),
            cpu_usage_usec: read_keyed(&self.dir.join("cpu.stat"), "usage_usec").unwrap_or(0),
            pids_current: read_u64(&self.dir.join("pids.current")).unwrap_or(0),
            oom_kills: self.oom_kills(),
        }
    }

    /// Removes the (empty) cgroup directory; a missing one is fine.
    pub fn remove(&self) {
        if self.dir.exists() {
            if let Err(e) = self.manager.remove() {
                tracing::warn!("removing cgroup {}: {e}", self.dir.display());
            }
        }
    }
}

/// Enables the controllers containers use for children of the root cgroup (guest init only;
/// in host mode the host's setup is left alone).
pub fn enable_controllers() -> Result<(), AgentError> {
    let root = Path::new(CGROUP_ROOT);
    let available = std::fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(AgentError::io("cgroup.controllers"))?;
    let wanted: Vec<String> = available.split_whitespace().map(|c| format!("+{c}")).collect();
    std::fs::write(root.join("cgroup.subtree_control"), wanted.join(" "))
        .map_err(AgentError::io("enabling cgroup controllers"))
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A value from a flat keyed file such as memory.events (`key value` lines).
fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_values() {
        let dir = std::env::temp_dir().join(format!("husk-agent-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let f = dir.join("memory.events");
        std::fs::write(&f, "low 0\nhigh 0\nmax 4\noom 1\noom_kill 2\n").expect("write");
        assert_eq!(read_keyed(&f, "oom_kill"), Some(2));
        assert_eq!(read_keyed(&f, "oom"), Some(1));
        assert_eq!(read_keyed(&f, "nope"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
