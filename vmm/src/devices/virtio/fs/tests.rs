//! The device driven like a guest driver would, through a mock split queue on guest memory,
//! with real FUSE messages against a temporary host directory. No KVM needed.

use std::collections::HashSet;
use std::mem::size_of;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use caps::{CapSet, Capability};
use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, Dirent, EntryOut, ForgetIn, FsOptions, GetattrIn, InHeader, InitIn, InitOut, MkdirIn,
    MknodIn, Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, RenameIn, SetattrIn, SetattrValid,
    WriteIn, FOPEN_IN_KILL_SUIDGID, KERNEL_VERSION, ROOT_ID, WRITE_KILL_PRIV,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::*;
use crate::devices::virtio::VirtioInterrupt;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const REQ: u64 = 0x10_0000;
const RESP: u64 = 0x20_0000;
const RESP_LEN: u32 = 0x2_0000;
const HELLO: &[u8] = b"hello, virtio-fs\n";

fn mem() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn obj<T: ByteValued + Default>(bytes: &[u8]) -> T {
    let mut v = T::default();
    let n = size_of::<T>();
    v.as_mut_slice().copy_from_slice(&bytes[..n]);
    v
}

fn cstr(s: &str) -> Vec<u8> {
    [s.as_bytes(), b"\0"].concat()
}

/// A share with `hello.txt`, a subdirectory and a symlink pointing out of the share.
fn share(read_only: bool) -> (TempDir, Fs) {
    share_cached(read_only, FsCache::Auto)
}

fn share_cached(read_only: bool, cache: FsCache) -> (TempDir, Fs) {
    let dir = TempDir::new_with_prefix("/tmp/husk-fs-").unwrap();
    let root = dir.as_path();
    std::fs::write(root.join("hello.txt"), HELLO).unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::os::unix::fs::symlink("/", root.join("escape")).unwrap();
    let cfg = FsShareConfig { tag: "share".into(), path: root.into(), read_only, cache };
    let dev = Fs::new(&cfg).unwrap();
    // The test thread serves the requests, so it is set up like the device's worker: FUSE_INIT
    // (the passthrough's umask(0)) then leaves the process's umask alone under the other tests.
    prepare_server_thread().unwrap();
    (dir, dev)
}

/// Serves `descs` (one or more chains) from a fresh queue; returns the used length of each.
fn serve(dev: &Fs, m: &GuestMem, descs: &[RawDescriptor]) -> Vec<u32> {
    let vq = MockSplitQueue::new(m, 64);
    vq.build_multiple_desc_chains(descs).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let (done, more) = process_queue(&mut q, m, &dev.server, MAX_CHAINS_PER_PASS);
    assert!(!more);
    assert_eq!(vq.used().idx().load(), done as u16);
    (0..done).map(|i| vq.used().ring().ref_at(i).unwrap().load().len()).collect()
}

fn message(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let header = InHeader {
        len: (size_of::<InHeader>() + body.len()) as u32,
        opcode,
        unique,
        nodeid,
        ..Default::default()
    };
    [header.as_slice(), body].concat()
}

struct Client {
    dev: Fs,
    unique: u64,
}

impl Client {
    /// One well-formed request and its reply: (error, body).
    fn call(&mut self, opcode: Opcode, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
        self.unique += 1;
        let m = mem();
        let req = message(opcode as u32, self.unique, nodeid, body);
        m.write_slice(&req, GuestAddress(REQ)).unwrap();
        let lens =
            serve(&self.dev, &m, &[desc(REQ, req.len() as u32, F_NEXT, 1), desc(RESP, RESP_LEN, F_WRITE, 0)]);
        let mut out = vec![0u8; lens[0] as usize];
        m.read_slice(&mut out, GuestAddress(RESP)).unwrap();
        assert!(out.len() >= size_of::<OutHeader>(), "{opcode:?}: no reply");
        let header: OutHeader = obj(&out);
        assert_eq!((header.len as usize, header.unique), (out.len(), self.unique));
        (header.error, out[size_of::<OutHeader>()..].to_vec())
    }

    fn ok(&mut self, opcode: Opcode, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let (err, out) = self.call(opcode, nodeid, body);
        assert_eq!(err, 0, "{opcode:?} failed");
        out
    }

    fn errno(&mut self, opcode: Opcode, nodeid: u64, body: &[u8]) -> i32 {
        let (err, out) = self.call(opcode, nodeid, body);
        assert!(out.is_empty());
        -err
    }

    fn init(&mut self) {
        self.init_with(0);
    }

    /// FUSE_INIT offering `flags`; returns the reply.
    fn init_with(&mut self, flags: u32) -> InitOut {
        let init = InitIn { major: KERNEL_VERSION, minor: 31, max_readahead: 0x2_0000, flags };
        let out: InitOut = obj(&self.ok(Opcode::Init, 0, init.as_slice()));
        assert_eq!(out.major, KERNEL_VERSION);
        out
    }

    fn lookup(&mut self, parent: u64, name: &str) -> EntryOut {
        obj(&self.ok(Opcode::Lookup, parent, &cstr(name)))
    }

    fn open(&mut self, nodeid: u64, flags: i32) -> Result<u64, i32> {
        self.open_with(nodeid, flags, 0)
    }

    fn open_with(&mut self, nodeid: u64, flags: i32, fuse_flags: u32) -> Result<u64, i32> {
        let body = OpenIn { flags: flags as u32, fuse_flags };
        match self.call(Opcode::Open, nodeid, body.as_slice()) {
            (0, out) => Ok(obj::<OpenOut>(&out).fh),
            (e, _) => Err(-e),
        }
    }
}

fn client(read_only: bool) -> (TempDir, Client) {
    let (dir, dev) = share(read_only);
    let mut c = Client { dev, unique: 0 };
    c.init();
    (dir, c)
}

#[test]
fn config_space_and_features() {
    let (_dir, dev) = share(true);
    assert_eq!(dev.device_type(), TYPE_FS);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
    let mut cfg = [0xffu8; CONFIG_LEN];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..5], b"share");
    assert!(cfg[5..TAG_LEN].iter().all(|&b| b == 0));
    assert_eq!(&cfg[TAG_LEN..], &1u32.to_le_bytes());
    let mut tail = [0xffu8; 8];
    dev.read_config(TAG_LEN as u64, &mut tail);
    assert_eq!(tail, [1, 0, 0, 0, 0, 0, 0, 0]);
    dev.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 8]);
    let full = "x".repeat(TAG_LEN);
    let dir = TempDir::new_with_prefix("/tmp/husk-fs-").unwrap();
    let cfg = FsShareConfig {
        tag: full.clone(),
        path: dir.as_path().into(),
        read_only: true,
        cache: FsCache::Never,
    };
    let mut bytes = [0u8; CONFIG_LEN];
    Fs::new(&cfg).unwrap().read_config(0, &mut bytes);
    assert_eq!(&bytes[..TAG_LEN], full.as_bytes());
}

