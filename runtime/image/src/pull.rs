//! Pulling an image from a registry into the store: the name's manifest (through an index to
//! the asked platform), its config, and the layers the store lacks, fetched in parallel and
//! verified while they stream (see store/ingest.rs). Blobs land before the manifest, and the
//! manifest before the record, so a record never names content the store does not have, and a
//! pull killed at any point leaves only unreferenced content for garbage collection.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{StreamExt as _, TryStreamExt as _};
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use tracing::{debug, warn};

use crate::blob::MAX_JSON;
use crate::config::is_config;
use crate::error::ImageError;
use crate::layout::{is_index, is_manifest, MAX_INDEX_DEPTH};
use crate::platform::Platform;
use crate::registry::{ImageName, Registry};
use crate::store::{check_digest, ImageRecord, Store};
use crate::unpack::layer_compression;

/// How a pull goes.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub platform: Platform,
    /// Layers fetched at once.
    pub parallel: usize,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self { platform: Platform::default(), parallel: 3 }
    }
}

/// What a pull reports as it goes, for progress bars or log lines.
#[derive(Debug, Clone, Copy)]
pub enum PullEvent<'a> {
    /// The store already has this blob: nothing is transferred.
    Present { digest: &'a str, size: u64 },
    /// A blob starts to transfer.
    Fetching { digest: &'a str, size: u64 },
    /// `done` bytes of it have arrived.
    Progress { digest: &'a str, done: u64 },
    /// It arrived whole and verified.
    Done { digest: &'a str, size: u64 },
}

/// Receives [`PullEvent`]s; called from the pulling task, so it should be quick.
pub trait PullProgress: Send + Sync {
    fn event(&self, event: PullEvent<'_>);
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl PullProgress for Silent {
    fn event(&self, _: PullEvent<'_>) {}
}

fn json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::Json { what: what.to_owned(), source })
}

/// Pulls `name` into `store`, recording it under its full name.
pub async fn pull(
    store: &Store,
    registry: &Registry,
    name: &ImageName,
    opts: &PullOptions,
    progress: &dyn PullProgress,
) -> Result<ImageRecord, ImageError> {
    let _gc = store.shared_lock()?;
    let mut doc = registry.fetch_manifest(name).await?;
    if let Some(want) = name.digest() {
        if doc.digest != want {
            let actual = doc.digest.trim_start_matches("sha256:").to_owned();
            return Err(ImageError::DigestMismatch { digest: want.to_owned(), actual });
        }
    }
    let mut index_digest = None;
    let mut depth = 0;
    while is_index(&MediaType::from(doc.media_type.as_str())) {
        depth += 1;
        if depth > MAX_INDEX_DEPTH {
            return Err(ImageError::IndexTooDeep);
        }
        let index: ImageIndex = json(&doc.bytes, &format!("image index {}", doc.digest))?;
        let Some(entry) = opts.platform.select(index.manifests()) else {
            return Err(ImageError::NoPlatformInIndex {
                name: name.to_string(),
                platform: opts.platform.to_string(),
                available: index
                    .manifests()
                    .iter()
                    .filter_map(|d| d.platform().as_ref())
                    .map(|p| format!("{}/{}", p.os(), p.architecture()))
                    .collect(),
            });
        };
        let child_digest = entry.digest().to_string();
        check_digest(&child_digest)?;
        store.put_blob(&doc.digest, &doc.bytes)?;
        index_digest.get_or_insert_with(|| doc.digest.clone());
        let child = registry.fetch_manifest(&name.with_digest(&child_digest)).await?;
        if child.digest != child_digest {
            let actual = child.digest.trim_start_matches("sha256:").to_owned();
            return Err(ImageError::DigestMismatch { digest: child_digest, actual });
        }
        if child.bytes.len() as u64 != entry.size() {
            return Err(ImageError::SizeMismatch {
                digest: child_digest,
                expected: entry.size(),
                actual: child.bytes.len() as u64,
            });
        }
        doc = child;
    }
    if !is_manifest(&MediaType::from(doc.media_type.as_str())) {
        return Err(ImageError::UnsupportedMediaType {
            what: "an image manifest",
            media_type: doc.media_type,
        });
    }
    let manifest: ImageManifest = json(&doc.bytes, &format!("image manifest {}", doc.digest))?;

    let config_desc = manifest.config();
    let config_type = config_desc.media_type().to_string();
    if !is_config(config_desc.media_type()) {
        return Err(ImageError::NotAContainerImage { name: name.to_string(), media_type: config_type });
    }
    let config_digest = config_desc.digest().to_string();
    if config_desc.size() > MAX_JSON {
        return Err(ImageError::TooLarge { what: format!("image config {config_digest}"), limit: MAX_JSON });
    }
    for layer in manifest.layers() {
        check_digest(layer.digest().as_ref())?;
        layer_compression(layer)?;
    }
    fetch_blob(store, registry, name, &config_digest, config_desc.size(), progress).await?;
    let config: ImageConfiguration =
        json(&store.read_verified(&config_digest)?, &format!("image config {config_digest}"))?;
    let platform = Platform::of_config(
        &config.os().to_string(),
        &config.architecture().to_string(),
        config.variant().as_deref(),
    );
    if !opts.platform.same_os_arch(&platform) {
        warn!(image = %name, want = %opts.platform, got = %platform, "the image is for another platform");
    }
    let diff_ids = config.rootfs().diff_ids().clone();
    if diff_ids.len() != manifest.layers().len() {
        return Err(ImageError::LayerCountMismatch {
            name: name.to_string(),
            layers: manifest.layers().len(),
            diff_ids: diff_ids.len(),
        });
    }

    // Each distinct layer once, several at a time.
    let mut seen = HashSet::new();
    let layers: Vec<(String, u64)> = manifest
        .layers()
        .iter()
        .map(|l| (l.digest().to_string(), l.size()))
        .filter(|(d, _)| seen.insert(d.clone()))
        .collect();
    futures_util::stream::iter(layers.iter().map(Ok::<_, ImageError>))
        .try_for_each_concurrent(opts.parallel.max(1), |(digest, size)| {
            fetch_blob(store, registry, name, digest, *size, progress)
        })
        .await?;

    store.put_blob(&doc.digest, &doc.bytes)?;
    let record = ImageRecord {
        name: name.to_string(),
        digest: doc.digest.clone(),
        index_digest,
        platform: platform.to_string(),
        config_digest: config_digest.clone(),
        config_media_type: config_type,
        config_size: config_desc.size(),
        layers: manifest.layers().iter().map(|l| l.digest().to_string()).collect(),
        diff_ids,
        size: config_desc.size() + manifest.layers().iter().map(|l| l.size()).sum::<u64>(),
        created: config.created().clone(),
        pulled_at: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    };
    store.put_record(record.clone())?;
    debug!(image = %name, digest = %record.digest, "pulled");
    Ok(record)
}

/// Fetches blob `digest` into the store unless it is there already.
async fn fetch_blob(
    store: &Store,
    registry: &Registry,
    name: &ImageName,
    digest: &str,
    size: u64,
    progress: &dyn PullProgress,
) -> Result<(), ImageError> {
    if store.has_blob(digest, size) {
        progress.event(PullEvent::Present { digest, size });
        return Ok(());
    }
    progress.event(PullEvent::Fetching { digest, size });
    let (_, mut stream) = registry.fetch_blob(name, digest, size).await?;
    let mut ingest = store.ingest(digest, size)?;
    // Progress at most every 1 MiB: a terminal redraw per network chunk is wasted work.
    let mut reported = 0u64;
    while let Some(chunk) = stream.next().await {
        ingest.write(&chunk?)?;
        if ingest.written() - reported >= 1 << 20 {
            reported = ingest.written();
            progress.event(PullEvent::Progress { digest, done: reported });
        }
    }
    ingest.commit()?;
    progress.event(PullEvent::Done { digest, size });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use serde_json::{json, Value};
    use sha2::{Digest as _, Sha256};

    use super::*;
    use crate::registry::tests::{Fake, Req, Resp};

    const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    use crate::registry::RegistryOptions;
    use crate::testutil::{gzip, tar_bytes, TempDir, E, TAR_GZ};

    fn digest(bytes: &[u8]) -> String {
        format!("sha256:{:x}", Sha256::digest(bytes))
    }

    /// A registry serving one repository from a map of path tails (`manifests/x`, `blobs/x`).
    /// Path tail → (media type, bytes).
    type Docs = HashMap<String, (String, Vec<u8>)>;

    #[derive(Clone, Default)]
    struct Content(Arc<Mutex<Docs>>);

    impl Content {
        fn put(&self, tail: String, media_type: &str, bytes: Vec<u8>) {
            self.0.lock().expect("lock").insert(tail, (media_type.to_owned(), bytes));
        }

        fn blob(&self, media_type: &str, bytes: Vec<u8>) -> Value {
            let d = digest(&bytes);
            let desc = json!({"mediaType": media_type, "digest": d, "size": bytes.len()});
            self.put(format!("blobs/{d}"), media_type, bytes);
            desc
        }

        /// An image of one layer holding file `name`; returns the manifest's descriptor.
        fn image(&self, name: &str, arch: &str) -> Value {
            let tar = tar_bytes(&[E::File(name, arch.as_bytes(), 0o644)]);
            let layer = self.blob(TAR_GZ, gzip(&tar));
            let base = tar_bytes(&[E::File("base", b"shared", 0o644)]);
            let base_layer = self.blob(TAR_GZ, gzip(&base));
            let config = json!({
                "architecture": arch, "os": "linux", "config": {"Cmd": [name]},
                "rootfs": {"type": "layers", "diff_ids": [digest(&base), digest(&tar)]},
            });
            let config = self.blob(OCI_CONFIG, serde_json::to_vec(&config).expect("json"));
            let manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                                  "layers": [base_layer, layer]});
            let bytes = serde_json::to_vec(&manifest).expect("json");
            let d = digest(&bytes);
            self.put(format!("manifests/{d}"), OCI_MANIFEST, bytes.clone());
            json!({"mediaType": OCI_MANIFEST, "digest": d, "size": bytes.len(),
                   "platform": {"os": "linux", "architecture": arch}})
        }

        async fn serve(&self) -> Fake {
            let content = self.clone();
            Fake::start(move |_| {
                Arc::new(move |req: &Req| {
                    if req.path == "/v2/" {
                        return Resp::new(200, "{}");
                    }
                    let tail = req.path.strip_prefix("/v2/test/app/").unwrap_or("");
                    match content.0.lock().expect("lock").get(tail) {
                        Some((mt, bytes)) => Resp::new(200, bytes.clone()).header("Content-Type", mt.clone()),
                        None => Resp::new(404, r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}"#),
                    }
                })
            })
            .await
        }
    }

    fn blob_gets(fake: &Fake) -> usize {
        fake.requests().iter().filter(|p| p.contains("/blobs/")).count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pulls_through_an_index_once_and_verified() {
        let content = Content::default();
        let amd = content.image("amd", "amd64");
        let arm = content.image("arm", "arm64");
        let index =
            serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [arm, amd]}))
                .expect("json");
        let index_digest = digest(&index);
        content.put("manifests/1".into(), OCI_INDEX, index);
        let fake = content.serve().await;
        let tmp = TempDir::new();
        let store = Store::open(&tmp.0.join("data")).expect("store");
        let registry = Registry::new(RegistryOptions::default()).expect("registry");
        let name: ImageName = format!("{}/test/app:1", fake.host).parse().expect("name");

        let rec = pull(&store, &registry, &name, &PullOptions::default(), &Silent).await.expect("pull");
        assert_eq!(rec.digest, amd["digest"].as_str().expect("digest"));
        assert_eq!(rec.index_digest.as_deref(), Some(index_digest.as_str()));
        assert_eq!((rec.platform.as_str(), rec.layers.len()), ("linux/amd64", 2));
        assert_eq!(store.config(&rec).expect("config").cmd, ["amd"]);
        let fetched = blob_gets(&fake);
        assert_eq!(fetched, 3, "config and two layers");

        // Again: nothing transferred. The arm64 image shares the base layer.
        pull(&store, &registry, &name, &PullOptions::default(), &Silent).await.expect("pull again");
        assert_eq!(blob_gets(&fake), fetched);
        let opts = PullOptions { platform: "linux/arm64".parse().expect("platform"), ..Default::default() };
        let arm_rec = pull(&store, &registry, &name, &opts, &Silent).await.expect("pull arm64");
        assert_eq!(arm_rec.platform, "linux/arm64");
        assert_eq!(blob_gets(&fake), fetched + 2, "arm64's config and own layer only");
        let opts = PullOptions { platform: "linux/s390x".parse().expect("platform"), ..Default::default() };
        let err = pull(&store, &registry, &name, &opts, &Silent).await.expect_err("no such platform");
        assert!(matches!(err, ImageError::NoPlatformInIndex { .. }), "{err}");

        // By digest, straight to the manifest.
        let by_digest = name.with_digest(&rec.digest);
        let rec2 =
            pull(&store, &registry, &by_digest, &PullOptions::default(), &Silent).await.expect("by digest");
        assert_eq!((rec2.digest, rec2.index_digest), (rec.digest.clone(), None));

        let missing: ImageName = format!("{}/test/app:nope", fake.host).parse().expect("name");
        let err =
            pull(&store, &registry, &missing, &PullOptions::default(), &Silent).await.expect_err("missing");
        assert!(matches!(err, ImageError::ImageNotFound { .. }), "{err}");

        // A layer altered in the registry (same size): refused, and never visible in the store.
        let content2 = Content::default();
        let m = content2.image("x", "amd64");
        let manifest: Value = {
            let map = content2.0.lock().expect("lock");
            serde_json::from_slice(&map[&format!("manifests/{}", m["digest"].as_str().expect("d"))].1)
                .expect("json")
        };
        let layer = manifest["layers"][1]["digest"].as_str().expect("layer").to_owned();
        {
            let mut map = content2.0.lock().expect("lock");
            let entry = map.get_mut(&format!("blobs/{layer}")).expect("layer blob");
            let last = entry.1.len() - 1;
            entry.1[last] ^= 0xff;
        }
        content2.put("manifests/bad".into(), OCI_MANIFEST, {
            let map = content2.0.lock().expect("lock");
            map[&format!("manifests/{}", m["digest"].as_str().expect("d"))].1.clone()
        });
        let fake2 = content2.serve().await;
        let bad: ImageName = format!("{}/test/app:bad", fake2.host).parse().expect("name");
        let err =
            pull(&store, &registry, &bad, &PullOptions::default(), &Silent).await.expect_err("tampered");
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(!store.has_blob(&layer, manifest["layers"][1]["size"].as_u64().expect("size")));
        assert!(store.find(&bad.to_string()).expect("find").is_none());
        assert_eq!(std::fs::read_dir(store.dir().join("ingest")).expect("ls").count(), 0);
    }
}
