//! The host half of the vsock end-to-end test, run next to husk-vmm (inside the test host here).
//!
//! - `serve-echo PATH`: listen on a Unix socket (the VM's `<socket>_<port>`) and echo.
//! - `host-checks SOCKET`: connect into the guest through the VM's hybrid socket and check
//!   64 MiB echo, 32 concurrent streams, a refused port, closes seen on both ends, and a client
//!   killed mid-stream; then tell the guest to power off.
//!
//! - `getxattr PATH NAME`: print an extended attribute (for the virtio-fs test).
//! - `sink PATH`, `bench-native DIR`: the host halves of the device benchmarks.
//!
//! Prints `HOST-CHECK <name> ok|FAIL <detail>` lines and exits non-zero if any check failed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

const ECHO_PORT: u32 = 52;
const NOBODY_PORT: u32 = 53;
const CONTROL_PORT: u32 = 99;

fn echo(mut s: UnixStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

fn serve_echo(path: &str) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| format!("bind {path}: {e}"))?;
    for s in l.incoming().flatten() {
        std::thread::spawn(move || echo(s));
    }
    Ok(())
}

/// Opens a stream to guest `port` through the VM socket; Err carries what the VMM answered.
fn connect(sock: &str, port: u32) -> Result<(UnixStream, BufReader<UnixStream>), String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("connect {sock}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("handshake: {e}"))?;
    if !line.starts_with("OK ") {
        return Err(format!("handshake answer {line:?}"));
    }
    Ok((s, r))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed)).collect()
}

fn roundtrip(sock: &str, len: usize, seed: u8) -> Result<Duration, String> {
    let start = Instant::now();
    let (s, mut r) = connect(sock, ECHO_PORT)?;
    let data = pattern(len, seed);
    let sent = data.clone();
    let mut w = s;
    let writer = std::thread::spawn(move || {
        let res = w.write_all(&sent);
        let _ = w.shutdown(Shutdown::Write);
        res
    });
    let mut back = Vec::with_capacity(len);
    r.read_to_end(&mut back).map_err(|e| format!("read: {e}"))?;
    writer.join().map_err(|_| "writer panicked")?.map_err(|e| format!("write: {e}"))?;
    if back != data {
        return Err(format!("mismatch: sent {} bytes, got {}", data.len(), back.len()));
    }
    Ok(start.elapsed())
}

fn report(failed: &mut bool, name: &str, r: Result<String, String>) {
    match r {
        Ok(d) => println!("HOST-CHECK {name} ok {d}"),
        Err(e) => {
            *failed = true;
            println!("HOST-CHECK {name} FAIL {e}");
        }
    }
}

