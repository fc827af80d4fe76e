//! Image pulls end to end: `husk pull`, the content store (`husk images`, `husk image inspect`,
//! `husk rmi`, `husk image prune`), registry credentials (`husk login`/`logout`), and pulled
//! images run in a sandbox.
//!
//! The test images are built here, once per test process, as OCI layouts written entry by entry
//! (so every layer holds exactly what a check needs), and pushed with skopeo to Debian's
//! `docker-registry` (distribution 2.8) listening on 127.0.0.1 with a storage directory of its own:
//! - `multi:1`: an image index with a linux/amd64 and a linux/arm64 manifest (`/arch` says which);
//! - `layers:1`: five layers: busybox; files, a directory and a hard link's target; whiteouts of a
//!   file and a directory, an opaque directory, a hard link to the lower layer's file and one
//!   within the layer; a zstd-compressed layer; a busybox copy with `cap_net_raw+ep` (made by
//!   setcap, carried as a PAX `SCHILY.xattr.security.capability` record);
//! - `bb:1` (busybox only), `tamper:1` (a small layer of its own, altered in the registry's
//!   storage), `big:1` (a 64 MiB random layer, pulled through a throttling proxy so a pull can be
//!   killed midway), `bomb:1` (a gzip layer of 256 MiB of zeros, over a 64 MiB `max_layer_bytes`).
//!
//! `registry_pull_store_and_auth` runs on this host (pulls need no KVM);
//! `pulled_images_run_in_test_host` runs images in one test-host boot, from a registry started
//! in L1 over a storage directory filled here. Each check prints `@@NAME ok` or `@@NAME FAIL
//! detail`; a test fails listing every failed check.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use husk_tests::artifacts::ImageTestKit;
use husk_tests::{require, run_job, Job};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The unpacking cap of the bomb check, and the bomb's unpacked size.
const MAX_LAYER_BYTES: u64 = 64 << 20;
const BOMB_BYTES: u64 = 256 << 20;
const BIG_BYTES: usize = 64 << 20;
/// The throttling proxy's rate per connection: the 64 MiB layer takes 4 s through it.
const THROTTLE_BYTES_PER_SEC: u64 = 16 << 20;
const USER: &str = "husk";
const PASSWORD: &str = "s3cret";
/// mtime of every entry of the test layers.
const MTIME: u64 = 1_700_000_000;

// ------------------------------------------------------------------------------------------
// Scratch directories

const SCRATCH_PREFIX: &str = "husk-images-test-";

/// A directory removed on drop (kept with `HUSK_TESTHOST_KEEP=1`).
#[derive(Debug)]
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Self, String> {
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(sweep_stale_scratch);
        let p = std::env::temp_dir().join(format!("{SCRATCH_PREFIX}{tag}-{}", std::process::id()));
        fs::remove_dir_all(&p).ok();
        fs::create_dir_all(&p).map_err(|e| format!("creating {}: {e}", p.display()))?;
        Ok(Self(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("HUSK_TESTHOST_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
        } else {
            fs::remove_dir_all(&self.0).ok();
        }
    }
}

/// Removes `husk-images-test-<tag>-<pid>` dirs of processes that are gone (the fixtures live in
/// a static and are never dropped).
fn sweep_stale_scratch() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(SCRATCH_PREFIX) else { continue };
        let Some(pid) = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            fs::remove_dir_all(e.path()).ok();
        }
    }
}

// ------------------------------------------------------------------------------------------
// Hashing

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha256_file(p: &Path) -> io::Result<String> {
    let mut f = fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// `sha256:<hex>` → `<hex>`.
fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// The 12-hex short form of a digest, as `husk pull` prints it per layer.
fn short(digest: &str) -> &str {
    &hex_of(digest)[..12]
}

/// A writer that hashes what passes through it (a layer's diff ID while it is compressed).
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

// ------------------------------------------------------------------------------------------
// Test layers

/// Entry-by-entry tar writing, with fixed owners and mtimes.
struct LayerTar<W: Write> {
    b: tar::Builder<W>,
}

impl<W: Write> LayerTar<W> {
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    fn dir(&mut self, path: &str) -> io::Result<()> {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.b.append_data(&mut h, path, io::empty())
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.b.append_data(&mut h, path, data)
    }

    fn file_from(&mut self, path: &str, size: u64, r: impl Read) -> io::Result<()> {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, size);
        self.b.append_data(&mut h, path, r)
    }

    fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.b.append_link(&mut h, path, target)
    }

    fn hardlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.b.append_link(&mut h, path, target)
    }

    /// A PAX extended header for the next entry: `SCHILY.xattr.<name>` records, as GNU tar,
    /// umoci and containerd write extended attributes.
    fn xattrs(&mut self, path: &str, xattrs: &[(&str, &[u8])]) -> io::Result<()> {
        let mut data = Vec::new();
        for (name, value) in xattrs {
            let key = format!("SCHILY.xattr.{name}");
            // "<len> <key>=<value>\n", the length counting its own digits.
            let rest = 1 + key.len() + 1 + value.len() + 1;
            let mut len = rest + 1;
            while rest + len.to_string().len() != len {
                len = rest + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let mut h = Self::header(tar::EntryType::XHeader, 0o644, data.len() as u64);
        let name = format!("PaxHeaders/{}", path.rsplit('/').next().unwrap_or(path));
        self.b.append_data(&mut h, name, &data[..])
    }
}

/// A blob of an OCI layout.
#[derive(Debug, Clone)]
struct Desc {
    media_type: String,
    digest: String,
    size: u64,
}

impl Desc {
    fn json(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

#[derive(Debug, Clone)]
struct Layer {
    desc: Desc,
    diff_id: String,
}

/// An image written into a layout: its manifest, config and layers.
#[derive(Debug, Clone)]
struct Image {
    manifest: Desc,
    config: Desc,
    layers: Vec<Layer>,
}

/// An OCI image layout being written.
struct Layout {
    dir: PathBuf,
    refs: Vec<Value>,
    n: u32,
}

impl Layout {
    fn new(dir: PathBuf) -> Result<Self, String> {
        fs::create_dir_all(dir.join("blobs/sha256")).map_err(|e| format!("{}: {e}", dir.display()))?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self { dir, refs: Vec::new(), n: 0 })
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(hex_of(digest))
    }

    fn put(&self, media_type: &str, data: &[u8]) -> Result<Desc, String> {
        let digest = format!("sha256:{}", sha256_hex(data));
        fs::write(self.blob_path(&digest), data).map_err(|e| format!("writing a blob: {e}"))?;
        Ok(Desc { media_type: media_type.into(), digest, size: data.len() as u64 })
    }

    /// Copies an image's blobs from another layout.
    fn import(&self, from: &Layout, img: &Image) -> Result<(), String> {
        let descs = img.layers.iter().map(|l| &l.desc).chain([&img.config, &img.manifest]);
        for d in descs {
            fs::copy(from.blob_path(&d.digest), self.blob_path(&d.digest))
                .map_err(|e| format!("copying {}: {e}", d.digest))?;
        }
        Ok(())
    }

    /// A layer: `fill` writes the tar, which goes through `compressor` (gzip or zstd) into the
    /// layout while its diff ID is hashed.
    fn layer(
        &mut self,
        compressor: &Path,
        media_type: &str,
        fill: impl FnOnce(&mut LayerTar<HashingWriter<std::process::ChildStdin>>) -> io::Result<()>,
    ) -> Result<Layer, String> {
        self.n += 1;
        let tmp = self.dir.join(format!("blobs/tmp-{}", self.n));
        let out = fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let args: &[&str] = if media_type == ZSTD_LAYER { &["-q", "-c", "-3"] } else { &["-n", "-c", "-6"] };
        let mut child = Command::new(compressor)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(out)
            .spawn()
            .map_err(|e| format!("running {}: {e}", compressor.display()))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let mut t = LayerTar { b: tar::Builder::new(HashingWriter { inner: stdin, hash: Sha256::new() }) };
        let written = fill(&mut t).and_then(|()| t.b.into_inner());
        let w = written.map_err(|e| format!("writing a layer: {e}"))?;
        let diff_id = format!("sha256:{}", hex(&w.hash.finalize()));
        drop(w.inner);
        let st = child.wait().map_err(|e| format!("waiting for {}: {e}", compressor.display()))?;
        if !st.success() {
            return Err(format!("{} failed: {st}", compressor.display()));
        }
        let hx = sha256_file(&tmp).map_err(|e| format!("hashing {}: {e}", tmp.display()))?;
        let digest = format!("sha256:{hx}");
        let size = fs::metadata(&tmp).map_err(|e| e.to_string())?.len();
        fs::rename(&tmp, self.blob_path(&digest)).map_err(|e| format!("storing a layer: {e}"))?;
        Ok(Layer { desc: Desc { media_type: media_type.into(), digest, size }, diff_id })
    }

    /// Writes an image's config and manifest.
    fn image(&self, arch: &str, layers: &[Layer], env: &[&str]) -> Result<Image, String> {
        let mut envs = vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
        envs.extend(env.iter().map(|s| s.to_string()));
        let config = json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": arch,
            "os": "linux",
            "config": {"Env": envs, "Cmd": ["sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
            "history": layers.iter().map(|_| json!({"created": "2023-11-14T22:13:20Z", "created_by": "husk images test"})).collect::<Vec<_>>(),
        });
        let config = self.put(CONFIG, config.to_string().as_bytes())?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": config.json(),
            "layers": layers.iter().map(|l| l.desc.json()).collect::<Vec<_>>(),
        });
        let manifest = self.put(MANIFEST, manifest.to_string().as_bytes())?;
        Ok(Image { manifest, config, layers: layers.to_vec() })
    }

    fn index(&self, images: &[(&Image, &str)]) -> Result<Desc, String> {
        let manifests: Vec<Value> = images
            .iter()
            .map(|(img, arch)| {
                let mut d = img.manifest.json();
                d["platform"] = json!({"architecture": arch, "os": "linux"});
                d
            })
            .collect();
        let index = json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests});
        self.put(INDEX, index.to_string().as_bytes())
    }

    fn tag(&mut self, name: &str, d: &Desc) {
        let mut e = d.json();
        e["annotations"] = json!({ REF_NAME: name });
        self.refs.push(e);
    }

    fn finish(&self) -> Result<(), String> {
        let index = json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": self.refs});
        fs::write(self.dir.join("index.json"), index.to_string()).map_err(|e| format!("index.json: {e}"))
    }
}