#[test]
fn bad_shares_are_refused() {
    let dir = TempDir::new_with_prefix("/tmp/husk-fs-").unwrap();
    let file = dir.as_path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let mk = |tag: &str, path: &std::path::Path| {
        Fs::new(&FsShareConfig { tag: tag.into(), path: path.into(), read_only: false, cache: FsCache::Auto })
    };
    assert!(mk("t", std::path::Path::new("/nonexistent/husk")).is_err());
    assert!(mk("t", &file).is_err());
    assert!(mk("", dir.as_path()).is_err());
    assert!(mk(&"x".repeat(TAG_LEN + 1), dir.as_path()).is_err());
    assert!(mk("a\0b", dir.as_path()).is_err());
}

#[test]
fn lookup_getattr_open_read() {
    let (_dir, mut c) = client(true);
    let entry = c.lookup(ROOT_ID, "hello.txt");
    assert!(entry.nodeid > ROOT_ID);
    assert_eq!(entry.attr.size, HELLO.len() as u64);
    assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFREG);
    // cache=auto: names and attributes are trusted for a second.
    assert_eq!((entry.entry_valid, entry.attr_valid), (1, 1));

    let attr: AttrOut = obj(&c.ok(Opcode::Getattr, entry.nodeid, GetattrIn::default().as_slice()));
    assert_eq!(attr.attr.size, HELLO.len() as u64);
    assert_eq!(attr.attr.ino, entry.attr.ino);
    let root: AttrOut = obj(&c.ok(Opcode::Getattr, ROOT_ID, GetattrIn::default().as_slice()));
    assert_eq!(root.attr.mode & libc::S_IFMT, libc::S_IFDIR);

    let fh = c.open(entry.nodeid, libc::O_RDONLY).unwrap();
    let read = ReadIn { fh, offset: 0, size: 4096, ..Default::default() };
    assert_eq!(c.ok(Opcode::Read, entry.nodeid, read.as_slice()), HELLO);
    let read = ReadIn { fh, offset: 7, size: 3, ..Default::default() };
    assert_eq!(c.ok(Opcode::Read, entry.nodeid, read.as_slice()), b"vir");
    // A read larger than the reply buffers is refused, not overrun.
    let read = ReadIn { fh, offset: 0, size: RESP_LEN * 2, ..Default::default() };
    assert_ne!(c.call(Opcode::Read, entry.nodeid, read.as_slice()).0, 0);
    // Unknown handles and inodes are errors, not panics.
    let read = ReadIn { fh: fh + 1000, offset: 0, size: 16, ..Default::default() };
    assert_eq!(c.errno(Opcode::Read, entry.nodeid, read.as_slice()), libc::EBADF);
    assert_eq!(c.errno(Opcode::Getattr, 0xdead_beef, GetattrIn::default().as_slice()), libc::EBADF);
    // cache=auto: a missing name is a negative entry (node id 0), also kept for a second.
    assert_eq!((c.lookup(ROOT_ID, "missing").nodeid, c.lookup(ROOT_ID, "missing").entry_valid), (0, 1));
    c.ok(Opcode::Statfs, ROOT_ID, &[]);
}

#[test]
fn an_unchanged_file_keeps_the_guests_cache_across_opens() {
    const KEEP_CACHE: u32 = 2;
    let (dir, mut c) = client(false);
    let entry = c.lookup(ROOT_ID, "hello.txt");
    let open = |c: &mut Client| {
        let out: OpenOut =
            obj(&c.ok(Opcode::Open, entry.nodeid, OpenIn { flags: 0, fuse_flags: 0 }.as_slice()));
        c.release(Opcode::Release, entry.nodeid, out.fh);
        out.open_flags & KEEP_CACHE != 0
    };
    assert!(!open(&mut c), "a first open has nothing to keep");
    assert!(open(&mut c), "unchanged since the last open");
    // Changed on the host, even to the same size: the next open drops the cache, once.
    std::thread::sleep(Duration::from_millis(10));
    std::fs::write(dir.as_path().join("hello.txt"), b"HELLO, virtio-fs\n").unwrap();
    assert!(!open(&mut c), "changed on the host");
    assert!(open(&mut c));
    // Written through the share: also a change.
    let fh = c.open(entry.nodeid, libc::O_RDWR).unwrap();
    let w = WriteIn { fh, offset: 0, size: 1, ..Default::default() };
    c.ok(Opcode::Write, entry.nodeid, &[w.as_slice(), b"J"].concat());
    c.release(Opcode::Release, entry.nodeid, fh);
    assert!(!open(&mut c), "written through the share");
    // Forgotten and looked up again: nothing is assumed about the new inode's cache.
    c.forget(entry.nodeid, 1);
    let again = c.lookup(ROOT_ID, "hello.txt");
    let out: OpenOut = obj(&c.ok(Opcode::Open, again.nodeid, OpenIn { flags: 0, fuse_flags: 0 }.as_slice()));
    assert_eq!(out.open_flags & KEEP_CACHE, 0);
}

