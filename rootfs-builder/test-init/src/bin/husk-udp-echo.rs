//! A static UDP echo server for network tests (Debian's busybox-static has no `nc -u` and no
//! `udpsvd`): `husk-udp-echo PORT` binds 0.0.0.0:PORT, prints `udp-echo ready`, and sends every
//! datagram back to where it came from.

use std::net::UdpSocket;

fn main() {
    let port: u16 = match std::env::args().nth(1).map(|p| p.parse()) {
        Some(Ok(p)) => p,
        _ => {
            eprintln!("usage: husk-udp-echo PORT");
            std::process::exit(2);
        }
    };
    let sock = match UdpSocket::bind(("0.0.0.0", port)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("husk-udp-echo: binding 0.0.0.0:{port}: {e}");
            std::process::exit(1);
        }
    };
    println!("udp-echo ready");
    // Up to the largest UDP payload, so no datagram is truncated on its way back.
    let mut buf = vec![0u8; 65536];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                // A lost echo is the sender's to notice (it retries or reports).
                let _ = sock.send_to(&buf[..n], from);
            }
            Err(e) => eprintln!("husk-udp-echo: {e}"),
        }
    }
}
