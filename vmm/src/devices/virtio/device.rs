//! What a virtio device implements; the transport owns registers, queues and status.

use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::VirtioInterrupt;
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
    /// Stops any worker and drops the queues; the transport then resets its own state.
    fn reset(&mut self);
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

/// A device's queue-serving thread and the eventfd that tells it to stop. Dropping it stops
/// and joins the thread, so a reset or a VMM exit never leaves a worker touching guest memory.
#[derive(Debug)]
pub struct Worker {
    kill: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Runs `run` on a thread named `name`; `run` gets its copy of the kill eventfd and must
    /// return soon after it becomes readable.
    pub fn spawn(name: &str, run: impl FnOnce(EventFd) + Send + 'static) -> Result<Self, ActivateError> {
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let worker_kill = kill.try_clone().map_err(ActivateError::Worker)?;
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(worker_kill))
            .map_err(ActivateError::Worker)?;
        Ok(Self { kill, handle: Some(handle) })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.kill.write(1);
            let _ = handle.join();
        }
    }
}
