//! What the agent does first when it is the guest's PID 1: leave the initramfs root, mount the
//! kernel file systems, enable cgroup controllers; and how the VM is powered off at the end.

use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::error::AgentError;

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(target).map_err(AgentError::io(format!("mkdir {target}")))?;
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(AgentError::errno(format!("mounting {fstype} on {target}")))
}

/// The kernel starts init on rootfs (the initramfs), where pivot_root(2) is refused; container
/// setup needs it. So init moves onto a tmpfs root first, as switch_root does: mount a tmpfs,
/// move it over /, chroot into it. The agent binary is already in memory; nothing else of the
/// initramfs is needed.
fn leave_initramfs() -> Result<(), AgentError> {
    let new_root = "/newroot";
    mount_fs("root", new_root, "tmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    nix::unistd::chdir(new_root).map_err(AgentError::errno("chdir /newroot"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(AgentError::errno("moving the new root"))?;
    nix::unistd::chroot(".").map_err(AgentError::errno("chroot"))?;
    nix::unistd::chdir("/").map_err(AgentError::errno("chdir /"))?;
    Ok(())
}

pub fn setup_guest() -> Result<(), AgentError> {
    leave_initramfs()?;
    let nosuid_noexec_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_fs("proc", "/proc", "proc", nosuid_noexec_nodev, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid_noexec_nodev, None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_fs("shm", "/dev/shm", "tmpfs", nosuid_noexec_nodev, Some("mode=1777"))?;
    mount_fs("run", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    mount_fs("tmp", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))?;
    // favordynmods (Linux 6.0+): moving a task into a cgroup (every container's init, every
    // exec) then skips an RCU grace period, at a small cost to fork and exit. An older kernel
    // refuses the option; it mounts without.
    if let Err(e) =
        mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_noexec_nodev, Some("nsdelegate,favordynmods"))
    {
        tracing::debug!("{e}; mounting cgroup2 without favordynmods");
        mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_noexec_nodev, Some("nsdelegate"))?;
    }
    crate::cgroup::enable_controllers()?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if !Path::new(link).exists() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    // /dev/ptmx from devtmpfs points at the initial devpts instance; use ours.
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    Ok(())
}

/// Mounts virtio-fs share `tag` at `target`. `nodev`: device nodes come from the spec only.
/// Not `nosuid`: a setuid binary in an image must elevate where the spec allows privilege gain,
/// as under runc; `noNewPrivileges` (and mounts the spec marks `nosuid`) stop it where not.
pub fn mount_share(tag: &str, target: &Path, read_only: bool) -> Result<(), AgentError> {
    std::fs::create_dir_all(target).map_err(AgentError::io(format!("mkdir {}", target.display())))?;
    let mut flags = share_flags();
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(Some(tag), target, Some("virtiofs"), flags, None::<&str>)
        .map_err(AgentError::errno(format!("mounting virtio-fs share {tag:?}")))?;
    set_read_ahead(target, SHARE_READ_AHEAD_KB);
    Ok(())
}

/// Readahead of a share, in KiB: what one request carries (husk-vmm offers 256 pages a
/// request). The kernel's default, 128 KiB, read a program started from a share in 128 KiB
/// requests, each a round trip to the VMM.
const SHARE_READ_AHEAD_KB: u32 = 1024;

/// Sets the readahead of the file system mounted at `target` (its backing device's, which a
/// FUSE mount has of its own). A failure only leaves the default.
fn set_read_ahead(target: &Path, kib: u32) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(target) {
        Ok(m) => m.dev(),
        Err(e) => return tracing::debug!("readahead of {}: {e}", target.display()),
    };
    let knob =
        format!("/sys/class/bdi/{}:{}/read_ahead_kb", nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    if let Err(e) = std::fs::write(&knob, kib.to_string()) {
        tracing::debug!("readahead of {}: {knob}: {e}", target.display());
    }
}

fn share_flags() -> MsFlags {
    MsFlags::MS_NODEV
}

pub fn set_clock(unix_ns: i64) -> Result<(), AgentError> {
    if unix_ns <= 0 {
        return Err(AgentError::InvalidArgument("unix_time_ns must be positive".into()));
    }
    let ts = nix::sys::time::TimeSpec::new(unix_ns / 1_000_000_000, unix_ns % 1_000_000_000);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(AgentError::errno("setting the clock"))
}

/// Syncs and powers the VM off; as PID 1 the agent must never simply exit (the kernel panics).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Only reached if the reboot syscall failed; hang rather than panic the kernel.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// CLOCK_BOOTTIME in ns.
pub fn boottime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_keep_setuid_but_not_devices() {
        assert!(share_flags().contains(MsFlags::MS_NODEV));
        assert!(!share_flags().contains(MsFlags::MS_NOSUID));
    }
}
