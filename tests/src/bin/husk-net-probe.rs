//! The L1 side of the network end-to-end test (tests/network.rs), run inside the test host.
//! Every check prints exactly one line, `@@<NAME> ok ...` or `@@<NAME> FAIL <why>`, and every
//! network wait is bounded.
//!
//! - `serve ADDR:PORT SIZE`: an HTTP/1.0 server (foreground, one thread per connection); GET
//!   `/blob` returns SIZE deterministic bytes, anything else `hello-from-l1`. Prints
//!   `@@SERVE-READY sha256=<hex of the blob>` once it listens.
//! - `get NAME ADDR:PORT PATH [--contains TEXT] [--sha256 HEX] [--len N] [--wait SECS]`: one
//!   GET (retried for up to SECS while the server is not there yet); checks the status and the
//!   body; prints its length and sha256.
//! - `conns NAME ADDR:PORT N PATH TEXT`: N connections opened at once, then each sends a GET
//!   and must get a 200 whose body contains TEXT.
//! - `udp NAME ADDR:PORT N [--wait SECS]`: N distinct datagrams, each of which must come back
//!   unchanged from an echo server (waits up to SECS for the first echo).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest silence on an established connection (one read or write), not the whole transfer:
/// nested TCG moves tens of MiB at a few MiB/s.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// A whole transfer's limit.
const TRANSFER_DEADLINE: Duration = Duration::from_secs(300);
const HELLO: &[u8] = b"hello-from-l1\n";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.get(1).cloned().unwrap_or_default();
    let r = match (args.first().map(String::as_str), args.len()) {
        (Some("serve"), 3) => serve(&args[1], &args[2]),
        (Some("get"), n) if n >= 4 => get_check(&args[2], &args[3], &args[4..]),
        (Some("conns"), 6) => conns(&args[2], &args[3], &args[4], &args[5]),
        (Some("udp"), n) if n >= 4 => udp(&args[2], &args[3], &args[4..]),
        _ => {
            eprintln!(
                "usage: husk-net-probe serve ADDR:PORT SIZE | get NAME ADDR:PORT PATH [--contains TEXT] \
                 [--sha256 HEX] [--len N] [--wait SECS] | conns NAME ADDR:PORT N PATH TEXT \
                 | udp NAME ADDR:PORT N [--wait SECS]"
            );
            std::process::exit(2);
        }
    };
    match r {
        Ok(detail) => println!("@@{name} ok {detail}"),
        Err(e) => {
            // serve's NAME slot is its address: name its failure by the subcommand.
            let name = if args.first().is_some_and(|a| a == "serve") { "SERVE".into() } else { name };
            println!("@@{name} FAIL {}", format!("{e:#}").replace('\n', " | "));
            std::process::exit(1);
        }
    }
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn addr(s: &str) -> Result<SocketAddr> {
    s.to_socket_addrs()
        .with_context(|| format!("bad address {s:?} (want IP:PORT)"))?
        .next()
        .ok_or_else(|| anyhow!("{s:?} resolves to nothing"))
}

fn number<T: std::str::FromStr>(what: &str, s: &str) -> Result<T> {
    s.parse().map_err(|_| anyhow!("{what}: {s:?} is not a number"))
}

/// The served blob: an xorshift stream, cheap to make in TCG and the same on every run.
fn blob(size: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(size + 8);
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(size);
    v
}

fn serve(at: &str, size: &str) -> Result<String> {
    let body: Arc<Vec<u8>> = Arc::new(blob(number("SIZE", size)?));
    let l = TcpListener::bind(addr(at)?).with_context(|| format!("binding {at}"))?;
    println!("@@SERVE-READY sha256={}", hex(Sha256::digest(body.as_slice())));
    std::io::stdout().flush().ok();
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        let body = Arc::clone(&body);
        std::thread::spawn(move || {
            // A client that went away is its own check's failure, not the server's.
            let _ = answer(c, &body);
        });
    }
    Ok(String::new())
}

