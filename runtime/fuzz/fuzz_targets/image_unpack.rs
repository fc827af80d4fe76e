//! Image layers from a hostile registry: the input describes 1-3 layers, each a tar stream
//! that is either built by the harness from a script of entries (so that headers carry valid
//! checksums and the fuzzer's mutations go to what the entries say) or taken from raw bytes
//! whose header checksums the harness fixes up, then stored uncompressed, gzip- or
//! zstd-compressed as verified blobs, and unpacked with `husk_image::unpack_layers` into a
//! fresh directory, with small limits (256 KiB and 48 entries per layer) and optionally the
//! layers' diff_ids (right or wrong).
//!
//! Entries: regular files (ustar, GNU or pre-POSIX headers), directories, symlinks, hard
//! links, devices, FIFOs, contiguous and sparse files, unknown types; paths made of `a`, `b`,
//! `..`, `.`, empty components, whiteouts, opaque markers, aufs names, long names, a leading
//! `/` or `./`; link targets inside, above and outside the destination, absolute ones naming the
//! sentinel directory; modes with setuid bits, any owner and mtime; a declared size that differs
//! from the data; PAX records (path, linkpath, size, uid, gid, mtime, xattrs of every namespace,
//! sparse maps, malformed lengths) and GNU long names and links; raw 512-byte blocks; the end
//! of archive or not, garbage after it, and streams cut short.
//!
//! Checked: `unpack_layers` returns (no panic; `-timeout` catches a hang), and whether it
//! succeeded or not, nothing outside the destination changed: the sandbox holds exactly
//! `dest`, `blobs` and `outside`, and `outside` (a file, a directory and a file in it) has the
//! same entries, types, modes, owners, sizes, link counts, mtimes and contents as before.
//!
//! Everything happens in the target's sandbox (see `confine`), `/tmp/husk-fuzz-image-unpack`,
//! a tmpfs in a mount namespace where every other mount is read-only: an escape that the
//! sentinel does not see still cannot write to the host.

#![no_main]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use husk_image::{unpack_layers, UnpackLimits};
use husk_runtime_fuzz::{confine, Input};
use libfuzzer_sys::fuzz_target;
use oci_spec::image::{Descriptor, DescriptorBuilder, Digest, MediaType};
use sha2::{Digest as _, Sha256};

const SANDBOX: &str = "image-unpack";
const LIMITS: UnpackLimits = UnpackLimits { max_layer_bytes: 256 << 10, max_layer_entries: 48 };
const MAX_ENTRIES_BUILT: usize = 64;

struct Env {
    sandbox: PathBuf,
    before: BTreeMap<PathBuf, String>,
}

fn debug() -> bool {
    static D: OnceLock<bool> = OnceLock::new();
    *D.get_or_init(|| std::env::var_os("HUSK_FUZZ_DEBUG").is_some_and(|v| v == "1"))
}

fn env() -> &'static Env {
    static E: OnceLock<Env> = OnceLock::new();
    E.get_or_init(|| {
        let sandbox = confine(SANDBOX);
        let out = sandbox.join("outside");
        std::fs::create_dir_all(out.join("dir")).expect("outside/dir");
        std::fs::write(out.join("secret"), b"secret").expect("outside/secret");
        std::fs::write(out.join("dir/x"), b"x").expect("outside/dir/x");
        let before = snapshot(&out);
        Env { sandbox, before }
    })
}

/// Everything about a tree that an escape could change, by path.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).expect("sentinel metadata");
        let mut desc = format!(
            "{:o} {}:{} {} bytes {} links mtime {}.{}",
            m.mode(),
            m.uid(),
            m.gid(),
            m.size(),
            m.nlink(),
            m.mtime(),
            m.mtime_nsec()
        );
        if m.is_dir() {
            for e in std::fs::read_dir(&p).expect("sentinel dir") {
                todo.push(e.expect("sentinel entry").path());
            }
        } else if m.file_type().is_symlink() {
            desc += &format!(" -> {:?}", std::fs::read_link(&p).expect("readlink"));
        } else if m.is_file() {
            desc += &format!(" {:?}", std::fs::read(&p).expect("sentinel content"));
        }
        if let Ok(names) = xattr::list(&p) {
            let mut names: Vec<_> = names.collect();
            names.sort();
            desc += &format!(" xattrs {names:?}");
        }
        out.insert(p, desc);
    }
    out
}

