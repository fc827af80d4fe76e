//! A tap device in the VMM's network namespace: frames with a virtio-net header in front, so
//! checksum and segmentation offloads pass between the guest and the host kernel untouched.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::header::HDR_LEN;

/// Linux interface names are at most 15 bytes (IFNAMSIZ less the NUL).
pub const MAX_NAME_LEN: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?}: 1-15 bytes of letters, digits, '-', '_' or '.'")]
    Name(String),
    #[error("opening /dev/net/tun: {0}")]
    Open(#[source] io::Error),
    #[error("attaching tap {name}: {source}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: {what}: {source}")]
    Setup {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Checks an interface name before it reaches an ioctl.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(TapError::Name(name.into()))
    }
}

#[derive(Debug)]
pub struct Tap {
    fd: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Opens tap `name` (creating it if no such interface exists), non-blocking, with a
    /// 12-byte virtio-net header on every frame.
    pub fn open(name: &str) -> Result<Self, TapError> {
        check_name(name)?;
        let path = c"/dev/net/tun";
        // SAFETY: a NUL-terminated path and plain flags; the result is checked.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(TapError::Open(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor this function just opened and owns.
        let fd = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads (and may update) an ifreq; `req` has its layout (name, then
        // the flags union member) and lives for the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach { name: name.into(), source: io::Error::last_os_error() });
        }
        let tap = Self { fd, name: name.into() };
        let size = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which lives for the call.
        if unsafe { libc::ioctl(tap.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(tap.setup_error("setting the vnet header size"));
        }
        Ok(tap)
    }

    fn setup_error(&self, what: &'static str) -> TapError {
        TapError::Setup { name: self.name.clone(), what, source: io::Error::last_os_error() }
    }

    /// Which offloaded frames the kernel may hand the guest (TUN_F_* bits, from the guest's
    /// GUEST_* features).
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(self.setup_error("setting offloads"));
        }
        Ok(())
    }

    /// Makes the tap outlive this descriptor, so another process can open it by name later
    /// (the runtime makes the taps, husk-vmm opens them).
    pub fn persist(&self) -> Result<(), TapError> {
        // SAFETY: TUNSETPERSIST takes its argument by value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
            return Err(self.setup_error("making it persistent"));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Tap {
    /// Reads one frame; `None` when none waits (the fd is non-blocking).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: reads at most `buf.len()` bytes into `buf`, which is exclusively borrowed.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        }
    }

    /// Writes one frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: writes `frame.len()` bytes from `frame`, which is borrowed for the call.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_ioctl() {
        for bad in ["", "a-name-of-16-byt", "eth0/x", "tap 0", "t\u{e9}p", "a\0b"] {
            assert!(matches!(Tap::open(bad), Err(TapError::Name(_))), "{bad:?}");
        }
        assert!(check_name("tap0").is_ok());
        assert!(check_name("husk-0123456789").is_ok());
    }
}
