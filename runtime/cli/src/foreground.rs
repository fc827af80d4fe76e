//! Relaying a process whose streams this CLI holds (foreground `run`, `exec`, `husk run`)
//! through the invoking terminal or pipes, with the terminal in raw mode for the duration.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use husk_core::lifecycle::Held;
use husk_core::relay::{self, HostSide, Outcome};
use husk_core::vm::{Calls, VmProcess, Vms};
use husk_core::RuntimeError;

use crate::commands::Rt;

/// Size of this process's terminal (stdin), if it is one.
pub fn own_terminal_size() -> Option<(u16, u16)> {
    relay::terminal_size(0)
}

/// Whether stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    nix::unistd::isatty(0).unwrap_or(false)
}

/// Removes a foreground container once its relay ended: one whose exit was seen is known to
/// be stopped; a lost one is asked about as any delete does.
pub async fn delete_after(rt: &Rt, id: &str, outcome: Outcome, vm: VmProcess) -> Result<(), RuntimeError> {
    match outcome {
        Outcome::Exited(_) | Outcome::Signaled(_) => rt.delete_exited(id, vm).await,
        Outcome::Lost => rt.delete(id, true, vm).await,
    }
}

/// Relays `held` through this process's stdio; with `terminal`, stdin must be a terminal.
/// Hands back the VMM (if this process started it) for the caller to reap after the delete.
pub async fn relay(rt: &Rt, held: Held, terminal: bool) -> Result<(Outcome, VmProcess), RuntimeError> {
    let Held { target, guest, vm, .. } = held;
    let rec = rt.state.read_container(&target.container_id)?;
    let srec = rt
        .state
        .read_sandbox(&rec.sandbox_id)?
        .ok_or_else(|| RuntimeError::NotFound(target.container_id.clone()))?;
    // A connection of its own: bounded calls give up after a timeout, a wait must not.
    let agent = rt.vms.connect(&srec, Calls::Long).await?;
    husk_core::timeline::mark("relay: connected");
    if terminal {
        let fd = nix::unistd::dup(0).map_err(RuntimeError::errno("dup stdin"))?;
        // SAFETY: dup returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let saved = relay::make_raw(&fd.as_fd()).ok();
        let restore = fd.try_clone().map_err(RuntimeError::io("dup terminal"))?;
        let outcome = relay::relay(agent, &target, HostSide::Terminal { fd }, guest).await;
        if let Some(t) = saved {
            let _ = nix::sys::termios::tcsetattr(&restore, nix::sys::termios::SetArg::TCSANOW, &t);
        }
        husk_core::timeline::mark("relay: exit seen");
        Ok((outcome, vm))
    } else {
        let outcome = relay::relay(agent, &target, relay::stdio_fds()?, guest).await;
        husk_core::timeline::mark("relay: exit seen");
        Ok((outcome, vm))
    }
}
