//! Terminals: receiving a container process's pty master over the console socket, relaying it
//! to the host's stdio streams, and resizing it.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::error::AgentError;

/// Listens for the one connection that brings a pty master (runc's console-socket protocol:
/// SCM_RIGHTS with a single fd).
pub struct ConsoleSocket {
    listener: UnixListener,
}

impl ConsoleSocket {
    pub fn bind(path: &Path) -> Result<Self, AgentError> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).map_err(AgentError::io(format!("binding {}", path.display())))?;
        Ok(Self { listener })
    }

    /// Waits (blocking, up to `timeout`) for the master fd.
    pub fn receive(self, timeout: Duration) -> Result<OwnedFd, AgentError> {
        let mut pfd = [nix::poll::PollFd::new(self.listener.as_fd(), nix::poll::PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let ready = nix::poll::poll(&mut pfd, ms).map_err(AgentError::errno("polling the console socket"))?;
        if ready == 0 {
            return Err(AgentError::Internal("the container did not send its pty in time".into()));
        }
        let (conn, _) = self.listener.accept().map_err(AgentError::io("accepting on the console socket"))?;
        let mut buf = [0u8; 256];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(AgentError::errno("receiving the pty"))?;
        let mut master = None;
        for c in msg.cmsgs().map_err(AgentError::errno("reading control messages"))? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: SCM_RIGHTS hands us fresh fds that nothing else owns.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    if master.is_none() {
                        master = Some(owned);
                    }
                }
            }
        }
        master.ok_or_else(|| AgentError::Internal("console socket message had no fd".into()))
    }
}

pub fn resize(master: &OwnedFd, rows: u32, cols: u32) -> Result<(), AgentError> {
    let (rows, cols) = (u16::try_from(rows), u16::try_from(cols));
    let (Ok(rows), Ok(cols)) = (rows, cols) else {
        return Err(AgentError::InvalidArgument("rows and cols must be at most 65535".into()));
    };
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(AgentError::io("resizing the tty")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Copies between the pty master and the host's streams until the process side closes (EIO on
/// the master). `master` is a dup the relay owns; resize uses the original.
pub fn spawn_relay(
    master: OwnedFd,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
) -> Result<(), AgentError> {
    crate::fdio::set_nonblocking(&master).map_err(AgentError::io("pty master"))?;
    let master = std::sync::Arc::new(crate::fdio::register(master).map_err(AgentError::io("pty master"))?);
    if let Some(stdin) = stdin {
        crate::fdio::set_nonblocking(&stdin).map_err(AgentError::io("stdin stream"))?;
        let stdin = crate::fdio::register(stdin).map_err(AgentError::io("stdin stream"))?;
        let master = master.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n @ 1..) = crate::fdio::read_some(&stdin, &mut buf).await {
                if crate::fdio::write_all(&master, &buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
    let stdout = match stdout {
        Some(s) => {
            crate::fdio::set_nonblocking(&s).map_err(AgentError::io("stdout stream"))?;
            Some(crate::fdio::register(s).map_err(AgentError::io("stdout stream"))?)
        }
        None => None,
    };
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        // EIO once every slave fd is closed: the process tree has gone.
        while let Ok(n @ 1..) = crate::fdio::read_some(&master, &mut buf).await {
            if let Some(out) = &stdout {
                if crate::fdio::write_all(out, &buf[..n]).await.is_err() {
                    break;
                }
            }
        }
        if let Some(out) = &stdout {
            let _ = nix::sys::socket::shutdown(out.get_ref().as_raw_fd(), nix::sys::socket::Shutdown::Write);
        }
    });
    Ok(())
}
