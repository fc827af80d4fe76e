//! A static TCP server for network tests: `husk-tcp-hello PORT TEXT` binds 0.0.0.0:PORT,
//! prints `tcp-hello ready`, and answers every HTTP request with a 200 whose body is TEXT, one
//! thread per connection.
//!
//! Used where many connections arrive at once: busybox httpd listens with a backlog of 9 and
//! forks per connection, so a burst in a slow nested guest waits on SYN retransmits (1, 3, 7,
//! 15 s) and measures httpd rather than the network path.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (port, text) = match args.as_slice() {
        [p, t] => match p.parse::<u16>() {
            Ok(p) => (p, format!("{t}\n")),
            Err(_) => usage(),
        },
        _ => usage(),
    };
    // std listens with the kernel's largest backlog (somaxconn).
    let l = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("husk-tcp-hello: binding 0.0.0.0:{port}: {e}");
            std::process::exit(1);
        }
    };
    println!("tcp-hello ready");
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        let text = text.clone();
        std::thread::spawn(move || {
            // A client that went away is its own check's failure.
            let _ = answer(c, text.as_bytes());
        });
    }
}

fn usage() -> ! {
    eprintln!("usage: husk-tcp-hello PORT TEXT");
    std::process::exit(2);
}

fn answer(mut c: TcpStream, body: &[u8]) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    // Only the end of the header matters; read up to it (or 8 KiB).
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    c.write_all(
        format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).as_bytes(),
    )?;
    c.write_all(body)
}