// ---- tar building ---------------------------------------------------------------------------

fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    if s.len() <= digits {
        field[..digits].copy_from_slice(s.as_bytes());
        field[digits] = 0;
    } else {
        // GNU base-256 for values that do not fit.
        field.fill(0);
        field[0] = 0x80;
        let b = v.to_be_bytes();
        let n = b.len().min(field.len() - 1);
        let len = field.len();
        field[len - n..].copy_from_slice(&b[b.len() - n..]);
    }
}

fn set_checksum(h: &mut [u8]) {
    h[148..156].fill(b' ');
    let sum: u32 = h[..512].iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

#[derive(Clone, Copy)]
enum Format {
    Ustar,
    Gnu,
    Old,
}

struct Header {
    name: Vec<u8>,
    link: Vec<u8>,
    mode: u64,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    kind: u8,
    dev: (u64, u64),
    format: Format,
}

impl Header {
    fn bytes(&self, fix_checksum: bool) -> [u8; 512] {
        let mut h = [0u8; 512];
        let put = |dst: &mut [u8], src: &[u8]| {
            let n = src.len().min(dst.len());
            dst[..n].copy_from_slice(&src[..n]);
        };
        match self.format {
            Format::Ustar if self.name.len() > 100 => {
                // Split at a '/' into prefix and name, as ustar writers do.
                let cut = self.name[..self.name.len().min(156)].iter().rposition(|&b| b == b'/');
                match cut {
                    Some(i) if self.name.len() - i - 1 <= 100 => {
                        put(&mut h[345..500], &self.name[..i]);
                        put(&mut h[0..100], &self.name[i + 1..]);
                    }
                    _ => put(&mut h[0..100], &self.name),
                }
            }
            _ => put(&mut h[0..100], &self.name),
        }
        octal(&mut h[100..108], self.mode);
        octal(&mut h[108..116], self.uid);
        octal(&mut h[116..124], self.gid);
        octal(&mut h[124..136], self.size);
        octal(&mut h[136..148], self.mtime);
        h[156] = self.kind;
        put(&mut h[157..257], &self.link);
        match self.format {
            Format::Ustar => {
                h[257..263].copy_from_slice(b"ustar\0");
                h[263..265].copy_from_slice(b"00");
            }
            Format::Gnu => h[257..265].copy_from_slice(b"ustar  \0"),
            Format::Old => {}
        }
        if !matches!(self.format, Format::Old) {
            put(&mut h[265..297], b"root");
            put(&mut h[297..329], b"root");
            octal(&mut h[329..337], self.dev.0);
            octal(&mut h[337..345], self.dev.1);
        }
        if fix_checksum {
            set_checksum(&mut h);
        }
        h
    }
}

fn pad(out: &mut Vec<u8>) {
    let rem = out.len() % 512;
    if rem != 0 {
        out.resize(out.len() + 512 - rem, 0);
    }
}

const COMPONENTS: [&str; 17] = [
    "a",
    "b",
    "c",
    "..",
    ".",
    "",
    ".wh.a",
    ".wh..wh..opq",
    ".wh..wh.aufs",
    ".wh.",
    ".wh..",
    ".wh...",
    "link",
    "f",
    "dir",
    "outside",
    "secret",
];

fn path(inp: &mut Input<'_>) -> Vec<u8> {
    let shape = inp.u8();
    if shape >= 0xf0 {
        let n = inp.u8() as usize;
        return inp.bytes(n).to_vec();
    }
    let mut p = match shape & 3 {
        0 | 1 => Vec::new(),
        2 => b"./".to_vec(),
        _ => b"/".to_vec(),
    };
    let n = 1 + (shape >> 2 & 3) as usize;
    for i in 0..n {
        if i > 0 {
            p.push(b'/');
        }
        let c = inp.u8();
        match c {
            0xe0..=0xef => p.extend(std::iter::repeat_n(b'n', 90 + usize::from(c & 0xf) * 16)),
            _ => p.extend_from_slice(COMPONENTS[c as usize % COMPONENTS.len()].as_bytes()),
        }
    }
    if shape & 0x40 != 0 {
        p.push(b'/');
    }
    p
}

fn link_target(inp: &mut Input<'_>) -> Vec<u8> {
    const TARGETS: [&str; 12] = [
        "a",
        "../a",
        "../outside",
        "../../outside",
        "../outside/secret",
        "/tmp/husk-fuzz-image-unpack/outside",
        "/tmp/husk-fuzz-image-unpack/outside/secret",
        "/",
        "a/f",
        "link",
        ".",
        "..",
    ];
    match inp.u8() {
        0..=0xbf => TARGETS[inp.u8() as usize % TARGETS.len()].as_bytes().to_vec(),
        _ => path(inp),
    }
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "<len> key=value\n" where len counts itself.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(format!("{len} ").as_bytes());
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn pax_records(inp: &mut Input<'_>) -> Vec<u8> {
    const XATTRS: [&str; 9] = [
        "user.x",
        "trusted.x",
        "security.capability",
        "security.selinux",
        "trusted.overlay.opaque",
        "user.overlay.x",
        "system.posix_acl_access",
        "security.ima",
        "",
    ];
    let mut out = Vec::new();
    for _ in 0..1 + inp.u8() % 4 {
        let value_len = inp.u8() as usize % 64;
        match inp.u8() % 12 {
            0 => pax_record(&mut out, b"path", &path(inp)),
            1 => pax_record(&mut out, b"linkpath", &link_target(inp)),
            2 => pax_record(&mut out, b"size", inp.u32().to_string().as_bytes()),
            3 => pax_record(&mut out, b"uid", inp.u64().to_string().as_bytes()),
            4 => pax_record(&mut out, b"gid", inp.u32().to_string().as_bytes()),
            5 => pax_record(&mut out, b"mtime", format!("{}.{}", inp.u64(), inp.u8()).as_bytes()),
            6..=8 => {
                let name = XATTRS[inp.u8() as usize % XATTRS.len()];
                let key = [b"SCHILY.xattr.".as_slice(), name.as_bytes()].concat();
                let value = if name == "security.capability" && inp.u8() & 1 == 0 {
                    // A valid v2 capability set (cap_net_raw+ep).
                    let mut v = vec![0u8; 20];
                    v[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
                    v[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
                    v
                } else {
                    inp.bytes(value_len).to_vec()
                };
                pax_record(&mut out, &key, &value);
            }
            9 => {
                let key = ["GNU.sparse.map", "GNU.sparse.size", "GNU.sparse.numblocks", "GNU.sparse.offset"]
                    [inp.u8() as usize % 4];
                pax_record(&mut out, key.as_bytes(), inp.bytes(value_len));
            }
            10 => {
                // A record whose length lies.
                let claimed = inp.u16();
                out.extend_from_slice(format!("{claimed} ").as_bytes());
                out.extend_from_slice(inp.bytes(value_len));
            }
            _ => {
                let key = inp.bytes(value_len % 16).to_vec();
                pax_record(&mut out, &key, inp.bytes(value_len));
            }
        }
    }
    out
}

fn data(inp: &mut Input<'_>) -> Vec<u8> {
    match inp.u8() % 4 {
        0 => Vec::new(),
        1 => {
            let n = inp.u8() as usize;
            inp.bytes(n).to_vec()
        }
        2 => vec![b'd'; inp.u16() as usize * 4],
        _ => b"hello\n".to_vec(),
    }
}

/// One entry (with its PAX or GNU long-name header first, if the script says so).
fn entry(out: &mut Vec<u8>, inp: &mut Input<'_>) {
    const KINDS: [u8; 16] =
        [b'0', b'0', b'0', b'5', b'5', b'2', b'2', b'1', b'1', b'3', b'4', b'6', b'7', b'S', 0, b'Z'];
    let sel = inp.u8();
    let kind = KINDS[sel as usize % KINDS.len()];
    let format = match inp.u8() % 6 {
        0..=2 => Format::Ustar,
        3 | 4 => Format::Gnu,
        _ => Format::Old,
    };
    let name = path(inp);
    let link = if matches!(kind, b'1' | b'2') { link_target(inp) } else { Vec::new() };
    let extra = inp.u8();
    if extra & 3 == 1 {
        let records = pax_records(inp);
        let pax = Header {
            name: b"PaxHeaders/x".to_vec(),
            link: Vec::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: records.len() as u64,
            mtime: 0,
            kind: if extra & 4 == 0 { b'x' } else { b'g' },
            dev: (0, 0),
            format: Format::Ustar,
        };
        out.extend_from_slice(&pax.bytes(true));
        out.extend_from_slice(&records);
        pad(out);
    } else if extra & 3 == 2 {
        // GNU long name (and link).
        for (k, v) in [(b'L', &name), (b'K', &link)] {
            if k == b'K' && v.is_empty() {
                continue;
            }
            let mut body = v.clone();
            body.push(0);
            let h = Header {
                name: b"././@LongLink".to_vec(),
                link: Vec::new(),
                mode: 0,
                uid: 0,
                gid: 0,
                size: body.len() as u64,
                mtime: 0,
                kind: k,
                dev: (0, 0),
                format: Format::Gnu,
            };
            out.extend_from_slice(&h.bytes(true));
            out.extend_from_slice(&body);
            pad(out);
        }
    }
    let body = if matches!(kind, b'0' | b'7' | b'S' | 0 | b'Z') { data(inp) } else { Vec::new() };
    let mode = match inp.u8() % 8 {
        0..=2 => 0o644,
        3 => 0o755,
        4 => 0o4755,
        5 => 0,
        6 => 0o7777,
        _ => u64::from(inp.u32()),
    };
    let (uid, gid) = match inp.u8() % 4 {
        0 | 1 => (0, 0),
        2 => (1000, 1000),
        _ => (inp.u64(), u64::from(inp.u32())),
    };
    let mtime = match inp.u8() % 4 {
        0..=2 => 1_600_000_000,
        _ => inp.u64(),
    };
    let size = match inp.u8() % 8 {
        0..=5 => body.len() as u64,
        6 => u64::from(inp.u16()),
        _ => inp.u64(),
    };
    let dev = if matches!(kind, b'3' | b'4') { (u64::from(inp.u8()), u64::from(inp.u8())) } else { (0, 0) };
    let h = Header { name, link, mode, uid, gid, size, mtime, kind, dev, format };
    out.extend_from_slice(&h.bytes(inp.u8() != 0xff));
    out.extend_from_slice(&body);
    pad(out);
}

/// Raw bytes, with the checksum of every block where a reader would look for a header fixed.
fn raw_fixed(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    pad(&mut out);
    let mut i = 0;
    while i + 512 <= out.len() {
        let block = &mut out[i..i + 512];
        i += 512;
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        set_checksum(block);
        let size = std::str::from_utf8(&block[124..135])
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim_matches(|c: char| c == '\0' || c == ' '), 8).ok())
            .unwrap_or(0);
        i = i.saturating_add((size.div_ceil(512) as usize).saturating_mul(512));
    }
    out
}

/// One layer's uncompressed tar stream.
fn layer_tar(inp: &mut Input<'_>) -> Vec<u8> {
    let mode = inp.u8();
    let mut out = Vec::new();
    if mode >= 0xe0 {
        let n = inp.u16() as usize;
        return raw_fixed(inp.bytes(n));
    }
    for _ in 0..MAX_ENTRIES_BUILT {
        match inp.u8() {
            0 => break,
            0x01..=0xef => entry(&mut out, inp),
            0xf0..=0xf7 => {
                // A raw block, its checksum fixed or not.
                let fix = inp.u8() & 1 == 0;
                let mut b = inp.bytes(512).to_vec();
                b.resize(512, 0);
                if fix {
                    set_checksum(&mut b);
                }
                out.extend_from_slice(&b);
            }
            _ => {
                let n = inp.u8() as usize;
                out.extend_from_slice(inp.bytes(n));
            }
        }
        if inp.is_empty() {
            break;
        }
    }
    match mode % 8 {
        0..=4 => out.extend_from_slice(&[0u8; 1024]),
        5 => {}
        6 => {
            out.extend_from_slice(&[0u8; 1024]);
            let n = inp.u8() as usize;
            out.extend_from_slice(inp.bytes(n));
        }
        _ => {
            let cut = inp.u16() as usize;
            out.truncate(out.len().saturating_sub(cut));
        }
    }
    out
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// Stores `tar` as a blob (compressed as asked) and returns its descriptor and diff_id.
fn store(blobs: &Path, tar: &[u8], compression: u8) -> (Descriptor, String) {
    let (bytes, media) = match compression % 6 {
        0..=2 => (tar.to_vec(), MediaType::ImageLayer),
        3 | 4 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).expect("gzip");
            (e.finish().expect("gzip"), MediaType::ImageLayerGzip)
        }
        _ => (zstd::encode_all(tar, 1).expect("zstd"), MediaType::ImageLayerZstd),
    };
    let hex = sha256_hex(&bytes);
    std::fs::write(blobs.join("blobs/sha256").join(&hex), &bytes).expect("blob");
    let desc = DescriptorBuilder::default()
        .media_type(media)
        .digest(Digest::from_str(&format!("sha256:{hex}")).expect("digest"))
        .size(bytes.len() as u64)
        .build()
        .expect("descriptor");
    (desc, format!("sha256:{}", sha256_hex(tar)))
}

fuzz_target!(|data: &[u8]| {
    let e = env();
    let dest = e.sandbox.join("dest");
    let blobs = e.sandbox.join("blobs");
    let _ = std::fs::remove_dir_all(&dest);
    let _ = std::fs::remove_dir_all(&blobs);
    std::fs::create_dir(&dest).expect("dest");
    std::fs::create_dir_all(blobs.join("blobs/sha256")).expect("blobs");

    let mut inp = Input::new(data);
    let pre = inp.u8();
    let n = 1 + usize::from(pre % 3);
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for _ in 0..n {
        let compression = inp.u8();
        let tar = layer_tar(&mut inp);
        let (desc, diff_id) = store(&blobs, &tar, compression);
        layers.push(desc);
        diff_ids.push(diff_id);
    }
    match pre >> 2 & 3 {
        1 => {}
        2 => diff_ids[0] = format!("sha256:{}", "0".repeat(64)),
        3 => {
            diff_ids.pop();
        }
        _ => diff_ids.clear(),
    }
    let ids = (pre >> 2 & 3 != 0).then_some(diff_ids.as_slice());
    let result = unpack_layers(&blobs, &layers, ids, &dest, &LIMITS);
    if debug() {
        eprintln!("unpack: {result:?}");
    }

    let mut top: Vec<String> = std::fs::read_dir(&e.sandbox)
        .expect("sandbox")
        .map(|d| d.expect("sandbox entry").file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["blobs", "dest", "outside"], "something appeared next to dest");
    let after = snapshot(&e.sandbox.join("outside"));
    assert_eq!(after, e.before, "the sentinel outside dest changed");
});
