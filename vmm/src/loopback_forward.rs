//! The pod's loopback, carried into the guest. CRI's PortForward (containerd dials
//! `localhost:<port>` inside the pod's network namespace) finds nothing there when the workload
//! runs in a VM: the namespace only holds the pod's interfaces, which are wired to the guest.
//! husk-vmm runs in that namespace, so it listens on `127.0.0.1:<listen port>` there; the
//! runtime adds a REDIRECT rule that sends every other loopback TCP port to it as well. Each
//! connection becomes a vsock stream to the agent (`CONNECT <guest port>`, then
//! `FORWARD <original port>`), which connects to the same port on the guest's loopback, and the
//! two are joined until both sides end.
//!
//! Nothing here takes input from the guest beyond the agent's answer lines (bounded by the
//! handshake codec) and stream bytes that are copied, never interpreted.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use husk_proto::handshake::{LineReader, Reply, Request};

use crate::config::LoopbackForward;

/// Most forwarded connections at once (each holds two threads).
const MAX_CONNECTIONS: usize = 64;

/// How long the VMM's vsock side and the agent get to answer the two handshake lines (the
/// agent's answer includes its connect to the guest port).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h): the destination before NAT.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The bound listener (a taken port is a set-up error) and where connections go in the guest.
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    guest_port: u32,
}

/// Binds the listener; [`start`] serves it.
pub fn bind(cfg: &LoopbackForward) -> io::Result<Listener> {
    Ok(Listener {
        tcp: TcpListener::bind((Ipv4Addr::LOCALHOST, cfg.listen_port))?,
        guest_port: cfg.guest_port,
    })
}

/// Serves the listener on a thread of its own, confined before it accepts anything; its
/// connection threads inherit that confinement.
pub fn start(listener: Listener, vsock_uds: PathBuf) -> io::Result<()> {
    let Listener { tcp: listener, guest_port } = listener;
    let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new().name("husk-loopback-fwd".into()).spawn(move || {
        let confined = crate::confine::confine_thread(crate::confine::ThreadKind::LoopbackForward)
            .map_err(|e| io::Error::other(e.to_string()));
        let ok = confined.is_ok();
        let _ = ready_tx.send(confined);
        if !ok {
            return;
        }
        let active = Arc::new(AtomicUsize::new(0));
        for conn in listener.incoming() {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("loopback forward: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("loopback forward: more than {MAX_CONNECTIONS} connections; one refused");
                continue;
            }
            let (uds, active) = (vsock_uds.clone(), active.clone());
            let spawned = std::thread::Builder::new().name("husk-fwd-conn".into()).spawn(move || {
                if let Err(e) = forward(conn, &uds, guest_port) {
                    tracing::debug!("loopback forward: {e}");
                }
                active.fetch_sub(1, Ordering::SeqCst);
            });
            if let Err(e) = spawned {
                tracing::warn!("loopback forward: {e}");
            }
        }
    })?;
    ready.recv().map_err(|_| io::Error::other("the forwarder thread died starting"))?
}

/// The port the client dialled: the destination before the REDIRECT, or the listener's own
/// port for a direct connection (conntrack then has the same tuple, or none at all).
fn original_port(tcp: &TcpStream) -> io::Result<u16> {
    // SAFETY: sockaddr_in is plain old data, so all-zero is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the fd is a live TCP socket owned by `tcp`; the kernel writes at most `len`
    // bytes into `addr`, which is that large.
    let r = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(u16::from_be(addr.sin_port))
    } else {
        Ok(tcp.local_addr()?.port())
    }
}

/// Sends one request line and reads the one answer line, byte by byte (whatever follows it
/// belongs to the forwarded stream).
fn exchange(s: &mut UnixStream, req: &Request) -> io::Result<Reply> {
    s.write_all(&req.encode())?;
    let mut line = LineReader::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "vsock stream closed in the handshake"));
        }
        let done = line.push_byte(b[0]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if let Some(l) = done {
            return Reply::parse_line(&l).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
}

fn forward(tcp: TcpStream, uds: &std::path::Path, guest_port: u32) -> io::Result<()> {
    let port = original_port(&tcp)?;
    let mut guest = UnixStream::connect(uds)?;
    guest.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let refused = |what: &str, r: Reply| io::Error::other(format!("{what}: {r:?}"));
    match exchange(&mut guest, &Request::Connect(guest_port))? {
        Reply::Ok(Some(_)) => {}
        r => return Err(refused("vsock connect", r)),
    }
    match exchange(&mut guest, &Request::Forward(port))? {
        Reply::Ok(None) => {}
        r => return Err(refused(&format!("port {port}"), r)),
    }
    guest.set_read_timeout(None)?;
    let (mut tcp_r, mut guest_w) = (tcp.try_clone()?, guest.try_clone()?);
    let upstream = std::thread::Builder::new().name("husk-fwd-up".into()).spawn(move || {
        let _ = io::copy(&mut tcp_r, &mut guest_w);
        let _ = guest_w.shutdown(Shutdown::Write);
    })?;
    let (mut guest_r, mut tcp_w) = (guest, tcp);
    let _ = io::copy(&mut guest_r, &mut tcp_w);
    let _ = tcp_w.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake VMM vsock socket + agent: answers the two lines, then echoes.
    fn fake_agent(path: &std::path::Path, want_port: u16) -> std::thread::JoinHandle<()> {
        let l = UnixListener::bind(path).expect("bind");
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut line = LineReader::new();
            let mut lines = Vec::new();
            let mut b = [0u8; 1];
            while lines.len() < 2 {
                s.read_exact(&mut b).expect("read");
                if let Some(l) = line.push_byte(b[0]).expect("line") {
                    let req = Request::parse_line(&l).expect("request");
                    let reply = match &req {
                        Request::Connect(p) => Reply::Ok(Some(*p)),
                        _ => Reply::Ok(None),
                    };
                    lines.push(req);
                    s.write_all(&reply.encode()).expect("reply");
                }
            }
            assert_eq!(lines, [Request::Connect(1025), Request::Forward(want_port)]);
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).expect("read");
            s.write_all(&buf).expect("echo");
        })
    }

    #[test]
    fn a_loopback_connection_reaches_the_agent_with_its_port() {
        let dir = std::env::temp_dir().join(format!("husk-lofwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let uds = dir.join("vsock.sock");
        let _ = std::fs::remove_file(&uds);
        // A free port for the listener (no REDIRECT here: the original port is its own).
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
        let agent = fake_agent(&uds, port);
        let l = bind(&LoopbackForward { listen_port: port, guest_port: 1025 }).expect("bind");
        start(l, uds.clone()).expect("start");
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        c.write_all(b"ping over the pod's loopback").expect("write");
        c.shutdown(Shutdown::Write).expect("shutdown");
        let mut back = String::new();
        c.read_to_string(&mut back).expect("read");
        assert_eq!(back, "ping over the pod's loopback");
        agent.join().expect("agent");
        let _ = std::fs::remove_dir_all(dir);
    }
}
