//! Makes a sandbox's kernel RNG its own. Sandboxes restored from one snapshot start with the
//! same pool and CRNG state, so CreateSandbox mixes in the host's bytes (credited) and forces a
//! CRNG reseed first: /dev/urandom and getrandom(2) diverge between siblings from that request
//! on, not from the kernel's next scheduled reseed. Fresh virtio-rng bytes are read meanwhile
//! (device round trips, overlapped with the share mounts) and mixed in, with a second reseed,
//! before the request is answered, so no container ever draws from a CRNG without them.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::ioctl::ioctl_num_type;
use thiserror::Error;

use crate::error::AgentError;

/// The most host bytes a request may carry (the kernel's pool hashes whatever it gets; more
/// than this buys nothing).
pub const MAX_HOST_BYTES: usize = 256;
const RANDOM: &str = "/dev/random";
const HWRNG: &str = "/dev/hwrng";
/// virtio-rng bytes to read. More than the 64 the reseed needs: the virtio-rng driver and the
/// hw_random core each buffer up to 64 bytes fetched before the snapshot, the same in every
/// sibling, so the tail of this read is what the device produced after the restore.
const HWRNG_BYTES: usize = 256;
/// How long CreateSandbox waits for /dev/hwrng: virtio-rng answers in microseconds, but a
/// missing backend or a stuck device must not hold up the sandbox.
const HWRNG_WAIT: Duration = Duration::from_millis(200);

/// RNDADDENTROPY = _IOW('R', 0x03, int[2]): the argument is a `struct rand_pool_info`.
const RNDADDENTROPY: ioctl_num_type =
    nix::request_code_write!(b'R', 0x03, std::mem::size_of::<[libc::c_int; 2]>());
/// RNDRESEEDCRNG = _IO('R', 0x07).
const RNDRESEEDCRNG: ioctl_num_type = nix::request_code_none!(b'R', 0x07);

nix::ioctl_write_ptr_bad!(rnd_add_entropy, RNDADDENTROPY, u32);
nix::ioctl_none_bad!(rnd_reseed_crng, RNDRESEEDCRNG);

/// Set while a /dev/hwrng reader thread runs, so a device that never answers costs one thread,
/// not one per request.
static HWRNG_BUSY: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Error)]
pub enum EntropyError {
    #[error("entropy: {0} bytes is more than {MAX_HOST_BYTES}")]
    TooLong(usize),
    #[error("opening {RANDOM}: {0}")]
    Open(#[source] std::io::Error),
    #[error("{what} on {RANDOM}: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: Errno,
    },
}

impl From<EntropyError> for AgentError {
    fn from(e: EntropyError) -> Self {
        match e {
            EntropyError::TooLong(_) => AgentError::InvalidArgument(e.to_string()),
            EntropyError::Open(_) | EntropyError::Ioctl { .. } => AgentError::Io {
                context: "reseeding the kernel RNG".into(),
                source: std::io::Error::other(e),
            },
        }
    }
}

/// The request's limit on host bytes.
pub fn check(host: &[u8]) -> Result<(), EntropyError> {
    if host.len() > MAX_HOST_BYTES {
        return Err(EntropyError::TooLong(host.len()));
    }
    Ok(())
}

/// Mixes `host` (credited) into the kernel's pool and reseeds the CRNG, then starts reading up
/// to [`HWRNG_BYTES`] from /dev/hwrng; [`Reseed::finish`] mixes those in. Needs CAP_SYS_ADMIN;
/// the agent as PID 1 has it.
pub fn reseed(host: &[u8]) -> Result<Reseed, EntropyError> {
    check(host)?;
    let random = std::fs::OpenOptions::new().write(true).open(RANDOM).map_err(EntropyError::Open)?;
    mix(&random, host, &[])?;
    Ok(Reseed { random, hwrng: start_hwrng(), host_bytes: host.len() })
}

/// A reseed whose virtio-rng bytes are still being read.
pub struct Reseed {
    random: File,
    hwrng: Option<tokio::sync::oneshot::Receiver<std::io::Result<Vec<u8>>>>,
    host_bytes: usize,
}

impl Reseed {
    /// Waits for the virtio-rng bytes (at most [`HWRNG_WAIT`]), mixes them in (not credited:
    /// the driver's buffered bytes may be shared with siblings) and reseeds the CRNG again.
    pub async fn finish(self) -> Result<(), EntropyError> {
        let hw = match self.hwrng {
            Some(rx) => hwrng_bytes(rx).await,
            None => Vec::new(),
        };
        if !hw.is_empty() {
            mix(&self.random, &[], &hw)?;
        }
        tracing::debug!("kernel RNG reseeded ({} host bytes, {} hwrng bytes)", self.host_bytes, hw.len());
        Ok(())
    }
}

