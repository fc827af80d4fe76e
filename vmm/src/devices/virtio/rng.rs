//! virtio-rng (spec 5.4): fills the driver's write-only buffers from the host's getrandom(2), so
//! the guest's entropy pool is ready at once instead of waiting on jitter at boot.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::{check_queue_count, read_config_bytes, Worker};
use super::{ActivateContext, ActivateError, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1};
use crate::confine::ThreadKind;
use crate::memory::GuestMem;

pub const QUEUE_SIZE: u16 = 256;
/// Bytes served per request at most, so one huge chain cannot stall the device.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
const TOKEN_QUEUE: u64 = 0;
const TOKEN_KILL: u64 = 1;

#[derive(Debug)]
pub struct Rng {
    worker: Worker,
}

impl Rng {
    pub fn new() -> Self {
        Self { worker: Worker::new("virtio-rng", ThreadKind::VirtioRng) }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

/// Serves every available request; returns how many were completed. Chains with a
/// device-readable descriptor or bad addresses are completed with length 0 (the guest gets no
/// entropy from them) rather than stalling the queue.
pub fn process_queue(queue: &mut Queue, mem: &GuestMem) -> usize {
    let mut completed = 0;
    let mut buf = Vec::new();
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut written: u32 = 0;
        for desc in chain {
            if !desc.is_write_only() {
                tracing::debug!("virtio-rng: device-readable descriptor in request");
                break;
            }
            let n = desc.len().min(MAX_BYTES_PER_REQUEST - written);
            if n == 0 {
                continue;
            }
            buf.resize(n as usize, 0);
            if !fill_random(&mut buf) {
                break;
            }
            if mem.write_slice(&buf, GuestAddress(desc.addr().0)).is_err() {
                tracing::debug!(addr = desc.addr().0, len = n, "virtio-rng: buffer outside guest memory");
                break;
            }
            written += n;
        }
        if let Err(e) = queue.add_used(mem, head, written) {
            tracing::debug!("virtio-rng: add_used: {e}");
            break;
        }
        completed += 1;
    }
    completed
}

fn run_worker(mut ctx: ActivateContext, kill: EventFd) {
    let Some(mut queue) = ctx.queues.pop() else { return };
    let Some(queue_evt) = ctx.queue_evts.pop() else { return };
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => return tracing::error!("virtio-rng: epoll: {e}"),
    };
    for (fd, token) in [(&queue_evt, TOKEN_QUEUE), (&kill, TOKEN_KILL)] {
        if let Err(e) = epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), EpollEvent::new(EventSet::IN, token))
        {
            return tracing::error!("virtio-rng: epoll_ctl: {e}");
        }
    }
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return tracing::error!("virtio-rng: epoll_wait: {e}"),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_KILL => return,
                _ => {
                    let _ = queue_evt.read();
                    if process_queue(&mut queue, &ctx.mem) > 0
                        && queue.needs_notification(&ctx.mem).unwrap_or(true)
                    {
                        ctx.interrupt.signal_used_queue();
                    }
                }
            }
        }
    }
}

use std::os::unix::io::AsRawFd;

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        check_queue_count(&ctx, QUEUE_SIZES.len())?;
        self.reset();
        self.worker.start(move |kill| run_worker(ctx, kill))
    }

    fn start_threads(&mut self) -> Result<(), ActivateError> {
        self.worker.start_thread()
    }

    fn reset(&mut self) {
        self.worker.stop();
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn mem() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    #[test]
    fn fills_write_only_buffers() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [desc(0x10_0000, 64, F_WRITE | F_NEXT, 1), desc(0x20_0000, 32, F_WRITE, 0)];
        vq.build_desc_chain(&descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(process_queue(&mut q, &m), 1);
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), 96);
        let mut got = [0u8; 64];
        m.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_ne!(got, [0u8; 64], "buffer should hold random bytes");
    }

    #[test]
    fn hostile_chains_complete_without_writing() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        // Device-readable descriptor, out-of-memory buffer, zero length, 4 GiB length.
        vq.build_multiple_desc_chains(&[
            desc(0x10_0000, 64, 0, 0),
            desc(0xffff_0000_0000, 64, F_WRITE, 0),
            desc(0x10_0000, 0, F_WRITE, 0),
            desc(0x30_0000, u32::MAX, F_WRITE, 0),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(process_queue(&mut q, &m), 4);
        let lens: Vec<u32> = (0..4).map(|i| vq.used().ring().ref_at(i).unwrap().load().len()).collect();
        // The oversized buffer is served only up to the per-request cap.
        assert_eq!(lens, vec![0, 0, 0, MAX_BYTES_PER_REQUEST]);
    }

    #[test]
    fn request_is_capped() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_desc_chain(&[desc(0x10_0000, 1 << 20, F_WRITE, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(process_queue(&mut q, &m), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), MAX_BYTES_PER_REQUEST);
    }

    #[test]
    fn looping_chain_terminates() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 4);
        // Two descriptors pointing at each other.
        vq.build_desc_chain(&[
            desc(0x10_0000, 8, F_WRITE | F_NEXT, 1),
            desc(0x10_1000, 8, F_WRITE | F_NEXT, 0),
        ])
        .unwrap();
        // build_desc_chain rewrites `next` to chain sequentially; point the last back at 0.
        vq.desc_table().store(1, desc(0x10_1000, 8, F_WRITE | F_NEXT, 0)).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(process_queue(&mut q, &m), 1);
        assert!(vq.used().ring().ref_at(0).unwrap().load().len() <= 32);
    }
}
