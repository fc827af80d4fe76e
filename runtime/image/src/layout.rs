//! The structure of an OCI image layout: the `oci-layout` marker, `index.json`, picking the manifest for a
//! tag, and descending through image indexes (manifest lists) to the linux/amd64 manifest.

use std::io;
use std::path::Path;

use oci_spec::image::{Arch, Descriptor, ImageIndex, ImageManifest, MediaType, OciLayout, Os};

use crate::blob::{read_capped, read_json_blob};
use crate::error::{json_err, ImageError};
use crate::reference::DEFAULT_TAG;

/// How deep image indexes may nest before the layout is considered hostile.
pub(crate) const MAX_INDEX_DEPTH: usize = 4;
/// The index annotation that holds a manifest's tag.
pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Finds the image manifest for `tag` in `layout` (see [`crate::unpack`] for how the tag selects it).
pub(crate) fn find_manifest(layout: &Path, tag: &str) -> Result<ImageManifest, ImageError> {
    check_layout_marker(layout)?;
    let index_path = layout.join("index.json");
    let index: ImageIndex =
        serde_json::from_slice(&read_capped(&index_path, "index.json")?).map_err(json_err("index.json"))?;
    resolve_manifest(layout, select_manifest(&index, tag)?)
}

fn check_layout_marker(layout: &Path) -> Result<(), ImageError> {
    let path = layout.join("oci-layout");
    let not_layout = |reason: String| ImageError::NotALayout { path: layout.to_owned(), reason };
    let bytes = match read_capped(&path, "oci-layout") {
        Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Err(not_layout("no oci-layout file".to_owned()))
        }
        other => other?,
    };
    let marker: OciLayout =
        serde_json::from_slice(&bytes).map_err(|e| not_layout(format!("bad oci-layout file: {e}")))?;
    let version = marker.image_layout_version();
    if !version.starts_with("1.") {
        return Err(ImageError::UnsupportedLayoutVersion(version.clone()));
    }
    Ok(())
}

fn ref_name(desc: &Descriptor) -> Option<&str> {
    desc.annotations().as_ref()?.get(REF_NAME).map(String::as_str)
}

fn select_manifest<'a>(index: &'a ImageIndex, tag: &str) -> Result<&'a Descriptor, ImageError> {
    let manifests = index.manifests();
    if !tag.is_empty() {
        if let Some(desc) = manifests.iter().find(|d| ref_name(d) == Some(tag)) {
            return Ok(desc);
        }
    }
    if let [only] = manifests.as_slice() {
        if tag.is_empty() || (tag == DEFAULT_TAG && ref_name(only).is_none()) {
            return Ok(only);
        }
    }
    let mut available: Vec<String> = manifests.iter().filter_map(ref_name).map(str::to_owned).collect();
    available.sort();
    available.dedup();
    if tag.is_empty() {
        return Err(ImageError::AmbiguousImage { count: manifests.len(), available });
    }
    Err(ImageError::UnknownTag { tag: tag.to_owned(), available })
}

pub(crate) fn is_index(media_type: &MediaType) -> bool {
    match media_type {
        MediaType::ImageIndex => true,
        MediaType::Other(s) => s == DOCKER_MANIFEST_LIST,
        _ => false,
    }
}

pub(crate) fn is_manifest(media_type: &MediaType) -> bool {
    match media_type {
        MediaType::ImageManifest => true,
        MediaType::Other(s) => s == DOCKER_MANIFEST,
        _ => false,
    }
}

fn is_linux_amd64(desc: &Descriptor) -> bool {
    desc.platform().as_ref().is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
}

