//! `husk-vmm-ctl SOCKET COMMAND`: sends one command to a husk-vmm control socket (see
//! `husk_vmm::snapshot::control`) and prints the answer; exits 0 on `ok`, 1 otherwise.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, command] = args.as_slice() else {
        eprintln!("usage: husk-vmm-ctl SOCKET snapshot|ping");
        return ExitCode::from(2);
    };
    let answer = (|| -> std::io::Result<String> {
        let mut s = UnixStream::connect(socket)?;
        // A snapshot of a large VM on a slow disk takes a while; never hang forever.
        s.set_read_timeout(Some(Duration::from_secs(300)))?;
        s.write_all(format!("{command}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim_end().to_string())
    })();
    match answer {
        Ok(a) if a == "ok" => {
            println!("{a}");
            ExitCode::SUCCESS
        }
        Ok(a) => {
            eprintln!("husk-vmm-ctl: {}", if a.is_empty() { "no answer" } else { &a });
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("husk-vmm-ctl: {socket}: {e}");
            ExitCode::from(1)
        }
    }
}
