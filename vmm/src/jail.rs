//! The VMM's jail. Before it opens anything for the guest, husk-vmm moves into mount, IPC and
//! UTS namespaces of its own (husk also starts it in a PID namespace of its own and in the
//! sandbox's cgroup), mounts a small tmpfs on the jail directory and binds into it only:
//! - each virtio-fs share, at `/shares/<n>`: the passthrough opens the share through that bind
//!   mount, whose root is the share, so a directory moved out of the share on the host can no
//!   longer be walked above (the kernel refuses `..` that leaves a bind mount's root);
//! - the vsock socket's directory, at `/vsock`, where it listens and reaches host listeners;
//! - its own `/proc/self/fd` directory (the passthrough's xattr calls go through those paths).
//!
//! Kernel, initramfs, `/dev/kvm`, taps and the console file are opened before the pivot; after
//! it the VMM's root is the jail (read-only, nosuid, nodev, noexec) and the host's tree is gone
//! from its view. The host's later mounts under a share (container root filesystems) still
//! arrive: the mount namespace is a slave of the host's.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::config::{JailConfig, VmConfig};

#[derive(Debug, thiserror::Error)]
#[error("jail: {what}: {source}")]
pub struct JailError {
    what: String,
    #[source]
    source: io::Error,
}

fn fail(what: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
    let what = what.into();
    move |source| JailError { what, source }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = src.map(cstr).transpose()?;
    let dst = cstr(dst)?;
    let fstype =
        fstype.map(CString::new).transpose().map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let data =
        data.map(CString::new).transpose().map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null where
    // mount(2) accepts null.
    check(unsafe {
        libc::mount(ptr(&src), dst.as_ptr(), ptr(&fstype), flags, ptr(&data).cast::<libc::c_void>())
    })
}

const LOCKDOWN: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// A jail being built: namespaces entered and binds in place, root not yet pivoted.
#[derive(Debug)]
pub struct Jail {
    root: PathBuf,
}

/// Enters the namespaces, builds the jail and returns it with `cfg` rewritten to the paths the
/// VMM uses: shares at their bind mounts (opened before the pivot), the vsock socket at its
/// in-jail path (bound after it). Must run before the VMM starts any thread.
/// `keep`: descriptors the VMM opened before the jail and still needs (a snapshot's memory
/// file, the control socket); every other descriptor above stderr is closed.
pub fn prepare(j: &JailConfig, cfg: &VmConfig, keep: &[RawFd]) -> Result<(Jail, VmConfig), JailError> {
    // The vsock directory is entered before the namespace changes: a path through an inherited
    // descriptor (`/proc/self/fd/3/...`, for long state paths) names a mount of the old
    // namespace, which cannot be bound in the new one, while the working directory moves
    // into the new namespace with the process.
    // Resolved first, with the host's view and working directory, so a symlinked share path
    // is fixed at start.
    let share_srcs = cfg
        .fs
        .iter()
        .map(|s| std::fs::canonicalize(&s.path).map_err(fail(format!("share {}", s.path.display()))))
        .collect::<Result<Vec<_>, _>>()?;
    let vsock_dir = cfg.vsock.as_ref().map(|v| match v.uds_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    });
    if let Some(dir) = &vsock_dir {
        std::env::set_current_dir(dir)
            .map_err(fail(format!("entering vsock directory {}", dir.display())))?;
    }
    // SAFETY: unshare only changes this (still single-threaded) process's namespaces.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) })
        .map_err(fail("unshare(mount, IPC, UTS namespaces)"))?;
    // Receive the host's mount events (container root filesystems), never send ours back.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_SLAVE, None)
        .map_err(fail("making / a slave"))?;
    let root = j.root.clone();
    mount(
        Some(Path::new("husk-jail")),
        &root,
        Some("tmpfs"),
        LOCKDOWN,
        Some("size=64k,nr_inodes=64,mode=0755"),
    )
    .map_err(fail(format!("tmpfs on {}", root.display())))?;
    let mut out = cfg.clone();
    let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(fail(format!("mkdir {}", p.display())));
    if let (Some(v), Some(dir)) = (out.vsock.as_mut(), &vsock_dir) {
        let name = v.uds_path.file_name().ok_or_else(|| JailError {
            what: format!("vsock socket {}", v.uds_path.display()),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        let target = root.join("vsock");
        mkdir(&target)?;
        mount(Some(Path::new(".")), &target, None, libc::MS_BIND, None)
            .map_err(fail(format!("binding vsock directory {}", dir.display())))?;
        mount(None, &target, None, libc::MS_REMOUNT | libc::MS_BIND | LOCKDOWN, None)
            .map_err(fail("locking down the vsock directory"))?;
        v.uds_path = Path::new("/vsock").join(name);
    }
    for (i, share) in out.fs.iter_mut().enumerate() {
        let target = root.join("shares").join(i.to_string());
        mkdir(&target)?;
        let src = &share_srcs[i];
        mount(Some(src), &target, None, libc::MS_BIND | libc::MS_REC, None)
            .map_err(fail(format!("binding share {}", src.display())))?;
        let ro = if share.read_only { libc::MS_RDONLY } else { 0 };
        mount(None, &target, None, libc::MS_REMOUNT | libc::MS_BIND | LOCKDOWN | ro, None)
            .map_err(fail(format!("locking down share {}", src.display())))?;
        // Relative to the jail directory, which is the working directory from here on (and
        // `/` after the pivot): see `Fs::new`.
        share.path = Path::new("shares").join(i.to_string());
    }
    // The passthrough reaches xattrs through `/proc/self/fd/N` paths: the VMM's own fd
    // directory, and nothing else of /proc, is bound at that path.
    let fd_dir = root.join("proc/self/fd");
    mkdir(&fd_dir)?;
    mount(Some(Path::new("/proc/self/fd")), &fd_dir, None, libc::MS_BIND, None)
        .map_err(fail("binding the VMM's /proc/self/fd"))?;
    mount(None, &fd_dir, None, libc::MS_REMOUNT | libc::MS_BIND | LOCKDOWN | libc::MS_RDONLY, None)
        .map_err(fail("locking down /proc/self/fd"))?;
    std::env::set_current_dir(&root).map_err(fail("entering the jail directory"))?;
    // Inherited descriptors (the vsock directory's, when its path was long) are done with.
    close_all_but(keep);
    set_limits(j.nofile).map_err(fail("resource limits"))?;
    Ok((Jail { root }, out))
}

/// Closes every descriptor above stderr except those in `keep`.
fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<u32> = keep.iter().filter_map(|&f| u32::try_from(f).ok()).filter(|&f| f > 2).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 3u32;
    for k in keep.into_iter().chain([u32::MAX]) {
        if k > from {
            // SAFETY: close_range closes only this process's descriptors in [from, k - 1],
            // none of which is one the VMM still uses (those are in `keep`).
            unsafe { libc::syscall(libc::SYS_close_range, from, k - 1, 0u32) };
        }
        from = k.saturating_add(1);
    }
}

