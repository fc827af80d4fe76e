//! Test helpers: temporary directories, tar layers and OCI layouts built in memory.

use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use flate2::write::GzEncoder;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::layout::REF_NAME;

pub(crate) const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub(crate) const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub(crate) const TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// A directory removed on drop (no tempfile dependency for one helper).
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("husk-image-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub(crate) fn sub(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        fs::create_dir_all(&p).expect("create subdir");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(crate) enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    /// A file whose name is written raw into the header, bypassing the tar crate's own checks.
    RawFile(&'a str),
    /// A hard link whose target is written raw.
    RawHardlink(&'a str, &'a str),
    /// A PAX extended header: its records (key, value) apply to the next entry.
    Pax(&'a [(&'a str, &'a [u8])]),
    /// A PAX global header (as `git archive` writes one).
    PaxGlobal(&'a [(&'a str, &'a [u8])]),
    /// A character or block device (major, minor) or a FIFO (0, 0).
    Node(&'a str, tar::EntryType, u32, u32, u32),
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_600_000_000);
    h.set_uid(1234);
    h.set_gid(4321);
    h
}

fn raw_name(h: &mut tar::Header, name: &str) {
    let field = &mut h.as_old_mut().name;
    field.fill(0);
    field[..name.len()].copy_from_slice(name.as_bytes());
}

fn raw_link(h: &mut tar::Header, name: &str) {
    let field = &mut h.as_old_mut().linkname;
    field.fill(0);
    field[..name.len()].copy_from_slice(name.as_bytes());
}

pub(crate) fn tar_bytes(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match *e {
            E::Dir(path, mode) => {
                let mut h = header(tar::EntryType::Directory, mode, 0);
                b.append_data(&mut h, path, io::empty()).expect("dir");
            }
            E::File(path, data, mode) => {
                let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
                b.append_data(&mut h, path, data).expect("file");
            }
            E::Symlink(path, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, path, target).expect("symlink");
            }
            E::Hardlink(path, target) => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                b.append_link(&mut h, path, target).expect("hardlink");
            }
            E::RawFile(path) => {
                let mut h = header(tar::EntryType::Regular, 0o644, 4);
                raw_name(&mut h, path);
                h.set_cksum();
                b.append(&h, &b"evil"[..]).expect("raw file");
            }
            E::Pax(records) | E::PaxGlobal(records) => {
                let data = pax_records(records);
                let mut h = tar::Header::new_ustar();
                let global = matches!(e, E::PaxGlobal(_));
                h.set_entry_type(if global {
                    tar::EntryType::XGlobalHeader
                } else {
                    tar::EntryType::XHeader
                });
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, "PaxHeaders/entry", &data[..]).expect("pax header");
            }
            E::Node(path, kind, major, minor, mode) => {
                let mut h = header(kind, mode, 0);
                h.set_device_major(major).expect("major");
                h.set_device_minor(minor).expect("minor");
                b.append_data(&mut h, path, io::empty()).expect("device node");
            }
            E::RawHardlink(path, target) => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                raw_name(&mut h, path);
                raw_link(&mut h, target);
                h.set_cksum();
                b.append(&h, io::empty()).expect("raw link");
            }
        }
    }
    b.into_inner().expect("finish tar")
}

/// PAX records: "LEN KEY=VALUE\n", where LEN counts the whole record, its own digits included.
fn pax_records(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let rest = key.len() + value.len() + 3; // ' ', '=' and '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

pub(crate) fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).expect("zstd")
}

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// Builds layouts blob by blob.
pub(crate) struct LayoutBuilder {
    pub(crate) dir: PathBuf,
}

impl LayoutBuilder {
    pub(crate) fn new(dir: PathBuf) -> Self {
        fs::create_dir_all(dir.join("blobs/sha256")).expect("blobs dir");
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
        LayoutBuilder { dir }
    }

    pub(crate) fn blob(&self, media_type: &str, data: &[u8]) -> Value {
        let hex = sha256_hex(data);
        fs::write(self.dir.join("blobs/sha256").join(&hex), data).expect("write blob");
        json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len()})
    }

    /// Stores a blob and returns its descriptor, as a content store's caller would have it.
    pub(crate) fn descriptor(&self, media_type: &str, data: &[u8]) -> oci_spec::image::Descriptor {
        serde_json::from_value(self.blob(media_type, data)).expect("descriptor")
    }

    pub(crate) fn json_blob(&self, media_type: &str, value: &Value) -> Value {
        self.blob(media_type, &serde_json::to_vec(value).expect("json"))
    }

    pub(crate) fn image(&self, layers: &[(&str, Vec<u8>)], config: Value) -> Value {
        let layers: Vec<Value> = layers.iter().map(|(mt, data)| self.blob(mt, data)).collect();
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": []},
        });
        let config = self.json_blob("application/vnd.oci.image.config.v1+json", &config);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": layers,
        });
        self.json_blob("application/vnd.oci.image.manifest.v1+json", &manifest)
    }

    pub(crate) fn index(&self, manifests: Vec<Value>) {
        let index = json!({"schemaVersion": 2, "manifests": manifests});
        fs::write(self.dir.join("index.json"), serde_json::to_vec(&index).expect("json")).expect("index");
    }
}

pub(crate) fn tagged(mut desc: Value, tag: &str) -> Value {
    desc["annotations"] = json!({ REF_NAME: tag });
    desc
}

/// A layout holding one image tagged "t" made of `layers`.
pub(crate) fn single(tmp: &TempDir, layers: &[(&str, Vec<u8>)]) -> PathBuf {
    let l = LayoutBuilder::new(tmp.sub("layout"));
    let m = l.image(layers, json!({}));
    l.index(vec![tagged(m, "t")]);
    l.dir
}