#[test]
fn read_only_share_refuses_every_write() {
    let (dir, mut c) = client(true);
    let file = c.lookup(ROOT_ID, "hello.txt").nodeid;
    for flags in
        [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC, libc::O_RDONLY | libc::O_APPEND]
    {
        assert_eq!(c.open(file, flags), Err(libc::EROFS), "flags {flags:#x}");
    }
    let erofs = |c: &mut Client, op: Opcode, node: u64, body: Vec<u8>| {
        assert_eq!(c.errno(op, node, &body), libc::EROFS, "{op:?}");
    };
    let create =
        CreateIn { flags: (libc::O_CREAT | libc::O_WRONLY) as u32, mode: 0o644, umask: 0, fuse_flags: 0 };
    erofs(&mut c, Opcode::Create, ROOT_ID, [create.as_slice(), &cstr("new")].concat());
    erofs(
        &mut c,
        Opcode::Mkdir,
        ROOT_ID,
        [MkdirIn { mode: 0o755, umask: 0 }.as_slice(), &cstr("d")].concat(),
    );
    let mknod = MknodIn { mode: libc::S_IFIFO | 0o644, ..Default::default() };
    erofs(&mut c, Opcode::Mknod, ROOT_ID, [mknod.as_slice(), &cstr("fifo")].concat());
    erofs(&mut c, Opcode::Unlink, ROOT_ID, cstr("hello.txt"));
    erofs(&mut c, Opcode::Rmdir, ROOT_ID, cstr("sub"));
    erofs(&mut c, Opcode::Symlink, ROOT_ID, [cstr("link"), cstr("/etc")].concat());
    let rename = RenameIn { newdir: ROOT_ID };
    erofs(&mut c, Opcode::Rename, ROOT_ID, [rename.as_slice(), &cstr("hello.txt"), &cstr("moved")].concat());
    let setattr = SetattrIn { valid: 0x8, size: 0, ..Default::default() }; // FATTR_SIZE: truncate
    erofs(&mut c, Opcode::Setattr, file, setattr.as_slice().to_vec());
    let setattr = SetattrIn { valid: 0x1, mode: 0o777, ..Default::default() }; // FATTR_MODE
    erofs(&mut c, Opcode::Setattr, file, setattr.as_slice().to_vec());
    erofs(&mut c, Opcode::Link, ROOT_ID, [file.to_le_bytes().as_slice(), &cstr("hard")].concat());
    // A write through a handle opened read-only is refused before it reaches the file.
    let fh = c.open(file, libc::O_RDONLY).unwrap();
    let write = WriteIn { fh, offset: 0, size: 4, ..Default::default() };
    erofs(&mut c, Opcode::Write, file, [write.as_slice(), b"evil"].concat());
    let fallocate = [fh.to_le_bytes(), 0u64.to_le_bytes(), 4096u64.to_le_bytes()].concat();
    erofs(&mut c, Opcode::Fallocate, file, [fallocate, 0u32.to_le_bytes().to_vec(), vec![0; 4]].concat());
    let setxattr = [8u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
    erofs(&mut c, Opcode::Setxattr, file, [setxattr, cstr("user.x"), b"12345678".to_vec()].concat());
    erofs(&mut c, Opcode::Removexattr, file, cstr("user.x"));
    let access = [(libc::W_OK as u32).to_le_bytes(), 0u32.to_le_bytes()].concat();
    erofs(&mut c, Opcode::Access, file, access);
    // Reads still work, and the host directory is untouched.
    let read = ReadIn { fh, offset: 0, size: 64, ..Default::default() };
    assert_eq!(c.ok(Opcode::Read, file, read.as_slice()), HELLO);
    assert_eq!(std::fs::read(dir.as_path().join("hello.txt")).unwrap(), HELLO);
    let mut names: Vec<_> =
        std::fs::read_dir(dir.as_path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["escape", "hello.txt", "sub"]);
}

#[test]
fn o_path_opens_are_refused() {
    // An O_PATH handle used to reach a path in fuse-backend-rs 0.14's READ/WRITE where
    // fcntl(F_SETFL) fails and the handle's fd is closed under it, then closed again when the
    // handle goes (an abort in debug builds, a double close otherwise). Found by fuzzing.
    for read_only in [true, false] {
        let (_dir, mut c) = client(read_only);
        let file = c.lookup(ROOT_ID, "hello.txt").nodeid;
        assert_eq!(c.open(file, libc::O_RDONLY | libc::O_PATH), Err(libc::EINVAL));
        let opendir = OpenIn { flags: libc::O_PATH as u32, fuse_flags: 0 };
        assert_eq!(c.errno(Opcode::Opendir, ROOT_ID, opendir.as_slice()), libc::EINVAL);
        if !read_only {
            let flags = (libc::O_CREAT | libc::O_RDWR | libc::O_PATH) as u32;
            let create = CreateIn { flags, mode: 0o644, umask: 0, fuse_flags: 0 };
            let body = [create.as_slice(), &cstr("new")].concat();
            assert_eq!(c.errno(Opcode::Create, ROOT_ID, &body), libc::EINVAL);
        }
        // A normal handle still follows READ flags that differ from its open flags.
        let fh = c.open(file, libc::O_RDONLY).unwrap();
        let read = ReadIn { fh, offset: 0, size: 64, flags: libc::O_NONBLOCK as u32, ..Default::default() };
        assert_eq!(c.ok(Opcode::Read, file, read.as_slice()), HELLO);
        // Drops every handle (this is where the double close aborted).
        c.dev.fs.destroy();
    }
}

#[test]
fn writable_share_writes_but_makes_no_device_nodes() {
    let (dir, mut c) = client(false);
    let out: EntryOut = obj(&c.ok(
        Opcode::Mkdir,
        ROOT_ID,
        &[MkdirIn { mode: 0o755, umask: 0 }.as_slice(), &cstr("d")].concat(),
    ));
    assert_eq!(out.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    assert!(dir.as_path().join("d").is_dir());
    let file = c.lookup(ROOT_ID, "hello.txt").nodeid;
    let fh = c.open(file, libc::O_RDWR).unwrap();
    let write = WriteIn { fh, offset: 0, size: 5, ..Default::default() };
    c.ok(Opcode::Write, file, &[write.as_slice(), b"HELLO"].concat());
    assert!(std::fs::read(dir.as_path().join("hello.txt")).unwrap().starts_with(b"HELLO, virtio"));
    for kind in [libc::S_IFCHR, libc::S_IFBLK] {
        let mknod = MknodIn { mode: kind | 0o666, rdev: libc::makedev(1, 3) as u32, ..Default::default() };
        let body = [mknod.as_slice(), &cstr("null")].concat();
        assert_eq!(c.errno(Opcode::Mknod, ROOT_ID, &body), libc::EPERM);
    }
    assert!(!dir.as_path().join("null").exists());
}

#[test]
fn guest_cannot_walk_out_of_the_share() {
    let (_dir, mut c) = client(true);
    // `..` at the root is the root itself.
    assert_eq!(c.lookup(ROOT_ID, "..").nodeid, ROOT_ID);
    let sub = c.lookup(ROOT_ID, "sub").nodeid;
    assert_eq!(c.lookup(sub, "..").nodeid, ROOT_ID);
    // Multi-component names are refused outright.
    for name in ["sub/../..", "../etc", "/etc", "sub/"] {
        assert_eq!(c.errno(Opcode::Lookup, ROOT_ID, &cstr(name)), libc::EINVAL, "{name}");
    }
    // A symlink is looked up as a symlink, never followed on the host.
    let link = c.lookup(ROOT_ID, "escape");
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(c.ok(Opcode::Readlink, link.nodeid, &[]), b"/");
    assert_eq!(c.errno(Opcode::Lookup, link.nodeid, &cstr("etc")), libc::ENOTDIR);
    assert!(c.open(link.nodeid, libc::O_RDONLY).is_err());
    assert!(c.call(Opcode::Opendir, link.nodeid, OpenIn::default().as_slice()).0 != 0);
}

#[test]
fn hostile_chains_are_completed_and_the_device_keeps_going() {
    let (_dir, c) = client(true);
    let m = mem();
    let getattr = |unique| message(Opcode::Getattr as u32, unique, ROOT_ID, GetattrIn::default().as_slice());
    let mut reqs: Vec<Vec<u8>> = vec![
        getattr(1),
        // Header claims more than the buffer holds.
        {
            let mut r = message(Opcode::Lookup as u32, 2, ROOT_ID, &cstr("hello.txt"));
            r[..4].copy_from_slice(&4096u32.to_le_bytes());
            r
        },
        // Header claims less than the header itself.
        {
            let mut r = message(Opcode::Lookup as u32, 3, ROOT_ID, &cstr("hello.txt"));
            r[..4].copy_from_slice(&0u32.to_le_bytes());
            r
        },
        // Header claims 4 GiB.
        {
            let mut r = getattr(4);
            r[..4].copy_from_slice(&u32::MAX.to_le_bytes());
            r
        },
        message(9999, 5, ROOT_ID, &[]),
        // Truncated header.
        getattr(6)[..20].to_vec(),
        // Name without its NUL terminator.
        message(Opcode::Lookup as u32, 7, ROOT_ID, b"hello.txt"),
        getattr(8),
    ];
    let mut addrs = Vec::new();
    for (i, r) in reqs.iter_mut().enumerate() {
        let addr = REQ + i as u64 * 0x1000;
        m.write_slice(r, GuestAddress(addr)).unwrap();
        addrs.push((addr, r.len() as u32));
    }
    let resp = |i: u64| RESP + i * 0x1000;
    let pair = |i: usize, idx: u16| {
        [desc(addrs[i].0, addrs[i].1, F_NEXT, idx + 1), desc(resp(i as u64), 0x1000, F_WRITE, 0)]
    };
    let mut descs = Vec::new();
    let mut push = |d: &[RawDescriptor]| descs.extend_from_slice(d);
    push(&pair(0, 0)); // 0: fine
    push(&pair(1, 2)); // 1: header longer than buffer
    push(&pair(2, 4)); // 2: header shorter than header
    push(&pair(3, 6)); // 3: 4 GiB header
    push(&pair(4, 8)); // 4: unknown opcode
    push(&pair(5, 10)); // 5: truncated header
    push(&pair(6, 12)); // 6: unterminated name
                        // 7: request outside guest memory
    push(&[desc(0xffff_0000_0000, 64, F_NEXT, 15), desc(resp(7), 0x1000, F_WRITE, 0)]);
    // 8: zero-length request
    push(&[desc(addrs[0].0, 0, F_NEXT, 17), desc(resp(8), 0x1000, F_WRITE, 0)]);
    // 9: only device-writable buffers (no request at all)
    push(&[desc(resp(9), 0x1000, F_WRITE, 0)]);
    // 10: only a request, no room for the reply
    push(&[desc(addrs[0].0, addrs[0].1, 0, 0)]);
    // 11: reply buffer too short for the reply
    push(&[desc(addrs[0].0, addrs[0].1, F_NEXT, 21), desc(resp(11), 8, F_WRITE, 0)]);
    // 12: reply buffer of 4 GiB
    push(&[desc(addrs[0].0, addrs[0].1, F_NEXT, 23), desc(resp(12), u32::MAX, F_WRITE, 0)]);
    // 13: reply buffer outside guest memory
    push(&[desc(addrs[0].0, addrs[0].1, F_NEXT, 25), desc(0xffff_0000_0000, 0x1000, F_WRITE, 0)]);
    // 14: fine again
    push(&pair(7, 26));
    let lens = serve(&c.dev, &m, &descs);
    let hdr = size_of::<OutHeader>() as u32;
    let attr = hdr + size_of::<AttrOut>() as u32;
    // Chain 6 does get an EINVAL reply written, but the server reports it as an error, so it
    // is completed with length 0 like the other undecodable requests.
    assert_eq!(lens, [attr, 0, 0, hdr, hdr, 0, 0, 0, 0, 0, 0, 0, 0, 0, attr]);
    let err = |i: u64| m.read_obj::<OutHeader>(GuestAddress(resp(i))).unwrap().error;
    assert_eq!(err(3), -libc::ENOMEM);
    assert_eq!(err(4), -libc::ENOSYS);
    // The last chain replies into request 7's buffer.
    assert_eq!(err(7), 0);
}

#[test]
fn looping_chain_terminates() {
    let (_dir, c) = client(true);
    let m = mem();
    let vq = MockSplitQueue::new(&m, 4);
    vq.build_desc_chain(&[desc(REQ, 64, F_NEXT, 1), desc(RESP, 64, F_WRITE | F_NEXT, 0)]).unwrap();
    // Point the last descriptor back at the first.
    vq.desc_table().store(1, desc(RESP, 64, F_WRITE | F_NEXT, 0)).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert_eq!(process_queue(&mut q, &m, &c.dev.server, MAX_CHAINS_PER_PASS), (1, false));
}

#[test]
fn budget_bounds_one_pass() {
    let (_dir, c) = client(true);
    let m = mem();
    let req = message(Opcode::Getattr as u32, 1, ROOT_ID, GetattrIn::default().as_slice());
    m.write_slice(&req, GuestAddress(REQ)).unwrap();
    let vq = MockSplitQueue::new(&m, 16);
    let len = req.len() as u32;
    vq.build_multiple_desc_chains(&[
        desc(REQ, len, F_NEXT, 1),
        desc(RESP, 0x1000, F_WRITE, 0),
        desc(REQ, len, F_NEXT, 3),
        desc(RESP, 0x1000, F_WRITE, 0),
        desc(REQ, len, F_NEXT, 5),
        desc(RESP, 0x1000, F_WRITE, 0),
    ])
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert_eq!(process_queue(&mut q, &m, &c.dev.server, 2), (2, true));
    assert_eq!(process_queue(&mut q, &m, &c.dev.server, 2), (1, false));
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn worker_serves_both_queues_and_resets() {
    let (_dir, mut dev) = share(true);
    let m = mem();
    // Queue 0 (high priority) at 0, queue 1 (requests) at 64 KiB.
    let hiprio = MockSplitQueue::create(&m, GuestAddress(0), 16);
    let requests = MockSplitQueue::create(&m, GuestAddress(0x1_0000), 16);
    let init = InitIn { major: KERNEL_VERSION, minor: 31, max_readahead: 0, flags: 0 };
    let msgs = [
        message(Opcode::Init as u32, 1, 0, init.as_slice()),
        message(Opcode::Lookup as u32, 2, ROOT_ID, &cstr("hello.txt")),
    ];
    let mut descs = Vec::new();
    for (i, msg) in msgs.iter().enumerate() {
        let addr = REQ + i as u64 * 0x1000;
        m.write_slice(msg, GuestAddress(addr)).unwrap();
        let idx = i as u16 * 2;
        descs.push(desc(addr, msg.len() as u32, F_NEXT, idx + 1));
        descs.push(desc(RESP + i as u64 * 0x1000, 0x1000, F_WRITE, 0));
    }
    requests.build_multiple_desc_chains(&descs).unwrap();
    let forget = message(Opcode::Forget as u32, 3, 2, ForgetIn { nlookup: 1 }.as_slice());
    m.write_slice(&forget, GuestAddress(REQ + 0x8000)).unwrap();
    hiprio.build_multiple_desc_chains(&[desc(REQ + 0x8000, forget.len() as u32, 0, 0)]).unwrap();

    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(irqfd.try_clone().unwrap()));
    let evts: Vec<EventFd> = (0..2).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
    let kicks: Vec<EventFd> = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let ctx = |queues: Vec<Queue>, queue_evts: Vec<EventFd>| ActivateContext {
        mem: m.clone(),
        queues,
        queue_evts,
        interrupt: interrupt.clone(),
        acked_features: VIRTIO_F_VERSION_1,
    };
    // One queue is not enough.
    let one = ctx(vec![requests.create_queue().unwrap()], vec![EventFd::new(EFD_NONBLOCK).unwrap()]);
    assert!(matches!(dev.activate(one), Err(ActivateError::QueueCount { needed: 2, ready: 1 })));

    let queues = vec![hiprio.create_queue().unwrap(), requests.create_queue().unwrap()];
    dev.activate(ctx(queues, evts)).unwrap();
    // Started but never used (not mounted): a snapshot may be taken.
    assert_eq!(dev.snapshot_ready(), Ok(()));
    kicks[1].write(1).unwrap();
    wait_for("request queue", || requests.used().idx().load() == 2);
    // A FUSE session exists now: refused.
    wait_for("request count", || dev.snapshot_ready().is_err());
    wait_for("interrupt", || irqfd.read().is_ok());
    let lookup: OutHeader = m.read_obj(GuestAddress(RESP + 0x1000)).unwrap();
    assert_eq!((lookup.error, lookup.unique), (0, 2));
    let nodeid = m.read_obj::<EntryOut>(GuestAddress(RESP + 0x1000 + 16)).unwrap().nodeid;
    assert!(nodeid > ROOT_ID);
    kicks[0].write(1).unwrap();
    wait_for("high-priority queue", || hiprio.used().idx().load() == 1);
    // FORGET has no reply.
    assert_eq!(hiprio.used().ring().ref_at(0).unwrap().load().len(), 0);
    assert!(interrupt.status() & crate::devices::virtio::interrupt::INT_VRING != 0);

    // Reset stops the worker and forgets every inode the driver had.
    dev.reset();
    assert!(!dev.worker.is_running());
    assert_eq!(dev.snapshot_ready(), Ok(()));
    let mut c = Client { dev, unique: 10 };
    assert_eq!(c.errno(Opcode::Getattr, nodeid, GetattrIn::default().as_slice()), libc::EBADF);
    c.ok(Opcode::Getattr, ROOT_ID, GetattrIn::default().as_slice());
}

#[test]
fn symlink_swapped_in_after_lookup_is_not_followed() {
    let (dir, mut c) = client(true);
    let entry = c.lookup(ROOT_ID, "hello.txt");
    // The host (or another VM sharing the directory) replaces the file with a symlink to a host
    // secret between the guest's LOOKUP and its OPEN.
    let secret = dir.as_path().parent().unwrap().join(format!("husk-secret-{}", std::process::id()));
    std::fs::write(&secret, b"HOST SECRET").unwrap();
    let path = dir.as_path().join("hello.txt");
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&secret, &path).unwrap();
    // The inode is the handle taken at LOOKUP (O_PATH, no follow): the open reaches the original
    // file, never the link's target.
    let fh = c.open(entry.nodeid, libc::O_RDONLY).unwrap();
    let read = ReadIn { fh, offset: 0, size: 4096, ..Default::default() };
    assert_eq!(c.ok(Opcode::Read, entry.nodeid, read.as_slice()), HELLO);
    // A fresh lookup sees the symlink as a symlink, and opening it is refused.
    let link = c.lookup(ROOT_ID, "hello.txt");
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert!(c.open(link.nodeid, libc::O_RDONLY).is_err());
    std::fs::remove_file(secret).unwrap();
}

/// A writable share of `files` empty files whose caps are small enough to reach.
fn capped(files: usize, limits: Limits) -> (TempDir, Client) {
    let dir = TempDir::new_with_prefix("/tmp/husk-fs-").unwrap();
    for i in 0..files {
        std::fs::write(dir.as_path().join(format!("f{i}")), b"").unwrap();
    }
    let root = std::fs::canonicalize(dir.as_path()).unwrap().to_str().unwrap().to_string();
    let inner = PassthroughFs::new(passthrough_config(root, FsCache::Auto)).unwrap();
    let dev = Fs::with_fs("share", ShareFs::with_limits(inner, false, limits)).unwrap();
    prepare_server_thread().unwrap();
    let mut c = Client { dev, unique: 0 };
    c.init();
    (dir, c)
}

impl Client {
    /// FORGET has no reply.
    fn forget(&mut self, nodeid: u64, nlookup: u64) {
        self.unique += 1;
        let m = mem();
        let req = message(Opcode::Forget as u32, self.unique, nodeid, ForgetIn { nlookup }.as_slice());
        m.write_slice(&req, GuestAddress(REQ)).unwrap();
        assert_eq!(serve(&self.dev, &m, &[desc(REQ, req.len() as u32, 0, 0)]), [0]);
    }

    fn release(&mut self, opcode: Opcode, nodeid: u64, fh: u64) {
        self.ok(opcode, nodeid, ReleaseIn { fh, ..Default::default() }.as_slice());
    }
}

#[test]
fn inode_cap_refuses_lookups_until_the_guest_forgets() {
    let (dir, mut c) = capped(10, Limits { inodes: 4, handles: 64 });
    let mut held = Vec::new();
    // A flood of lookups over ten files: four distinct inodes at most, however often.
    for round in 0..1_000 {
        let name = format!("f{}", round % 10);
        match c.call(Opcode::Lookup, ROOT_ID, &cstr(&name)) {
            (0, out) => held.push(obj::<EntryOut>(&out).nodeid),
            (e, _) => assert_eq!(-e, libc::ENFILE, "{name}"),
        }
    }
    let distinct: HashSet<u64> = held.iter().copied().collect();
    assert_eq!(distinct.len(), 4);
    // The root is not counted, and files already held are still looked up.
    assert_eq!(c.lookup(ROOT_ID, "..").nodeid, ROOT_ID);
    c.lookup(ROOT_ID, "f0");
    // Nothing new is made at the cap: the host directory is left as it was.
    let mkdir = [MkdirIn { mode: 0o755, umask: 0 }.as_slice(), &cstr("d")].concat();
    assert_eq!(c.errno(Opcode::Mkdir, ROOT_ID, &mkdir), libc::ENFILE);
    let create =
        CreateIn { flags: (libc::O_CREAT | libc::O_RDWR) as u32, mode: 0o644, umask: 0, fuse_flags: 0 };
    assert_eq!(c.errno(Opcode::Create, ROOT_ID, &[create.as_slice(), &cstr("new")].concat()), libc::ENFILE);
    assert!(!dir.as_path().join("d").exists() && !dir.as_path().join("new").exists());
    // Once the guest forgets every lookup of one, another fits.
    let f0 = c.lookup(ROOT_ID, "f0").nodeid;
    let lookups = held.iter().filter(|&&n| n == f0).count() as u64 + 2;
    c.forget(f0, lookups);
    assert_eq!(c.errno(Opcode::Getattr, f0, GetattrIn::default().as_slice()), libc::EBADF, "gone");
    c.lookup(ROOT_ID, "f9");
    assert_eq!(c.errno(Opcode::Lookup, ROOT_ID, &cstr("f8")), libc::ENFILE);
    // FUSE_DESTROY drops everything, the counts with it.
    c.dev.fs.destroy();
    c.init();
    for i in 0..4 {
        c.lookup(ROOT_ID, &format!("f{i}"));
    }
}

#[test]
fn handle_cap_refuses_opens_until_released() {
    let (_dir, mut c) = capped(1, Limits { inodes: 64, handles: 3 });
    let f0 = c.lookup(ROOT_ID, "f0").nodeid;
    let mut fhs: Vec<u64> = (0..3).map(|_| c.open(f0, libc::O_RDONLY).unwrap()).collect();
    for _ in 0..1_000 {
        assert_eq!(c.open(f0, libc::O_RDONLY), Err(libc::ENFILE));
    }
    assert_eq!(c.errno(Opcode::Opendir, ROOT_ID, OpenIn::default().as_slice()), libc::ENFILE);
    let create =
        CreateIn { flags: (libc::O_CREAT | libc::O_RDWR) as u32, mode: 0o644, umask: 0, fuse_flags: 0 };
    assert_eq!(c.errno(Opcode::Create, ROOT_ID, &[create.as_slice(), &cstr("new")].concat()), libc::ENFILE);
    // A release of a handle that does not exist frees no slot.
    assert_eq!(
        c.errno(Opcode::Release, f0, ReleaseIn { fh: 9_999, ..Default::default() }.as_slice()),
        libc::EBADF
    );
    assert_eq!(c.open(f0, libc::O_RDONLY), Err(libc::ENFILE));
    c.release(Opcode::Release, f0, fhs.pop().unwrap());
    let dh: OpenOut = obj(&c.ok(Opcode::Opendir, ROOT_ID, OpenIn::default().as_slice()));
    assert_eq!(c.open(f0, libc::O_RDONLY), Err(libc::ENFILE));
    c.release(Opcode::Releasedir, ROOT_ID, dh.fh);
    // A create takes one slot too.
    let out = c.ok(Opcode::Create, ROOT_ID, &[create.as_slice(), &cstr("new")].concat());
    let opened: OpenOut = obj(&out[size_of::<EntryOut>()..]);
    assert_eq!(c.open(f0, libc::O_RDONLY), Err(libc::ENFILE));
    c.release(Opcode::Release, obj::<EntryOut>(&out).nodeid, opened.fh);
    c.open(f0, libc::O_RDONLY).unwrap();
}

#[test]
fn readdirplus_at_the_inode_cap_still_lists_every_name() {
    let (_dir, mut c) = capped(10, Limits { inodes: 3, handles: 64 });
    let dh: OpenOut = obj(&c.ok(Opcode::Opendir, ROOT_ID, OpenIn::default().as_slice()));
    let read = ReadIn { fh: dh.fh, offset: 0, size: 0x1_0000, ..Default::default() };
    let out = c.ok(Opcode::Readdirplus, ROOT_ID, read.as_slice());
    // (node id, name) of each entry.
    let mut entries = Vec::new();
    let mut at = 0;
    while at < out.len() {
        let entry: EntryOut = obj(&out[at..]);
        let dirent: Dirent = obj(&out[at + size_of::<EntryOut>()..]);
        let name_at = at + size_of::<EntryOut>() + size_of::<Dirent>();
        let name = String::from_utf8(out[name_at..name_at + dirent.namelen as usize].to_vec()).unwrap();
        entries.push((entry.nodeid, name));
        at = (name_at + dirent.namelen as usize + 7) & !7;
    }
    let mut names: Vec<&str> = entries.iter().map(|(_, n)| n.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        (0..10).map(|i| format!("f{i}")).collect::<Vec<_>>().iter().map(String::as_str).collect::<Vec<_>>()
    );
    let with_lookup: Vec<&(u64, String)> = entries.iter().filter(|(n, _)| *n != 0).collect();
    assert_eq!(with_lookup.len(), 3, "{entries:?}");
    // A name listed without a lookup cannot be looked up either, until one is forgotten.
    let (_, bare) = entries.iter().find(|(n, _)| *n == 0).unwrap();
    assert_eq!(c.errno(Opcode::Lookup, ROOT_ID, &cstr(bare)), libc::ENFILE);
    c.forget(with_lookup[0].0, 1);
    c.lookup(ROOT_ID, bare);
}

const KILLPRIV_V2: u32 = FsOptions::HANDLE_KILLPRIV_V2.bits() as u32;

fn host_mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn set_host_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    assert_eq!(host_mode(path), mode);
}

