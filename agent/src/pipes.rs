//! A process's stdio as runc gives it: pipes, never the host's stream sockets, so a program can
//! reopen `/dev/stdout` or `/proc/self/fd/1`, splice into its output, or see a pipe's EOF. The
//! agent copies between each pipe and its host stream; copies are off the RPC path.

use std::os::fd::{AsRawFd, OwnedFd};

use tokio::task::AbortHandle;

use crate::error::AgentError;
use crate::fdio;

/// Pipe capacity asked for: fewer wake-ups per MiB than the 64 KiB default.
const PIPE_SIZE: libc::c_int = 1 << 20;
/// Copy buffer per stream.
const CHUNK: usize = 128 * 1024;

fn pipe() -> Result<(OwnedFd, OwnedFd), AgentError> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(AgentError::errno("pipe"))?;
    // Best effort: an unprivileged limit (pipe-max-size) only makes it smaller.
    // SAFETY: F_SETPIPE_SZ takes an int and touches nothing else.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    Ok((r, w))
}

/// Input: returns the pipe's read end for the process, and a handle whose abort closes the
/// write end (CloseStdin). The process sees EOF after everything the host sent, once the host
/// shuts its side of the stream down.
pub fn input(stream: OwnedFd) -> Result<(OwnedFd, AbortHandle), AgentError> {
    let (r, w) = pipe()?;
    fdio::set_nonblocking(&stream).map_err(AgentError::io("stdin stream"))?;
    fdio::set_nonblocking(&w).map_err(AgentError::io("stdin pipe"))?;
    let stream = fdio::register(stream).map_err(AgentError::io("stdin stream"))?;
    let w = fdio::register(w).map_err(AgentError::io("stdin pipe"))?;
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        while let Ok(n @ 1..) = fdio::read_some(&stream, &mut buf).await {
            if fdio::write_all(&w, &buf[..n]).await.is_err() {
                break;
            }
        }
        // Dropping `w` gives the process its EOF.
    });
    Ok((r, task.abort_handle()))
}

/// Output: returns the pipe's write end for the process. Everything written reaches the
/// stream; once every writer is gone the stream's write side is shut down, which is the
/// host's EOF. If the host stops reading, the pipe is closed and writers get EPIPE, as with
/// a dead reader under runc.
pub fn output(stream: OwnedFd) -> Result<OwnedFd, AgentError> {
    let (r, w) = pipe()?;
    fdio::set_nonblocking(&stream).map_err(AgentError::io("output stream"))?;
    fdio::set_nonblocking(&r).map_err(AgentError::io("output pipe"))?;
    let stream = fdio::register(stream).map_err(AgentError::io("output stream"))?;
    let r = fdio::register(r).map_err(AgentError::io("output pipe"))?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        while let Ok(n @ 1..) = fdio::read_some(&r, &mut buf).await {
            if fdio::write_all(&stream, &buf[..n]).await.is_err() {
                return;
            }
        }
        let _ = nix::sys::socket::shutdown(stream.get_ref().as_raw_fd(), nix::sys::socket::Shutdown::Write);
    });
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[tokio::test(flavor = "current_thread")]
    async fn output_is_a_pipe_and_ends_with_eof() {
        let (host, agent) = UnixStream::pair().expect("socketpair");
        let w = output(agent.into()).expect("output");
        // SAFETY: libc::stat is only integer fields, so all-zero is a valid value (fstat overwrites it).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat fills the struct for an fd we own.
        assert_eq!(unsafe { libc::fstat(w.as_raw_fd(), &mut st) }, 0);
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFIFO);
        let data = vec![7u8; 3 << 20];
        let writer = std::thread::spawn(move || {
            let mut f = std::fs::File::from(w);
            f.write_all(&data).expect("write");
        });
        let got = tokio::task::spawn_blocking(move || {
            let mut v = Vec::new();
            (&host).read_to_end(&mut v).expect("read");
            v
        })
        .await
        .expect("join");
        writer.join().expect("writer");
        assert_eq!(got.len(), 3 << 20);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn input_delivers_then_eof_and_abort_closes() {
        let (host, agent) = UnixStream::pair().expect("socketpair");
        let (r, _h) = input(agent.into()).expect("input");
        (&host).write_all(b"hello").expect("write");
        host.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let got = tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            std::fs::File::from(r).read_to_string(&mut s).expect("read");
            s
        })
        .await
        .expect("join");
        assert_eq!(got, "hello");

        let (_host2, agent2) = UnixStream::pair().expect("socketpair");
        let (r2, h2) = input(agent2.into()).expect("input");
        h2.abort();
        let n = tokio::task::spawn_blocking(move || {
            let mut v = Vec::new();
            std::fs::File::from(r2).read_to_end(&mut v).map(|_| v.len())
        })
        .await
        .expect("join");
        assert_eq!(n.expect("eof after abort"), 0);
    }
}
