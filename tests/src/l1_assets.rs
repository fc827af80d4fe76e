//! The L1 kernel and KVM modules, fetched by `testhost/prepare-l1.sh` into the user's cache.
//!
//! They are the only thing the test host keeps across runs: downloading a 27 MB kernel package
//! per test run would dominate the run time, while everything else is rebuilt per job so that
//! no stale state leaks between jobs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::error::TestHostError;

/// The prepare script, found through the crate's source dir so tests work from any cwd.
pub const PREPARE_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testhost/prepare-l1.sh");

/// Modules to `insmod` in L1, in load order, with their arguments.
/// `npt=1`: nested paging makes L2 usable at all under TCG (shadow paging is far slower).
pub const KVM_MODULES: [(&str, &str); 3] = [("irqbypass", ""), ("kvm", ""), ("kvm-amd", "npt=1")];

/// Modules loaded when the kernel package has them (overlayfs, for containerd's default
/// snapshotter); a kernel with them built in has no file.
pub const EXTRA_MODULES: [&str; 1] = ["overlay"];

#[derive(Debug, Clone)]
pub struct L1Assets {
    pub dir: PathBuf,
    pub vmlinuz: PathBuf,
}

impl L1Assets {
    /// Path of module `name` (one of [`KVM_MODULES`]).
    pub fn module(&self, name: &str) -> PathBuf {
        self.dir.join("modules").join(format!("{name}.ko"))
    }

    fn from_dir(dir: &Path) -> Result<Self, TestHostError> {
        let assets = Self { dir: dir.to_path_buf(), vmlinuz: dir.join("vmlinuz") };
        let mut missing: Vec<PathBuf> = KVM_MODULES.iter().map(|(m, _)| assets.module(m)).collect();
        missing.push(assets.vmlinuz.clone());
        missing.retain(|p| !p.is_file());
        if !missing.is_empty() {
            return Err(TestHostError::Assets(format!("{} lacks {missing:?}", dir.display())));
        }
        Ok(assets)
    }
}

/// The L1 assets, prepared once per process (the script is cheap when they are cached, but
/// it may download on the first call, and parallel tests should not all do that).
///
/// `HUSK_L1_ASSETS=<dir>` uses a ready directory instead of running the script.
pub fn l1_assets() -> Result<&'static L1Assets, TestHostError> {
    static ASSETS: OnceLock<Result<L1Assets, String>> = OnceLock::new();
    ASSETS
        .get_or_init(|| prepare().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| TestHostError::Assets(e.clone()))
}

fn prepare() -> Result<L1Assets, TestHostError> {
    if let Some(dir) = std::env::var_os("HUSK_L1_ASSETS") {
        return L1Assets::from_dir(Path::new(&dir));
    }
    let out = Command::new("sh")
        .arg(PREPARE_SCRIPT)
        .stdin(Stdio::null())
        .output()
        .map_err(TestHostError::io(format!("running {PREPARE_SCRIPT}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(TestHostError::Assets(format!(
            "{PREPARE_SCRIPT} {}:\n{}",
            out.status,
            tail(&stderr, 20)
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout.lines().last().unwrap_or("").trim();
    if dir.is_empty() {
        return Err(TestHostError::Assets(format!("{PREPARE_SCRIPT} printed no directory:\n{stderr}")));
    }
    L1Assets::from_dir(Path::new(dir))
}

/// The last `n` lines of `s`.
pub(crate) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