fn answer(mut c: TcpStream, blob: &[u8]) -> Result<()> {
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    // The request line is all that matters; read up to the header end (or 8 KiB).
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let body = if path == "/blob" { blob } else { HELLO };
    c.write_all(
        format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).as_bytes(),
    )?;
    c.write_all(body)?;
    Ok(())
}

/// A GET's outcome: status code, body length, its sha256, and the body's first 4 KiB.
struct Response {
    status: u16,
    len: u64,
    sha256: String,
    head: Vec<u8>,
}

fn connect(to: SocketAddr) -> Result<TcpStream> {
    let s =
        TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).with_context(|| format!("connecting to {to}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Sends `GET path` on `s` and streams the body through sha256 (a 64 MiB body is not kept).
fn request(mut s: TcpStream, host: SocketAddr, path: &str) -> Result<Response> {
    let start = Instant::now();
    s.write_all(
        format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: husk-net-probe\r\n\r\n").as_bytes(),
    )?;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let header_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if raw.len() > 64 * 1024 {
            bail!("no end of the HTTP header in the first 64 KiB");
        }
        let n = s.read(&mut buf).context("reading the response header")?;
        if n == 0 {
            bail!(
                "connection closed before the end of the HTTP header ({} bytes: {:?})",
                raw.len(),
                lossy(&raw)
            );
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let header = String::from_utf8_lossy(&raw[..header_end]).into_owned();
    let status = header
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("bad status line: {:?}", header.lines().next().unwrap_or_default()))?;
    let content_length = header.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<u64>().ok()).flatten()
    });
    let mut hasher = Sha256::new();
    let mut head = raw[header_end..].to_vec();
    hasher.update(&head);
    let mut len = head.len() as u64;
    head.truncate(4096);
    loop {
        if start.elapsed() > TRANSFER_DEADLINE {
            bail!("the body was not complete after {TRANSFER_DEADLINE:?} ({len} bytes so far)");
        }
        let n = s.read(&mut buf).with_context(|| format!("reading the body after {len} bytes"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if head.len() < 4096 {
            head.extend_from_slice(&buf[..n.min(4096 - head.len())]);
        }
        len += n as u64;
    }
    if let Some(cl) = content_length {
        if cl != len {
            bail!("Content-Length {cl} but {len} bytes arrived");
        }
    }
    Ok(Response { status, len, sha256: hex(hasher.finalize()), head })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned()
}

/// `--flag VALUE` pairs after the positional arguments.
fn flags(rest: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut it = rest.iter();
    while let Some(f) = it.next() {
        let v = it.next().ok_or_else(|| anyhow!("{f} needs a value"))?;
        out.push((f.clone(), v.clone()));
    }
    Ok(out)
}

fn get_check(at: &str, path: &str, rest: &[String]) -> Result<String> {
    let to = addr(at)?;
    let (mut contains, mut sha256, mut want_len, mut wait) = (None, None, None, 0u64);
    for (f, v) in flags(rest)? {
        match f.as_str() {
            "--contains" => contains = Some(v),
            "--sha256" => sha256 = Some(v.to_ascii_lowercase()),
            "--len" => want_len = Some(number::<u64>("--len", &v)?),
            "--wait" => wait = number("--wait", &v)?,
            _ => bail!("unknown option {f}"),
        }
    }
    // The server may still be starting: retry connecting (only) until the wait is over.
    let deadline = Instant::now() + Duration::from_secs(wait);
    let s = loop {
        match connect(to) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
            Err(e) => return Err(e),
        }
    };
    let started = Instant::now();
    let r = request(s, to, path).with_context(|| format!("GET http://{to}{path}"))?;
    let secs = started.elapsed().as_secs_f64();
    if r.status != 200 {
        bail!("GET http://{to}{path}: status {} ({:?})", r.status, lossy(&r.head));
    }
    if let Some(t) = &contains {
        if !String::from_utf8_lossy(&r.head).contains(t.as_str()) {
            bail!("GET http://{to}{path}: the body does not contain {t:?}: {:?}", lossy(&r.head));
        }
    }
    if let Some(n) = want_len {
        if r.len != n {
            bail!("GET http://{to}{path}: {} bytes, want {n}", r.len);
        }
    }
    if let Some(h) = &sha256 {
        if &r.sha256 != h {
            bail!("GET http://{to}{path}: sha256 {} ({} bytes), want {h}", r.sha256, r.len);
        }
    }
    let rate = r.len as f64 / (1 << 20) as f64 / secs.max(1e-3);
    Ok(format!("len={} sha256={} secs={secs:.1} MiB/s={rate:.1}", r.len, r.sha256))
}

