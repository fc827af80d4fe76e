//! The rule that a process does not outlive what stands for it on the host: the host holds a
//! lifeline stream for each process (its relay does), and when that stream closes while the
//! process still runs, however the holder died (SIGKILL from a shim's ExecSync timeout, say),
//! the process is killed.

use std::os::fd::OwnedFd;

use crate::error::AgentError;
use crate::fdio;
use crate::reaper::{self, ExitWatch};

/// Watches `stream` until the process behind `exit` ends; if the stream closes first, calls
/// `kill` once. Data on the stream is ignored.
pub fn watch<F>(stream: OwnedFd, exit: ExitWatch, kill: F) -> Result<(), AgentError>
where
    F: FnOnce() + Send + 'static,
{
    fdio::set_nonblocking(&stream).map_err(AgentError::io("lifeline stream"))?;
    let stream = fdio::register(stream).map_err(AgentError::io("lifeline stream"))?;
    tokio::spawn(async move {
        let closed = async {
            let mut buf = [0u8; 64];
            while let Ok(1..) = fdio::read_some(&stream, &mut buf).await {}
        };
        tokio::select! {
            biased;
            _ = reaper::wait(exit.clone()) => {}
            _ = closed => {
                // Exited meanwhile: nothing to kill (and its PID may be reused).
                if exit.borrow().is_none() {
                    tracing::info!("lifeline closed; killing the process it stood for");
                    kill();
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn holder_death_kills_a_running_process() {
        let (host, agent) = UnixStream::pair().expect("socketpair");
        let (_tx, rx) = tokio::sync::watch::channel(None);
        let killed = Arc::new(AtomicBool::new(false));
        let k = killed.clone();
        watch(agent.into(), rx, move || k.store(true, Ordering::SeqCst)).expect("watch");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!killed.load(Ordering::SeqCst), "killed while the holder lives");
        drop(host);
        for _ in 0..100 {
            if killed.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the process was not killed after its lifeline closed");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_exited_process_is_left_alone() {
        let (host, agent) = UnixStream::pair().expect("socketpair");
        let (tx, rx) = tokio::sync::watch::channel(None);
        let killed = Arc::new(AtomicBool::new(false));
        let k = killed.clone();
        watch(agent.into(), rx, move || k.store(true, Ordering::SeqCst)).expect("watch");
        tx.send(Some(reaper::ExitStatus { code: 0, signal: 0, core_dumped: false })).expect("send");
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(host);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!killed.load(Ordering::SeqCst), "killed a process that had exited");
    }
}
