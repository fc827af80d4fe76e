//! The test host's errors. Failures of the L1 VM carry the tails of its logs, because a test
//! failure message is usually the only thing a developer (or CI) gets to look at.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use husk_rootfs_builder::CpioError;

#[derive(Debug, thiserror::Error)]
pub enum TestHostError {
    /// Neither a real local KVM nor QEMU for the nested test host is usable here.
    #[error("no KVM test host on this machine: {0}")]
    Unavailable(String),

    /// `prepare-l1.sh` failed or its output is not an asset directory.
    #[error("preparing the L1 kernel assets failed: {0}")]
    Assets(String),

    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },

    #[error("{0:?} was not found in PATH")]
    NotInPath(String),

    #[error("{0} must be an absolute path (files are copied to the same path inside L1)")]
    NotAbsolute(PathBuf),

    /// `ldd` failed or reported a library it cannot find.
    #[error("resolving shared libraries of {path}: {msg}")]
    Ldd { path: PathBuf, msg: String },

    /// Two different things would land at one path of the L1 initramfs.
    #[error("initramfs path /{0} is wanted both as {1} and as {2}")]
    Conflict(String, String, String),

    #[error("writing the L1 initramfs: {0}")]
    Cpio(#[from] CpioError),

    /// L1 stopped (see `Job::stall_after`): `how` says what showed it; QEMU was killed.
    #[error("the test host stalled: {how}\n--- L1 console (tail) ---\n{console_tail}\n--- job output (tail) ---\n{output_tail}")]
    Stalled { how: String, console_tail: String, output_tail: String },

    /// The job did not finish in time; QEMU (or the local shell) was killed.
    #[error("job timed out after {after:?}\n--- L1 console (tail) ---\n{console_tail}\n--- job output (tail) ---\n{output_tail}")]
    Timeout { after: Duration, console_tail: String, output_tail: String },

    /// L1 booted but could not provide /dev/kvm (module load failed, ...).
    #[error("L1 setup failed: {msg}\n--- L1 console (tail) ---\n{console_tail}")]
    L1Setup { msg: String, console_tail: String },

    /// QEMU exited before the job's exit trailer arrived: L1 crashed, panicked or never booted.
    #[error("L1 VM exited ({status}) without reporting the job's exit code\n--- QEMU stderr ---\n{qemu_stderr}\n--- L1 console (tail) ---\n{console_tail}\n--- job output (tail) ---\n{output_tail}")]
    NoTrailer { status: String, qemu_stderr: String, console_tail: String, output_tail: String },
}

impl TestHostError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
