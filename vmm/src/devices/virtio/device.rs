//! What a virtio device implements; the transport owns registers, queues and status.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::VirtioInterrupt;
use crate::confine::ThreadKind;
use crate::memory::GuestMem;

/// Everything a device needs to run once the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct ActivateContext {
    pub mem: GuestMem,
    /// The ready queues, in queue-index order (validated against guest memory).
    pub queues: Vec<Queue>,
    /// One ioeventfd per queue, signalled by KVM when the driver notifies that queue.
    pub queue_evts: Vec<EventFd>,
    pub interrupt: Arc<VirtioInterrupt>,
    pub acked_features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device needs {needed} queues, driver made {ready} ready")]
    QueueCount { needed: usize, ready: usize },
    #[error("cannot start device worker: {0}")]
    Worker(std::io::Error),
    #[error("{0}")]
    Device(String),
}

pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    fn avail_features(&self) -> u64;
    /// Device-specific configuration space, read at `offset`. Out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Most device configs are read-only; the default ignores writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Starts the device's worker thread ahead of the guest (see [`Worker`]).
    fn start_threads(&mut self) -> Result<(), ActivateError> {
        Ok(())
    }
    /// Stops any worker and drops the queues; the transport then resets its own state.
    fn reset(&mut self);
    /// Whether a snapshot may be taken now. The transport saves the queues; a device with
    /// state of its own outside guest memory (connections, a FUSE session) refuses while it
    /// holds any, since a restored VM could not have it back.
    fn snapshot_ready(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Copies `config[offset..]` into `data`, zero-filling whatever lies outside.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Checks that the driver made ready exactly the queues the device has.
pub fn check_queue_count(ctx: &ActivateContext, needed: usize) -> Result<(), ActivateError> {
    if ctx.queues.len() != needed || ctx.queue_evts.len() != needed {
        return Err(ActivateError::QueueCount { needed, ready: ctx.queues.len() });
    }
    Ok(())
}

type Job = Box<dyn FnOnce(EventFd) + Send>;

/// A device's queue-serving thread. It is started (and confines itself) before the guest runs,
/// because the vCPU thread that activates a device may not start threads under its seccomp
/// filter; each activation hands it a job, and a reset stops that job through the kill
/// eventfd. Dropping it stops and joins the thread, so a reset or a VMM exit never leaves a
/// worker touching guest memory.
#[derive(Debug)]
pub struct Worker {
    name: &'static str,
    kind: ThreadKind,
    thread: Option<WorkerThread>,
    running: bool,
}

#[derive(Debug)]
struct WorkerThread {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<()>,
    kill: EventFd,
    handle: JoinHandle<()>,
}

impl Worker {
    pub fn new(name: &'static str, kind: ThreadKind) -> Self {
        Self { name, kind, thread: None, running: false }
    }

    /// Starts the thread, confined as its kind, and returns once it is. Idempotent.
    pub fn start_thread(&mut self) -> Result<(), ActivateError> {
        if self.thread.is_some() {
            return Ok(());
        }
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let worker_kill = kill.try_clone().map_err(ActivateError::Worker)?;
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let kind = self.kind;
        let handle = std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || {
                let confined = prepare_thread(kind).and_then(|()| {
                    crate::confine::confine_thread(kind).map_err(|e| std::io::Error::other(e.to_string()))
                });
                let ok = confined.is_ok();
                let _ = ready_tx.send(confined);
                if !ok {
                    return;
                }
                while let Ok(job) = job_rx.recv() {
                    // A stop that came after the previous job had ended on its own.
                    let _ = worker_kill.read();
                    match worker_kill.try_clone() {
                        Ok(k) => job(k),
                        Err(e) => tracing::error!("device worker: {e}"),
                    }
                    let _ = done_tx.send(());
                }
            })
            .map_err(ActivateError::Worker)?;
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(ActivateError::Worker(e));
            }
            Err(_) => {
                let _ = handle.join();
                return Err(ActivateError::Worker(std::io::Error::other("worker thread died starting")));
            }
        }
        self.thread = Some(WorkerThread { jobs, done, kill, handle });
        Ok(())
    }

    /// Runs `run` on the worker thread (started now if it was not, which only tests rely on);
    /// `run` gets a copy of the kill eventfd and must return soon after it becomes readable.
    pub fn start(&mut self, run: impl FnOnce(EventFd) + Send + 'static) -> Result<(), ActivateError> {
        self.stop();
        self.start_thread()?;
        let t =
            self.thread.as_ref().ok_or_else(|| ActivateError::Worker(std::io::Error::other("no worker")))?;
        t.jobs
            .send(Box::new(run))
            .map_err(|_| ActivateError::Worker(std::io::Error::other("worker thread is gone")))?;
        self.running = true;
        Ok(())
    }

    /// Runs `f` on the worker thread after stopping any job, and waits for it: work that needs
    /// the worker's syscalls, capabilities or umask but is asked for on another thread (a
    /// reset from a vCPU, teardown from the main thread).
    pub fn run_and_wait(&mut self, f: impl FnOnce() + Send + 'static) -> Result<(), ActivateError> {
        self.start(move |_kill| f())?;
        self.running = false;
        if let Some(t) = &self.thread {
            let _ = t.done.recv();
        }
        Ok(())
    }

    /// Stops the running job, if any, and waits until it has returned.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        if let Some(t) = &self.thread {
            let _ = t.kill.write(1);
            let _ = t.done.recv();
        }
    }

    /// Whether a job is running (it may have ended on its own).
    pub fn is_running(&self) -> bool {
        self.running
    }
}

/// Per-kind set-up a thread does for itself before it is confined.
fn prepare_thread(kind: ThreadKind) -> std::io::Result<()> {
    match kind {
        ThreadKind::VirtioFs => super::fs::prepare_server_thread(),
        _ => Ok(()),
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            drop(t.jobs);
            let _ = t.handle.join();
        }
    }
}
