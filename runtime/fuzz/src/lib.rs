//! Shared pieces of the runtime fuzz targets: a confined place to write, and a byte-script
//! reader.
//!
//! Both targets make the host side write to the file system as root (bind mounts, unpacked
//! layers, device nodes), driven by arbitrary input. A bug in the code under test could then
//! write, delete or mount outside its directory. [`confine`] therefore moves the fuzzing thread
//! into a mount namespace of its own where every mount is read-only except a fresh tmpfs (the
//! target's sandbox) and the directories libFuzzer writes to (its corpus and artifact
//! directories, from the command line); mounts made there never reach the host's namespace
//! and go when the process ends.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Reads the fuzzer's input as a script; past the end every read yields zeros, so any input is
/// a valid script.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> std::io::Result<()> {
    let src = src.map(cstr);
    let target = cstr(target);
    let fstype = fstype.map(|t| CString::new(t).expect("fstype"));
    let data = data.map(|d| CString::new(d).expect("mount data"));
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mount(ptr(&src), target.as_ptr(), ptr(&fstype), flags, ptr(&data).cast()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The mount points of this mount namespace, from /proc/self/mountinfo (octal escapes undone).
fn mount_points() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| {
            let b = p.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'\\' && i + 3 < b.len() {
                    if let Ok(v) = u8::from_str_radix(&p[i + 1..i + 4], 8) {
                        out.push(v);
                        i += 4;
                        continue;
                    }
                }
                out.push(b[i]);
                i += 1;
            }
            PathBuf::from(std::ffi::OsStr::from_bytes(&out))
        })
        .collect()
}

/// The per-mount flags a read-only bind remount must keep (it resets the others).
fn kept_flags(p: &Path) -> libc::c_ulong {
    let c = cstr(p);
    // SAFETY: statvfs only writes the struct it is given, a zeroed local.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    flags
}

/// Directories libFuzzer writes to, from the command line: corpus directories and the
/// artifact prefix's directory.
fn fuzzer_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for a in std::env::args().skip(1) {
        if let Some(prefix) = a.strip_prefix("-artifact_prefix=") {
            let p = Path::new(prefix);
            let dir = if prefix.ends_with('/') { p } else { p.parent().unwrap_or(Path::new(".")) };
            let _ = std::fs::create_dir_all(dir);
            dirs.push(dir.to_path_buf());
        } else if let Some(path) = a.strip_prefix("-exact_artifact_path=") {
            dirs.push(Path::new(path).parent().unwrap_or(Path::new(".")).to_path_buf());
        } else if !a.starts_with('-') && Path::new(&a).is_dir() {
            dirs.push(PathBuf::from(a));
        }
    }
    dirs.into_iter()
        .map(|d| if d.as_os_str().is_empty() { PathBuf::from(".") } else { d })
        .filter_map(|d| d.canonicalize().ok())
        .collect()
}

/// Moves the calling thread (libFuzzer's, which runs every input) into a mount namespace where
/// everything is read-only but a fresh tmpfs at `/tmp/husk-fuzz-<name>` (returned) and
/// libFuzzer's own directories. Panics if that cannot be set up, unless
/// `HUSK_FUZZ_UNCONFINED=1` (then the sandbox is a plain directory and nothing protects the
/// host from the code under test).
pub fn confine(name: &str) -> PathBuf {
    let sandbox = PathBuf::from(format!("/tmp/husk-fuzz-{name}"));
    if std::env::var_os("HUSK_FUZZ_UNCONFINED").is_some_and(|v| v == "1") {
        let _ = std::fs::remove_dir_all(&sandbox);
        std::fs::create_dir_all(&sandbox).expect("sandbox");
        return sandbox;
    }
    let writable = fuzzer_dirs();
    std::fs::create_dir_all(&sandbox).expect("sandbox mount point");
    // SAFETY: unshare only changes this thread's namespaces; CLONE_NEWNS also unshares the
    // thread's fs_struct (cwd, root), which nothing else relies on being shared.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        panic!(
            "unshare(CLONE_NEWNS): {} (run as root, or set HUSK_FUZZ_UNCONFINED=1 at your own risk)",
            std::io::Error::last_os_error()
        );
    }
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None).expect("make / private");
    let mounts_before = mount_points();
    mount(
        Some(Path::new("tmpfs")),
        &sandbox,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("size=256m,mode=0700"),
    )
    .expect("sandbox tmpfs");
    for d in &writable {
        mount(Some(d), d, None, libc::MS_BIND, None).expect("bind a libFuzzer directory");
    }
    for mp in mounts_before {
        if mp == sandbox || writable.contains(&mp) {
            continue;
        }
        let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | kept_flags(&mp);
        if let Err(e) = mount(None, &mp, None, flags, None) {
            // Over-mounted or vanished mount points cannot be reached anyway.
            eprintln!("husk-fuzz: read-only remount of {}: {e}", mp.display());
        }
    }
    // The libFuzzer directories may sit on a mount that is now read-only: their own binds stay
    // writable, which the remount above skipped.
    let probe = Path::new("/tmp").join(format!(".husk-fuzz-probe-{}", std::process::id()));
    match std::fs::write(&probe, b"") {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        other => {
            let _ = std::fs::remove_file(&probe);
            panic!("confinement failed: writing {} gave {other:?}", probe.display());
        }
    }
    for d in &writable {
        let probe = d.join(format!(".husk-fuzz-probe-{}", std::process::id()));
        std::fs::write(&probe, b"").unwrap_or_else(|e| panic!("{} is not writable: {e}", d.display()));
        let _ = std::fs::remove_file(&probe);
    }
    sandbox
}
