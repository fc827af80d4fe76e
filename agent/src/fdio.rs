//! Async I/O on raw fds the agent owns (pty masters, stdio streams, inotify).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;

/// Registers an fd-owning value with the reactor.
pub fn register<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: every T used here (OwnedFd, RawFdOwner) owns its fd and always returns the same one
    // until it is dropped, which the AsyncFd does first.
    unsafe { AsyncFd::register(inner) }.map_err(|e| e.into_parts().1)
}

/// Wraps anything that owns an fd through `AsFd` so the reactor can use it.
pub struct RawFdOwner<T: AsFd>(pub T);

impl<T: AsFd> AsRawFd for RawFdOwner<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

pub async fn read_some(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut g = fd.readable().await?;
        match g.try_io(|f| nix::unistd::read(f.get_ref().as_raw_fd(), buf).map_err(io::Error::from)) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

pub async fn write_all(fd: &AsyncFd<OwnedFd>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let mut g = fd.writable().await?;
        match g.try_io(|f| nix::unistd::write(f.get_ref(), buf).map_err(io::Error::from)) {
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}