/// The two ioctls on an open /dev/random. A kernel without them (ENOTTY, EINVAL) is logged and
/// let through; so is a CRNG not yet ready to reseed (ENODATA), which the credit then seeds.
fn mix(random: &File, host: &[u8], hw: &[u8]) -> Result<(), EntropyError> {
    let mut data = Vec::with_capacity(host.len() + hw.len());
    data.extend_from_slice(host);
    data.extend_from_slice(hw);
    if !data.is_empty() {
        // `check` bounds the host part to 256 bytes (2048 bits): the credit fits in an int.
        let info = pool_info((host.len().min(MAX_HOST_BYTES) * 8) as i32, &data);
        // SAFETY: `info` is a `struct rand_pool_info` (two ints, then `buf_size` bytes; see
        // `pool_info`), u32-aligned and alive for the call; the kernel only reads from it.
        let r = unsafe { rnd_add_entropy(random.as_raw_fd(), info.as_ptr()) };
        tolerate("RNDADDENTROPY", r.map(drop), &[Errno::ENOTTY, Errno::EINVAL])?;
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let r = unsafe { rnd_reseed_crng(random.as_raw_fd()) };
    tolerate("RNDRESEEDCRNG", r.map(drop), &[Errno::ENOTTY, Errno::EINVAL, Errno::ENODATA])
}

fn tolerate(what: &'static str, r: nix::Result<()>, ok: &[Errno]) -> Result<(), EntropyError> {
    match r {
        Err(e) if ok.contains(&e) => {
            tracing::warn!("{what} on {RANDOM}: {e} (left out)");
            Ok(())
        }
        r => r.map_err(|source| EntropyError::Ioctl { what, source }),
    }
}

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }` with `data` as its
/// bytes (the kernel reads `buf_size` bytes from `buf`; the last word is zero-padded).
fn pool_info(credit_bits: i32, data: &[u8]) -> Vec<u32> {
    let mut info = Vec::with_capacity(2 + data.len().div_ceil(4));
    info.push(credit_bits as u32);
    info.push(data.len() as u32);
    info.extend(data.chunks(4).map(|c| {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        u32::from_ne_bytes(w)
    }));
    info
}

/// Starts reading up to [`HWRNG_BYTES`] from /dev/hwrng on a thread; None if the device is
/// missing, an earlier read has not returned, or no thread could be started.
fn start_hwrng() -> Option<tokio::sync::oneshot::Receiver<std::io::Result<Vec<u8>>>> {
    if !Path::new(HWRNG).exists() {
        tracing::debug!("{HWRNG}: none (no virtio-rng)");
        return None;
    }
    if HWRNG_BUSY.swap(true, Ordering::SeqCst) {
        tracing::warn!("{HWRNG}: an earlier read has not returned; left out");
        return None;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("hwrng".into()).spawn(move || {
        let r = read_bounded(Path::new(HWRNG), HWRNG_BYTES);
        HWRNG_BUSY.store(false, Ordering::SeqCst);
        let _ = tx.send(r);
    });
    if let Err(e) = spawned {
        HWRNG_BUSY.store(false, Ordering::SeqCst);
        tracing::warn!("{HWRNG}: starting the reader: {e}");
        return None;
    }
    Some(rx)
}

/// The started read's bytes, waited for at most [`HWRNG_WAIT`]; nothing if it failed or is slow.
async fn hwrng_bytes(rx: tokio::sync::oneshot::Receiver<std::io::Result<Vec<u8>>>) -> Vec<u8> {
    match tokio::time::timeout(HWRNG_WAIT, rx).await {
        Ok(Ok(Ok(bytes))) => bytes,
        Ok(Ok(Err(e))) => {
            tracing::warn!("{HWRNG}: {e}");
            Vec::new()
        }
        Ok(Err(_)) => Vec::new(),
        Err(_) => {
            tracing::warn!("{HWRNG}: no answer in {HWRNG_WAIT:?}; left out");
            Vec::new()
        }
    }
}

/// Reads until `max` bytes, end of file or an error (what was read by then is kept).
fn read_bounded(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; max];
    let mut got = 0;
    while got < max {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if got == 0 => return Err(e),
            Err(_) => break,
        }
    }
    buf.truncate(got);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bytes_are_bounded() {
        assert!(check(&[]).is_ok());
        assert!(check(&[7; MAX_HOST_BYTES]).is_ok());
        let e = check(&[7; MAX_HOST_BYTES + 1]).unwrap_err();
        assert!(matches!(e, EntropyError::TooLong(257)));
        assert!(matches!(AgentError::from(e), AgentError::InvalidArgument(_)));
    }

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        // <linux/random.h> on x86 and arm64.
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }

    #[test]
    fn pool_info_is_rand_pool_info() {
        let data: Vec<u8> = (1..=10).collect();
        let info = pool_info(32, &data);
        assert_eq!(info.len(), 2 + 3, "two ints, then 10 bytes in 3 words");
        let bytes: Vec<u8> = info.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(i32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 32, "entropy_count");
        assert_eq!(i32::from_ne_bytes(bytes[4..8].try_into().unwrap()), 10, "buf_size");
        assert_eq!(&bytes[8..18], &data[..], "buf at offset 8");
        assert_eq!(&bytes[18..], &[0, 0], "padding");
        assert_eq!(pool_info(0, &[]), vec![0, 0]);
        assert_eq!(std::mem::align_of::<u32>(), std::mem::align_of::<libc::c_int>());
    }

    #[test]
    fn a_file_without_the_ioctls_is_tolerated() {
        // /dev/null answers both ioctls with ENOTTY, as a kernel without them would.
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap();
        assert!(mix(&null, &[1; 32], &[2; 64]).is_ok());
        assert!(mix(&null, &[], &[]).is_ok());
    }

    #[test]
    fn other_errors_are_returned() {
        let r = tolerate("X", Err(Errno::EPERM), &[Errno::ENOTTY]);
        assert!(matches!(r, Err(EntropyError::Ioctl { what: "X", source: Errno::EPERM })));
        assert!(tolerate("X", Err(Errno::ENOTTY), &[Errno::ENOTTY]).is_ok());
    }

    #[test]
    fn reads_are_bounded() {
        let got = read_bounded(Path::new("/dev/zero"), 100).unwrap();
        assert_eq!(got, vec![0; 100]);
        assert!(read_bounded(Path::new("/nonexistent/hwrng"), 10).is_err());
    }
}
