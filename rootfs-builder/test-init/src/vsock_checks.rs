//! The guest half of the vsock end-to-end test.
//!
//! Serves an echo on port 52 (for host-initiated streams), runs guest-initiated checks against
//! the host's echo listener on port 5000, and powers off when told so on control port 99.
//! Results are printed as `GUEST-CHECK <name> ok|FAIL <detail>` lines.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};

pub const ECHO_PORT: u32 = 52;
pub const CONTROL_PORT: u32 = 99;
pub const HOST_ECHO_PORT: u32 = 5000;
pub const HOST_NOBODY_PORT: u32 = 5999;
const HOST_CID: u32 = 2;

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; zero is a valid start.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn socket() -> io::Result<File> {
    // SAFETY: socket(2) takes no pointers; the fd it returns is checked, then owned by a File.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn connect(cid: u32, port: u32) -> io::Result<File> {
    let s = socket()?;
    let a = sockaddr(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `a` is a valid sockaddr_vm of `len` bytes.
    check(unsafe { libc::connect(s.as_raw_fd(), (&a as *const libc::sockaddr_vm).cast(), len) })?;
    Ok(s)
}

pub fn listen(port: u32) -> io::Result<File> {
    let s = socket()?;
    let a = sockaddr(libc::VMADDR_CID_ANY, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `a` is a valid sockaddr_vm of `len` bytes that outlives the call; bind only reads it.
    check(unsafe { libc::bind(s.as_raw_fd(), (&a as *const libc::sockaddr_vm).cast(), len) })?;
    // SAFETY: listen(2) takes no pointers and acts only on the socket `s` owns.
    check(unsafe { libc::listen(s.as_raw_fd(), 128) })?;
    Ok(s)
}

pub fn accept(l: &File) -> io::Result<File> {
    // SAFETY: accept4 with null address pointers is allowed.
    let fd = unsafe {
        libc::accept4(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn shutdown_write(f: &File) {
    // SAFETY: shutdown(2) takes no pointers; `f` keeps the socket's fd open for the call.
    unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
}

fn echo(mut s: File) {
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
    // Our peer closed its side: close ours so it sees EOF too.
    shutdown_write(&s);
}

fn serve(port: u32) -> io::Result<()> {
    let l = listen(port)?;
    std::thread::spawn(move || loop {
        match accept(&l) {
            Ok(s) => {
                std::thread::spawn(move || echo(s));
            }
            Err(e) => {
                println!("GUEST-CHECK accept FAIL {e}");
                return;
            }
        }
    });
    Ok(())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Sends `len` bytes to the host echo and checks they come back unchanged.
fn echo_roundtrip(len: usize, seed: u8) -> Result<(), String> {
    let s = connect(HOST_CID, HOST_ECHO_PORT).map_err(|e| format!("connect: {e}"))?;
    let data = pattern(len, seed);
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        let r = w.write_all(&sent);
        shutdown_write(&w);
        r
    });
    let mut back = Vec::with_capacity(len);
    let mut r = s;
    r.read_to_end(&mut back).map_err(|e| format!("read: {e}"))?;
    writer.join().map_err(|_| "writer panicked".to_string())?.map_err(|e| format!("write: {e}"))?;
    if back != data {
        return Err(format!("echo mismatch: sent {} got {}", data.len(), back.len()));
    }
    Ok(())
}

fn report(name: &str, r: Result<(), String>) {
    match r {
        Ok(()) => println!("GUEST-CHECK {name} ok"),
        Err(e) => println!("GUEST-CHECK {name} FAIL {e}"),
    }
}

pub fn run() {
    let control = match (serve(ECHO_PORT), listen(CONTROL_PORT)) {
        (Ok(()), Ok(c)) => c,
        (a, b) => {
            println!("GUEST-CHECK listen FAIL {:?} {:?}", a.err(), b.err());
            return;
        }
    };
    println!("GUEST-VSOCK-LISTENING");
    report("g2h-echo-4MiB", echo_roundtrip(4 << 20, 1));
    let threads: Vec<_> =
        (0..32u8).map(|i| std::thread::spawn(move || echo_roundtrip(64 * 1024, i))).collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap_or(Err("panicked".into()))).collect();
    let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    report("g2h-32-concurrent", if failed.is_empty() { Ok(()) } else { Err(failed.join("; ")) });
    report(
        "g2h-refused",
        match connect(HOST_CID, HOST_NOBODY_PORT) {
            Ok(_) => Err("connected to a port with no listener".into()),
            Err(e)
                if e.raw_os_error() == Some(libc::ECONNRESET)
                    || e.raw_os_error() == Some(libc::ECONNREFUSED) =>
            {
                Ok(())
            }
            Err(e) => Err(format!("unexpected error {e}")),
        },
    );
    println!("GUEST-VSOCK-CHECKS-DONE");
    // Wait for the host to finish its checks and say so.
    loop {
        let Ok(mut c) = accept(&control) else { return };
        let mut line = String::new();
        let _ = c.read_to_string(&mut line);
        if line.trim() == "poweroff" {
            return;
        }
    }
}
