//! `husk spec`: runc's default config.json, from oci-spec's defaults.

use std::path::Path;

use husk_core::RuntimeError;

use super::ExitCode;

/// `spec`: runc's default config.json, for a busybox-like rootfs in `rootfs/`.
pub fn run(bundle: &Path, rootless: bool) -> Result<ExitCode, RuntimeError> {
    let path = bundle.join("config.json");
    if path.exists() {
        return Err(RuntimeError::InvalidArgument("File config.json exists. Remove it first".into()));
    }
    let spec = if rootless {
        oci_spec::runtime::Spec::rootless(nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw())
    } else {
        oci_spec::runtime::Spec::default()
    };
    let bytes = serde_json::to_vec_pretty(&spec).map_err(|e| RuntimeError::Internal(e.to_string()))?;
    std::fs::write(&path, bytes).map_err(RuntimeError::io(format!("writing {}", path.display())))?;
    Ok(0)
}