/// The test images, built once per test process.
#[derive(Debug)]
struct Fixtures {
    _dir: Scratch,
    /// OCI layout with refs `multi` (an index), `layers`, `bb`, `tamper`, `bomb`.
    main: PathBuf,
    /// OCI layout with `big` only (kept out of what L1 gets).
    big_layout: PathBuf,
    /// OCI layout with `bb` only, for `husk run --image oci:DIR:bb`.
    bb_layout: PathBuf,
    multi_index: Desc,
    multi_amd64: Image,
    multi_arm64: Image,
    layers: Image,
    bb: Image,
    tamper: Image,
    big: Image,
    bomb: Image,
}

impl Fixtures {
    fn get(kit: &ImageTestKit) -> Result<&'static Fixtures, String> {
        static F: OnceLock<Result<Fixtures, String>> = OnceLock::new();
        F.get_or_init(|| {
            let t = Instant::now();
            let f = Self::build(kit);
            eprintln!("test images built in {:?}", t.elapsed());
            f
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    fn build(kit: &ImageTestKit) -> Result<Fixtures, String> {
        let dir = Scratch::new("fixtures")?;
        let (gz, zst) = (kit.gzip.as_path(), kit.zstd.as_path());
        let busybox = fs::read(&kit.busybox).map_err(|e| format!("{}: {e}", kit.busybox.display()))?;
        let out = Command::new(&kit.busybox).arg("--list").output().map_err(|e| e.to_string())?;
        let applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|a| !a.is_empty() && *a != "busybox")
            .map(String::from)
            .collect();
        // The capability as setcap writes it (the vfs_cap_data xattr value).
        let capsrc = dir.join("capsrc");
        fs::write(&capsrc, &busybox).map_err(|e| e.to_string())?;
        let st = Command::new(&kit.setcap)
            .arg("cap_net_raw+ep")
            .arg(&capsrc)
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("setcap cap_net_raw+ep {} failed: {st}", capsrc.display()));
        }
        let cap = read_xattr(&capsrc, "security.capability")?;

        let mut main = Layout::new(dir.join("oci"))?;
        let base = main.layer(gz, GZIP_LAYER, |t| {
            for d in ["bin", "etc", "dev", "proc", "sys", "tmp", "root", "run"] {
                t.dir(d)?;
            }
            t.file("bin/busybox", 0o755, &busybox)?;
            for a in &applets {
                t.symlink(&format!("bin/{a}"), "busybox")?;
            }
            t.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
            t.file("etc/group", 0o644, b"root:x:0:\n")
        })?;
        let arch_layer = |main: &mut Layout, arch: &str| {
            main.layer(gz, GZIP_LAYER, |t| t.file("arch", 0o644, format!("{arch}\n").as_bytes()))
        };
        let l_amd64 = arch_layer(&mut main, "amd64")?;
        let l_arm64 = arch_layer(&mut main, "arm64")?;
        let multi_amd64 = main.image("amd64", &[base.clone(), l_amd64], &[])?;
        let multi_arm64 = main.image("arm64", &[base.clone(), l_arm64], &[])?;
        let multi_index = main.index(&[(&multi_amd64, "amd64"), (&multi_arm64, "arm64")])?;
        main.tag("multi", &multi_index);

        let lower = main.layer(gz, GZIP_LAYER, |t| {
            t.dir("wh")?;
            t.file("wh/file-gone", 0o644, b"gone\n")?;
            t.dir("wh/dir-gone")?;
            t.file("wh/dir-gone/inner", 0o644, b"inner\n")?;
            t.file("wh/kept", 0o644, b"kept\n")?;
            t.dir("opq")?;
            t.file("opq/old1", 0o644, b"old1\n")?;
            t.dir("opq/sub")?;
            t.file("opq/sub/old2", 0o644, b"old2\n")?;
            t.dir("data")?;
            t.file("data/orig", 0o644, b"linked-across-layers\n")
        })?;
        let upper = main.layer(gz, GZIP_LAYER, |t| {
            t.dir("wh")?;
            t.file("wh/.wh.file-gone", 0o644, b"")?;
            t.file("wh/.wh.dir-gone", 0o644, b"")?;
            t.dir("opq")?;
            t.file("opq/.wh..wh..opq", 0o644, b"")?;
            t.file("opq/new", 0o644, b"new\n")?;
            t.dir("data")?;
            // A hard link to the lower layer's file, and a pair within this layer.
            t.hardlink("data/link", "data/orig")?;
            t.file("data/in1", 0o644, b"linked-in-layer\n")?;
            t.hardlink("data/in2", "data/in1")
        })?;
        let zstd_layer = main.layer(zst, ZSTD_LAYER, |t| {
            t.dir("zstd")?;
            t.file("zstd/hello", 0o644, b"from-a-zstd-layer\n")
        })?;
        let cap_layer = main.layer(gz, GZIP_LAYER, |t| {
            t.dir("bin")?;
            t.xattrs("bin/ping-cap", &[("security.capability", &cap)])?;
            t.file("bin/ping-cap", 0o755, &busybox)
        })?;
        let layers = main.image(
            "amd64",
            &[base.clone(), lower, upper, zstd_layer, cap_layer],
            &["IMGVAR=from-config"],
        )?;
        main.tag("layers", &layers.manifest);

        let bb = main.image("amd64", std::slice::from_ref(&base), &[])?;
        main.tag("bb", &bb.manifest);

        let payload: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let t_layer = main.layer(gz, GZIP_LAYER, |t| t.file("tamper", 0o644, &payload))?;
        let tamper = main.image("amd64", &[base.clone(), t_layer], &[])?;
        main.tag("tamper", &tamper.manifest);

        let b_layer =
            main.layer(gz, GZIP_LAYER, |t| t.file_from("zeros", BOMB_BYTES, io::repeat(0).take(BOMB_BYTES)))?;
        let bomb = main.image("amd64", &[base.clone(), b_layer], &[])?;
        main.tag("bomb", &bomb.manifest);
        main.finish()?;

        let mut big_l = Layout::new(dir.join("oci-big"))?;
        let mut random = vec![0u8; BIG_BYTES];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .map_err(|e| e.to_string())?;
        let r_layer = big_l.layer(gz, GZIP_LAYER, |t| t.file("random", 0o644, &random))?;
        fs::copy(main.blob_path(&base.desc.digest), big_l.blob_path(&base.desc.digest))
            .map_err(|e| e.to_string())?;
        let big = big_l.image("amd64", &[base.clone(), r_layer], &[])?;
        big_l.tag("big", &big.manifest);
        big_l.finish()?;

        let mut bb_l = Layout::new(dir.join("oci-bb"))?;
        bb_l.import(&main, &bb)?;
        bb_l.tag("bb", &bb.manifest);
        bb_l.finish()?;

