//! A process's stdio between containerd's FIFOs and the guest's vsock streams, one blocking
//! copy thread per direction: a slow reader of a FIFO stalls its copy and so the guest's
//! writes (backpressure), and nothing is dropped while the reader is there.

use std::fs::{File, OpenOptions};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use husk_core::relay::{pump, GuestStreams};
use tokio::sync::oneshot;

/// Where containerd wants a process's stdio (empty: not wanted).
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The running copies of one process.
#[derive(Debug)]
pub struct Copies {
    outputs: Vec<oneshot::Receiver<()>>,
    /// Held while the process is known here: closing it tells the agent to kill the process.
    pub lifeline: Option<UnixStream>,
}

fn open_fifo_for_output(path: &str) -> Option<File> {
    match OpenOptions::new().write(true).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("opening {path}: {e}");
            None
        }
    }
}

/// Copies `from` to the FIFO at `path` (or reads it to nothing); signals `done` at the end.
fn output(from: UnixStream, path: String, done: oneshot::Sender<()>) {
    std::thread::spawn(move || {
        // Opening blocks until containerd holds the read side, which it does before Create.
        match (!path.is_empty()).then(|| open_fifo_for_output(&path)).flatten() {
            Some(fifo) => pump(&from, fifo),
            None => pump(&from, std::io::sink()),
        }
        let _ = done.send(());
    });
}

pub fn start(mut guest: GuestStreams, stdio: &Stdio) -> Copies {
    let mut outputs = Vec::new();
    for (stream, path) in [(guest.stdout.take(), &stdio.stdout), (guest.stderr.take(), &stdio.stderr)] {
        if let Some(s) = stream {
            let (tx, rx) = oneshot::channel();
            output(s, path.clone(), tx);
            outputs.push(rx);
        }
    }
    if let Some(gin) = guest.stdin.take() {
        if stdio.stdin.is_empty() {
            // No input: the process reads EOF at once.
            let _ = gin.shutdown(std::net::Shutdown::Write);
        } else {
            let path = stdio.stdin.clone();
            std::thread::spawn(move || {
                // Blocks until containerd (or an attached client) opens the write side.
                match File::open(&path) {
                    Ok(fifo) => {
                        let mut g = &gin;
                        pump(fifo, &mut g);
                    }
                    Err(e) => tracing::warn!("opening {path}: {e}"),
                }
                // EOF after everything sent.
                let _ = gin.shutdown(std::net::Shutdown::Write);
            });
        }
    }
    Copies { outputs, lifeline: guest.lifeline.take() }
}

impl Copies {
    /// Waits until every output stream has ended, at most `grace` (a background child of the
    /// process may hold them open for ever).
    pub async fn drained(&mut self, grace: Duration) -> bool {
        let all = futures_all(std::mem::take(&mut self.outputs));
        tokio::time::timeout(grace, all).await.is_ok()
    }
}

async fn futures_all(rx: Vec<oneshot::Receiver<()>>) {
    for r in rx {
        let _ = r.await;
    }
}
