//! Where host connections come in and which port they are for.
//!
//! In a VM the agent listens on vsock ports [`AGENT_PORT`] and [`STDIO_PORT`]. In host mode it
//! listens on one Unix socket that speaks the VMM's hybrid-vsock handshake (`CONNECT <port>\n`,
//! answered `OK <port>\n`), so a host client dials both the same way.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use husk_proto::{AGENT_PORT, STDIO_PORT};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

use crate::stdio::StdioRegistry;

/// How long a peer may take to send its handshake line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest handshake line accepted (`STDIO ` + 64-byte name + newline fits).
const MAX_HANDSHAKE: usize = 80;

#[derive(Debug, Clone)]
pub enum Endpoint {
    Vsock,
    Unix(PathBuf),
}

/// One accepted stream, vsock or Unix.
pub enum Conn {
    Unix(UnixStream),
    Vsock(VsockStream),
}

impl Conn {
    /// The stream as a plain blocking fd, to hand to a process as its stdio.
    pub fn into_blocking_fd(self) -> io::Result<OwnedFd> {
        let fd = match self {
            Conn::Unix(s) => OwnedFd::from(s.into_std()?),
            // Not into_raw_fd(): that leaves the fd registered with the reactor, and registering
            // it again for a pty relay then fails with EEXIST.
            Conn::Vsock(s) => OwnedFd::from(s),
        };
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(fd)
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
            Conn::Vsock($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// Accepts connections for ever: gRPC ones go to `grpc`, stdio ones are named and parked in
/// `stdio`.
pub async fn serve(
    endpoint: Endpoint,
    grpc: mpsc::Sender<io::Result<Conn>>,
    stdio: Arc<StdioRegistry>,
) -> io::Result<()> {
    match endpoint {
        Endpoint::Vsock => {
            let agent = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, AGENT_PORT))?;
            let streams = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, STDIO_PORT))?;
            let stdio_loop = async {
                loop {
                    match streams.accept().await {
                        Ok((s, _)) => spawn_stdio(Conn::Vsock(s), stdio.clone()),
                        Err(e) => tracing::warn!("vsock accept on the stdio port: {e}"),
                    }
                }
            };
            let agent_loop = async {
                loop {
                    match agent.accept().await {
                        Ok((s, _)) => {
                            if grpc.send(Ok(Conn::Vsock(s))).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!("vsock accept on the agent port: {e}"),
                    }
                }
            };
            tokio::select! {
                () = stdio_loop => {}
                () = agent_loop => {}
            }
            Ok(())
        }
        Endpoint::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path)?;
            loop {
                let (s, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accept on {}: {e}", path.display());
                        continue;
                    }
                };
                let (grpc, stdio) = (grpc.clone(), stdio.clone());
                tokio::spawn(async move {
                    let mut conn = Conn::Unix(s);
                    match unix_handshake(&mut conn).await {
                        Ok(AGENT_PORT) => {
                            let _ = grpc.send(Ok(conn)).await;
                        }
                        Ok(STDIO_PORT) => handle_stdio(conn, stdio).await,
                        Ok(port) => tracing::debug!("connection for unknown port {port} dropped"),
                        Err(e) => tracing::debug!("bad handshake: {e}"),
                    }
                });
            }
        }
    }
}

fn spawn_stdio(conn: Conn, stdio: Arc<StdioRegistry>) {
    tokio::spawn(handle_stdio(conn, stdio));
}

async fn unix_handshake(conn: &mut Conn) -> io::Result<u32> {
    let line = read_line(conn).await?;
    let port = line.strip_prefix("CONNECT ").and_then(|p| p.parse::<u32>().ok()).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, format!("expected CONNECT <port>, got {line:?}"))
    })?;
    conn.write_all(format!("OK {port}\n").as_bytes()).await?;
    Ok(port)
}

/// Reads `STDIO <name>\n`, parks the stream under that name and answers `OK\n` (or
/// `ERR <why>\n` and closes).
async fn handle_stdio(mut conn: Conn, stdio: Arc<StdioRegistry>) {
    let name = match read_line(&mut conn).await {
        Ok(line) => match line.strip_prefix("STDIO ") {
            Some(n) => n.to_string(),
            None => {
                let _ = conn.write_all(b"ERR expected STDIO <name>\n").await;
                return;
            }
        },
        Err(e) => {
            tracing::debug!("stdio handshake: {e}");
            return;
        }
    };
    if let Err(e) = crate::validate::name("stdio stream name", &name) {
        let _ = conn.write_all(format!("ERR {e}\n").as_bytes()).await;
        return;
    }
    let fd = match conn.into_blocking_fd() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("stdio stream {name}: {e}");
            return;
        }
    };
    // Registered before the answer, so a request naming the stream right after `OK` finds it.
    let reply = fd.try_clone();
    let answer = match stdio.insert(&name, fd) {
        Ok(()) => "OK\n".to_string(),
        Err(e) => format!("ERR {e}\n"),
    };
    if let Ok(reply) = reply {
        // The fd is blocking now; MSG_DONTWAIT keeps a peer without receive credit from
        // stalling the agent's only runtime thread.
        if let Err(e) = nix::sys::socket::send(
            reply.as_raw_fd(),
            answer.as_bytes(),
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            tracing::warn!("stdio stream {name}: answering: {e}");
        }
    }
}

/// Reads one `\n`-terminated line byte by byte (the peer may send payload right after it).
async fn read_line(conn: &mut Conn) -> io::Result<String> {
    let read = async {
        let mut line = Vec::with_capacity(32);
        loop {
            let b = conn.read_u8().await?;
            if b == b'\n' {
                break;
            }
            if line.len() == MAX_HANDSHAKE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "handshake line too long"));
            }
            line.push(b);
        }
        String::from_utf8(line)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "handshake is not UTF-8"))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no handshake line in time"))?
}
