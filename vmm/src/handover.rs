//! Handing the KVM VM's descriptor to the runtime that started this VMM.
//!
//! Linux destroys a KVM VM when its last descriptor closes, and much of that (on 6.1: the MMU
//! notifier's and KVM's RCU grace periods, stopping the VM's kernel threads) is waiting, not
//! work: about 40 ms per VM in the test host. When the VMM holds the last descriptor, its exit,
//! and so everything waiting on it (reaping, removing the sandbox's cgroup), includes that
//! wait. With a duplicate held by the runtime, the VMM's exit only frees its own memory, and
//! the runtime closes the duplicate off its critical path.
//!
//! The duplicate grants nothing: KVM refuses every ioctl from a process other than the VM's
//! creator, so a holder can only keep the VM's kernel state alive, as the VMM itself does.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Takes ownership of inherited descriptor `fd`, which must be a Unix socket. Errors say why
/// it is not; the descriptor is then left alone.
pub fn socket(fd: RawFd) -> io::Result<OwnedFd> {
    if fd <= 2 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a descriptor above stderr"));
    }
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only the struct it is given; a closed `fd` fails with EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a socket"));
    }
    // Close-on-exec like every other descriptor of the VMM (it execs nothing, but a
    // descriptor that is not needed should not look inheritable).
    // SAFETY: F_SETFD on a descriptor just checked to be open.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the descriptor was inherited for this purpose only (the command line names it)
    // and nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends a duplicate of `vm` over `socket` (SCM_RIGHTS, with one byte) and closes the socket.
/// Failing is harmless: the VMM then destroys the VM itself when it exits, as without it.
pub fn send(socket: OwnedFd, vm: &impl AsRawFd) {
    let stream = UnixStream::from(socket);
    if let Err(e) = stream.send_with_fd(&[0u8][..], vm.as_raw_fd()) {
        tracing::debug!("VM descriptor not handed over: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd;

    use super::*;

    #[test]
    fn only_a_socket_is_taken() {
        let file = std::fs::File::open("/dev/null").expect("open");
        let fd = file.as_raw_fd();
        assert!(socket(fd).is_err());
        assert!(socket(2).is_err());
        let (a, _b) = UnixStream::pair().expect("pair");
        let raw = a.into_raw_fd();
        let owned = socket(raw).expect("a socket");
        assert_eq!(owned.as_raw_fd(), raw);
    }

    #[test]
    fn the_peer_receives_a_working_duplicate() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let (r, w) = std::io::pipe().expect("pipe");
        send(OwnedFd::from(theirs), &w);
        drop(w);
        let mut buf = [0u8; 1];
        let (n, fd) = ours.recv_with_fd(&mut buf).expect("recv");
        assert_eq!(n, 1);
        let dup = fd.expect("a descriptor came along");
        // The pipe's write end lives on in the duplicate: a read sees no end of file until it
        // closes.
        let mut w2 = dup;
        std::io::Write::write_all(&mut w2, b"x").expect("write through the duplicate");
        drop(w2);
        let got = std::io::read_to_string(r).expect("read");
        assert_eq!(got, "x");
    }
}
