//! virtio-vsock (spec 5.10) with a hybrid host side: streams end on Unix sockets, so the host
//! needs no vhost-vsock module and every VM has its own socket namespace (see [`muxer`]).

pub mod ctrl;
pub mod deadline;
pub mod muxer;
pub mod packet;

use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::{check_queue_count, read_config_bytes, Worker};
use super::{ActivateContext, ActivateError, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1};
use crate::confine::ThreadKind;
use muxer::Muxer;

pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const TOKEN_RXQ: u64 = 0;
const TOKEN_TXQ: u64 = 1;
const TOKEN_EVQ: u64 = 2;
const TOKEN_KILL: u64 = 3;
const TOKEN_MUXER: u64 = 4;

/// Guest CIDs 0-2 are reserved (hypervisor, local, host).
pub const MIN_GUEST_CID: u64 = 3;

#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    config: [u8; 8],
    worker: Worker,
    /// Open streams plus control packets waiting for the guest, as the worker last saw them.
    busy: Arc<AtomicUsize>,
}

impl Vsock {
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Self {
        Self {
            guest_cid,
            uds_path,
            config: guest_cid.to_le_bytes(),
            worker: Worker::new("virtio-vsock", ThreadKind::VirtioVsock),
            busy: Arc::new(AtomicUsize::new(0)),
        }
    }
}

fn run_worker(mut ctx: ActivateContext, mut muxer: Muxer, busy: &AtomicUsize, kill: EventFd) {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => return tracing::error!("vsock: epoll: {e}"),
    };
    let fds = [
        (ctx.queue_evts[RXQ].as_raw_fd(), TOKEN_RXQ),
        (ctx.queue_evts[TXQ].as_raw_fd(), TOKEN_TXQ),
        (ctx.queue_evts[EVQ].as_raw_fd(), TOKEN_EVQ),
        (kill.as_raw_fd(), TOKEN_KILL),
        (muxer.epoll().as_raw_fd(), TOKEN_MUXER),
    ];
    for (fd, token) in fds {
        if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)) {
            return tracing::error!("vsock: epoll_ctl: {e}");
        }
    }
    let mut events = [EpollEvent::default(); 8];
    let mut again = false;
    loop {
        // Straight round again when TX can resume (see below), after a look at the events.
        let n = match epoll.wait(if again { 0 } else { -1 }, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return tracing::error!("vsock: epoll_wait: {e}"),
        };
        let mut used = false;
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_KILL => return,
                TOKEN_MUXER => muxer.handle_events(),
                t @ (TOKEN_RXQ | TOKEN_TXQ | TOKEN_EVQ) => {
                    let _ = ctx.queue_evts[t as usize].read();
                }
                _ => {}
            }
        }
        // TX first: guest packets can free credit or queue replies that RX then delivers.
        used |= muxer.process_tx(&mut ctx.queues[TXQ], &ctx.mem);
        used |= muxer.process_rx(&mut ctx.queues[RXQ], &ctx.mem);
        if used {
            let notify = ctx.queues[RXQ].needs_notification(&ctx.mem).unwrap_or(true)
                | ctx.queues[TXQ].needs_notification(&ctx.mem).unwrap_or(true);
            if notify {
                ctx.interrupt.signal_used_queue();
            }
        }
        // TX waits in its ring while control replies wait for RX buffers. When RX delivery has
        // made room, nothing else would wake us for it: the guest notified TX long ago.
        again = muxer.tx_resumable();
        busy.store(muxer.connection_count() + muxer.pending_ctrl(), Ordering::Release);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        check_queue_count(&ctx, QUEUE_SIZES.len())?;
        self.reset();
        let (cid, path, busy) = (self.guest_cid, self.uds_path.clone(), self.busy.clone());
        // The socket is bound on the worker: the vCPU thread that activates us may not.
        self.worker.start(move |kill| {
            match Muxer::new(cid, &path) {
                Ok(muxer) => run_worker(ctx, muxer, &busy, kill),
                Err(e) => tracing::error!("virtio-vsock: {e}; the device stays idle"),
            }
            // The muxer is gone, and every stream with it.
            busy.store(0, Ordering::Release);
        })
    }

    fn start_threads(&mut self) -> Result<(), ActivateError> {
        self.worker.start_thread()
    }

    fn reset(&mut self) {
        // Stopping the worker drops the muxer: host streams close and the socket file goes.
        self.worker.stop();
    }

    fn snapshot_ready(&self) -> Result<(), String> {
        // A restored VM gets a fresh muxer on its own socket: no stream could come along.
        match self.busy.load(Ordering::Acquire) {
            0 => Ok(()),
            n => Err(format!("virtio-vsock has {n} open connections or pending control packets")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_refused_while_streams_are_open() {
        let v = Vsock::new(3, PathBuf::from("/nonexistent/vsock"));
        assert_eq!(v.snapshot_ready(), Ok(()));
        v.busy.store(2, Ordering::Release);
        assert!(v.snapshot_ready().unwrap_err().contains("2 open connections"));
    }
}