/// The guest kernel (FUSE_HANDLE_KILLPRIV_V2) flags the requests whose caller lacks
/// CAP_FSETID, and the server, which has it, must then clear setuid/setgid on the host file
/// itself; unflagged requests keep the bits, as for a local root writer.
#[test]
fn killpriv_v2_requests_clear_setuid_and_setgid() {
    const SUGID: u32 = 0o6755;
    let (dir, dev) = share(false);
    let mut c = Client { dev, unique: 0 };
    assert_ne!(c.init_with(KILLPRIV_V2).flags & KILLPRIV_V2, 0, "KILLPRIV_V2 not negotiated");
    let path = dir.as_path().join("hello.txt");
    let file = c.lookup(ROOT_ID, "hello.txt").nodeid;
    let fh = c.open(file, libc::O_RDWR).unwrap();
    let write = |c: &mut Client, fuse_flags: u32| {
        let w = WriteIn { fh, offset: 0, size: 1, fuse_flags, ..Default::default() };
        c.ok(Opcode::Write, file, &[w.as_slice(), b"H"].concat());
    };
    let setattr = |c: &mut Client, s: SetattrIn| obj::<AttrOut>(&c.ok(Opcode::Setattr, file, s.as_slice()));
    let has_fsetid = || caps::has_cap(None, CapSet::Effective, Capability::CAP_FSETID).unwrap();
    assert!(has_fsetid(), "tests run as root");

    set_host_mode(&path, SUGID);
    write(&mut c, 0);
    assert_eq!(host_mode(&path), SUGID, "unflagged write");
    write(&mut c, WRITE_KILL_PRIV);
    assert_eq!(host_mode(&path), 0o755, "flagged write");
    assert!(has_fsetid(), "CAP_FSETID is back after the request");

    // Truncate: SETATTR(SIZE), flagged when the caller lacks CAP_FSETID.
    set_host_mode(&path, SUGID);
    setattr(&mut c, SetattrIn { valid: SetattrValid::SIZE.bits(), size: 4, ..Default::default() });
    assert_eq!(host_mode(&path), SUGID, "unflagged truncate");
    let valid = (SetattrValid::SIZE | SetattrValid::KILL_SUIDGID).bits();
    let out = setattr(&mut c, SetattrIn { valid, size: 2, ..Default::default() });
    assert_eq!((host_mode(&path), out.attr.mode & 0o7777), (0o755, 0o755), "flagged truncate");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 2);

    // chown: always flagged by the guest (and always clears on the host).
    set_host_mode(&path, SUGID);
    let valid = (SetattrValid::UID | SetattrValid::GID | SetattrValid::KILL_SUIDGID).bits();
    setattr(&mut c, SetattrIn { valid, uid: 1000, gid: 1000, ..Default::default() });
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid(), host_mode(&path)), (1000, 1000, 0o755), "chown");

    // OPEN with O_TRUNC, and CREATE of an existing file.
    set_host_mode(&path, SUGID);
    c.open_with(file, libc::O_WRONLY | libc::O_TRUNC, 0).unwrap();
    assert_eq!(host_mode(&path), SUGID, "unflagged O_TRUNC");
    c.open_with(file, libc::O_WRONLY | libc::O_TRUNC, FOPEN_IN_KILL_SUIDGID).unwrap();
    assert_eq!(host_mode(&path), 0o755, "flagged O_TRUNC");
    set_host_mode(&path, SUGID);
    let flags = (libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC) as u32;
    let create = CreateIn { flags, mode: libc::S_IFREG | 0o644, umask: 0, fuse_flags: FOPEN_IN_KILL_SUIDGID };
    c.ok(Opcode::Create, ROOT_ID, &[create.as_slice(), &cstr("hello.txt")].concat());
    assert_eq!(host_mode(&path), 0o755, "flagged create of an existing file");
    assert!(has_fsetid());
}

