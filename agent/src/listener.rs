//! Where host connections come in and which port they are for.
//!
//! In a VM the agent listens on vsock ports [`AGENT_PORT`] and [`STDIO_PORT`]. In host mode it
//! listens on one Unix socket that speaks the VMM's hybrid-vsock handshake (`CONNECT <port>\n`,
//! answered `OK <port>\n`), so a host client dials both the same way. Both handshakes, and the
//! stdio stream's `STDIO <name>\n` (or `FORWARD <tcp port>\n`, a stream joined to a TCP
//! connection to the guest's loopback: the pod's port forwarding), are
//! [`husk_proto::handshake`] lines.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use husk_proto::handshake::{HandshakeError, LineReader, Reply, Request};
use husk_proto::{AGENT_PORT, READY_PORT, STDIO_PORT};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY, VMADDR_CID_HOST};

use crate::stdio::StdioRegistry;

/// How long a peer may take to send its handshake line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a forwarded connection may take to reach the guest's loopback.
const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Most forwarded connections at once: each holds two sockets and a copy task.
const MAX_FORWARDS: usize = 256;

static FORWARDS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_FORWARDS);

/// Why a handshake line did not arrive or did not parse.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Codec(#[from] HandshakeError),
    /// A well-formed request of the other kind.
    #[error("expected {0}")]
    Unexpected(&'static str),
    #[error("no handshake line within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
}

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

/// How long the agent tries to tell the host it serves.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(2);

/// Tells the host the agent serves: one connection to the host's ready port, closed at once.
/// Nobody may be listening (a snapshot's template VM; a host that polls), which is fine: the
/// host also tries now and then.
async fn announce_ready() {
    let dial = VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, READY_PORT));
    match tokio::time::timeout(ANNOUNCE_TIMEOUT, dial).await {
        Ok(Ok(_)) => tracing::debug!("told the host the agent serves"),
        Ok(Err(e)) => tracing::debug!("ready announcement: {e}"),
        Err(_) => tracing::debug!("ready announcement: no answer"),
    }
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
            tokio::spawn(announce_ready());
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
                        Ok(STDIO_PORT) => handle_stream(conn, stdio).await,
                        Ok(port) => tracing::debug!("connection for unknown port {port} dropped"),
                        Err(e) => tracing::debug!("bad handshake: {e}"),
                    }
                });
            }
        }
    }
}

fn spawn_stdio(conn: Conn, stdio: Arc<StdioRegistry>) {
    tokio::spawn(handle_stream(conn, stdio));
}

/// Reads `CONNECT <port>\n` and answers `OK <port>\n` (or `ERR <why>\n`).
async fn unix_handshake(conn: &mut Conn) -> Result<u32, ReadError> {
    let port = match read_request(conn).await {
        Ok(Request::Connect(port)) => Ok(port),
        Ok(Request::Stdio(_) | Request::Forward(_)) => Err(ReadError::Unexpected("CONNECT <port>")),
        Err(e) => Err(e),
    };
    match port {
        Ok(port) => {
            conn.write_all(&Reply::Ok(Some(port)).encode()).await?;
            Ok(port)
        }
        Err(e) => {
            refuse(conn, &e).await;
            Err(e)
        }
    }
}

/// Reads the stream's request: `STDIO <name>\n` parks it under that name, `FORWARD <port>\n`
/// joins it to the guest's `127.0.0.1:<port>`; either is answered `OK\n` (or `ERR <why>\n`
/// and closed).
async fn handle_stream(mut conn: Conn, stdio: Arc<StdioRegistry>) {
    match read_request(&mut conn).await {
        Ok(Request::Stdio(name)) => park_stdio(conn, name, &stdio),
        Ok(Request::Forward(port)) => forward(conn, port).await,
        Ok(Request::Connect(_)) => {
            refuse(&mut conn, &ReadError::Unexpected("STDIO <name> or FORWARD <port>")).await
        }
        Err(e) => {
            tracing::debug!("stream handshake: {e}");
            refuse(&mut conn, &e).await
        }
    }
}

/// Joins `conn` to a new TCP connection to the guest's `127.0.0.1:port` until both sides end.
/// The pod's network namespace is the guest's own, so this is the pod's loopback.
async fn forward(mut conn: Conn, port: u16) {
    let dialled = async {
        let permit =
            FORWARDS.try_acquire().map_err(|_| format!("more than {MAX_FORWARDS} forwarded connections"))?;
        let dial = tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port));
        match tokio::time::timeout(FORWARD_CONNECT_TIMEOUT, dial).await {
            Ok(Ok(tcp)) => Ok((permit, tcp)),
            Ok(Err(e)) => Err(format!("127.0.0.1:{port}: {e}")),
            Err(_) => Err(format!("127.0.0.1:{port}: no answer within {FORWARD_CONNECT_TIMEOUT:?}")),
        }
    };
    let (_permit, mut tcp) = match dialled.await {
        Ok(d) => d,
        Err(reason) => {
            let _ = conn.write_all(&Reply::Err(reason).encode()).await;
            return;
        }
    };
    if conn.write_all(&Reply::Ok(None).encode()).await.is_err() {
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut conn, &mut tcp).await {
        tracing::debug!("forward to port {port}: {e}");
    }
}

