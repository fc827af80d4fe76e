//! The guest half of the device benchmarks: vsock guest→host throughput, virtio-fs sequential
//! read and a metadata loop. Prints `GUEST-BENCH <name> <value> <unit>`; the host half measures
//! the same operations natively in the same run (see tests/examples/bench_devices.rs).

use std::fs;
use std::io::{Read, Write};
use std::time::Instant;

use crate::vsock_checks;

const SINK_PORT: u32 = 5001;
const VSOCK_BYTES: usize = 256 << 20;
const META_OPS: usize = 10_000;

fn vsock_g2h() -> Result<f64, String> {
    let mut s = vsock_checks::connect(2, SINK_PORT).map_err(|e| format!("connect: {e}"))?;
    let chunk = vec![0x5au8; 64 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < VSOCK_BYTES {
        s.write_all(&chunk).map_err(|e| format!("write: {e}"))?;
        sent += chunk.len();
    }
    // SAFETY: shutdown(2) takes no pointers; `s` keeps the socket's fd open for the call.
    unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&s), libc::SHUT_WR) };
    // The host acknowledges once it has read everything.
    let mut ack = String::new();
    s.read_to_string(&mut ack).map_err(|e| format!("ack: {e}"))?;
    if !ack.starts_with("done") {
        return Err(format!("bad ack {ack:?}"));
    }
    Ok(sent as f64 / 1e6 / start.elapsed().as_secs_f64())
}

fn seq_read(path: &str) -> Result<f64, String> {
    let mut f = fs::File::open(path).map_err(|e| format!("open: {e}"))?;
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut total = 0usize;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(total as f64 / 1e6 / start.elapsed().as_secs_f64())
}

fn metadata_loop(dir: &str) -> Result<f64, String> {
    fs::create_dir_all(dir).map_err(|e| format!("mkdir: {e}"))?;
    let start = Instant::now();
    for i in 0..META_OPS {
        let p = format!("{dir}/f{i}");
        fs::File::create(&p).map_err(|e| format!("create: {e}"))?;
        fs::metadata(&p).map_err(|e| format!("stat: {e}"))?;
        fs::remove_file(&p).map_err(|e| format!("unlink: {e}"))?;
    }
    Ok(META_OPS as f64 / start.elapsed().as_secs_f64())
}

fn print(name: &str, unit: &str, r: Result<f64, String>) {
    match r {
        Ok(v) => println!("GUEST-BENCH {name} {v:.2} {unit}"),
        Err(e) => println!("GUEST-BENCH {name} FAIL {e}"),
    }
}

pub fn run() {
    print("vsock_g2h", "MB/s", vsock_g2h());
    if let Err(e) = crate::fs_checks::mount_virtiofs("bench", "/mnt/bench") {
        return println!("GUEST-BENCH mount FAIL {e}");
    }
    print("fs_seq_read", "MB/s", seq_read("/mnt/bench/big"));
    print("fs_metadata", "ops/s", metadata_loop("/mnt/bench/meta-guest"));
    println!("GUEST-BENCH-DONE");
}
