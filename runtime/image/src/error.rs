//! [`ImageError`]: everything that can go wrong reading, unpacking or interpreting an image.

use std::io;
use std::path::{Path, PathBuf};

use crate::layout::MAX_INDEX_DEPTH;

/// Why an image could not be read, unpacked or interpreted.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not an OCI image layout: {reason}")]
    NotALayout { path: PathBuf, reason: String },
    #[error("unsupported OCI image layout version {0:?} (want 1.x)")]
    UnsupportedLayoutVersion(String),
    #[error("{path} {reason}; refusing to read it")]
    UnsafeLayoutFile { path: PathBuf, reason: &'static str },
    #[error("{what} is larger than the {limit}-byte limit")]
    TooLarge { what: String, limit: u64 },
    #[error("invalid JSON in {what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported digest {0:?}: only sha256 with 64 lowercase hex digits is accepted")]
    UnsupportedDigest(String),
    #[error("blob {digest} is missing from the layout")]
    MissingBlob { digest: String },
    #[error("blob {digest} is {actual} bytes but its descriptor says {expected}")]
    SizeMismatch { digest: String, expected: u64, actual: u64 },
    #[error("blob {digest} does not match its digest: content hashes to sha256:{actual}")]
    DigestMismatch { digest: String, actual: String },
    #[error("tag {tag:?} not found in the layout; available tags: {}", list_or_none(available))]
    UnknownTag { tag: String, available: Vec<String> },
    #[error("no tag given and the layout holds {count} images; available tags: {}", list_or_none(available))]
    AmbiguousImage { count: usize, available: Vec<String> },
    #[error("image index {digest} has no linux/amd64 manifest")]
    NoMatchingPlatform { digest: String },
    #[error("invalid platform {platform:?}: {reason}")]
    InvalidPlatform { platform: String, reason: &'static str },
    #[error("{name} has no {platform} image (it has: {})", list_or_none(available))]
    NoPlatformInIndex { name: String, platform: String, available: Vec<String> },
    #[error("{name} is not a container image (its config is {media_type:?})")]
    NotAContainerImage { name: String, media_type: String },
    #[error("{name}: the manifest lists {layers} layers but the config {diff_ids} diff IDs")]
    LayerCountMismatch { name: String, layers: usize, diff_ids: usize },
    #[error("no image {query:?} in the store (husk images lists them; husk pull fetches one)")]
    NoSuchImage { query: String },
    #[error("{query:?} matches more than one image ID; give more digits")]
    AmbiguousImageId { query: String },
    #[error("image indexes nest more than {MAX_INDEX_DEPTH} deep")]
    IndexTooDeep,
    #[error("unsupported media type {media_type:?} for {what}")]
    UnsupportedMediaType { what: &'static str, media_type: String },
    #[error("layer {digest}: unsupported media type {media_type:?} (supported: tar, tar+gzip, tar+zstd)")]
    UnsupportedLayer { digest: String, media_type: String },
    #[error("destination {path} must be an existing empty directory")]
    BadDestination { path: PathBuf },
    #[error("layer {layer}: refusing entry {entry:?}: {reason}")]
    UnsafeEntry { layer: String, entry: String, reason: &'static str },
    #[error("layer {layer}: entry {entry:?}: {source}")]
    Extract {
        layer: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// A layer decompresses to more bytes, or holds more entries, than [`crate::UnpackLimits`] allows.
    #[error(
        "layer {layer}: {what} exceeds the limit of {limit} {} (raise \"{}\" in husk's config file, $HUSK_CONFIG or /etc/husk/config.json, to allow it)",
        layer_limit_unit(what),
        layer_limit_key(what)
    )]
    LayerTooLarge { layer: String, what: &'static str, limit: u64 },
    /// A layer's uncompressed tar stream does not hash to the diff_id the image config gives it.
    #[error("layer {layer}: uncompressed content is {actual} but the image config's diff_id is {expected}")]
    DiffIdMismatch { layer: String, expected: String, actual: String },
    /// [`crate::unpack_layers`] got a different number of diff_ids than layers.
    #[error("{layers} layers to unpack but {diff_ids} diff_ids to check them against")]
    DiffIdCountMismatch { layers: usize, diff_ids: usize },
    /// An extended attribute that must be applied (e.g. `security.capability`) could not be set.
    #[error("layer {layer}: entry {entry:?}: setting extended attribute {name}: {source}")]
    Xattr {
        layer: String,
        entry: String,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: reading the archive: {source}")]
    Archive {
        layer: String,
        #[source]
        source: io::Error,
    },
    /// The image config's `User` is not a valid `user[:group]`.
    #[error("invalid image user {user:?}: {reason}")]
    InvalidUser { user: String, reason: &'static str },
    /// The image config's `User` names a user or group the image does not define (well).
    #[error("image user {user:?}: {reason}")]
    UnknownUser { user: String, reason: String },
    /// A file of the unpacked image that is read on the host (e.g. /etc/passwd) is a symlink or not what
    /// it should be.
    #[error("{path} {reason}; refusing to read it")]
    UnsafeRootfsFile { path: PathBuf, reason: &'static str },
    /// The registry has no such repository, tag or manifest digest.
    #[error("{name} not found: the registry has no such repository or tag")]
    ImageNotFound { name: String },
    /// The registry answered 401/403: it wants credentials, or refused the ones sent.
    #[error("registry {registry} {detail}")]
    RegistryAuth { registry: String, detail: String },
    /// Any other failure talking to a registry.
    #[error("registry {registry}: {source}")]
    Registry {
        registry: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// The registry could not be connected to, or timed out.
    #[error("cannot reach registry {registry}: {source}")]
    RegistryUnreachable {
        registry: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// A registry auth file (containers auth.json / docker config.json) is malformed.
    #[error("{path}: invalid registry auth file: {reason}")]
    AuthFile { path: PathBuf, reason: String },
    /// Credentials that cannot be stored in an auth file.
    #[error("invalid credentials for registry {registry}: {reason}")]
    InvalidCredentials { registry: String, reason: &'static str },
}

fn list_or_none(tags: &[String]) -> String {
    if tags.is_empty() {
        "(none)".to_owned()
    } else {
        tags.join(", ")
    }
}

/// The unit of a [`ImageError::LayerTooLarge`] limit.
fn layer_limit_unit(what: &str) -> &'static str {
    if what == LAYER_ENTRIES {
        "entries"
    } else {
        "bytes"
    }
}

/// The husk config key that raises a [`ImageError::LayerTooLarge`] limit.
fn layer_limit_key(what: &str) -> &'static str {
    if what == LAYER_ENTRIES {
        "images.max_layer_entries"
    } else {
        "images.max_layer_bytes"
    }
}

/// [`ImageError::LayerTooLarge`]'s `what` for the uncompressed size of a layer.
pub(crate) const LAYER_BYTES: &str = "uncompressed size";
/// [`ImageError::LayerTooLarge`]'s `what` for the number of entries in a layer.
pub(crate) const LAYER_ENTRIES: &str = "entry count";

/// Maps an I/O error on `path` to [`ImageError::Io`].
pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_owned(), source }
}

/// Maps a JSON error in `what` to [`ImageError::Json`].
pub(crate) fn json_err(what: &str) -> impl FnOnce(serde_json::Error) -> ImageError + '_ {
    move |source| ImageError::Json { what: what.to_owned(), source }
}