fn resolve_manifest(layout: &Path, desc: &Descriptor) -> Result<ImageManifest, ImageError> {
    let mut desc = desc.clone();
    for _ in 0..=MAX_INDEX_DEPTH {
        let media_type = desc.media_type();
        if is_manifest(media_type) {
            let (bytes, what) = read_json_blob(layout, &desc, "image manifest")?;
            return serde_json::from_slice(&bytes).map_err(json_err(&what));
        }
        if !is_index(media_type) {
            return Err(ImageError::UnsupportedMediaType {
                what: "a manifest",
                media_type: media_type.to_string(),
            });
        }
        let (bytes, what) = read_json_blob(layout, &desc, "image index")?;
        let index: ImageIndex = serde_json::from_slice(&bytes).map_err(json_err(&what))?;
        desc = match index.manifests().iter().find(|d| is_linux_amd64(d)) {
            Some(d) => d.clone(),
            None => return Err(ImageError::NoMatchingPlatform { digest: desc.digest().to_string() }),
        };
    }
    Err(ImageError::IndexTooDeep)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use serde_json::json;

    use crate::testutil::{single, tagged, tar_bytes, LayoutBuilder, TempDir, E, TAR};
    use crate::{unpack, ImageError, MAX_JSON};

    #[test]
    fn oversized_index_and_missing_marker_are_rejected() {
        let tmp = TempDir::new();
        let layout = single(&tmp, &[]);
        fs::write(layout.join("index.json"), vec![b' '; MAX_JSON as usize + 1]).expect("write");
        let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");

        fs::remove_file(layout.join("oci-layout")).expect("rm");
        let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::NotALayout { .. }), "{err}");

        fs::write(layout.join("oci-layout"), b"{}").expect("write");
        let err = unpack(&layout, "t", &tmp.sub("rootfs")).expect_err("must fail");
        assert!(matches!(err, ImageError::NotALayout { .. }), "{err}");
    }

    #[test]
    fn tag_selection() {
        let tmp = TempDir::new();
        let l = LayoutBuilder::new(tmp.sub("layout"));
        let one = l.image(&[(TAR, tar_bytes(&[E::File("one", b"1", 0o644)]))], json!({"Cmd": ["one"]}));
        let two = l.image(&[(TAR, tar_bytes(&[E::File("two", b"2", 0o644)]))], json!({"Cmd": ["two"]}));
        l.index(vec![tagged(one.clone(), "v1"), tagged(two, "v2")]);
        let config = unpack(&l.dir, "v2", &tmp.sub("r1")).expect("unpack");
        assert_eq!(config.cmd, ["two"]);
        assert!(tmp.0.join("r1/two").exists());

        let err = unpack(&l.dir, "nope", &tmp.sub("r2")).expect_err("must fail");
        assert!(matches!(err, ImageError::UnknownTag { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("\"nope\"") && msg.contains("v1, v2"), "{msg}");
        let err = unpack(&l.dir, "", &tmp.sub("r3")).expect_err("must fail");
        assert!(matches!(err, ImageError::AmbiguousImage { count: 2, .. }), "{err}");

        // One manifest: taken when no tag is asked; an untagged one is also "latest".
        l.index(vec![tagged(one.clone(), "v1")]);
        assert_eq!(unpack(&l.dir, "", &tmp.sub("r4")).expect("unpack").cmd, ["one"]);
        assert!(unpack(&l.dir, "latest", &tmp.sub("r5")).is_err());
        l.index(vec![one]);
        assert_eq!(unpack(&l.dir, "latest", &tmp.sub("r6")).expect("unpack").cmd, ["one"]);
        let err = unpack(&l.dir, "v1", &tmp.sub("r7")).expect_err("must fail");
        assert!(err.to_string().contains("(none)"), "{err}");
    }

    #[test]
    fn nested_index_picks_linux_amd64() {
        let tmp = TempDir::new();
        let l = LayoutBuilder::new(tmp.sub("layout"));
        let arm = l.image(&[(TAR, tar_bytes(&[E::File("arm", b"", 0o644)]))], json!({"Cmd": ["arm"]}));
        let amd = l.image(&[(TAR, tar_bytes(&[E::File("amd", b"", 0o644)]))], json!({"Cmd": ["amd"]}));
        let mut arm = arm;
        arm["platform"] = json!({"architecture": "arm64", "os": "linux"});
        let mut amd = amd;
        amd["platform"] = json!({"architecture": "amd64", "os": "linux"});
        let nested = json!({"schemaVersion": 2, "manifests": [arm.clone(), amd]});
        let nested = l.json_blob("application/vnd.oci.image.index.v1+json", &nested);
        l.index(vec![tagged(nested, "multi")]);
        let dest = tmp.sub("rootfs");
        assert_eq!(unpack(&l.dir, "multi", &dest).expect("unpack").cmd, ["amd"]);
        assert!(dest.join("amd").exists() && !dest.join("arm").exists());

        let only_arm = json!({"schemaVersion": 2, "manifests": [arm]});
        let only_arm = l.json_blob("application/vnd.oci.image.index.v1+json", &only_arm);
        l.index(vec![tagged(only_arm, "multi")]);
        let err = unpack(&l.dir, "multi", &tmp.sub("r2")).expect_err("must fail");
        assert!(matches!(err, ImageError::NoMatchingPlatform { .. }), "{err}");
    }
}