fn host_checks(sock: &str) -> bool {
    let mut failed = false;
    // The guest's echo server may not be up yet: retry until it answers.
    let deadline = Instant::now() + Duration::from_secs(300);
    let ready = loop {
        match connect(sock, ECHO_PORT) {
            Ok(_) => break Ok(String::new()),
            Err(e) if Instant::now() > deadline => break Err(format!("guest echo never answered: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    report(&mut failed, "guest-ready", ready);

    let r = roundtrip(sock, 64 << 20, 7)
        .map(|t| format!("{:.1} MB/s each way", 64.0 * 1.048576 / t.as_secs_f64()));
    report(&mut failed, "h2g-echo-64MiB", r);

    let threads: Vec<_> = (0..32u8)
        .map(|i| {
            let sock = sock.to_string();
            std::thread::spawn(move || roundtrip(&sock, 256 * 1024, i))
        })
        .collect();
    let errors: Vec<String> =
        threads.into_iter().filter_map(|t| t.join().unwrap_or(Err("panicked".into())).err()).collect();
    report(
        &mut failed,
        "h2g-32-concurrent",
        if errors.is_empty() { Ok(String::new()) } else { Err(errors.join("; ")) },
    );

    let r = match connect(sock, NOBODY_PORT) {
        Ok(_) => Err("connected to a guest port with no listener".into()),
        Err(e) if e.contains("\"\"") => Ok("closed without OK".into()),
        Err(e) => Err(format!("unexpected: {e}")),
    };
    report(&mut failed, "h2g-refused", r);

    // A client killed mid-stream (abrupt close with unread data) must not disturb others.
    let killed = (|| -> Result<String, String> {
        let (mut victim, _r) = connect(sock, ECHO_PORT)?;
        let other = std::thread::spawn({
            let sock = sock.to_string();
            move || roundtrip(&sock, 8 << 20, 3)
        });
        // The echo comes back unread, so the guest soon stops reading: a full write would block
        // for ever. Write what fits in a couple of seconds, then vanish.
        victim.set_write_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
        let _ = victim.write_all(&pattern(1 << 20, 9));
        drop(victim);
        drop(_r);
        other.join().map_err(|_| "panicked")??;
        roundtrip(sock, 1 << 20, 4)?;
        Ok(String::new())
    })();
    report(&mut failed, "h2g-kill-mid-stream", killed);

    // Closing our end is seen by the guest (its echo shuts down in turn, which we see).
    let close = (|| -> Result<String, String> {
        let (s, mut r) = connect(sock, ECHO_PORT)?;
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).map_err(|e| format!("read: {e}"))?;
        if rest.is_empty() {
            Ok(String::new())
        } else {
            Err(format!("{} unexpected bytes", rest.len()))
        }
    })();
    report(&mut failed, "h2g-close-both-ends", close);

    match connect(sock, CONTROL_PORT) {
        Ok((mut s, _)) => {
            let _ = s.write_all(b"poweroff\n");
            let _ = s.shutdown(Shutdown::Write);
        }
        Err(e) => report(&mut failed, "poweroff", Err(e)),
    }
    !failed
}

/// Accepts one connection on `path`, reads it to EOF, answers `done <bytes>`.
fn sink(path: &str) -> bool {
    let _ = std::fs::remove_file(path);
    let Ok(l) = UnixListener::bind(path) else { return false };
    let Ok((mut s, _)) = l.accept() else { return false };
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n;
    }
    let _ = s.write_all(format!("done {total}\n").as_bytes());
    true
}

/// Host-native baselines for the device benchmarks, printed as `HOST-BENCH <name> <value> <unit>`.
fn bench_native(dir: &str) -> bool {
    // Unix socket pair throughput, the baseline for vsock.
    let (mut a, mut b) = match UnixStream::pair() {
        Ok(p) => p,
        Err(_) => return false,
    };
    let bytes = 256usize << 20;
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0;
        while sent < bytes {
            if a.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    while total < bytes {
        match b.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    let _ = writer.join();
    println!("HOST-BENCH uds_pair {:.2} MB/s", total as f64 / 1e6 / start.elapsed().as_secs_f64());
    // Sequential read of the same file the guest reads.
    let start = Instant::now();
    let mut total = 0usize;
    if let Ok(mut f) = std::fs::File::open(format!("{dir}/big")) {
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
    }
    println!("HOST-BENCH fs_seq_read {:.2} MB/s", total as f64 / 1e6 / start.elapsed().as_secs_f64());
    // create + stat + unlink, 10k times.
    let meta = format!("{dir}/meta-host");
    let _ = std::fs::create_dir_all(&meta);
    let start = Instant::now();
    for i in 0..10_000 {
        let p = format!("{meta}/f{i}");
        if std::fs::File::create(&p)
            .and_then(|_| std::fs::metadata(&p))
            .and_then(|_| std::fs::remove_file(&p))
            .is_err()
        {
            return false;
        }
    }
    println!("HOST-BENCH fs_metadata {:.2} ops/s", 10_000.0 / start.elapsed().as_secs_f64());
    true
}

/// Prints an extended attribute's value (busybox has no getfattr; the virtio-fs test needs it).
fn getxattr(path: &str, name: &str) -> bool {
    let (Ok(p), Ok(n)) = (std::ffi::CString::new(path), std::ffi::CString::new(name)) else { return false };
    let mut buf = [0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of the given size.
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        eprintln!("getxattr {path} {name}: {}", std::io::Error::last_os_error());
        return false;
    }
    println!("{}", String::from_utf8_lossy(&buf[..rc as usize]));
    true
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ok = match args.get(1..).unwrap_or_default() {
        [cmd, path] if cmd == "serve-echo" => serve_echo(path).map_err(|e| eprintln!("{e}")).is_ok(),
        [cmd, sock] if cmd == "host-checks" => host_checks(sock),
        [cmd, path, name] if cmd == "getxattr" => getxattr(path, name),
        [cmd, path] if cmd == "sink" => sink(path),
        [cmd, dir] if cmd == "bench-native" => bench_native(dir),
        _ => {
            eprintln!("usage: husk-vsock-probe serve-echo PATH | host-checks SOCKET | getxattr PATH NAME | sink PATH | bench-native DIR");
            false
        }
    };
    std::process::exit(if ok { 0 } else { 1 });
}
