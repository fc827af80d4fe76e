//! The guest half of the virtio-fs end-to-end test. Mounts tag `rw` at /mnt/rw and tag `ro`
//! at /mnt/ro and prints `GUEST-CHECK <name> ok|FAIL <detail>` for each file operation; the
//! host half then checks that what the guest did is visible on the host.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

pub fn mount_virtiofs(tag: &str, dir: &str) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let (t, d, f) = (cstr(tag), cstr(dir), cstr("virtiofs"));
    // SAFETY: valid NUL-terminated strings for the call's duration.
    let rc = unsafe { libc::mount(t.as_ptr(), d.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn setxattr(path: &str, name: &str, value: &[u8]) -> io::Result<()> {
    let (p, n) = (cstr(path), cstr(name));
    // SAFETY: valid strings and buffer.
    let rc = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn getxattr(path: &str, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (cstr(path), cstr(name));
    let mut buf = vec![0u8; 256];
    // SAFETY: valid strings and buffer of the given size.
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(rc as usize);
    Ok(buf)
}

fn report(name: &str, r: Result<(), String>) {
    match r {
        Ok(()) => println!("GUEST-CHECK {name} ok"),
        Err(e) => println!("GUEST-CHECK {name} FAIL {e}"),
    }
}

fn e<T>(what: &str) -> impl FnOnce(T) -> String + '_
where
    T: std::fmt::Display,
{
    move |err| format!("{what}: {err}")
}

fn expect_errno(r: io::Result<impl Sized>, errno: i32, what: &str) -> Result<(), String> {
    match r {
        Ok(_) => Err(format!("{what} succeeded")),
        Err(err) if err.raw_os_error() == Some(errno) => Ok(()),
        Err(err) => Err(format!("{what}: expected errno {errno}, got {err}")),
    }
}

fn rw_ops() -> Result<(), String> {
    let d = "/mnt/rw";
    fs::write(format!("{d}/a.txt"), b"hello from guest").map_err(e("create+write"))?;
    let got = fs::read(format!("{d}/a.txt")).map_err(e("read"))?;
    if got != b"hello from guest" {
        return Err("read back differs".into());
    }
    fs::rename(format!("{d}/a.txt"), format!("{d}/b.txt")).map_err(e("rename"))?;
    fs::create_dir(format!("{d}/dir")).map_err(e("mkdir"))?;
    std::os::unix::fs::symlink("b.txt", format!("{d}/sym")).map_err(e("symlink"))?;
    fs::hard_link(format!("{d}/b.txt"), format!("{d}/hard")).map_err(e("link"))?;
    fs::set_permissions(format!("{d}/b.txt"), fs::Permissions::from_mode(0o640)).map_err(e("chmod"))?;
    if fs::metadata(format!("{d}/b.txt")).map_err(e("stat"))?.nlink() != 2 {
        return Err("hard link count is not 2".into());
    }
    let mut f = fs::File::create(format!("{d}/synced")).map_err(e("create"))?;
    f.write_all(b"durable").map_err(e("write"))?;
    f.sync_all().map_err(e("fsync"))?;
    fs::write(format!("{d}/gone"), b"x").map_err(e("create"))?;
    fs::remove_file(format!("{d}/gone")).map_err(e("unlink"))?;
    Ok(())
}

/// user.* xattrs pass through; other namespaces (trusted.*, security.*) are refused by the
/// device. Prints `xattr
/// unsupported` when the host filesystem itself has no user xattrs (tmpfs before Linux 6.6).
fn xattrs() {
    let f = "/mnt/rw/b.txt";
    match setxattr(f, "user.husk", b"xattr-value") {
        Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => println!("GUEST-CHECK xattr unsupported"),
        Err(err) => report("xattr", Err(format!("setxattr: {err}"))),
        Ok(()) => report(
            "xattr",
            match getxattr(f, "user.husk") {
                Ok(v) if v == b"xattr-value" => Ok(()),
                Ok(v) => Err(format!("read back {v:?}")),
                Err(err) => Err(format!("getxattr: {err}")),
            },
        ),
    }
    report(
        "xattr-security-refused",
        expect_errno(setxattr(f, "trusted.husk", b"x"), libc::EPERM, "setxattr trusted.husk"),
    );
}

fn ro_refuses_writes() -> Result<(), String> {
    let d = "/mnt/ro";
    let mut s = String::new();
    fs::File::open(format!("{d}/hello.txt")).and_then(|mut f| f.read_to_string(&mut s)).map_err(e("read"))?;
    if s.trim() != "host file" {
        return Err(format!("unexpected content {s:?}"));
    }
    expect_errno(fs::write(format!("{d}/new"), b"x"), libc::EROFS, "create")?;
    expect_errno(
        fs::OpenOptions::new().append(true).open(format!("{d}/hello.txt")),
        libc::EROFS,
        "open for write",
    )?;
    expect_errno(fs::create_dir(format!("{d}/newdir")), libc::EROFS, "mkdir")?;
    expect_errno(fs::remove_file(format!("{d}/hello.txt")), libc::EROFS, "unlink")?;
    expect_errno(fs::rename(format!("{d}/hello.txt"), format!("{d}/x")), libc::EROFS, "rename")?;
    expect_errno(
        fs::set_permissions(format!("{d}/hello.txt"), fs::Permissions::from_mode(0o777)),
        libc::EROFS,
        "chmod",
    )?;
    Ok(())
}

/// Symlinks the host planted point outside the share; following them resolves in the guest's
/// own namespace, never the host's.
fn no_escape() -> Result<(), String> {
    let d = "/mnt/ro";
    let target = fs::read_link(format!("{d}/abs-escape")).map_err(e("readlink"))?;
    if target.to_str() != Some("/husk-host-secret") {
        return Err(format!("readlink gave {target:?}"));
    }
    for link in ["abs-escape", "rel-escape"] {
        match fs::read(format!("{d}/{link}")) {
            Ok(c) if c.starts_with(b"HOST-SECRET") => return Err(format!("{link} reached the host file")),
            _ => {}
        }
    }
    if fs::read("/mnt/ro/../husk-host-secret").is_ok() {
        return Err("`..` from the mount reached the host file".into());
    }
    Ok(())
}

fn copy_big() -> Result<(), String> {
    let mut src = fs::File::open("/mnt/ro/big").map_err(e("open big"))?;
    let mut dst = fs::File::create("/mnt/rw/big-copy").map_err(e("create copy"))?;
    let n = io::copy(&mut src, &mut dst).map_err(e("copy"))?;
    dst.sync_all().map_err(e("fsync"))?;
    println!("GUEST-INFO copied {n} bytes");
    Ok(())
}

pub fn run() {
    if let Err(err) = mount_virtiofs("rw", "/mnt/rw").and_then(|_| mount_virtiofs("ro", "/mnt/ro")) {
        return report("mount", Err(err.to_string()));
    }
    report("mount", Ok(()));
    report("rw-ops", rw_ops());
    xattrs();
    report("ro-refuses-writes", ro_refuses_writes());
    report("no-escape", no_escape());
    report("copy-big", copy_big());
    println!("GUEST-FS-CHECKS-DONE");
}
