//! Unix socket paths of any length.
//!
//! `sun_path` holds 107 bytes and a NUL, while state roots (containerd's
//! `/run/containerd/io.containerd.runtime.v2.task/k8s.io/<64-hex id>/...`, a `--root` of any
//! depth) and ids (64 hex) are not bounded by it. A long path is reached through its directory
//! instead: the directory is opened, and the socket named `/proc/self/fd/<fd>/<name>`, which
//! fits whatever the directory's own path is. A child told to bind such a socket is given the
//! directory as an inherited fd in the same way ([`inherited_path`]).

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Longest path `sun_path` takes (without its NUL).
pub const MAX_PATH: usize = 107;

/// Room a socket name keeps for suffixes its users add (husk-vmm's guest-to-host listeners
/// append `_<port>`, up to 11 bytes).
pub const SUFFIX_ROOM: usize = 11;

/// The socket's directory and file name, or an error naming the path.
fn split(path: &Path) -> std::io::Result<(&Path, &OsStr)> {
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a socket path", path.display()),
        )
    };
    let name = path.file_name().ok_or_else(bad)?;
    if name.len() + "/proc/self/fd/2147483647/".len() + SUFFIX_ROOM > MAX_PATH {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: socket file name too long", path.display()),
        ));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok((dir, name))
}

/// Opens `dir` for use as a path prefix.
pub fn open_dir(dir: &Path) -> std::io::Result<OwnedFd> {
    use nix::fcntl::OFlag;
    let fd = nix::fcntl::open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| std::io::Error::new(std::io::Error::from(e).kind(), format!("{}: {e}", dir.display())))?;
    // SAFETY: open returned a fresh fd that nothing else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// The short form of `name` in the directory open as `fd` in the process that uses it.
pub fn via_fd(fd: RawFd, name: &OsStr) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{fd}"));
    p.push(name);
    p
}

/// Whether `path` (plus the suffix room) fits `sun_path` as it is.
pub fn fits(path: &Path) -> bool {
    path.as_os_str().as_bytes().len() + SUFFIX_ROOM <= MAX_PATH
}

/// Connects to the socket at `path`, however long the path.
pub async fn connect(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    if fits(path) {
        return tokio::net::UnixStream::connect(path).await;
    }
    let (dir, name) = split(path)?;
    let dir = open_dir(dir)?;
    // The fd stays open until the connect has resolved the path.
    let s = tokio::net::UnixStream::connect(via_fd(dir.as_raw_fd(), name)).await;
    drop(dir);
    s
}

/// Waits up to `limit` for a socket to appear at `path` (a VMM that is starting binds it once
/// its devices are restored): an inotify event on the directory, not a poll. True once it
/// exists; false at the limit or when the directory cannot be watched.
pub async fn wait_for(path: &Path, limit: std::time::Duration) -> bool {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return path.exists() };
    let Ok(ino) = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) else { return path.exists() };
    let watched =
        ino.add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ONLYDIR);
    // Checked after the watch is in place, so a socket bound in between is not missed.
    if watched.is_err() || path.exists() {
        return path.exists();
    }
    /// tokio wants the raw descriptor, nix's Inotify lends only a borrowed one.
    struct Watch(Inotify);
    impl AsRawFd for Watch {
        fn as_raw_fd(&self) -> RawFd {
            std::os::fd::AsFd::as_fd(&self.0).as_raw_fd()
        }
    }
    // SAFETY: the Watch owns the inotify descriptor, which stays open (and the same) until the
    // AsyncFd, which owns the Watch, is dropped.
    let Ok(fd) = (unsafe { tokio::io::unix::AsyncFd::register(Watch(ino)) }) else { return path.exists() };
    let wait = async {
        loop {
            let Ok(mut ready) = fd.readable().await else { return false };
            match fd.get_ref().0.read_events() {
                Ok(events) => {
                    if events.iter().any(|e| e.name.as_deref() == Some(name)) {
                        return true;
                    }
                    ready.clear_ready();
                }
                Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(_) => return false,
            }
        }
    };
    tokio::time::timeout(limit, wait).await.unwrap_or(false) || path.exists()
}

/// Binds a listener at `path`, however long the path.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if fits(path) {
        return tokio::net::UnixListener::bind(path);
    }
    let (dir, name) = split(path)?;
    let dir = open_dir(dir)?;
    tokio::net::UnixListener::bind(via_fd(dir.as_raw_fd(), name))
}