#[test]
fn killpriv_v2_on_a_read_only_share_changes_nothing() {
    let (dir, dev) = share(true);
    let mut c = Client { dev, unique: 0 };
    assert_ne!(c.init_with(KILLPRIV_V2).flags & KILLPRIV_V2, 0);
    let path = dir.as_path().join("hello.txt");
    set_host_mode(&path, 0o6755);
    let file = c.lookup(ROOT_ID, "hello.txt").nodeid;
    assert_eq!(c.open_with(file, libc::O_WRONLY | libc::O_TRUNC, FOPEN_IN_KILL_SUIDGID), Err(libc::EROFS));
    let valid = (SetattrValid::SIZE | SetattrValid::KILL_SUIDGID).bits();
    assert_eq!(
        c.errno(Opcode::Setattr, file, SetattrIn { valid, ..Default::default() }.as_slice()),
        libc::EROFS
    );
    // A flag the kernel would not send on a read-only open does nothing either.
    let fh = c.open_with(file, libc::O_RDONLY, FOPEN_IN_KILL_SUIDGID).unwrap();
    let w = WriteIn { fh, offset: 0, size: 1, fuse_flags: WRITE_KILL_PRIV, ..Default::default() };
    assert_eq!(c.errno(Opcode::Write, file, &[w.as_slice(), b"H"].concat()), libc::EROFS);
    assert_eq!(host_mode(&path), 0o6755);
    assert_eq!(std::fs::read(&path).unwrap(), HELLO);
}

