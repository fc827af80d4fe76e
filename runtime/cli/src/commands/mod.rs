//! One file per verb: each checks its arguments, calls the core's lifecycle, and prints what
//! runc prints.

pub mod create;
pub mod delete;
pub mod events;
pub mod exec;
pub mod features;
pub mod images;
pub mod kill;
pub mod list;
pub mod login;
pub mod pause;
pub mod ps;
pub mod run;
pub mod sandbox_run;
pub mod snapshot;
pub mod spec;
pub mod start;
pub mod state;
pub mod update;

use husk_core::vm::husk_vmm::HuskVmm;
use husk_core::RuntimeError;

/// The lifecycle as the CLI runs it: sandboxes are husk-vmm processes.
pub type Rt = husk_core::Runtime<HuskVmm>;

/// What a command leaves for `main`: usually success, sometimes a process's exit code.
pub type ExitCode = i32;

/// Prints a line to stdout; a reader that went away (`husk state x | grep -q`) is not an error.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}
pub(crate) use out;

pub fn refuse_preserve_fds(n: u32) -> Result<(), RuntimeError> {
    if n > 0 {
        return Err(RuntimeError::InvalidArgument(format!(
            "--preserve-fds {n}: host file descriptors cannot be passed into a sandbox VM"
        )));
    }
    Ok(())
}

/// The lifecycle over `root` with this host's configuration.
pub fn runtime(root: &std::path::Path, no_snapshot: bool) -> Result<Rt, RuntimeError> {
    let mut cfg = husk_core::config::Config::load()?;
    if no_snapshot {
        cfg.snapshots.enabled = false;
    }
    let state = husk_core::state::StateDir::new(root)?;
    // One short-lived process: each VM's agent is dialled once, whatever the command's steps
    // (HUSK_SHARE_CONNECTIONS=0 dials per step, to measure the difference).
    if std::env::var_os("HUSK_SHARE_CONNECTIONS").is_none_or(|v| v != "0") {
        husk_core::vm::husk_vmm::share_connections();
    }
    Ok(husk_core::Runtime::new(state, cfg.clone(), HuskVmm { cfg }))
}

/// Checks `--format`.
pub fn check_format(format: &str) -> Result<(), RuntimeError> {
    if format != "table" && format != "json" {
        return Err(RuntimeError::InvalidArgument(format!("invalid format option {format:?}")));
    }
    Ok(())
}