/// RLIMIT_NOFILE to `nofile` (never above the inherited hard limit) and no core dumps: a core
/// of the VMM would hold the guest's memory.
fn set_limits(nofile: u64) -> io::Result<()> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit/prctl read and write only `lim` and process attributes.
    unsafe {
        check(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim))?;
        // Raising the hard limit needs CAP_SYS_RESOURCE; without it, stay within it.
        if libc::setrlimit(libc::RLIMIT_NOFILE, &libc::rlimit { rlim_cur: nofile, rlim_max: nofile }) != 0 {
            let n = nofile.min(lim.rlim_max);
            check(libc::setrlimit(libc::RLIMIT_NOFILE, &libc::rlimit { rlim_cur: n, rlim_max: n }))?;
        }
        check(libc::setrlimit(libc::RLIMIT_CORE, &libc::rlimit { rlim_cur: 0, rlim_max: 0 }))?;
        check(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0))?;
    }
    Ok(())
}

/// How the jail became the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootChange {
    /// pivot_root, the old root detached: the usual case.
    Pivoted,
    /// Moved over `/` and chrooted: the host runs from its initramfs.
    MovedOverInitramfs,
}

impl Jail {
    /// Makes the jail the VMM's root and drops the host's tree from its view.
    pub fn enter(self) -> Result<RootChange, JailError> {
        let root = cstr(&self.root).map_err(fail("jail path"))?;
        // SAFETY: chdir with a valid C string.
        check(unsafe { libc::chdir(root.as_ptr()) }).map_err(fail("chdir into the jail"))?;
        let dot = c".";
        // pivot_root(".", "."): the old root is stacked under the new one and detached below.
        // SAFETY: both arguments are valid C strings.
        let pivoted =
            check(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as i32);
        let how = match pivoted {
            Ok(()) => {
                // SAFETY: umount2 of the old root stacked on "."; MNT_DETACH lets busy mounts go.
                check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) })
                    .map_err(fail("detaching the old root"))?;
                RootChange::Pivoted
            }
            // The host runs from its initramfs (rootfs cannot be pivoted away): move the jail
            // over / and chroot, as runc's no-pivot mode does. The chroot cannot be left: the
            // VMM keeps neither CAP_SYS_CHROOT nor the chroot syscall.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!("pivot_root: {e}; moving the jail over / instead");
                mount(Some(Path::new(".")), Path::new("/"), None, libc::MS_MOVE, None)
                    .map_err(fail("moving the jail over /"))?;
                // SAFETY: chroot with a valid C string.
                check(unsafe { libc::chroot(dot.as_ptr()) }).map_err(fail("chroot into the jail"))?;
                RootChange::MovedOverInitramfs
            }
            Err(e) => return Err(fail("pivot_root")(e)),
        };
        // SAFETY: chdir with a valid C string.
        check(unsafe { libc::chdir(c"/".as_ptr()) }).map_err(fail("chdir /"))?;
        mount(
            None,
            Path::new("/"),
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | LOCKDOWN,
            None,
        )
        .map_err(fail("making the jail root read-only"))?;
        Ok(how)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// The jail changes the whole process, so it is built in a child: this test binary run
    /// again for this one test, with `HUSK_JAIL_CHILD` naming a scratch directory.
    #[test]
    fn jail_child() {
        let Ok(dir) = std::env::var("HUSK_JAIL_CHILD") else { return };
        let d = Path::new(&dir);
        let cfg = VmConfig::from_json(&format!(
            r#"{{"kernel":"/k","vsock":{{"uds_path":"{dir}/v/vsock.sock"}},
                "fs":[{{"tag":"rw","path":"{dir}/share"}},{{"tag":"ro","path":"{dir}/ro","read_only":true}}]}}"#
        ))
        .expect("config");
        // A descriptor opened before the jail and kept (a snapshot's memory file), one not.
        let kept = std::fs::File::open(d.join("share/hello")).expect("open kept");
        let dropped = std::fs::File::open(d.join("share/hello")).expect("open dropped");
        let keep = [std::os::fd::AsRawFd::as_raw_fd(&kept)];
        let (jail, out) =
            prepare(&JailConfig { root: d.join("root"), nofile: 1024 }, &cfg, &keep).expect("prepare");
        // SAFETY: F_GETFD only reads the descriptor flags of these two numbers.
        let open = |f: &std::fs::File| unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(f), libc::F_GETFD) } >= 0;
        let (kept_open, dropped_open) = (open(&kept), open(&dropped));
        // The closed one must not be closed again on drop (its number may be reused).
        std::mem::forget(dropped);
        let how = jail.enter().expect("enter");
        let mut names: Vec<String> = std::fs::read_dir("/")
            .expect("read /")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let shared = std::fs::read_to_string(out.fs[0].path.join("hello")).unwrap_or_default();
        let rw = std::fs::write(out.fs[0].path.join("new"), b"x").is_ok();
        let ro = std::fs::write(out.fs[1].path.join("new"), b"x").map_err(|e| e.raw_os_error());
        let root = std::fs::write("/new", b"x").map_err(|e| e.raw_os_error());
        let up = std::fs::read_dir("/..").map(|r| r.count()).unwrap_or(0);
        let mut o = std::io::stdout();
        writeln!(o, "@@how {how:?}").ok();
        writeln!(o, "@@root {} up={up}", names.join(" ")).ok();
        writeln!(o, "@@share {} rw={rw} ro={ro:?} rootfs={root:?}", shared.trim()).ok();
        writeln!(o, "@@vsock {}", out.vsock.map(|v| v.uds_path.display().to_string()).unwrap_or_default())
            .ok();
        writeln!(o, "@@fd {}", Path::new("/proc/self/fd/0").exists()).ok();
        writeln!(o, "@@kept {kept_open} dropped {dropped_open}").ok();
    }

    /// Whether `/` is an initramfs here, where pivot_root cannot work.
    fn root_is_initramfs() -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        info.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let fstype = l.split(" - ").nth(1).and_then(|r| r.split(' ').next());
            f.get(4) == Some(&"/") && matches!(fstype, Some("rootfs"))
        })
    }

    #[test]
    fn the_jail_holds_only_shares_vsock_and_fds_and_pivots() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: building a jail needs root (mount namespaces and mounts)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("husk-jail-test-{}", std::process::id()));
        for sub in ["root", "v", "share", "ro"] {
            std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        std::fs::write(dir.join("share/hello"), "hello-through-the-jail").expect("write");
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args(["--exact", "jail::tests::jail_child", "--test-threads=1", "--nocapture"])
            .env("HUSK_JAIL_CHILD", &dir)
            .output()
            .expect("run child");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(out.status.success(), "{out:?}");
        let how = if root_is_initramfs() { "MovedOverInitramfs" } else { "Pivoted" };
        for want in [
            format!("@@how {how}"),
            // `/..` is `/`: nothing of the host above the jail.
            "@@root proc shares vsock up=3".to_string(),
            format!(
                "@@share hello-through-the-jail rw=true ro=Err(Some({})) rootfs=Err(Some({}))",
                libc::EROFS,
                libc::EROFS
            ),
            "@@vsock /vsock/vsock.sock".to_string(),
            "@@fd true".to_string(),
            "@@kept true dropped false".to_string(),
        ] {
            assert!(text.contains(&want), "want {want:?} in:\n{text}");
        }
        // The jail's mounts lived in the child's namespace only.
        assert!(!std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .contains("husk-jail-test"));
    }
}