        Ok(Fixtures {
            main: main.dir.clone(),
            big_layout: big_l.dir.clone(),
            bb_layout: bb_l.dir.clone(),
            _dir: dir,
            multi_index,
            multi_amd64,
            multi_arm64,
            layers,
            bb,
            tamper,
            big,
            bomb,
        })
    }
}

fn read_xattr(path: &Path, name: &str) -> Result<Vec<u8>, String> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let n = CString::new(name).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256];
    // SAFETY: both names are NUL-terminated C strings and buf is valid for buf.len() bytes.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(format!("getxattr {name} on {}: {}", path.display(), io::Error::last_os_error()));
    }
    buf.truncate(r as usize);
    Ok(buf)
}

// ------------------------------------------------------------------------------------------
// Registries

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding a port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// The status line of `GET path` over plain HTTP.
fn http_status(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    String::from_utf8_lossy(&buf[..n]).lines().next().map(String::from)
}

/// Debian's docker-registry serving a storage directory on 127.0.0.1, its access log in a file.
#[derive(Debug)]
struct Registry {
    child: Child,
    addr: String,
    storage: PathBuf,
    log: PathBuf,
}

fn registry_config(storage: &Path, addr: &str, htpasswd: Option<&Path>) -> String {
    let auth = htpasswd
        .map(|p| format!("auth:\n  htpasswd:\n    realm: husk-test\n    path: {}\n", p.display()))
        .unwrap_or_default();
    format!(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n{auth}",
        storage.display()
    )
}