fn conns(at: &str, n: &str, path: &str, text: &str) -> Result<String> {
    let to = addr(at)?;
    let n: usize = number("N", n)?;
    let barrier = Arc::new(Barrier::new(n));
    let started = Instant::now();
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            let (path, text) = (path.to_string(), text.to_string());
            std::thread::spawn(move || -> Result<()> {
                let s = connect(to);
                // Every connection is open before any request goes out; each wait is bounded by
                // the connect timeout of the slowest.
                barrier.wait();
                let r = request(s?, to, &path)?;
                if r.status != 200 || !String::from_utf8_lossy(&r.head).contains(text.as_str()) {
                    bail!("status {}, body {:?}", r.status, lossy(&r.head));
                }
                Ok(())
            })
        })
        .collect();
    let mut failed = Vec::new();
    for (i, h) in threads.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(format!("#{i}: {e:#}")),
            Err(_) => failed.push(format!("#{i}: panicked")),
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {n} connections to {to} failed: {}",
            failed.len(),
            failed.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
        );
    }
    Ok(format!("{n} connections answered in {:.1}s", started.elapsed().as_secs_f64()))
}

fn udp(at: &str, n: &str, rest: &[String]) -> Result<String> {
    let to = addr(at)?;
    let n: usize = number("N", n)?;
    let mut wait = 0u64;
    for (f, v) in flags(rest)? {
        match f.as_str() {
            "--wait" => wait = number("--wait", &v)?,
            _ => bail!("unknown option {f}"),
        }
    }
    let sock =
        UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).context("binding a UDP socket")?;
    sock.connect(to).with_context(|| format!("connecting the UDP socket to {to}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = vec![0u8; 65536];
    // One round trip: sends `msg` up to `tries` times, true when the same bytes came back.
    // Stale echoes of earlier tries (a slow answer) are skipped by content.
    let round = |msg: &[u8], tries: u32, buf: &mut [u8]| -> Result<bool> {
        for _ in 0..tries {
            sock.send(msg).with_context(|| format!("sending {} bytes to {to}", msg.len()))?;
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                match sock.recv(buf) {
                    Ok(k) if &buf[..k] == msg => return Ok(true),
                    Ok(_) => continue,
                    // ICMP port unreachable (echo server not up yet) or the read timeout.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::ConnectionRefused
                        ) =>
                    {
                        if e.kind() == std::io::ErrorKind::ConnectionRefused {
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        break;
                    }
                    Err(e) => return Err(e).with_context(|| format!("receiving from {to}")),
                }
            }
        }
        Ok(false)
    };
    // Wait for the server: the first echo may take a while.
    let deadline = Instant::now() + Duration::from_secs(wait.max(2));
    loop {
        if round(b"husk-udp-hello", 1, &mut buf)? {
            break;
        }
        if Instant::now() >= deadline {
            bail!("no echo from {to} within {wait} s");
        }
    }
    let mut retried = 0;
    for i in 0..n {
        // Distinct contents and sizes (up to one MTU's worth) so a misrouted echo shows.
        let size = 16 + (i * 97) % 1400;
        let msg: Vec<u8> = format!("husk-udp-{i:06}-").bytes().cycle().take(size).collect();
        if !round(&msg, 1, &mut buf)? {
            retried += 1;
            // UDP may drop a datagram; two more tries before calling it lost.
            if !round(&msg, 2, &mut buf)? {
                bail!(
                    "datagram #{i} ({size} bytes) to {to} never came back (3 tries; {retried} resent so far)"
                );
            }
        }
    }
    Ok(format!("{n} datagrams echoed by {to} ({retried} resent)"))
}