/// The umask(0) the passthrough needs holds on the server thread only: the process keeps its
/// own, and guest-chosen modes land exactly, masked only by the umask the guest sends.
#[test]
fn umask_zero_is_the_server_threads_alone() {
    let dir = TempDir::new_with_prefix("/tmp/husk-fs-").unwrap();
    let cfg = FsShareConfig {
        tag: "share".into(),
        path: dir.as_path().into(),
        read_only: false,
        cache: FsCache::Auto,
    };
    // SAFETY: umask(2) takes no pointers and cannot fail; this test thread has not unshared its
    // umask, so this sets the process's (the usual 022; the old one is put back below).
    let saved = unsafe { libc::umask(0o022) };
    let dev = Fs::new(&cfg).unwrap();
    // The device's worker, with FUSE_INIT (the passthrough's umask(0)) and FUSE_DESTROY.
    std::thread::spawn(move || {
        prepare_server_thread().unwrap();
        let mut c = Client { dev, unique: 0 };
        c.init();
        let create = |c: &mut Client, name: &str, umask: u32| {
            let flags = (libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY) as u32;
            let body = CreateIn { flags, mode: libc::S_IFREG | 0o666, umask, fuse_flags: 0 };
            c.ok(Opcode::Create, ROOT_ID, &[body.as_slice(), &cstr(name)].concat());
        };
        create(&mut c, "open", 0);
        create(&mut c, "masked", 0o027);
        c.ok(Opcode::Mkdir, ROOT_ID, &[MkdirIn { mode: 0o777, umask: 0 }.as_slice(), &cstr("d")].concat());
        c.dev.fs.destroy();
    })
    .join()
    .unwrap();
    // SAFETY: as above; puts the saved mask back and reads the one in force.
    let now = unsafe { libc::umask(saved) };
    assert_eq!(now, 0o022, "the process umask changed");
    let mode = |name: &str| host_mode(&dir.as_path().join(name));
    assert_eq!((mode("open"), mode("masked"), mode("d")), (0o666, 0o640, 0o777));
}