/// Blocking connect, for code outside an async runtime.
pub fn connect_std(path: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    if fits(path) {
        return std::os::unix::net::UnixStream::connect(path);
    }
    let (dir, name) = split(path)?;
    let dir = open_dir(dir)?;
    std::os::unix::net::UnixStream::connect(via_fd(dir.as_raw_fd(), name))
}

/// For a child process that binds or dials `path`: the path to give it, and the directory fd
/// it must inherit at number `child_fd` when `path` is too long to use as it is.
pub fn inherited_path(path: &Path, child_fd: RawFd) -> std::io::Result<(PathBuf, Option<OwnedFd>)> {
    if fits(path) {
        return Ok((path.to_path_buf(), None));
    }
    let (dir, name) = split(path)?;
    Ok((via_fd(child_fd, name), Some(open_dir(dir)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory whose own path is far past `sun_path`.
    fn long_dir(tag: &str) -> PathBuf {
        let mut d = std::env::temp_dir().join(format!("husk-uds-{tag}-{}", std::process::id()));
        for _ in 0..4 {
            d.push("a-directory-name-of-forty-characters-xx");
        }
        std::fs::create_dir_all(&d).expect("mkdir");
        assert!(d.as_os_str().len() > 150);
        d
    }

    #[tokio::test]
    async fn a_socket_bound_later_is_waited_for_by_event() {
        let d = long_dir("wait");
        let path = d.join("vsock.sock");
        let _ = std::fs::remove_file(&path);
        let other = d.join("other.sock");
        let _ = std::fs::remove_file(&other);
        let (p, o) = (path.clone(), other.clone());
        let binder = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            // Another name first: only the awaited one ends the wait.
            let _a = bind(&o).expect("bind other");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            bind(&p).expect("bind")
        });
        let started = std::time::Instant::now();
        assert!(wait_for(&path, std::time::Duration::from_secs(10)).await);
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
        let _listener = binder.await.expect("binder");
        assert!(connect(&path).await.is_ok());
        // There already: at once. Never made: false at the limit. No directory: false.
        assert!(wait_for(&path, std::time::Duration::ZERO).await);
        assert!(!wait_for(&d.join("never.sock"), std::time::Duration::from_millis(30)).await);
        assert!(!wait_for(&d.join("no-such-dir/x.sock"), std::time::Duration::from_secs(5)).await);
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("husk-uds-wait-{}", std::process::id())),
        );
    }

    #[test]
    fn short_paths_are_used_as_they_are() {
        assert!(fits(Path::new("/run/husk/x/vsock.sock")));
        let (p, fd) = inherited_path(Path::new("/run/husk/x/vsock.sock"), 3).expect("path");
        assert_eq!(p, Path::new("/run/husk/x/vsock.sock"));
        assert!(fd.is_none());
    }

    #[test]
    fn long_paths_connect_through_their_directory() {
        let d = long_dir("c");
        let sock = d.join("vsock.sock");
        assert!(!fits(&sock));
        let dir = open_dir(&d).expect("open");
        let listener =
            std::os::unix::net::UnixListener::bind(via_fd(dir.as_raw_fd(), OsStr::new("vsock.sock")))
                .expect("bind through the directory");
        drop(dir);
        let c = connect_std(&sock).expect("connect");
        let (_s, _) = listener.accept().expect("accept");
        drop(c);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async { connect(&sock).await.expect("async connect") });
        let (p, fd) = inherited_path(&sock, 3).expect("inherited");
        assert_eq!(p, Path::new("/proc/self/fd/3/vsock.sock"));
        assert!(fd.is_some());
        let _ =
            std::fs::remove_dir_all(std::env::temp_dir().join(format!("husk-uds-c-{}", std::process::id())));
    }

    #[tokio::test]
    async fn long_paths_bind_through_their_directory() {
        let d = long_dir("b");
        let sock = d.join("vsock.sock_1026");
        let listener = bind(&sock).expect("bind");
        let c = connect(&sock).await.expect("connect");
        listener.accept().await.expect("accept");
        drop(c);
        assert!(sock.exists());
        let _ =
            std::fs::remove_dir_all(std::env::temp_dir().join(format!("husk-uds-b-{}", std::process::id())));
    }

    #[test]
    fn a_long_file_name_is_refused_plainly() {
        let name = "n".repeat(100);
        let e = connect_std(&Path::new("/tmp").join(format!("{name}/x{name}"))).expect_err("too long");
        assert!(e.to_string().contains("too long"), "{e}");
    }
}
