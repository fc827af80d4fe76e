//! virtio-fs from a hostile guest: the input is a script of FUSE requests (a real `InHeader`
//! with fuzzed opcode, node id, unique, credentials and length, a body assembled from raw bytes
//! and names of the share's entries) carried in fuzzer-shaped descriptor chains (split readable
//! parts, 0-3 reply buffers of chosen sizes, indirect tables), raw chains, writes anywhere in
//! guest RAM, and queue passes with chosen budgets, all served by `fs::process_queue` exactly
//! as the device worker serves them.
//!
//! The share is read-only: a small directory with a file, an empty file, a 128 KiB file, a
//! subdirectory, a FIFO and symlinks (one pointing at `/`). A writable share is fuzzed only when
//! `HUSK_FUZZ_RW_DIR` names a directory on a tmpfs (so its size is capped); see the README.
//!
//! Every iteration starts from the same state: fresh guest memory, then a FUSE_DESTROY (drops
//! every inode and handle the last iteration's guest held, re-imports the root), a FUSE_INIT
//! with fuzzed minor version and flags, a LOOKUP of `hello.txt` and an OPENDIR of the root; a
//! writable share is also rebuilt from scratch. The passthrough's inode and handle counters run
//! on across DESTROY, so node ids and handles in the script are relative to what that LOOKUP
//! and OPENDIR returned (node 2 is `hello.txt`, handle 0 the root directory).

#![no_main]

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use husk_vmm::config::{FsCache, FsShareConfig};
use husk_vmm::devices::virtio::fs::{process_queue, Fs, MAX_CHAINS_PER_PASS, QUEUE_SIZE};
use husk_vmm_fuzz::*;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: u32 = 16;
const FUSE_LOOKUP: u32 = 1;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_DESTROY: u32 = 38;
const MAX_COMMANDS: usize = 64;
const HELLO: &[u8] = b"hello, virtio-fs\n";
/// Names the guest can put in requests (NUL added), besides raw bytes.
const NAMES: [&str; 12] =
    ["hello.txt", "sub", "nested.txt", "escape", "link", "fifo", "big.bin", "empty", "..", ".", "new", ""];
const TMPFS_MAGIC: i64 = 0x0102_1994;

fn tmp_root() -> PathBuf {
    std::env::temp_dir().join(format!("husk-fuzz-fs-{}", std::process::id()))
}

fn populate(root: &Path, with_specials: bool) {
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("hello.txt"), HELLO).unwrap();
    std::fs::write(root.join("sub/nested.txt"), b"nested\n").unwrap();
    if with_specials {
        std::fs::write(root.join("empty"), b"").unwrap();
        let big: Vec<u8> = (0..128 * 1024).map(|i| i as u8).collect();
        std::fs::write(root.join("big.bin"), big).unwrap();
        std::os::unix::fs::symlink("/", root.join("escape")).unwrap();
        std::os::unix::fs::symlink("hello.txt", root.join("link")).unwrap();
        let fifo = CString::new(root.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo/setxattr only read the NUL-terminated strings passed.
        unsafe {
            libc::mkfifo(fifo.as_ptr(), 0o644);
            let f = CString::new(root.join("hello.txt").to_str().unwrap()).unwrap();
            let (name, value) = (c"user.fuzz", b"xattr-value");
            libc::setxattr(f.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0);
        }
    }
}

/// The writable share's root, if `HUSK_FUZZ_RW_DIR` is a tmpfs.
fn rw_root() -> Option<&'static Path> {
    static RW: OnceLock<Option<PathBuf>> = OnceLock::new();
    RW.get_or_init(|| {
        let dir = PathBuf::from(std::env::var_os("HUSK_FUZZ_RW_DIR")?);
        let c = CString::new(dir.to_str()?).ok()?;
        // SAFETY: statfs writes only `st`.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        let is_tmpfs = unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type == TMPFS_MAGIC;
        assert!(is_tmpfs, "HUSK_FUZZ_RW_DIR must be a (size-limited) tmpfs mount");
        let root = dir.join(format!("share-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        populate(&root, false);
        at_exit_remove(root.clone());
        Some(root)
    })
    .as_deref()
}

fn reset_rw(root: &Path) {
    let _ = std::fs::remove_dir_all(root);
    populate(root, false);
}

/// One device per (writable, cache) combination, made on first use and kept for the process.
fn share(writable: bool, cache: u8) -> &'static Fs {
    static SHARES: [OnceLock<Fs>; 6] = [const { OnceLock::new() }; 6];
    SHARES[usize::from(writable) * 3 + cache as usize].get_or_init(|| {
        let path = if writable {
            rw_root().unwrap().to_path_buf()
        } else {
            let ro = tmp_root().join("ro");
            if !ro.exists() {
                let _ = std::fs::remove_dir_all(tmp_root());
                populate(&ro, true);
                at_exit_remove(tmp_root());
            }
            ro
        };
        let cache = [FsCache::Never, FsCache::Auto, FsCache::Always][cache as usize];
        let cfg = FsShareConfig { tag: "fuzz".into(), path, read_only: !writable, cache };
        Fs::new(&cfg).expect("share")
    })
}