/// Requests of up to 1 MiB when the guest kernel offers them (FUSE_MAX_PAGES), none when not.
#[test]
fn max_pages_is_negotiated_when_offered() {
    const MAX_PAGES: u32 = FsOptions::MAX_PAGES.bits() as u32;
    let (_dir, dev) = share(true);
    let mut c = Client { dev, unique: 0 };
    let out = c.init_with(MAX_PAGES);
    assert_ne!(out.flags & MAX_PAGES, 0, "MAX_PAGES not negotiated");
    assert_eq!((out.max_pages, out.max_write), (256, 1 << 20));
    let (_dir, dev) = share(true);
    let mut c = Client { dev, unique: 0 };
    let out = c.init_with(0);
    assert_eq!((out.flags & MAX_PAGES, out.max_pages), (0, 0));
}

const CACHE_SYMLINKS: u32 = FsOptions::CACHE_SYMLINKS.bits() as u32;
const NO_OPENDIR: u32 = FsOptions::ZERO_MESSAGE_OPENDIR.bits() as u32;

/// Under `cache=auto` and `always` a missing name is a negative entry the guest may keep for
/// the share's timeout, and symlink targets may be cached; under `never`, neither.
#[test]
fn missing_names_and_symlinks_are_cached_as_long_as_names_are() {
    for (cache, secs) in [(FsCache::Auto, 1), (FsCache::Always, 86_400)] {
        let (_dir, dev) = share_cached(true, cache);
        let mut c = Client { dev, unique: 0 };
        let out = c.init_with(CACHE_SYMLINKS);
        assert_ne!(out.flags & CACHE_SYMLINKS, 0, "{cache:?}: CACHE_SYMLINKS not negotiated");
        let missing = c.lookup(ROOT_ID, "missing");
        assert_eq!((missing.nodeid, missing.entry_valid, missing.attr_valid), (0, secs, 0), "{cache:?}");
        // Found names are as before, and a negative entry is not counted as a lookup.
        let found = c.lookup(ROOT_ID, "hello.txt");
        assert_ne!(found.nodeid, 0);
        assert_eq!(found.entry_valid, secs);
        assert_eq!(c.dev.fs.held().0, 1, "{cache:?}");
        // Other errors stay errors.
        assert_eq!(c.errno(Opcode::Lookup, found.nodeid, &cstr("x")), libc::ENOTDIR);
    }
    let (_dir, dev) = share_cached(true, FsCache::Never);
    let mut c = Client { dev, unique: 0 };
    let out = c.init_with(CACHE_SYMLINKS);
    assert_eq!(out.flags & CACHE_SYMLINKS, 0, "never: CACHE_SYMLINKS negotiated");
    assert_eq!(c.errno(Opcode::Lookup, ROOT_ID, &cstr("missing")), libc::ENOENT);
    // Not offered, not taken.
    let (_dir, dev) = share(true);
    let mut c = Client { dev, unique: 0 };
    assert_eq!(c.init_with(0).flags & CACHE_SYMLINKS, 0);
}