/// Parks a stdio stream under `name` and answers `OK\n` (or `ERR <why>\n`).
fn park_stdio(conn: Conn, name: String, stdio: &StdioRegistry) {
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
        Ok(()) => Reply::Ok(None),
        Err(e) => Reply::Err(e.to_string()),
    };
    if let Ok(reply) = reply {
        // The fd is blocking now; MSG_DONTWAIT keeps a peer without receive credit from
        // stalling the agent's only runtime thread.
        if let Err(e) = nix::sys::socket::send(
            reply.as_raw_fd(),
            &answer.encode(),
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            tracing::warn!("stdio stream {name}: answering: {e}");
        }
    }
}

/// Reads one request line byte by byte: the peer may send payload right after it.
async fn read_request(conn: &mut Conn) -> Result<Request, ReadError> {
    let read = async {
        let mut line = LineReader::new();
        loop {
            let b = match conn.read_u8().await {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(HandshakeError::Unterminated.into())
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(line) = line.push_byte(b)? {
                return Ok(Request::parse_line(&line)?);
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await.map_err(|_| ReadError::Timeout)?
}

/// Tells the peer why its handshake failed (best effort: the stream is dropped right after),
/// unless the stream itself is broken.
async fn refuse(conn: &mut Conn, e: &ReadError) {
    if !matches!(e, ReadError::Io(_)) {
        let _ = conn.write_all(&Reply::Err(e.to_string()).encode()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `lines` on a fresh connection to the host-mode socket and returns every reply line.
    async fn exchange(path: &std::path::Path, lines: &[u8], replies: usize) -> Vec<Reply> {
        let mut s = UnixStream::connect(path).await.expect("connect");
        s.write_all(lines).await.expect("write");
        let mut out = Vec::new();
        let mut line = LineReader::new();
        while out.len() < replies {
            let Ok(b) = s.read_u8().await else { break };
            if let Some(l) = line.push_byte(b).expect("bounded") {
                out.push(Reply::parse_line(&l).expect("a valid reply"));
            }
        }
        out
    }

    #[tokio::test(flavor = "current_thread")]
    async fn host_mode_handshakes_use_the_codec() {
        let dir = std::env::temp_dir().join(format!("husk-agent-listener-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("agent.sock");
        let (tx, _rx) = mpsc::channel(1);
        let stdio = Arc::new(StdioRegistry::default());
        let server = tokio::spawn(serve(Endpoint::Unix(path.clone()), tx, stdio.clone()));
        for _ in 0..400 {
            if path.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let ok = exchange(&path, b"CONNECT 1025\nSTDIO s1\n", 2).await;
        assert_eq!(ok, [Reply::Ok(Some(STDIO_PORT)), Reply::Ok(None)]);
        assert!(stdio.take("s1").is_ok(), "the stream was parked under its name");

        for bad in [&b"connect 1025\n"[..], b"CONNECT -1\n", b"STDIO s2\n"] {
            let got = exchange(&path, bad, 1).await;
            assert!(matches!(got.as_slice(), [Reply::Err(_)]), "{bad:?}: {got:?}");
        }
        for bad in [&b"CONNECT 1025\nSTDIO .hidden\n"[..], b"CONNECT 1025\nCONNECT 1025\n"] {
            let got = exchange(&path, bad, 2).await;
            assert!(matches!(got.as_slice(), [Reply::Ok(Some(_)), Reply::Err(_)]), "{bad:?}: {got:?}");
        }

        // FORWARD joins the stream to the loopback port; a port nobody listens on is refused.
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = tcp.local_addr().expect("addr").port();
        let echo = tokio::spawn(async move {
            let (mut c, _) = tcp.accept().await.expect("accept");
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).await.expect("read");
            c.write_all(&buf).await.expect("echo");
        });
        let mut s = UnixStream::connect(&path).await.expect("connect");
        s.write_all(format!("CONNECT 1025\nFORWARD {port}\nhello").as_bytes()).await.expect("write");
        let mut got = vec![0u8; "OK 1025\nOK\nhello".len()];
        s.read_exact(&mut got).await.expect("read");
        assert_eq!(got, b"OK 1025\nOK\nhello");
        echo.await.expect("echo task");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let gone = closed.local_addr().expect("addr").port();
        drop(closed);
        let got = exchange(&path, format!("CONNECT 1025\nFORWARD {gone}\n").as_bytes(), 2).await;
        assert!(matches!(got.as_slice(), [Reply::Ok(Some(_)), Reply::Err(_)]), "{got:?}");

        server.abort();
        let _ = std::fs::remove_dir_all(dir);
    }
}
