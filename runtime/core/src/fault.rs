//! Test hook: deterministic crash points. [`point`] kills this process with SIGKILL when the
//! environment variable `HUSK_FAULT_KILL_AT` names that point, so a test can stop a lifecycle
//! call exactly between two of its steps and check what a crash there leaves behind (and that
//! `delete --force` clears it). Without the variable, or with it naming another point, nothing
//! changes. The points are listed where they are called (`fault::point("...")`);
//! the fault and leak test drives each of them.

use nix::sys::signal::{raise, Signal};

/// The variable that names the point to die at.
pub const KILL_AT_ENV: &str = "HUSK_FAULT_KILL_AT";

/// Dies here, by SIGKILL, if `HUSK_FAULT_KILL_AT` is `name`: no unwinding, no destructor, no
/// cleanup, as when the OOM killer or a `kill -9` takes the process.
pub fn point(name: &str) {
    if std::env::var_os(KILL_AT_ENV).is_some_and(|v| v == name) {
        tracing::debug!("fault point {name}: killing this process");
        // SIGKILL cannot be caught or blocked: raise returns only if it failed to send.
        let _ = raise(Signal::SIGKILL);
        std::process::abort();
    }
}