/// Where the kernel offers FUSE_NO_OPENDIR_SUPPORT, directories are opened without a round
/// trip: OPENDIR gets ENOSYS (the kernel's cue), READDIR works without a handle, and no
/// handle slot is held.
#[test]
fn directories_are_read_without_opendir_when_the_kernel_allows() {
    let (_dir, dev) = share(true);
    let mut c = Client { dev, unique: 0 };
    let out = c.init_with(NO_OPENDIR);
    assert_ne!(out.flags & NO_OPENDIR, 0, "NO_OPENDIR_SUPPORT not negotiated");
    assert_eq!(c.errno(Opcode::Opendir, ROOT_ID, OpenIn::default().as_slice()), libc::ENOSYS);
    assert_eq!(c.dev.fs.held().1, 0);
    let read = ReadIn { fh: 0, offset: 0, size: 0x1_0000, ..Default::default() };
    let out = c.ok(Opcode::Readdir, ROOT_ID, read.as_slice());
    let mut names = Vec::new();
    let mut at = 0;
    while at < out.len() {
        let dirent: Dirent = obj(&out[at..]);
        let name_at = at + size_of::<Dirent>();
        names.push(String::from_utf8(out[name_at..name_at + dirent.namelen as usize].to_vec()).unwrap());
        at = (name_at + dirent.namelen as usize + 7) & !7;
    }
    names.sort();
    assert_eq!(names, ["escape", "hello.txt", "sub"]);
    assert_eq!(c.dev.fs.held().1, 0);
    // A kernel that does not offer it still gets directory handles.
    let (_dir, dev) = share(true);
    let mut c = Client { dev, unique: 0 };
    assert_eq!(c.init_with(0).flags & NO_OPENDIR, 0);
    let dh: OpenOut = obj(&c.ok(Opcode::Opendir, ROOT_ID, OpenIn::default().as_slice()));
    assert_ne!(dh.fh, 0);
    assert_eq!(c.dev.fs.held().1, 1);
}
