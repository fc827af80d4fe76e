//! Relaying a process from the invoking terminal or pipes (foreground `run`, `exec`,
//! `husk run`), with the terminal in raw mode for the duration.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::process::Child;

use crate::error::RuntimeError;
use crate::ops::Foreground;
use crate::relay::{self, HostSide, Outcome};

/// Size of this process's terminal (stdin), if it is one.
pub fn own_terminal_size() -> Option<(u16, u16)> {
    relay::terminal_size(0)
}

/// Relays `fg` through this process's stdio; with `terminal`, stdin must be a terminal.
/// Hands back the VMM child (if this process started it) for the caller to reap.
pub async fn relay(fg: Foreground, terminal: bool) -> Result<(Outcome, Option<Child>), RuntimeError> {
    let Foreground { target, guest, vmm } = fg;
    // A connection of its own: the CLI's gives up on calls after a timeout, a wait must not.
    let client = crate::sandbox::connect_long(&target.vsock).await?;
    if terminal {
        let fd = nix::unistd::dup(0).map_err(RuntimeError::errno("dup stdin"))?;
        // SAFETY: dup returned a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let saved = relay::make_raw(&fd.as_fd()).ok();
        let restore = fd.try_clone().map_err(RuntimeError::io("dup terminal"))?;
        let outcome = relay::relay(client, &target, HostSide::Terminal { fd }, guest).await;
        if let Some(t) = saved {
            let _ = nix::sys::termios::tcsetattr(&restore, nix::sys::termios::SetArg::TCSANOW, &t);
        }
        Ok((outcome, vmm))
    } else {
        Ok((relay::relay(client, &target, relay::stdio_fds()?, guest).await, vmm))
    }
}

/// Whether stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    nix::unistd::isatty(0).unwrap_or(false)
}