fn in_header(len: u32, opcode: u32, unique: u64, nodeid: u64, uid: u32, gid: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(IN_HEADER_LEN);
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&uid.to_le_bytes());
    h.extend_from_slice(&gid.to_le_bytes());
    h.extend_from_slice(&[0u8; 8]); // pid, padding
    h
}

struct Run<'a> {
    mem: &'a Mem,
    fs: &'static Fs,
    ring: Ring,
    queue: Queue,
    alloc: Alloc,
    /// The passthrough numbers inodes and handles from process-wide counters that DESTROY does
    /// not reset; the preamble's LOOKUP and OPENDIR reveal where this iteration starts, and the
    /// script's small node ids and handles are taken relative to them.
    node_base: u64,
    handle_base: u64,
    /// (opcode, first reply buffer) of the script's requests, for `HUSK_FUZZ_DEBUG`.
    sent: Vec<(u32, u64)>,
}

fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("HUSK_FUZZ_DEBUG").is_some())
}

impl Run<'_> {
    fn serve(&mut self, budget: usize) {
        let before = self.queue.next_used();
        let (done, _) = process_queue(&mut self.queue, self.mem, self.fs.server(), budget);
        assert!(done <= budget);
        // Every chain reported completed was put in the used ring.
        assert_eq!(self.queue.next_used(), before.wrapping_add(done as u16));
    }

    /// Node id `n` of the script: 0 and 1 (ROOT_ID) as they are, then the inodes this
    /// iteration looked up, in order.
    fn node(&self, n: u8) -> u64 {
        match n {
            0 | 1 => u64::from(n),
            n => self.node_base + u64::from(n - 2),
        }
    }

    /// A well-formed chain: readable request bytes, then `reply` writable buffers. Returns
    /// the address of the first reply buffer.
    fn push_request(&mut self, req: &[u8], read_parts: usize, reply: &[u32], indirect: bool) -> u64 {
        let addr = self.alloc.alloc(req.len());
        let _ = self.mem.write_slice(req, GuestAddress(addr));
        let mut descs = split(addr, req.len(), read_parts, 0);
        let mut first_reply = 0;
        for (i, &len) in reply.iter().enumerate() {
            let at = self.alloc.alloc(len as usize);
            if i == 0 {
                first_reply = at;
            }
            descs.push((at, len, F_WRITE));
        }
        let head = if indirect {
            let table = self.alloc.alloc(16 * descs.len());
            self.ring.write_indirect(self.mem, table, &descs)
        } else {
            self.ring.write_chain(self.mem, &descs)
        };
        self.ring.push_avail(self.mem, head);
        first_reply
    }

    fn name(inp: &mut Input<'_>, out: &mut Vec<u8>) {
        let i = inp.u8() as usize;
        match NAMES.get(i % 16) {
            Some(n) => out.extend_from_slice(n.as_bytes()),
            None => {
                let n = inp.u8() as usize % 64;
                out.extend_from_slice(inp.bytes(n));
            }
        }
        out.push(0);
    }

    fn request(&mut self, inp: &mut Input<'_>) {
        let opcode = match inp.u8() {
            0xff => inp.u32(),
            o => u32::from(o),
        };
        let nodeid = match inp.u8() {
            0xff => inp.u64(),
            n => self.node(n),
        };
        let unique = u64::from(inp.u8());
        let (uid, gid) = if inp.u8() & 0x80 == 0 { (0, 0) } else { (inp.u32(), inp.u32()) };
        // Body: up to four parts, each raw bytes, a NUL-terminated name, a file handle or a
        // node id of this iteration (u64), so that the fixed structs (ReadIn, RenameIn, ...)
        // can name real objects.
        let count = 1 + (inp.u8() & 3);
        let kinds = inp.u8();
        let mut body = Vec::new();
        for k in 0..count {
            match (kinds >> (2 * k)) & 3 {
                0 => {
                    let n = inp.u8() as usize;
                    body.extend_from_slice(inp.bytes(n));
                }
                1 => Self::name(inp, &mut body),
                2 => body.extend_from_slice(&(self.handle_base + u64::from(inp.u8())).to_le_bytes()),
                _ => {
                    let n = inp.u8();
                    body.extend_from_slice(&self.node(n).to_le_bytes());
                }
            }
        }
        let exact = (IN_HEADER_LEN + body.len()) as u32;
        let len = match inp.u8() {
            0..=0xef => exact,
            0xf0..=0xfd => exact.wrapping_add(inp.u8() as i8 as u32),
            _ => inp.u32(),
        };
        let mut req = in_header(len, opcode, unique, nodeid, uid, gid);
        req.extend_from_slice(&body);
        let shape = inp.u8();
        let read_parts = 1 + (shape as usize & 3);
        let nreply = (shape >> 2) as usize & 3;
        let reply: Vec<u32> = (0..nreply)
            .map(|_| match inp.u8() % 5 {
                0 | 1 => 4096,
                2 => OUT_HEADER_LEN,
                3 => 0x2_0000,
                _ => u32::from(inp.u16()),
            })
            .collect();
        let at = self.push_request(&req, read_parts, &reply, shape & 0x80 != 0);
        if debug() {
            self.sent.push((opcode, if reply.is_empty() { 0 } else { at }));
        }
    }

    /// Reads the u64 right after the `OutHeader` of a successful reply (`EntryOut::nodeid`,
    /// `OpenOut::fh`).
    fn reply_u64(&self, at: u64) -> Option<u64> {
        let err: i32 = self.mem.read_obj(GuestAddress(at + 4)).ok()?;
        (err == 0).then(|| self.mem.read_obj(GuestAddress(at + u64::from(OUT_HEADER_LEN))).ok()).flatten()
    }

    fn command(&mut self, inp: &mut Input<'_>) {
        match inp.u8() % 12 {
            0..=6 => self.request(inp),
            7 => self.ring.raw_chain(self.mem, inp),
            8 => mem_write(self.mem, inp),
            9 => {
                let idx = inp.u16();
                self.ring.set_avail_idx(self.mem, idx);
            }
            10 => {
                // The same chain made available again.
                let head = self.ring.last_head;
                self.ring.push_avail(self.mem, head);
            }
            _ => {
                let budget = 1 + inp.u8() as usize;
                self.serve(budget);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let writable = mode & 1 != 0 && rw_root().is_some();
    let fs = share(writable, (mode >> 1) % 3);
    if writable {
        reset_rw(rw_root().unwrap());
    }
    let mem = guest_memory();
    let (ring, queue) = Ring::new(&mem, 0, QUEUE_SIZE);
    let mut run = Run {
        mem: &mem,
        fs,
        ring,
        queue,
        alloc: Alloc::default(),
        node_base: 2,
        handle_base: 1,
        sent: Vec::new(),
    };

    // Same starting state every iteration: DESTROY, then INIT with the script's version/flags.
    run.push_request(&in_header(IN_HEADER_LEN as u32, FUSE_DESTROY, 1, 0, 0, 0), 1, &[4096], false);
    let minor = match inp.u8() {
        0 => 31,
        m => u32::from(m),
    };
    let flags = inp.u32();
    let mut init = in_header((IN_HEADER_LEN + 16) as u32, FUSE_INIT, 2, 0, 0, 0);
    for v in [7, minor, 0x2_0000, flags] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    run.push_request(&init, 1, &[4096], false);
    let lookup =
        [in_header(IN_HEADER_LEN as u32 + 10, FUSE_LOOKUP, 3, 1, 0, 0), b"hello.txt\0".to_vec()].concat();
    let entry = run.push_request(&lookup, 1, &[4096], false);
    let mut opendir = in_header(IN_HEADER_LEN as u32 + 8, FUSE_OPENDIR, 4, 1, 0, 0);
    opendir.extend_from_slice(&[0u8; 8]); // OpenIn: flags, fuse_flags
    let open = run.push_request(&opendir, 1, &[4096], false);
    run.serve(4);
    run.node_base = run.reply_u64(entry).unwrap_or(2);
    run.handle_base = run.reply_u64(open).unwrap_or(1);

    for _ in 0..MAX_COMMANDS {
        if inp.is_empty() {
            break;
        }
        run.command(&mut inp);
    }
    run.serve(MAX_CHAINS_PER_PASS);
    if debug() {
        eprintln!("node_base {} handle_base {}", run.node_base, run.handle_base);
        for (op, at) in &run.sent {
            let err: Option<i32> = (*at != 0).then(|| mem.read_obj(GuestAddress(at + 4)).unwrap_or(0));
            eprintln!("  opcode {op:3}: reply error {err:?}");
        }
    }
});
