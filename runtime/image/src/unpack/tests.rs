use std::os::unix::fs::MetadataExt;

use serde_json::json;

use super::stream::DOCKER_LAYER_GZIP;
use super::*;
use std::io::Write as _;
use std::time::{Duration, Instant};

use tar::EntryType as T;

use crate::testutil::{
    gzip, sha256_hex, single, tagged, tar_bytes, zstd, LayoutBuilder, TempDir, E, TAR, TAR_GZ, TAR_ZSTD,
};

#[test]
fn basic_unpack_and_config() {
    let tmp = TempDir::new();
    let l = LayoutBuilder::new(tmp.sub("layout"));
    let layer = tar_bytes(&[
        E::Dir("./", 0o755),
        E::Dir("./etc/", 0o750),
        E::File("./etc/hello", b"hi\n", 0o640),
        E::Dir("bin", 0o755),
        E::File("bin/busybox", b"\x7fELF", 0o4755),
        E::Symlink("bin/sh", "busybox"),
        E::Hardlink("bin/ls", "bin/busybox"),
        // link(2) on a symlink links the symlink itself, which is harmless.
        E::Hardlink("bin/sh2", "bin/sh"),
        E::File("deep/implicit/parent", b"x", 0o600),
        E::Dir("tmp", 0o1777),
    ]);
    let m = l.image(
        &[(TAR_GZ, gzip(&layer))],
        json!({
            "Env": ["PATH=/bin", "A=b"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hi"],
            "WorkingDir": "/etc",
            "User": "1000:1000",
        }),
    );
    l.index(vec![tagged(m, "t")]);
    let dest = tmp.sub("rootfs");
    let config = unpack(&l.dir, "t", &dest).expect("unpack");
    assert_eq!(
        config,
        ImageConfig {
            env: vec!["PATH=/bin".into(), "A=b".into()],
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo hi".into()],
            working_dir: "/etc".into(),
            user: "1000:1000".into(),
        }
    );
    assert_eq!(fs::read(dest.join("etc/hello")).expect("read"), b"hi\n");
    let hello = fs::metadata(dest.join("etc/hello")).expect("stat");
    assert_eq!(hello.mode() & 0o7777, 0o640);
    assert_eq!(hello.mtime(), 1_600_000_000);
    let etc = fs::metadata(dest.join("etc")).expect("stat");
    assert_eq!(etc.mode() & 0o7777, 0o750);
    assert_eq!(etc.mtime(), 1_600_000_000, "dir mtime survives files created in it");
    assert_eq!(fs::metadata(dest.join("tmp")).expect("stat").mode() & 0o7777, 0o1777);
    assert_eq!(fs::metadata(dest.join("bin/busybox")).expect("stat").mode() & 0o7777, 0o4755);
    assert_eq!(fs::read_link(dest.join("bin/sh")).expect("readlink"), Path::new("busybox"));
    let ls = fs::metadata(dest.join("bin/ls")).expect("stat");
    assert_eq!(ls.ino(), fs::metadata(dest.join("bin/busybox")).expect("stat").ino());
    assert_eq!(fs::read_link(dest.join("bin/sh2")).expect("readlink"), Path::new("busybox"));
    assert_eq!(fs::read(dest.join("deep/implicit/parent")).expect("read"), b"x");
    assert_eq!(fs::metadata(dest.join("deep")).expect("stat").mode() & 0o7777, 0o755);
    if is_root() {
        assert_eq!((hello.uid(), hello.gid()), (1234, 4321));
        assert_eq!((etc.uid(), etc.gid()), (1234, 4321));
    }
}

#[test]
fn whiteouts_and_opaque_dirs() {
    let tmp = TempDir::new();
    let lower = tar_bytes(&[
        E::Dir("a", 0o755),
        E::File("a/1", b"1", 0o644),
        E::File("a/2", b"2", 0o644),
        E::Dir("b", 0o755),
        E::File("b/keep", b"k", 0o644),
        E::File("b/drop", b"d", 0o644),
        E::Dir("b/dropdir", 0o755),
        E::File("b/dropdir/x", b"x", 0o644),
        E::Dir("c/old", 0o755),
        E::File("c/old/deep", b"deep", 0o644),
        E::File("c/gone", b"g", 0o644),
        E::Dir("d", 0o755),
        E::File("d/f", b"f", 0o644),
        E::Symlink("s", "/nonexistent"),
    ]);
    let upper = tar_bytes(&[
        // This layer's own entry before the marker must survive it.
        E::File("a/new", b"new", 0o644),
        E::File("a/.wh..wh..opq", b"", 0o644),
        E::File("b/.wh.drop", b"", 0o644),
        E::File("b/.wh.dropdir", b"", 0o644),
        E::File("b/.wh.never-existed", b"", 0o644),
        E::File("nodir/.wh.x", b"", 0o644),
        E::File("c/old/fresh", b"fresh", 0o644),
        E::File("c/.wh..wh..opq", b"", 0o644),
        // Whiteout after a same-layer file hides only lower layers: the file stays.
        E::File("b/mine", b"m", 0o644),
        E::File("b/.wh.mine", b"", 0o644),
        // Replacements: a file over a directory, a directory over a symlink.
        E::File("d", b"now a file", 0o644),
        E::Dir("s", 0o700),
        E::File("s/y", b"y", 0o644),
    ]);
    let layout = single(&tmp, &[(TAR, lower), (TAR_GZ, gzip(&upper))]);
    let dest = tmp.sub("rootfs");
    unpack(&layout, "t", &dest).expect("unpack");
    let names = |dir: &str| {
        let mut v: Vec<String> = fs::read_dir(dest.join(dir))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("a"), ["new"]);
    assert_eq!(names("b"), ["keep", "mine"]);
    assert_eq!(names("c"), ["old"]);
    assert_eq!(names("c/old"), ["fresh"]);
    assert!(!dest.join("nodir").exists(), "a whiteout creates nothing");
    assert_eq!(fs::read(dest.join("d")).expect("read"), b"now a file");
    let s = fs::symlink_metadata(dest.join("s")).expect("stat");
    assert!(s.is_dir());
    assert_eq!(s.mode() & 0o7777, 0o700);
    assert_eq!(fs::read(dest.join("s/y")).expect("read"), b"y");
}

#[test]
fn read_only_dirs_do_not_block_later_layers() {
    let tmp = TempDir::new();
    let lower = tar_bytes(&[E::Dir("ro", 0o555), E::Dir("ro/inner", 0o500), E::File("ro/old", b"o", 0o444)]);
    let upper = tar_bytes(&[E::File("ro/inner/new", b"n", 0o644), E::File("ro/.wh.old", b"", 0o644)]);
    let layout = single(&tmp, &[(TAR, lower), (TAR, upper)]);
    let dest = tmp.sub("rootfs");
    unpack(&layout, "t", &dest).expect("unpack");
    assert_eq!(fs::metadata(dest.join("ro")).expect("stat").mode() & 0o7777, 0o555);
    assert!(!dest.join("ro/old").exists());
    // Let the cleanup in; as root this is moot.
    fs::set_permissions(dest.join("ro"), fs::Permissions::from_mode(0o755)).expect("chmod");
    let inner = dest.join("ro/inner");
    assert_eq!(fs::metadata(&inner).expect("stat").mode() & 0o7777, 0o500);
    assert_eq!(fs::read(inner.join("new")).expect("read"), b"n");
    fs::set_permissions(&inner, fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn root_opaque_marker_clears_lower_layers() {
    let tmp = TempDir::new();
    let lower = tar_bytes(&[E::File("old", b"o", 0o644), E::Dir("olddir", 0o755)]);
    let upper = tar_bytes(&[E::File("new", b"n", 0o644), E::File(".wh..wh..opq", b"", 0o644)]);
    let layout = single(&tmp, &[(TAR, lower), (TAR, upper)]);
    let dest = tmp.sub("rootfs");
    unpack(&layout, "t", &dest).expect("unpack");
    let names: Vec<_> = fs::read_dir(&dest).expect("read_dir").map(|e| e.expect("e").file_name()).collect();
    assert_eq!(names, ["new"]);
}

#[test]
fn path_traversal_is_rejected() {
    for bad in ["../evil", "a/../../evil", "/abs-evil"] {
        let tmp = TempDir::new();
        let layout = single(&tmp, &[(TAR, tar_bytes(&[E::Dir("a", 0o755), E::RawFile(bad)]))]);
        let dest = tmp.sub("sub/rootfs");
        let err = unpack(&layout, "t", &dest).expect_err("must fail");
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{bad}: {err}");
        assert!(!tmp.0.join("sub/evil").exists() && !tmp.0.join("evil").exists());
    }
    for bad in ["../outside", "/etc/passwd"] {
        let tmp = TempDir::new();
        let layer = tar_bytes(&[E::RawHardlink("link", bad)]);
        let layout = single(&tmp, &[(TAR, layer)]);
        let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{bad}: {err}");
    }
}

#[test]
fn symlinks_from_lower_layers_are_never_followed() {
    let tmp = TempDir::new();
    let outside = tmp.sub("outside");
    fs::write(outside.join("victim"), b"precious").expect("victim");
    let outside_str = outside.to_str().expect("utf8 path");
    let cases: Vec<(&str, Vec<E>)> = vec![
        ("a/x", vec![E::File("a/x", b"pwned", 0o644)]),
        ("b/x", vec![E::File("b/x", b"pwned", 0o644)]),
        ("a/.wh.victim", vec![E::File("a/.wh.victim", b"", 0o644)]),
        ("a/.wh..wh..opq", vec![E::File("a/.wh..wh..opq", b"", 0o644)]),
        ("hard link via a/", vec![E::Hardlink("h", "a/victim")]),
        ("dir via a/", vec![E::Dir("a/sub", 0o755)]),
    ];
    for (what, upper) in cases {
        let case = TempDir::new();
        let lower = tar_bytes(&[E::Symlink("a", outside_str), E::Symlink("b", "..")]);
        let layout = single(&case, &[(TAR, lower), (TAR, tar_bytes(&upper))]);
        let dest = case.sub("rootfs");
        let err = unpack(&layout, "t", &dest).expect_err(what);
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{what}: {err}");
        let mut left: Vec<_> =
            fs::read_dir(&outside).expect("ls").map(|e| e.expect("e").file_name()).collect();
        left.sort();
        assert_eq!(left, ["victim"], "{what}");
        assert_eq!(fs::read(outside.join("victim")).expect("read"), b"precious", "{what}");
        assert!(!case.0.join("x").exists(), "{what}");
    }

    // Same layer: symlink, then a file through it.
    let case = TempDir::new();
    let layer = tar_bytes(&[E::Symlink("a", outside_str), E::File("a/x", b"pwned", 0o644)]);
    let layout = single(&case, &[(TAR, layer)]);
    let err = unpack(&layout, "t", &case.sub("rootfs")).expect_err("must fail");
    assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
    assert!(!outside.join("x").exists());

    // A file replacing the symlink itself is fine and writes inside dest.
    let case = TempDir::new();
    let lower = tar_bytes(&[E::Symlink("a", outside_str)]);
    let upper = tar_bytes(&[E::File("a", b"inside", 0o644)]);
    let layout = single(&case, &[(TAR, lower), (TAR, upper)]);
    let dest = case.sub("rootfs");
    unpack(&layout, "t", &dest).expect("unpack");
    assert_eq!(fs::read(dest.join("a")).expect("read"), b"inside");
    assert_eq!(fs::read(outside.join("victim")).expect("read"), b"precious");
}

#[test]
fn docker_media_types_and_zstd() {
    let tmp = TempDir::new();
    let layer = gzip(&tar_bytes(&[E::File("f", b"docker", 0o644)]));
    let layout = single(&tmp, &[(DOCKER_LAYER_GZIP, layer)]);
    let dest = tmp.sub("rootfs");
    unpack(&layout, "t", &dest).expect("unpack");
    assert_eq!(fs::read(dest.join("f")).expect("read"), b"docker");

    // zstd, the upper layer as two frames back to back (the decoder must read on past the first), and the
    // non-distributable flavour.
    let tmp = TempDir::new();
    let lower = tar_bytes(&[E::File("z", b"zstd", 0o644), E::File("gone", b"", 0o644)]);
    let upper = tar_bytes(&[E::File(".wh.gone", b"", 0o644), E::File("z2", &[5u8; 5000], 0o600)]);
    let mut two_frames = zstd(&upper[..1024]);
    two_frames.extend(zstd(&upper[1024..]));
    let foreign = tar_bytes(&[E::File("nd", b"nondistributable", 0o644)]);
    let layout = single(
        &tmp,
        &[
            (TAR_ZSTD, zstd(&lower)),
            (TAR_ZSTD, two_frames),
            ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", zstd(&foreign)),
        ],
    );
    let dest = tmp.sub("rootfs");
    unpack(&layout, "t", &dest).expect("unpack");
    assert_eq!(fs::read(dest.join("z")).expect("read"), b"zstd");
    assert_eq!(fs::read(dest.join("z2")).expect("read"), [5u8; 5000]);
    assert_eq!(fs::read(dest.join("nd")).expect("read"), b"nondistributable");
    assert!(!dest.join("gone").exists());

    let tmp = TempDir::new();
    let layout = single(&tmp, &[("application/vnd.oci.image.layer.v1.tar+lz4", vec![1, 2, 3])]);
    let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
    assert!(matches!(err, ImageError::UnsupportedLayer { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("tar+lz4") && msg.contains("tar+zstd") && !msg.contains("not zstd"), "{msg}");
}

#[test]
fn destination_must_be_an_empty_dir() {
    let tmp = TempDir::new();
    let layout = single(&tmp, &[]);
    let dest = tmp.sub("rootfs");
    fs::write(dest.join("junk"), b"").expect("write");
    let err = unpack(&layout, "t", &dest).expect_err("must fail");
    assert!(matches!(err, ImageError::BadDestination { .. }), "{err}");
    let err = unpack(&layout, "t", &tmp.0.join("missing")).expect_err("must fail");
    assert!(matches!(err, ImageError::BadDestination { .. }), "{err}");
}

fn diff_id(tar: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(tar))
}

#[test]
fn diff_ids_are_verified() {
    let tmp = TempDir::new();
    let l = LayoutBuilder::new(tmp.sub("store"));
    // Zero blocks past the end marker, as Go's tar writer pads to 10 KiB records: they are part of the
    // diff_id, so the stream must be read to its very end.
    let mut t1 = tar_bytes(&[E::File("a", b"1", 0o644)]);
    t1.extend([0u8; 8192]);
    let t2 = tar_bytes(&[E::File("b", b"2", 0o644), E::File(".wh.a", b"", 0o644)]);
    let layers = [l.descriptor(TAR_GZ, &gzip(&t1)), l.descriptor(TAR_ZSTD, &zstd(&t2))];
    let ids = [diff_id(&t1), diff_id(&t2)];
    let limits = UnpackLimits::default();

    let dest = tmp.sub("r1");
    let stats = unpack_layers(&l.dir, &layers, Some(&ids), &dest, &limits).expect("unpack");
    assert_eq!(stats, UnpackStats { layers: 2, entries: 3, bytes: (t1.len() + t2.len()) as u64 });
    assert_eq!(fs::read(dest.join("b")).expect("read"), b"2");
    assert!(!dest.join("a").exists());
    let dest = tmp.sub("r2");
    assert_eq!(unpack_layers(&l.dir, &layers, None, &dest, &limits).expect("unpack"), stats);

    let wrong = [ids[0].clone(), diff_id(b"something else")];
    let err = unpack_layers(&l.dir, &layers, Some(&wrong), &tmp.sub("r3"), &limits).expect_err("must fail");
    match &err {
        ImageError::DiffIdMismatch { layer, expected, actual } => {
            assert_eq!(layer, &layers[1].digest().to_string());
            assert_eq!(expected, &wrong[1]);
            assert_eq!(actual, &ids[1]);
        }
        other => panic!("{other}"),
    }

    // Refused before anything is written.
    let dest = tmp.sub("r4");
    let err = unpack_layers(&l.dir, &layers, Some(&ids[..1]), &dest, &limits).expect_err("must fail");
    assert!(matches!(err, ImageError::DiffIdCountMismatch { layers: 2, diff_ids: 1 }), "{err}");
    let bad = [ids[0].clone(), format!("sha512:{}", "a".repeat(128))];
    let err = unpack_layers(&l.dir, &layers, Some(&bad), &dest, &limits).expect_err("must fail");
    assert!(matches!(err, ImageError::UnsupportedDigest(_)), "{err}");
    assert_eq!(fs::read_dir(&dest).expect("ls").count(), 0);

    // A corrupt blob is reported as such, not as a diff_id mismatch.
    let gz = gzip(&t1);
    let mut bad = gz.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    fs::write(l.dir.join("blobs/sha256").join(sha256_hex(&gz)), &bad).expect("tamper");
    let err = unpack_layers(&l.dir, &layers, Some(&ids), &tmp.sub("r5"), &limits).expect_err("must fail");
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
}

#[test]
fn gzip_bomb_stops_at_the_size_cap() {
    let tmp = TempDir::new();
    let l = LayoutBuilder::new(tmp.sub("store"));
    let tar = tar_bytes(&[E::File("zeros", &vec![0u8; 64 << 20], 0o644)]);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&tar).expect("gzip");
    let bomb = enc.finish().expect("gzip");
    assert!(bomb.len() < 256 << 10, "a bomb: {} bytes", bomb.len());
    let desc = l.descriptor(TAR_GZ, &bomb);
    let digest = desc.digest().to_string();
    let limits = UnpackLimits { max_layer_bytes: 1 << 20, ..UnpackLimits::default() };

    let dest = tmp.sub("rootfs");
    let started = Instant::now();
    let err = unpack_layers(&l.dir, &[desc], None, &dest, &limits).expect_err("must fail");
    let elapsed = started.elapsed();
    assert!(
        matches!(&err, ImageError::LayerTooLarge { layer, what: "uncompressed size", limit: 1048576 } if *layer == digest),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&digest) && msg.contains("1048576") && msg.contains("images.max_layer_bytes"),
        "{msg}"
    );
    // Reading stopped at the cap: the file got at most 1 MiB of its 64.
    let written = fs::metadata(dest.join("zeros")).map(|m| m.len()).unwrap_or(0);
    assert!(written < 1 << 20, "{written} bytes written");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");

    // The layout entry point takes the same limits.
    let tmp = TempDir::new();
    let layout = single(&tmp, &[(TAR_GZ, bomb)]);
    let err = unpack_with_limits(&layout, "t", &tmp.sub("rootfs"), &limits).expect_err("must fail");
    assert!(matches!(err, ImageError::LayerTooLarge { .. }), "{err}");
}

#[test]
fn entry_count_cap() {
    let names: Vec<String> = (0..8).map(|i| format!("f{i}")).collect();
    let mut entries: Vec<E> = names.iter().map(|n| E::File(n, b"", 0o644)).collect();
    // Whiteouts and skipped entries count too.
    entries.push(E::File(".wh.nothing", b"", 0o644));
    entries.push(E::File(".wh..wh.plnk", b"", 0o644));
    let layer = tar_bytes(&entries);

    let tmp = TempDir::new();
    let l = LayoutBuilder::new(tmp.sub("store"));
    let desc = l.descriptor(TAR, &layer);
    let limits = UnpackLimits { max_layer_entries: 10, ..UnpackLimits::default() };
    let stats = unpack_layers(&l.dir, std::slice::from_ref(&desc), None, &tmp.sub("r1"), &limits)
        .expect("at the cap");
    assert_eq!(stats.entries, 10);

    let limits = UnpackLimits { max_layer_entries: 9, ..UnpackLimits::default() };
    let err = unpack_layers(&l.dir, std::slice::from_ref(&desc), None, &tmp.sub("r2"), &limits)
        .expect_err("must fail");
    assert!(matches!(&err, ImageError::LayerTooLarge { what: "entry count", limit: 9, .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&desc.digest().to_string()) && msg.contains("images.max_layer_entries"), "{msg}");
}

#[test]
fn oversized_entry_headers_are_refused() {
    let tmp = TempDir::new();
    let comment = vec![b'x'; 2 << 20];
    let layer = tar_bytes(&[E::Pax(&[("comment", &comment)]), E::File("f", b"", 0o644)]);
    let layout = single(&tmp, &[(TAR_GZ, gzip(&layer))]);
    let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
    assert!(matches!(err, ImageError::Archive { .. }), "{err}");
    assert!(err.to_string().contains("headers"), "{err}");
}

/// Whether the filesystem under `dir` lets this process set `name`.
fn xattr_supported(dir: &Path, name: &str, value: &[u8]) -> Result<(), io::Error> {
    let probe = dir.join("xattr-probe");
    fs::write(&probe, b"").expect("probe file");
    let result = xattr::set(&probe, name, value);
    fs::remove_file(&probe).expect("rm probe");
    result
}

/// A v2 file capability: cap_net_raw, permitted and effective.
const CAP_NET_RAW: &[u8] = &[1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// One holding a newline byte (0x0a), as telegraf's does: the tar crate cannot frame it by itself.
const CAP_WITH_NEWLINE: &[u8] = &[1, 0, 0, 2, 2, 0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

#[test]
fn file_capabilities_are_applied() {
    let tmp = TempDir::new();
    let layer = tar_bytes(&[
        E::Dir("bin", 0o755),
        E::Pax(&[
            ("SCHILY.xattr.security.capability", CAP_NET_RAW),
            ("SCHILY.xattr.security.selinux", b"system_u:object_r:ping_exec_t:s0"),
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
        ]),
        E::File("bin/ping", b"\x7fELF", 0o755),
        // setuid and a capability: the owner is set first, the mode second, the capability last.
        E::Pax(&[("SCHILY.xattr.security.capability", CAP_WITH_NEWLINE)]),
        E::File("bin/both", b"\x7fELF", 0o4755),
        // On a symlink a capability is skipped, not an error.
        E::Pax(&[("SCHILY.xattr.security.capability", CAP_NET_RAW)]),
        E::Symlink("bin/ping6", "ping"),
    ]);
    let layout = single(&tmp, &[(TAR_GZ, gzip(&layer))]);
    let dest = tmp.sub("rootfs");
    let result = unpack(&layout, "t", &dest);
    if let Err(probe) = xattr_supported(&tmp.0, "security.capability", CAP_NET_RAW) {
        eprintln!(
            "NOTE: {} refuses security.capability ({probe}); only checking that unpacking reports it",
            std::env::temp_dir().display()
        );
        let err = result.expect_err("a capability that cannot be set is an error");
        assert!(
            matches!(&err, ImageError::Xattr { entry, name, .. } if entry == "bin/ping" && name == "security.capability"),
            "{err}"
        );
        return;
    }
    result.expect("unpack");
    for (file, want) in [("bin/ping", CAP_NET_RAW), ("bin/both", CAP_WITH_NEWLINE)] {
        let cap = xattr::get(dest.join(file), "security.capability").expect("getxattr");
        assert_eq!(cap.as_deref(), Some(want), "{file}");
    }
    let ping = dest.join("bin/ping");
    let selinux = xattr::get(&ping, "security.selinux").expect("getxattr");
    assert_ne!(
        selinux.as_deref(),
        Some(&b"system_u:object_r:ping_exec_t:s0"[..]),
        "selinux labels are skipped"
    );
    assert_eq!(xattr::get(&ping, "trusted.overlay.opaque").expect("getxattr"), None);
    assert_eq!(fs::metadata(&ping).expect("stat").mode() & 0o7777, 0o755);
    let both = fs::metadata(dest.join("bin/both")).expect("stat");
    assert_eq!(both.mode() & 0o7777, 0o4755);
    if is_root() {
        assert_eq!((both.uid(), both.gid()), (1234, 4321));
    }
}

#[test]
fn user_xattrs_are_applied_best_effort() {
    let tmp = TempDir::new();
    let layer = tar_bytes(&[
        E::Pax(&[("SCHILY.xattr.user.dir", b"d")]),
        E::Dir("d", 0o700),
        E::Pax(&[("SCHILY.xattr.user.mime_type", b"text/plain"), ("SCHILY.xattr.user.bin", b"\0\xff\n=")]),
        E::File("d/f", b"x", 0o644),
        // Linux refuses user.* on symlinks: a warning, not an error.
        E::Pax(&[("SCHILY.xattr.user.link", b"l")]),
        E::Symlink("d/l", "f"),
    ]);
    let layout = single(&tmp, &[(TAR, layer)]);
    let dest = tmp.sub("rootfs");
    unpack(&layout, "t", &dest).expect("unpack");
    if let Err(probe) = xattr_supported(&tmp.0, "user.probe", b"1") {
        eprintln!(
            "NOTE: {} refuses user.* xattrs ({probe}); checked only that unpacking goes on without them",
            std::env::temp_dir().display()
        );
        return;
    }
    assert_eq!(xattr::get(dest.join("d"), "user.dir").expect("getxattr").as_deref(), Some(&b"d"[..]));
    let f = dest.join("d/f");
    assert_eq!(xattr::get(&f, "user.mime_type").expect("getxattr").as_deref(), Some(&b"text/plain"[..]));
    assert_eq!(xattr::get(&f, "user.bin").expect("getxattr").as_deref(), Some(&b"\0\xff\n="[..]));
}

#[test]
fn too_many_xattrs_are_refused() {
    let names: Vec<String> = (0..65).map(|i| format!("SCHILY.xattr.user.a{i}")).collect();
    let many: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"v"[..])).collect();
    let big = vec![b'v'; 40 << 10];
    let large: Vec<(&str, &[u8])> = vec![("SCHILY.xattr.user.a", &big), ("SCHILY.xattr.user.b", &big)];
    for records in [many, large] {
        let tmp = TempDir::new();
        let layout = single(&tmp, &[(TAR, tar_bytes(&[E::Pax(&records), E::File("f", b"", 0o644)]))]);
        let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
    }
}

#[test]
fn device_nodes_and_fifos() {
    let tmp = TempDir::new();
    let lower = tar_bytes(&[E::Dir("dev", 0o755), E::File("dev/null2", b"was a file", 0o644)]);
    let upper = tar_bytes(&[
        E::Node("dev/null2", T::Char, 1, 3, 0o666),
        E::Node("dev/loop9", T::Block, 7, 9, 0o660),
        E::Node("dev/wide", T::Char, 259, 300, 0o600),
        E::Node("run/fifo", T::Fifo, 0, 0, 0o620),
    ]);
    let layout = single(&tmp, &[(TAR, lower), (TAR_GZ, gzip(&upper))]);
    let dest = tmp.sub("rootfs");
    unpack(&layout, "t", &dest).expect("unpack");
    if !is_root() {
        assert!(!dest.join("dev/loop9").exists() && !dest.join("run/fifo").exists(), "skipped when not root");
        assert!(!dest.join("dev/null2").exists(), "the file below was still replaced");
        return;
    }
    use std::os::unix::fs::FileTypeExt;
    let node = |path: &str| fs::symlink_metadata(dest.join(path)).expect(path);
    let dev = |m: &fs::Metadata| (nix::sys::stat::major(m.rdev()), nix::sys::stat::minor(m.rdev()));
    let null = node("dev/null2");
    assert!(null.file_type().is_char_device());
    assert_eq!((dev(&null), null.mode() & 0o7777), ((1, 3), 0o666));
    let disk = node("dev/loop9");
    assert!(disk.file_type().is_block_device());
    assert_eq!((dev(&disk), disk.mode() & 0o7777), ((7, 9), 0o660));
    assert_eq!(dev(&node("dev/wide")), (259, 300));
    let fifo = node("run/fifo");
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o620);
    for m in [null, disk, fifo] {
        assert_eq!((m.uid(), m.gid(), m.mtime()), (1234, 4321, 1_600_000_000));
    }
}

#[test]
fn hard_links_across_layers() {
    let tmp = TempDir::new();
    let lower = tar_bytes(&[E::Dir("bin", 0o755), E::File("bin/busybox", b"bb", 0o755)]);
    let upper = tar_bytes(&[E::Hardlink("bin/sh", "bin/busybox"), E::Hardlink("sh-at-root", "bin/busybox")]);
    let layout = single(&tmp, &[(TAR, lower), (TAR_ZSTD, zstd(&upper))]);
    let dest = tmp.sub("rootfs");
    unpack(&layout, "t", &dest).expect("unpack");
    let ino = |p: &str| fs::metadata(dest.join(p)).expect(p).ino();
    assert_eq!(ino("bin/sh"), ino("bin/busybox"));
    assert_eq!(ino("sh-at-root"), ino("bin/busybox"));
    assert_eq!(fs::read(dest.join("bin/sh")).expect("read"), b"bb");
}

#[test]
fn hard_links_to_whited_out_files_or_directories_are_refused() {
    let lower = tar_bytes(&[E::Dir("d", 0o755), E::File("d/target", b"t", 0o644)]);
    let cases: Vec<(&str, Vec<E>, &str)> = vec![
        (
            "target whited out earlier in the layer",
            vec![E::File("d/.wh.target", b"", 0o644), E::Hardlink("link", "d/target")],
            "does not exist",
        ),
        ("target is a lower directory", vec![E::Hardlink("link", "d")], "directory"),
        (
            "target is a directory of this layer",
            vec![E::Dir("e", 0o755), E::Hardlink("link", "e")],
            "directory",
        ),
    ];
    for (what, upper, reason) in cases {
        let tmp = TempDir::new();
        let layout = single(&tmp, &[(TAR, lower.clone()), (TAR, tar_bytes(&upper))]);
        let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err(what);
        assert!(
            matches!(&err, ImageError::UnsafeEntry { entry, reason: r, .. } if entry == "link" && r.contains(reason)),
            "{what}: {err}"
        );
    }
}

#[test]
fn pax_global_headers_are_skipped() {
    let tmp = TempDir::new();
    let commit: &[u8] = b"0123456789abcdef0123456789abcdef01234567";
    // Larger than the header cap: its body is the global header entry's data, read as data.
    let big = vec![b'x'; 2 << 20];
    let layer = tar_bytes(&[
        E::PaxGlobal(&[("comment", commit)]),
        E::File("f", b"x", 0o644),
        E::PaxGlobal(&[("comment", &big)]),
        E::Pax(&[("path", b"g")]),
        E::File("ignored-name", b"y", 0o644),
    ]);
    let layout = single(&tmp, &[(TAR, layer)]);
    let dest = tmp.sub("rootfs");
    unpack(&layout, "t", &dest).expect("unpack");
    assert_eq!(fs::read(dest.join("f")).expect("read"), b"x");
    assert_eq!(fs::read(dest.join("g")).expect("read"), b"y");
}

#[test]
fn pax_values_with_newlines() {
    // A value holding newlines is framed by the record's length.
    let tmp = TempDir::new();
    let layer = tar_bytes(&[
        E::Pax(&[("SCHILY.xattr.user.lines", b"a\nb"), ("path", b"long/pax/name")]),
        E::File("short", b"x", 0o644),
        E::Pax(&[("uid", b"4000000")]),
        E::File("big-uid", b"", 0o644),
    ]);
    let layout = single(&tmp, &[(TAR, layer)]);
    let dest = tmp.sub("rootfs");
    unpack(&layout, "t", &dest).expect("unpack");
    assert_eq!(fs::read(dest.join("long/pax/name")).expect("read"), b"x");
    if xattr_supported(&tmp.0, "user.probe", b"1").is_ok() {
        let value = xattr::get(dest.join("long/pax/name"), "user.lines").expect("getxattr");
        assert_eq!(value.as_deref(), Some(&b"a\nb"[..]));
    }
    if is_root() {
        assert_eq!(fs::metadata(dest.join("big-uid")).expect("stat").uid(), 4_000_000);
    }

    // Crafted so that the tar crate, splitting on newlines, finds a linkpath record that is not there.
    let smuggled: &[(&str, &[u8])] = &[("SCHILY.xattr.user.a", b"x\n22 linkpath=/etc/evil")];
    let cases: Vec<(&str, Vec<E>)> = vec![
        ("invented linkpath", vec![E::Pax(smuggled), E::Symlink("s", "harmless")]),
        // Records the tar crate cannot read, so it goes by the header instead.
        ("unreadable path", vec![E::Pax(&[("path", b"new\nline")]), E::File("other", b"", 0o644)]),
        // It stops at the empty "line" the value's trailing newline makes.
        (
            "path after a value ending in a newline",
            vec![E::Pax(&[("SCHILY.xattr.user.a", b"a\n"), ("path", b"p")]), E::File("other", b"", 0o644)],
        ),
        (
            "uid after a value holding a newline",
            vec![E::Pax(&[("SCHILY.xattr.user.a", b"a\nb"), ("uid", b"4000000")]), E::File("f", b"", 0o644)],
        ),
    ];
    for (what, entries) in cases {
        let tmp = TempDir::new();
        let layout = single(&tmp, &[(TAR, tar_bytes(&entries))]);
        let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err(what);
        assert!(
            matches!(&err, ImageError::UnsafeEntry { reason, .. } if reason.contains("disagree")),
            "{what}: {err}"
        );
    }
}

/// Found by the image_unpack fuzz target: a directory whose mtime is past what `SystemTime`
/// holds (a base-256 header field) made `finish` panic ("overflow when adding duration to
/// instant"), which aborts a release build.
#[test]
fn directory_mtimes_beyond_system_time_do_not_panic() {
    let tmp = TempDir::new();
    let mut b = tar::Builder::new(Vec::new());
    for (path, mtime) in [("far", u64::MAX), ("edge", i64::MAX as u64 + 1)] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(T::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        b.append_data(&mut h, path, io::empty()).expect("dir");
    }
    let layer = b.into_inner().expect("tar");
    let layout = single(&tmp, &[(TAR, layer)]);
    let dest = tmp.sub("rootfs");
    // The kernel clamps the time to what the file system stores.
    let result = unpack(&layout, "t", &dest);
    assert!(result.is_ok(), "{result:?}");
    assert!(dest.join("far").is_dir() && dest.join("edge").is_dir());
}