impl Registry {
    /// Starts a registry over `dir/storage`; with `auth`, `USER`/`PASSWORD` in a bcrypt htpasswd.
    fn start(kit: &ImageTestKit, dir: &Path, auth: bool) -> Result<Self, String> {
        let storage = dir.join("storage");
        fs::create_dir_all(&storage).map_err(|e| e.to_string())?;
        let htpasswd = if auth {
            let p = dir.join("htpasswd");
            fs::write(&p, format!("{USER}:{}\n", bcrypt_hash(PASSWORD)?)).map_err(|e| e.to_string())?;
            Some(p)
        } else {
            None
        };
        let addr = format!("127.0.0.1:{}", free_port()?);
        let config = dir.join("config.yml");
        fs::write(&config, registry_config(&storage, &addr, htpasswd.as_deref()))
            .map_err(|e| e.to_string())?;
        let log = dir.join("registry.log");
        let out = fs::File::create(&log).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&kit.registry);
        // It takes REGISTRY_* variables as config overrides (REGISTRY_AUTH_FILE, which podman,
        // skopeo and husk read, would be `auth.file`): it gets none.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", kit.registry.display()))?;
        let mut r = Registry { child, addr, storage, log };
        let t = Instant::now();
        loop {
            if let Some(line) = http_status(&r.addr, "/v2/") {
                let want = if auth { " 401" } else { " 200" };
                if line.contains(want) {
                    return Ok(r);
                }
                return Err(format!("registry on {}: GET /v2/ said {line:?}", r.addr));
            }
            if let Ok(Some(st)) = r.child.try_wait() {
                return Err(format!("docker-registry exited ({st}): {}", tail_of(&r.log, 20)));
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err(format!("docker-registry not up in 30 s: {}", tail_of(&r.log, 20)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /v2/<repo>/blobs/...` requests in its access log so far.
    fn blob_gets(&self, repo: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/blobs/");
        fs::read_to_string(&self.log).unwrap_or_default().lines().filter(|l| l.contains(&needle)).count()
    }

    /// A blob's data file in the filesystem storage driver's layout.
    fn blob_data(&self, digest: &str) -> PathBuf {
        let h = hex_of(digest);
        self.storage.join(format!("docker/registry/v2/blobs/sha256/{}/{h}/data", &h[..2]))
    }

    fn stop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail_of(p: &Path, n: usize) -> String {
    let s = fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A bcrypt htpasswd hash (docker-registry takes no other kind), from the C library's crypt(3)
/// through perl (Debian's libxcrypt does `$2b$`).
fn bcrypt_hash(password: &str) -> Result<String, String> {
    let out = Command::new("perl")
        .args(["-e", "print crypt($ARGV[0], '$2b$05$' . $ARGV[1])", password, "huskimagestestsaltsalt"])
        .output()
        .map_err(|e| format!("running perl for a bcrypt hash: {e}"))?;
    let h = String::from_utf8_lossy(&out.stdout).into_owned();
    if h.starts_with("$2b$05$") && h.len() == 60 {
        Ok(h)
    } else {
        Err(format!("no bcrypt from crypt(3): {h:?} {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// `skopeo copy` of a layout's ref to a registry, digests preserved.
fn push(
    kit: &ImageTestKit,
    scratch: &Path,
    layout: &Path,
    r: &str,
    dest: &str,
    creds: bool,
) -> Result<(), String> {
    let mut c = Command::new(&kit.skopeo);
    c.args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
    ]);
    if creds {
        c.arg(format!("--dest-creds={USER}:{PASSWORD}"));
    }
    c.arg(format!("oci:{}:{r}", layout.display())).arg(format!("docker://{dest}"));
    // Its own (empty) auth file: nothing of the user's is read or written.
    c.env("REGISTRY_AUTH_FILE", scratch.join("skopeo-auth.json"));
    let out = c.output().map_err(|e| format!("running skopeo: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("skopeo copy {r} to {dest}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// What the registry serves for `reference` (skopeo as a stand-in client): the raw manifest and
/// its digest.
fn registry_manifest(kit: &ImageTestKit, scratch: &Path, reference: &str) -> Result<(String, Value), String> {
    let out = Command::new(&kit.skopeo)
        .args(["--insecure-policy", "inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .env("REGISTRY_AUTH_FILE", scratch.join("skopeo-auth.json"))
        .output()
        .map_err(|e| format!("running skopeo: {e}"))?;
    if !out.status.success() {
        return Err(format!("skopeo inspect {reference}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let v = serde_json::from_slice(&out.stdout).map_err(|e| format!("{reference}: {e}"))?;
    Ok((format!("sha256:{}", sha256_hex(&out.stdout)), v))
}

/// A TCP proxy that forwards the server's bytes at a fixed rate per connection, so that a
/// 64 MiB pull from a local registry lasts long enough to be killed midway.
#[derive(Debug)]
struct Throttle {
    addr: String,
    stop: Arc<AtomicBool>,
}

impl Throttle {
    fn start(upstream: &str, bytes_per_sec: u64) -> Result<Self, String> {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let addr = l.local_addr().map_err(|e| e.to_string())?.to_string();
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, up) = (stop.clone(), upstream.to_string());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).ok();
                        if let Ok(server) = TcpStream::connect(&up) {
                            Self::pipe(client, server, bytes_per_sec);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self { addr, stop })
    }

    fn pipe(client: TcpStream, server: TcpStream, rate: u64) {
        let (Ok(mut c_in), Ok(mut s_out)) = (client.try_clone(), server.try_clone()) else { return };
        std::thread::spawn(move || {
            io::copy(&mut c_in, &mut s_out).ok();
            s_out.shutdown(Shutdown::Write).ok();
        });
        let (mut s_in, mut c_out) = (server, client);
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut sent = 0u64;
            let mut buf = [0u8; 16384];
            loop {
                let n = match s_in.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if c_out.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent += n as u64;
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            c_out.shutdown(Shutdown::Both).ok();
            s_in.shutdown(Shutdown::Both).ok();
        });
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ------------------------------------------------------------------------------------------
// husk and its store

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == 0
    }

    fn last_line(&self) -> &str {
        self.stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim()
    }

    /// stdout and stderr, lowercased, for message checks.
    fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr).to_lowercase()
    }

    fn brief(&self) -> String {
        format!("exit {}; stdout: {:?}; stderr: {:?}", self.code, cut(&self.stdout), cut(&self.stderr))
    }
}

fn cut(s: &str) -> String {
    if s.len() > 1500 {
        let mut end = 1500;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    } else {
        s.to_string()
    }
}

/// The `husk` CLI with its own store, config and auth file.
#[derive(Debug)]
struct Husk {
    bin: PathBuf,
    store: PathBuf,
    env: Vec<(&'static str, PathBuf)>,
    out_dir: PathBuf,
}

const HUSK_TIMEOUT: Duration = Duration::from_secs(300);

impl Husk {
    fn new(kit: &ImageTestKit, dir: &Path, store: &Path, config: &Path) -> Self {
        Husk {
            bin: kit.husk.clone(),
            store: store.to_path_buf(),
            env: vec![
                ("HUSK_IMAGE_ROOT", store.to_path_buf()),
                ("HUSK_CONFIG", config.to_path_buf()),
                ("REGISTRY_AUTH_FILE", dir.join("auth.json")),
            ],
            out_dir: dir.to_path_buf(),
        }
    }

    fn with_store(&self, store: &Path) -> Self {
        let mut env = self.env.clone();
        env[0].1 = store.to_path_buf();
        Husk { bin: self.bin.clone(), store: store.to_path_buf(), env, out_dir: self.out_dir.clone() }
    }

    fn auth_file(&self) -> &Path {
        &self.env[2].1
    }

    fn command(&self, args: &[&str], tag: &str) -> Result<(Command, PathBuf, PathBuf), String> {
        let (o, e) = (self.out_dir.join(format!("{tag}.stdout")), self.out_dir.join(format!("{tag}.stderr")));
        let mut c = Command::new(&self.bin);
        c.args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(fs::File::create(&o).map_err(|e| e.to_string())?)
            .stderr(fs::File::create(&e).map_err(|e| e.to_string())?);
        Ok((c, o, e))
    }

    fn spawn(&self, args: &[&str], tag: &str) -> Spawned {
        let (mut c, o, e) = self.command(args, tag).expect("husk output files");
        c.stdin(Stdio::null());
        let child = c.spawn().unwrap_or_else(|e| panic!("spawning husk: {e}"));
        Spawned { child, o, e }
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_input(args, None)
    }

    fn run_input(&self, args: &[&str], input: Option<&str>) -> Run {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = format!("run-{}", N.fetch_add(1, Ordering::Relaxed));
        let (mut c, o, e) = match self.command(args, &tag) {
            Ok(x) => x,
            Err(e) => return Run { code: -1, stdout: String::new(), stderr: e },
        };
        c.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = match c.spawn() {
            Ok(ch) => ch,
            Err(e) => return Run { code: -1, stdout: String::new(), stderr: format!("spawning husk: {e}") },
        };
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).ok();
        }
        Spawned { child, o, e }.wait(HUSK_TIMEOUT, &format!("husk {}", args.join(" ")))
    }

    fn images_dir(&self) -> PathBuf {
        self.store.join("images")
    }

    /// Files under `images/<sub>` with their sizes.
    fn files_under(&self, sub: &str) -> Vec<(PathBuf, u64)> {
        let mut out = Vec::new();
        walk(&self.images_dir().join(sub), &mut out);
        out
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.images_dir().join("blobs/sha256").join(hex_of(digest))
    }

    /// Blobs whose content does not hash to their name (a partial or unverified file visible as
    /// a blob), as text.
    fn bad_blobs(&self) -> Vec<String> {
        self.files_under("blobs")
            .into_iter()
            .filter_map(|(p, _)| {
                let name = p.file_name()?.to_string_lossy().into_owned();
                let got = sha256_file(&p).unwrap_or_else(|e| e.to_string());
                let in_sha256 = p.parent().is_some_and(|d| d.ends_with("blobs/sha256"));
                (!in_sha256 || got != name).then(|| format!("{} hashes to {got}", p.display()))
            })
            .collect()
    }

    fn snapshots(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.images_dir().join("snapshots"))
            .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let Ok(m) = e.path().symlink_metadata() else { continue };
        if m.is_dir() {
            walk(&e.path(), out);
        } else {
            out.push((e.path(), m.len()));
        }
    }
}

#[derive(Debug)]
struct Spawned {
    child: Child,
    o: PathBuf,
    e: PathBuf,
}

impl Spawned {
    fn wait(mut self, timeout: Duration, what: &str) -> Run {
        let t = Instant::now();
        let code = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    use std::os::unix::process::ExitStatusExt;
                    break st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
                }
                Ok(None) if t.elapsed() > timeout => {
                    self.child.kill().ok();
                    self.child.wait().ok();
                    let mut r = self.collect(-1);
                    r.stderr.push_str(&format!("\n[test: {what} killed after {timeout:?}]"));
                    return r;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("waiting for {what}: {e}"),
            }
        };
        self.collect(code)
    }

    fn collect(&self, code: i32) -> Run {
        Run {
            code,
            stdout: fs::read_to_string(&self.o).unwrap_or_default(),
            stderr: fs::read_to_string(&self.e).unwrap_or_default(),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Checks

/// Named checks, printed as they happen (`@@NAME ok` / `@@NAME FAIL detail`).
#[derive(Debug, Default)]
struct Checks {
    failed: Vec<String>,
    passed: usize,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: impl FnOnce() -> String) -> bool {
        if ok {
            eprintln!("@@{name} ok");
            self.passed += 1;
        } else {
            let line = format!("@@{name} FAIL {}", detail());
            eprintln!("{line}");
            self.failed.push(line);
        }
        ok
    }

    /// Prints what husk said (for the checks of refusals: the message is part of the contract).
    fn said(&self, name: &str, r: &Run) {
        let msg = r.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        eprintln!("   {name}: husk exited {} saying: {msg}", r.code);
    }

    fn finish(self, what: &str) {
        assert!(
            self.failed.is_empty(),
            "{what}: {} of {} checks failed:\n{}",
            self.failed.len(),
            self.failed.len() + self.passed,
            self.failed.join("\n")
        );
    }
}

/// Whether `id` names `config_digest` (the full digest, its hex, or a prefix of 12+ hex).
fn same_id(id: &str, config_digest: &str) -> bool {
    let id = hex_of(id);
    id.len() >= 12 && hex_of(config_digest).starts_with(id)
}

/// Layers `husk pull` reported fetching (`<short>: fetching <N> bytes`), by short digest.
fn fetched(stderr: &str) -> BTreeMap<String, u64> {
    stderr
        .lines()
        .filter_map(|l| {
            let (s, rest) = l.trim().split_once(": fetching ")?;
            Some((s.to_string(), rest.strip_suffix(" bytes")?.parse().ok()?))
        })
        .collect()
}

fn has_line(stderr: &str, line: &str) -> bool {
    stderr.lines().any(|l| l.trim() == line)
}

fn inspect(h: &Husk, what: &str) -> Result<Value, String> {
    let r = h.run(&["image", "inspect", what]);
    if !r.ok() {
        return Err(r.brief());
    }
    serde_json::from_str(&r.stdout).map_err(|e| format!("not JSON ({e}): {}", r.brief()))
}

fn images_json(h: &Husk) -> Result<Vec<Value>, String> {
    let r = h.run(&["images", "--format", "json"]);
    if !r.ok() {
        return Err(r.brief());
    }
    match serde_json::from_str(&r.stdout) {
        Ok(Value::Array(a)) => Ok(a),
        _ => Err(format!("not a JSON array: {}", r.brief())),
    }
}

fn is_root() -> bool {
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Waits until the store's ingest dir holds a file of at least `min` bytes; its size.
fn wait_partial(h: &Husk, p: &mut Spawned, min: u64, limit: Duration) -> Option<u64> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some((_, n)) = h.files_under("ingest").into_iter().find(|(_, n)| *n >= min) {
            return Some(n);
        }
        if matches!(p.child.try_wait(), Ok(Some(_))) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

// ------------------------------------------------------------------------------------------
// Test (a): registry, store and credentials on this host

#[test]
fn registry_pull_store_and_auth() {
    let kit = require!(ImageTestKit::find());
    require!(if is_root() { Ok(()) } else { Err("needs root (setcap for the test image)".to_string()) });
    let started = Instant::now();
    let fx = Fixtures::get(&kit).unwrap_or_else(|e| panic!("building the test images: {e}"));
    let dir = Scratch::new("host").unwrap_or_else(|e| panic!("{e}"));
    let mut ck = Checks::default();

    // Registries: plain, with htpasswd, and the plain one behind a throttling proxy.
    fs::create_dir_all(dir.join("reg")).ok();
    fs::create_dir_all(dir.join("reg-auth")).ok();
    let reg = Registry::start(&kit, &dir.join("reg"), false).unwrap_or_else(|e| panic!("{e}"));
    let areg = Registry::start(&kit, &dir.join("reg-auth"), true).unwrap_or_else(|e| panic!("{e}"));
    let slow = Throttle::start(&reg.addr, THROTTLE_BYTES_PER_SEC).unwrap_or_else(|e| panic!("{e}"));
    let (r, a, s) = (reg.addr.as_str(), areg.addr.as_str(), slow.addr.as_str());
    for (layout, name) in [
        (&fx.main, "multi"),
        (&fx.main, "layers"),
        (&fx.main, "bb"),
        (&fx.main, "tamper"),
        (&fx.big_layout, "big"),
    ] {
        push(&kit, dir.path(), layout, name, &format!("{r}/{name}:1"), false)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    push(&kit, dir.path(), &fx.main, "bb", &format!("{a}/private/bb:1"), true)
        .unwrap_or_else(|e| panic!("{e}"));
    // The registry serves what was built (skopeo as the reference client).
    for (reference, want) in [
        (format!("{r}/layers:1"), &fx.layers.manifest.digest),
        (format!("{r}/multi:1"), &fx.multi_index.digest),
        (format!("{r}/big:1"), &fx.big.manifest.digest),
    ] {
        let got = registry_manifest(&kit, dir.path(), &reference).map(|(d, _)| d);
        assert_eq!(got.as_ref(), Ok(want), "the registry serves {reference} as built");
    }
    eprintln!("registries up and filled after {:?}", started.elapsed());

    let store = dir.join("store");
    let config = dir.join("config.json");
    fs::write(&config, r#"{"images": {}}"#).unwrap();
    let h = Husk::new(&kit, dir.path(), &store, &config);
    let layers_ref = format!("{r}/layers:1");
    let lay = &fx.layers;
    let lay_digests: Vec<&str> = lay.layers.iter().map(|l| l.desc.digest.as_str()).collect();

    // --- pull by tag
    let gets0 = reg.blob_gets("layers");
    let p = h.run(&["pull", &layers_ref]);
    ck.check("PULL-TAG", p.ok() && p.last_line() == lay.manifest.digest, || p.brief());
    let f = fetched(&p.stderr);
    ck.check(
        "PULL-TAG-PROGRESS",
        lay.layers.iter().all(|l| {
            f.get(short(&l.desc.digest)) == Some(&l.desc.size)
                && has_line(&p.stderr, &format!("{}: done", short(&l.desc.digest)))
        }),
        || {
            format!(
                "want `<short>: fetching <size> bytes` and `<short>: done` for each of {lay_digests:?}: {}",
                p.brief()
            )
        },
    );
    let gets1 = reg.blob_gets("layers");
    ck.check("PULL-TAG-REGISTRY-LOG", gets1 >= gets0 + lay.layers.len(), || {
        format!("the registry's access log shows {} blob GETs for {} layers", gets1 - gets0, lay.layers.len())
    });
    let missing: Vec<&str> = lay_digests
        .iter()
        .copied()
        .chain([lay.config.digest.as_str()])
        .filter(|d| !h.blob_path(d).is_file())
        .collect();
    ck.check("STORE-BLOBS", missing.is_empty(), || format!("not under blobs/sha256: {missing:?}"));
    let bad = h.bad_blobs();
    ck.check("STORE-BLOBS-VERIFIED", bad.is_empty(), || bad.join("; "));
    ck.check("STORE-IMAGES-JSON", h.images_dir().join("images.json").is_file(), || {
        "no images/images.json".into()
    });

    // --- a plain-HTTP loopback registry needs no CA certificates (a minimal host has none):
    // rustls' platform verifier reads its roots from SSL_CERT_FILE/SSL_CERT_DIR when set.
    // An empty bundle and an empty directory: a host without ca-certificates.
    let no_ca = dir.join("no-ca");
    fs::create_dir_all(&no_ca).ok();
    fs::write(no_ca.join("none.pem"), b"").ok();
    let mut h_no_ca = h.with_store(&dir.join("store-no-ca"));
    h_no_ca.env.push(("SSL_CERT_FILE", no_ca.join("none.pem")));
    h_no_ca.env.push(("SSL_CERT_DIR", no_ca.clone()));
    let p = h_no_ca.run(&["pull", &format!("{r}/bb:1")]);
    ck.check("PULL-PLAIN-HTTP-WITHOUT-CA-CERTS", p.ok() && p.last_line() == fx.bb.manifest.digest, || {
        p.brief()
    });

    // --- image inspect
    match inspect(&h, &layers_ref) {
        Ok(v) => {
            let layers: Vec<&str> = v["layers"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let diff_ids: Vec<&str> = v["config"]["rootfs"]["diff_ids"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let want_diff: Vec<&str> = lay.layers.iter().map(|l| l.diff_id.as_str()).collect();
            let env_ok = v["config"]["config"]["Env"]
                .as_array()
                .is_some_and(|e| e.iter().any(|x| x == "IMGVAR=from-config"));
            ck.check(
                "INSPECT",
                v["name"] == layers_ref.as_str()
                    && v["digest"] == lay.manifest.digest.as_str()
                    && v["id"].as_str().is_some_and(|id| same_id(id, &lay.config.digest))
                    && v["index_digest"].is_null()
                    && v["platform"] == "linux/amd64"
                    && layers == lay_digests
                    && v["size"].as_u64().is_some_and(|n| n > 0)
                    && diff_ids == want_diff
                    && env_ok,
                || format!("want name {layers_ref}, digest {}, id {}, no index, linux/amd64, layers {lay_digests:?}, size > 0, the config; got {v:#}", lay.manifest.digest, lay.config.digest),
            );
            ck.check("INSPECT-NO-SNAPSHOT-BEFORE-RUN", v["snapshot"].is_null(), || {
                format!("snapshot {}", v["snapshot"])
            });
        }
        Err(e) => {
            ck.check("INSPECT", false, || e);
        }
    }

    // --- pull by digest, and the same tag again: nothing transferred
    let by_digest = format!("{r}/layers@{}", lay.manifest.digest);
    let p = h.run(&["pull", &by_digest]);
    ck.check("PULL-DIGEST", p.ok() && p.last_line() == lay.manifest.digest, || p.brief());
    let present = |p: &Run| {
        lay.layers.iter().all(|l| has_line(&p.stderr, &format!("{}: already present", short(&l.desc.digest))))
            && !p.stderr.contains(": fetching ")
    };
    ck.check("PULL-DIGEST-ALREADY-PRESENT", present(&p), || p.brief());
    let p = h.run(&["pull", &layers_ref]);
    let gets2 = reg.blob_gets("layers");
    ck.check("REPULL-TAG", p.ok() && p.last_line() == lay.manifest.digest, || p.brief());
    ck.check("REPULL-NO-FETCHING", present(&p), || p.brief());
    ck.check("REPULL-NO-BLOB-GETS", gets2 == gets1, || {
        format!("{} more blob GETs in the registry's log: {}", gets2 - gets1, tail_of(&reg.log, 10))
    });
    let p = h.run(&["pull", "-q", &layers_ref]);
    ck.check("PULL-QUIET", p.ok() && p.last_line() == lay.manifest.digest, || p.brief());

    // --- a multi-arch index: --platform linux/arm64, then the default (amd64)
    let multi_ref = format!("{r}/multi:1");
    let p = h.run(&["pull", "--platform", "linux/arm64", &multi_ref]);
    ck.check("PULL-PLATFORM-ARM64", p.ok() && p.last_line() == fx.multi_arm64.manifest.digest, || {
        format!("want {}: {}", fx.multi_arm64.manifest.digest, p.brief())
    });
    let arm = inspect(&h, &fx.multi_arm64.manifest.digest);
    ck.check(
        "INSPECT-ARM64",
        arm.as_ref().is_ok_and(|v| {
            v["platform"] == "linux/arm64"
                && v["id"].as_str().is_some_and(|id| same_id(id, &fx.multi_arm64.config.digest))
                && v["index_digest"] == fx.multi_index.digest.as_str()
                && v["config"]["architecture"] == "arm64"
        }),
        || {
            format!(
                "want linux/arm64, id {}, index {}: {arm:?}",
                fx.multi_arm64.config.digest, fx.multi_index.digest
            )
        },
    );
    let p = h.run(&["pull", &multi_ref]);
    ck.check("PULL-INDEX-DEFAULT-AMD64", p.ok() && p.last_line() == fx.multi_amd64.manifest.digest, || {
        format!("want {}: {}", fx.multi_amd64.manifest.digest, p.brief())
    });
    let base = &fx.multi_amd64.layers[0].desc.digest;
    ck.check(
        "PULL-SHARED-LAYER-NOT-REFETCHED",
        has_line(&p.stderr, &format!("{}: already present", short(base))),
        || format!("the busybox layer {base} is in the store already: {}", p.brief()),
    );
    let amd = inspect(&h, &multi_ref);
    ck.check(
        "INSPECT-AMD64",
        amd.as_ref().is_ok_and(|v| {
            v["platform"] == "linux/amd64"
                && v["digest"] == fx.multi_amd64.manifest.digest.as_str()
                && v["id"].as_str().is_some_and(|id| same_id(id, &fx.multi_amd64.config.digest))
                && v["index_digest"] == fx.multi_index.digest.as_str()
        }),
        || {
            format!(
                "want linux/amd64, id {}, index {}: {amd:?}",
                fx.multi_amd64.config.digest, fx.multi_index.digest
            )
        },
    );
    ck.check(
        "PLATFORMS-DIFFER",
        matches!((&arm, &amd), (Ok(x), Ok(y)) if x["id"] != y["id"] && x["digest"] != y["digest"]),
        || "the arm64 and amd64 images have the same id or digest".into(),
    );
    let p = h.run(&["pull", "--platform", "linux/s390x", &multi_ref]);
    ck.check("PULL-PLATFORM-ABSENT", !p.ok() && !p.stderr.trim().is_empty(), || p.brief());
    ck.said("PULL-PLATFORM-ABSENT", &p);

    // --- husk images
    let t = h.run(&["images"]);
    let row = |name: &str, digest: &str| {
        t.stdout.lines().any(|l| l.split_whitespace().next() == Some(name) && l.contains(short(digest)))
    };
    let header = t.stdout.lines().next().unwrap_or("");
    ck.check(
        "IMAGES-TABLE",
        t.ok()
            && ["NAME", "DIGEST", "ID", "SIZE", "CREATED"].iter().all(|c| header.contains(c))
            && row(&layers_ref, &lay.manifest.digest)
            && row(&multi_ref, &fx.multi_amd64.manifest.digest),
        || format!("want rows for {layers_ref} and {multi_ref}: {}", t.brief()),
    );
    let list = images_json(&h);
    let entry = |name: &str| list.as_ref().ok().and_then(|l| l.iter().find(|e| e["name"] == name).cloned());
    let json_ok = |name: &str, img: &Image| {
        entry(name).is_some_and(|e| {
            e["digest"] == img.manifest.digest.as_str()
                && e["id"].as_str().is_some_and(|id| same_id(id, &img.config.digest))
                && e["size"].as_u64().is_some_and(|n| n > 0)
                && e["platform"] == "linux/amd64"
        })
    };
    ck.check("IMAGES-JSON", json_ok(&layers_ref, lay) && json_ok(&multi_ref, &fx.multi_amd64), || {
        format!("want {layers_ref} and {multi_ref} with digest, id, size, platform: {list:?}")
    });
    let q = h.run(&["images", "-q"]);
    let n_json = list.as_ref().map(Vec::len).unwrap_or(0);
    ck.check(
        "IMAGES-QUIET",
        q.ok()
            && q.stdout.lines().count() == n_json
            && q.stdout.lines().all(|l| l.split_whitespace().count() == 1),
        || format!("want {n_json} one-word lines: {}", q.brief()),
    );

    // --- what does not exist
    for (name, reference) in [
        ("MISSING-TAG", format!("{r}/layers:nope")),
        ("MISSING-REPOSITORY", format!("{r}/nosuchrepo:1")),
        ("MISSING-DIGEST", format!("{r}/layers@sha256:{}", "0".repeat(64))),
    ] {
        let p = h.run(&["pull", &reference]);
        ck.check(name, !p.ok() && p.text().contains("not found"), || p.brief());
        ck.said(name, &p);
    }

    // --- a blob altered in the registry's storage (same size) is refused
    let tl = &fx.tamper.layers[1].desc.digest;
    let data = reg.blob_data(tl);
    let mut bytes = fs::read(&data).unwrap_or_else(|e| panic!("{}: {e}", data.display()));
    for b in bytes.iter_mut().skip(64).take(32) {
        *b ^= 0x5a;
    }
    fs::write(&data, &bytes).unwrap();
    let p = h.run(&["pull", &format!("{r}/tamper:1")]);
    ck.check("TAMPERED-REFUSED", !p.ok() && p.text().contains("digest"), || p.brief());
    ck.said("TAMPERED-REFUSED", &p);
    ck.check("TAMPERED-NOT-STORED", !h.blob_path(tl).exists(), || format!("{} is in blobs/", tl));
    let bad = h.bad_blobs();
    ck.check("TAMPERED-BLOBS-VERIFIED", bad.is_empty(), || bad.join("; "));
    let listed =
        images_json(&h).map(|l| l.iter().any(|e| e["name"].as_str().is_some_and(|n| n.contains("/tamper"))));
    ck.check("TAMPERED-NOT-LISTED", listed == Ok(false), || format!("{listed:?}"));

    // --- two concurrent pulls of one image into a fresh store
    let h2 = h.with_store(&dir.join("store2"));
    let big_ref = format!("{s}/big:1");
    let big_layer = &fx.big.layers[1].desc;
    let t0 = Instant::now();
    let c1 = h2.spawn(&["pull", &big_ref], "conc1");
    let c2 = h2.spawn(&["pull", &big_ref], "conc2");
    let (r1, r2) = (c1.wait(HUSK_TIMEOUT, "pull 1"), c2.wait(HUSK_TIMEOUT, "pull 2"));
    eprintln!(
        "two concurrent pulls of 64 MiB through the {} MiB/s proxy: {:?}",
        THROTTLE_BYTES_PER_SEC >> 20,
        t0.elapsed()
    );
    let want = &fx.big.manifest.digest;
    ck.check(
        "CONCURRENT-PULLS",
        r1.ok() && r2.ok() && r1.last_line() == want && r2.last_line() == want,
        || format!("1: {}\n2: {}", r1.brief(), r2.brief()),
    );
    let bad = h2.bad_blobs();
    ck.check(
        "CONCURRENT-BLOBS-VERIFIED",
        bad.is_empty() && h2.blob_path(&big_layer.digest).is_file(),
        || format!("bad: {bad:?}; files: {:?}", h2.files_under("blobs")),
    );
    let v = inspect(&h2, &big_ref);
    ck.check("CONCURRENT-INSPECT", v.as_ref().is_ok_and(|v| v["digest"] == want.as_str()), || {
        format!("{v:?}")
    });
    let l2 = images_json(&h2);
    ck.check(
        "CONCURRENT-ONE-RECORD",
        l2.as_ref().is_ok_and(|l| l.iter().filter(|e| e["name"] == big_ref.as_str()).count() == 1),
        || format!("{l2:?}"),
    );
    let partial = h2.files_under("ingest");
    ck.check("CONCURRENT-NO-PARTIALS", partial.is_empty(), || format!("left in ingest/: {partial:?}"));

    // --- a pull SIGKILLed midway, then the same pull again
    let mut k = h.spawn(&["pull", &big_ref], "killed");
    let seen = wait_partial(&h, &mut k, 1 << 20, Duration::from_secs(60));
    k.child.kill().ok();
    let kr = k.wait(Duration::from_secs(10), "killed pull");
    ck.check("KILL-MIDWAY", seen.is_some() && kr.code == 137, || {
        format!(
            "no partial download of 1 MiB+ appeared under images/ingest/ before the pull ended: {}",
            kr.brief()
        )
    });
    let bad = h.bad_blobs();
    ck.check("KILL-NO-PARTIAL-BLOB", bad.is_empty() && !h.blob_path(&big_layer.digest).exists(), || {
        format!("bad: {bad:?}; the 64 MiB layer is under blobs/: {}", h.blob_path(&big_layer.digest).exists())
    });
    eprintln!("after the kill, ingest/ holds {:?}", h.files_under("ingest"));
    let p = h.run(&["pull", &big_ref]);
    ck.check("KILL-REPULL", p.ok() && p.last_line() == fx.big.manifest.digest, || p.brief());
    let bad = h.bad_blobs();
    ck.check("KILL-REPULL-VERIFIED", bad.is_empty() && h.blob_path(&big_layer.digest).is_file(), || {
        format!("bad: {bad:?}; layer present: {}", h.blob_path(&big_layer.digest).is_file())
    });

    // --- rmi collects what no other name needs; prune collects partial downloads
    let p = h.run(&["rmi", &big_ref]);
    ck.check("RMI", p.ok(), || p.brief());
    ck.check(
        "RMI-COLLECTS-UNSHARED",
        !h.blob_path(&big_layer.digest).exists() && h.blob_path(base).is_file(),
        || {
            format!(
                "the 64 MiB layer is still there ({}) or the shared busybox layer is gone ({})",
                h.blob_path(&big_layer.digest).exists(),
                !h.blob_path(base).is_file()
            )
        },
    );
    let mut k = h.spawn(&["pull", &big_ref], "killed2");
    let seen = wait_partial(&h, &mut k, 1 << 20, Duration::from_secs(60));
    k.child.kill().ok();
    k.wait(Duration::from_secs(10), "killed pull");
    let p = h.run(&["image", "prune"]);
    let freed = p
        .last_line()
        .strip_prefix("freed ")
        .and_then(|x| x.strip_suffix(" bytes"))
        .and_then(|n| n.parse::<u64>().ok());
    ck.check("PRUNE-PARTIAL", p.ok() && seen.is_some() && freed.is_some_and(|n| n >= 1 << 20), || {
        format!("want `freed <N> bytes` with N >= the partial download of {seen:?} bytes: {}", p.brief())
    });
    let partial = h.files_under("ingest");
    ck.check("PRUNE-EMPTIES-INGEST", partial.is_empty(), || format!("{partial:?}"));
    let kept = lay_digests.iter().all(|d| h.blob_path(d).is_file()) && inspect(&h, &layers_ref).is_ok();
    ck.check("PRUNE-KEEPS-REFERENCED", kept, || format!("blobs: {:?}", h.files_under("blobs")));

    // --- credentials
    let private = format!("{a}/private/bb:1");
    let p = h.run(&["pull", &private]);
    ck.check("AUTH-PULL-WITHOUT-LOGIN", !p.ok() && p.text().contains("husk login"), || p.brief());
    ck.said("AUTH-PULL-WITHOUT-LOGIN", &p);
    let p = h.run(&["login", "-u", USER, "-p", "wrong", a]);
    let t = p.text();
    ck.check(
        "AUTH-LOGIN-BAD",
        !p.ok() && (t.contains("credentials") || t.contains("unauthorized") || t.contains("refused")),
        || p.brief(),
    );
    ck.said("AUTH-LOGIN-BAD", &p);
    let auths = || -> Value {
        fs::read(h.auth_file()).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null)
    };
    ck.check("AUTH-BAD-NOT-STORED", auths()["auths"][a].is_null(), || format!("{}", auths()));
    let p = h.run_input(&["login", "-u", USER, "--password-stdin", a], Some(&format!("{PASSWORD}\n")));
    ck.check("AUTH-LOGIN", p.ok(), || p.brief());
    let stored = auths()["auths"][a]["auth"].as_str().map(String::from);
    let want_auth = b64(format!("{USER}:{PASSWORD}").as_bytes());
    ck.check("AUTH-FILE", stored.as_deref() == Some(want_auth.as_str()), || {
        format!("want auths[{a}].auth = {want_auth} in {}: {}", h.auth_file().display(), auths())
    });
    let p = h.run(&["pull", &private]);
    ck.check("AUTH-PULL", p.ok() && p.last_line() == fx.bb.manifest.digest, || p.brief());
    let p = h.run(&["logout", a]);
    ck.check("AUTH-LOGOUT", p.ok() && auths()["auths"][a].is_null(), || {
        format!("{}; {}", p.brief(), auths())
    });
    let p = h.run(&["pull", &private]);
    ck.check("AUTH-PULL-AFTER-LOGOUT", !p.ok(), || p.brief());
    ck.said("AUTH-PULL-AFTER-LOGOUT", &p);

    // --- everything removed: the store is empty again
    let names: Vec<String> = images_json(&h)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["name"].as_str().map(String::from))
        .collect();
    let before: u64 = h.files_under("blobs").iter().map(|(_, n)| n).sum();
    let mut args = vec!["rmi"];
    args.extend(names.iter().map(String::as_str));
    let p = h.run(&args);
    ck.check("RMI-ALL", p.ok() && !names.is_empty(), || format!("{names:?}: {}", p.brief()));
    let p = h.run(&["image", "prune"]);
    let freed_ok = p
        .last_line()
        .strip_prefix("freed ")
        .and_then(|x| x.strip_suffix(" bytes"))
        .is_some_and(|n| n.parse::<u64>().is_ok());
    ck.check("PRUNE", p.ok() && freed_ok, || p.brief());
    let (blobs, ingest, snaps) = (h.files_under("blobs"), h.files_under("ingest"), h.snapshots());
    let after: u64 = blobs.iter().map(|(_, n)| n).sum();
    ck.check("STORE-EMPTY", before > 0 && blobs.is_empty() && ingest.is_empty() && snaps.is_empty(), || {
        format!("{before} bytes of blobs before; left: blobs {blobs:?} ({after} bytes), ingest {ingest:?}, snapshots {snaps:?}")
    });
    let list = images_json(&h);
    ck.check("IMAGES-EMPTY", list.as_ref().is_ok_and(Vec::is_empty), || format!("{list:?}"));

    eprintln!("registry_pull_store_and_auth: {:?}", started.elapsed());
    ck.finish("registry, store and credentials");
}

fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

// ------------------------------------------------------------------------------------------
// Test (b): pulled images run in the test host

const L1_SCRIPT: &str = r##"
H=@HUSK@
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HUSK_IMAGE_ROOT=/var/hs HUSK_CONFIG=/var/husk-config.json REGISTRY_AUTH_FILE=/var/auth.json
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "@@NO-CGROUP2"
# The store on a tmpfs of its own: security.* extended attributes (file capabilities) need it.
mkdir -p /var/hs && mount -t tmpfs -o mode=0700 tmpfs /var/hs || echo "@@STORE-MOUNT FAIL"
echo '{"images": {"max_layer_bytes": @MAXLAYER@}}' > /var/husk-config.json
S=/var/hs/images/snapshots
R=127.0.0.1:5000
until_ok() { t=$1; shift; i=0; while ! "$@" >/dev/null 2>&1; do i=$((i+1)); [ $i -ge $((t*5)) ] && return 1; sleep 0.2; done; }
up() { cut -d' ' -f1 /proc/uptime; }
t() { echo "@@T $1 $(up)"; }
# ck NAME DETAIL CMD...: @@NAME ok when CMD succeeds, else @@NAME FAIL DETAIL.
ck() { n=$1; d=$2; shift 2; if "$@"; then echo "@@$n ok"; else echo "@@$n FAIL $d"; fi; }
# If a step stalls, the process list says where: on L1's console, whose tail a timeout reports
# (in the output it could land inside a section that a check reads whole).
( while sleep 120; do { echo "@@WATCH"; ps -o pid,ppid,stat,args | grep -v '\[' | cut -c1-160; } >/dev/console; done ) & watch=$!
cat > /var/reg.yml <<EOC
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: @STORAGE@
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $R
EOC
# docker-registry takes REGISTRY_* variables for config overrides (REGISTRY_AUTH_FILE would be
# `auth.file`): it gets none.
env -u REGISTRY_AUTH_FILE @REGISTRY@ serve /var/reg.yml > /var/reg.log 2>&1 &
reg=$!
i=0; while ! wget -q -O /dev/null http://$R/v2/ 2>/dev/null; do
    kill -0 $reg 2>/dev/null || { echo "@@REGISTRY FAIL exited: $(tail -n 5 /var/reg.log)"; break; }
    i=$((i+1)); [ $i -ge 600 ] && { echo "@@REGISTRY FAIL not up in 120 s"; break; }; sleep 0.2
done

echo "=== pull"
t pull
$H pull $R/layers:1 > /var/pull.out 2> /var/pull.err; rc=$?
ck L1-PULL "rc=$rc $(cat /var/pull.out /var/pull.err | tr '\n' ' ')" [ $rc = 0 -a "$(tail -n 1 /var/pull.out)" = "@LAYERS@" ]
$H image inspect $R/layers:1 > /var/inspect0.json
ck NO-SNAPSHOT-BEFORE-RUN "$(grep snapshot /var/inspect0.json)" grep -Eq '"snapshot": ?null' /var/inspect0.json

echo "=== run 1"
cat > /var/guest.sh <<'EOG'
ck() { n=$1; d=$2; shift 2; if "$@"; then echo "@@G-$n ok"; else echo "@@G-$n FAIL $d"; fi; }
ck WHITEOUT "$(ls -la /wh | tr '\n' ' ')" sh -c '[ ! -e /wh/file-gone ] && [ ! -e /wh/dir-gone ] && [ "$(cat /wh/kept)" = kept ]'
ck OPAQUE "$(ls -AR /opq | tr '\n' ' ')" [ "$(ls -A /opq | tr '\n' ' ')" = "new " ]
ck HARDLINK-ACROSS-LAYERS "$(ls -li /data | tr '\n' ' ')" sh -c '[ "$(stat -c %i /data/orig)" = "$(stat -c %i /data/link)" ] && [ "$(stat -c %h /data/link)" = 2 ] && [ "$(cat /data/link)" = linked-across-layers ]'
ck HARDLINK-IN-LAYER "$(ls -li /data | tr '\n' ' ')" sh -c '[ "$(stat -c %i /data/in1)" = "$(stat -c %i /data/in2)" ] && [ "$(cat /data/in2)" = linked-in-layer ]'
ck ZSTD-LAYER "$(ls -la /zstd 2>&1 | tr '\n' ' ')" [ "$(cat /zstd/hello)" = from-a-zstd-layer ]
ck CAP-FILE "$(ls -la /bin/ping-cap 2>&1)" [ -x /bin/ping-cap ]
ck IMAGE-ENV "IMGVAR=$IMGVAR" [ "$IMGVAR" = from-config ]
EOG
t run1
s=$(up)
$H run --pull never --net none $R/layers:1 -- sh -c "$(cat /var/guest.sh)" > /var/run1.out 2>&1; rc=$?
echo "@@T-RUN1 $(awk -v a=$s -v b=$(up) 'BEGIN{printf "%.2f", b-a}') s (first run: unpack + boot)"
cat /var/run1.out
ck RUN1 "rc=$rc" [ $rc = 0 ]
snap=$($H image inspect $R/layers:1 | sed -n 's/.*"snapshot": *"\([^"]*\)".*/\1/p')
ck SNAPSHOT "snapshot=$snap; $(ls -la $S 2>&1 | tr '\n' ' ')" sh -c "[ -n '$snap' ] && [ -d '$snap' ] && [ \"\$(dirname '$snap')\" = $S ]"
ck L1-GETCAP "$(getcap -v $snap/bin/ping-cap 2>&1)" sh -c "getcap $snap/bin/ping-cap | grep -q 'cap_net_raw[=+]ep'"
[ -n "$snap" ] && [ -d "$snap" ] || snap=/nonexistent-snapshot
i1=$(stat -c %i $snap/data/orig); i2=$(stat -c %i $snap/data/link)
ck L1-HARDLINK "$(ls -li $snap/data 2>&1 | tr '\n' ' ')" [ -n "$i1" -a "$i1" = "$i2" ]
ck L1-WHITEOUTS-GONE "$(find $snap -name '.wh.*' | head)" sh -c "[ -f $snap/wh/kept ] && [ -z \"\$(find $snap -name '.wh.*')\" ]"

echo "=== run 2"
ino1=$(stat -c %i "$snap"); list1=$(ls -A $S)
t run2
s=$(up)
$H run --pull never --net none $R/layers:1 -- true > /var/run2.out 2>&1; rc=$?
echo "@@T-RUN2 $(awk -v a=$s -v b=$(up) 'BEGIN{printf "%.2f", b-a}') s (second run: boot only)"
cat /var/run2.out
ck RUN2 "rc=$rc" [ $rc = 0 ]
ino2=$(stat -c %i "$snap"); list2=$(ls -A $S)
ck SNAPSHOT-REUSED "inode $ino1 -> $ino2; snapshots [$list1] -> [$list2]" [ -n "$ino1" -a "$ino1" = "$ino2" -a "$list1" = "$list2" ]

echo "=== multi-arch, pulled by run"
t multi
$H run --net none $R/multi:1 -- cat /arch > /var/multi.out 2>&1; rc=$?
cat /var/multi.out
ck MULTI-ARCH-AMD64 "rc=$rc" sh -c "[ $rc = 0 ] && grep -qx amd64 /var/multi.out"
$H run --pull never --net none $R/not-pulled:1 -- true > /var/never.out 2>&1; rc=$?
ck PULL-NEVER-MISSING "rc=$rc $(cat /var/never.out)" [ $rc != 0 ]

echo "=== bomb"
t bomb
# Directories under snapshots/: snapshots and unpacks in progress (lock files aside).
dirs() { find $S -mindepth 1 -maxdepth 1 -type d | sort | tr '\n' ' '; }
list1=$(dirs)
$H run --net none $R/bomb:1 -- true > /var/bomb.out 2>&1; rc=$?
cat /var/bomb.out
ck BOMB-REFUSED "rc=$rc" sh -c "[ $rc != 0 ] && grep -q '@BOMBHEX@' /var/bomb.out && grep -q max_layer_bytes /var/bomb.out"
list2=$(dirs)
ck BOMB-NO-SNAPSHOT "snapshot dirs [$list1] -> [$list2]" [ "$list1" = "$list2" ]
echo "snapshots/ after the bomb: $(ls -A $S | tr '\n' ' ')"

echo "=== oci layout"
t oci
$H run --net none --image oci:@BBLAYOUT@:bb -- sh -c 'echo oci-layout-ran' > /var/oci.out 2>&1; rc=$?
cat /var/oci.out
ck OCI-LAYOUT "rc=$rc" sh -c "[ $rc = 0 ] && grep -q oci-layout-ran /var/oci.out"
t end
ps -o pid,args | grep -v grep | grep -q husk-vmm && { echo "@@LEFT-VMM"; ps -o pid,args | grep husk-vmm; }
kill $watch
"##;

#[test]
fn pulled_images_run_in_test_host() {
    let kit = require!(ImageTestKit::find());
    let vm = require!(kit.vm());
    require!(if is_root() { Ok(()) } else { Err("needs root (setcap for the test image)".to_string()) });
    let started = Instant::now();
    let fx = Fixtures::get(&kit).unwrap_or_else(|e| panic!("building the test images: {e}"));
    // A registry storage directory for L1, filled here.
    let dir = Scratch::new("l1").unwrap_or_else(|e| panic!("{e}"));
    let mut reg = Registry::start(&kit, dir.path(), false).unwrap_or_else(|e| panic!("{e}"));
    for name in ["layers", "multi", "bomb"] {
        push(&kit, dir.path(), &fx.main, name, &format!("{}/{name}:1", reg.addr), false)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    reg.stop();
    let storage = reg.storage.clone();
    drop(reg);

    let d = |p: &Path| p.display().to_string();
    let script = L1_SCRIPT
        .replace("@HUSK@", &d(&kit.husk))
        .replace("@REGISTRY@", &d(&kit.registry))
        .replace("@STORAGE@", &d(&storage))
        .replace("@BBLAYOUT@", &d(&fx.bb_layout))
        .replace("@MAXLAYER@", &MAX_LAYER_BYTES.to_string())
        .replace("@LAYERS@", &fx.layers.manifest.digest)
        .replace("@BOMBHEX@", hex_of(&fx.bomb.layers[1].desc.digest));
    let mut job = Job::new(script).timeout(Duration::from_secs(1500));
    job.files = vec![
        kit.husk.clone(),
        vm.vmm.clone(),
        vm.kernel.clone(),
        vm.initrd.clone(),
        kit.registry.clone(),
        kit.getcap.clone(),
        // No CA certificates: L1 has none, and a pull from its plain-HTTP registry needs none.
        storage,
        fx.bb_layout.clone(),
    ];
    // As the runtime and network tests: one L1 CPU, and its watchdog (silence past stall_after
    // is a stalled L1, run once more).
    job.cpus = 1;
    job.mem_mib = 3072;
    job.stall_after = Some(Duration::from_secs(300));
    let out = run_job(&job).unwrap_or_else(|e| panic!("test host failed: {e}"));
    let o = out.output;
    eprintln!("test host: {:?} (whole test {:?})\n{o}", out.elapsed, started.elapsed());
    assert!(!o.contains("@@NO-CGROUP2"), "{o}");
    let failed: Vec<&str> = o.lines().filter(|l| l.starts_with("@@") && l.contains(" FAIL")).collect();
    assert!(failed.is_empty(), "image checks failed:\n{}\n\n{o}", failed.join("\n"));
    assert!(!o.contains("@@LEFT-"), "left behind:\n{o}");
    for check in [
        "@@L1-PULL ok",
        "@@NO-SNAPSHOT-BEFORE-RUN ok",
        "@@G-WHITEOUT ok",
        "@@G-OPAQUE ok",
        "@@G-HARDLINK-ACROSS-LAYERS ok",
        "@@G-HARDLINK-IN-LAYER ok",
        "@@G-ZSTD-LAYER ok",
        "@@G-CAP-FILE ok",
        "@@G-IMAGE-ENV ok",
        "@@RUN1 ok",
        "@@SNAPSHOT ok",
        "@@L1-GETCAP ok",
        "@@L1-HARDLINK ok",
        "@@L1-WHITEOUTS-GONE ok",
        "@@RUN2 ok",
        "@@SNAPSHOT-REUSED ok",
        "@@T-RUN1 ",
        "@@T-RUN2 ",
        "@@MULTI-ARCH-AMD64 ok",
        "@@PULL-NEVER-MISSING ok",
        "@@BOMB-REFUSED ok",
        "@@BOMB-NO-SNAPSHOT ok",
        "@@OCI-LAYOUT ok",
    ] {
        assert!(o.contains(check), "expected {check:?}:\n{o}");
    }
}
