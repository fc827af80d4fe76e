//! The per-sandbox share: one host directory, exported to the guest over virtio-fs, that
//! carries every container's rootfs and bind-mount sources.

use std::path::{Path, PathBuf};

use husk_proto as pb;

use crate::error::RuntimeError;
use crate::state::StateDir;

/// The tag of the per-sandbox share.
pub const SHARE_TAG: &str = "husk";

/// The share directory of a sandbox on the host.
pub fn shared_dir(state: &StateDir, sid: &str) -> PathBuf {
    state.sandbox_dir(sid).join("shared")
}

/// The guest path of `rel` inside the sandbox share.
pub fn guest_path(rel: &Path) -> PathBuf {
    Path::new(pb::SHARES_DIR).join(SHARE_TAG).join(rel)
}

/// Makes the share a mount of its own with shared propagation, so mounts made under it after
/// the VMM started (container root filesystems) also appear in the VMM's mount namespace,
/// which is a slave of this one. Undone by [`remove_files`].
pub fn make_propagating(shared: &Path) -> Result<(), RuntimeError> {
    use nix::mount::{mount, MsFlags};
    let none = None::<&str>;
    mount(Some(shared), shared, none, MsFlags::MS_BIND, none)
        .map_err(RuntimeError::errno(format!("bind-mounting {} on itself", shared.display())))?;
    mount(none, shared, none, MsFlags::MS_SHARED, none)
        .map_err(RuntimeError::errno(format!("making {} a shared mount", shared.display())))
}

/// Removes a sandbox directory whose VM is gone. Refuses while anything is still mounted under
/// its share: removing through a bind mount would delete the user's files.
pub fn remove_files(state: &StateDir, sid: &str) -> Result<(), RuntimeError> {
    let dir = state.sandbox_dir(sid);
    let shared = shared_dir(state, sid);
    // The share's own mount (see `make_propagating`) goes only when nothing is mounted below
    // it: a plain umount fails with EBUSY otherwise, and the check below then refuses.
    while nix::mount::umount2(&shared, nix::mount::MntFlags::empty()).is_ok() {}
    if let Some(m) = crate::mounts::first_mount_under(&shared)? {
        return Err(RuntimeError::Internal(format!(
            "not removing sandbox {sid}: {} is still mounted",
            m.display()
        )));
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RuntimeError::Io { what: format!("removing {}", dir.display()), source: e }),
    }
}
