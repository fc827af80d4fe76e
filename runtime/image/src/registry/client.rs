//! [`Registry`]: manifests and blobs from OCI distribution registries, through oci-client.
//!
//! - Each host contacted (a registry or one of its mirrors) gets its own oci-client `Client`, created on
//!   first use with that host's credentials from the auth files and its scheme: plain HTTP for loopback
//!   hosts and those listed as insecure, HTTPS otherwise.
//! - Mirrors are tried in order before the registry; any failure of a mirror falls through to the next
//!   source with a warning.
//! - The registry is not trusted: manifest digests are computed here, digests asked for are checked,
//!   blob streams are cut off at the expected size, and nothing it sends is unwrapped.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{BoxStream, Stream, StreamExt as _};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

use super::auth::{default_auth_files, lookup_credentials};
use super::manifest::{media_type, ACCEPTED_MANIFESTS};
use super::name::{check_digest, check_registry, normalize_registry, split_host_port, ImageName, DOCKER_HUB};
use super::oci_error::{map_oci_error, stream_error, Fetching};
use crate::blob::MAX_JSON;
use crate::error::ImageError;

pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
pub(super) const READ_TIMEOUT: Duration = Duration::from_secs(60);
pub(super) const USER_AGENT: &str = concat!("husk/", env!("CARGO_PKG_VERSION"));

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// host[:port] of registries reached over plain HTTP (matched exactly); loopback registries
    /// (localhost, 127.0.0.0/8, [::1], with any port) always are.
    pub insecure: Vec<String>,
    /// registry -> mirrors (host[:port], tried in order before the registry itself; an unreachable or
    /// failing mirror falls through to the next, with a warn! log).
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Auth files to read credentials from, in order; empty means [`default_auth_files`].
    pub auth_files: Vec<PathBuf>,
}

/// A manifest or index as the registry sent it.
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    /// The document's own `mediaType`, else inferred from its shape.
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`, computed here.
    pub digest: String,
}

impl fmt::Debug for FetchedManifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchedManifest")
            .field("len", &self.bytes.len())
            .field("media_type", &self.media_type)
            .field("digest", &self.digest)
            .finish()
    }
}

/// A blob's bytes as they arrive; ends with an error if the registry sends more or fewer bytes than
/// asked for, or content that does not match the digest.
pub type BlobStream = Pin<Box<dyn Stream<Item = Result<Bytes, ImageError>> + Send>>;

/// A client for OCI distribution registries.
pub struct Registry {
    opts: RegistryOptions,
    hosts: Mutex<HashMap<String, Host>>,
}

/// What is needed to talk to one host.
#[derive(Clone)]
struct Host {
    client: Client,
    auth: RegistryAuth,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> =
            self.hosts.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect();
        f.debug_struct("Registry").field("opts", &self.opts).field("hosts", &hosts).finish()
    }
}

impl Registry {
    /// Checks the options (every insecure host and mirror must be a host[:port]).
    pub fn new(mut opts: RegistryOptions) -> Result<Self, ImageError> {
        let check = |host: &str| {
            check_registry(host)
                .map_err(|reason| ImageError::InvalidReference { reference: host.to_owned(), reason })
        };
        opts.insecure.iter().try_for_each(|h| check(h))?;
        opts.mirrors.values().flatten().try_for_each(|h| check(h))?;
        opts.mirrors =
            opts.mirrors.into_iter().map(|(k, v)| (normalize_registry(&k).to_owned(), v)).collect();
        if opts.auth_files.is_empty() {
            opts.auth_files = default_auth_files();
        }
        Ok(Registry { opts, hosts: Mutex::new(HashMap::new()) })
    }

    /// The manifest or index `name.reference()` (tag or digest) names, raw. Accepts OCI manifest/index
    /// and Docker schema 2 manifest/manifest list media types; refuses Docker schema 1.
    ///
    /// `digest` is computed here from the bytes; when the reference is a digest it must match
    /// ([`ImageError::DigestMismatch`]). `media_type` is the document's own `mediaType`, else inferred
    /// (`manifests` => OCI index, `layers` => OCI manifest): oci-client does not expose the response's
    /// Content-Type.
    pub async fn fetch_manifest(&self, name: &ImageName) -> Result<FetchedManifest, ImageError> {
        if let Some(digest) = name.digest() {
            check_digest(digest).map_err(|_| ImageError::UnsupportedDigest(digest.to_owned()))?;
        }
        for mirror in self.mirrors_of(name.registry()) {
            match self.manifest_from(mirror, name).await {
                Ok(m) => return Ok(m),
                Err(e) => {
                    warn!(%mirror, image = %name, error = %e, "registry mirror failed; trying the next source")
                }
            }
        }
        self.manifest_from(name.registry(), name).await
    }

    /// The blob `digest` of `name`'s repository as a byte stream, with its Content-Length if known.
    ///
    /// The caller verifies size and digest while storing; the stream also ends with an error once more
    /// than `size` bytes arrive, or when the content does not match (oci-client checks the digest at
    /// the end).
    pub async fn fetch_blob(
        &self,
        name: &ImageName,
        digest: &str,
        size: u64,
    ) -> Result<(Option<u64>, BlobStream), ImageError> {
        check_digest(digest).map_err(|_| ImageError::UnsupportedDigest(digest.to_owned()))?;
        for mirror in self.mirrors_of(name.registry()) {
            match self.blob_from(mirror, name, digest, size).await {
                Ok(b) => return Ok(b),
                Err(e) => {
                    warn!(%mirror, image = %name, %digest, error = %e, "registry mirror failed; trying the next source")
                }
            }
        }
        self.blob_from(name.registry(), name, digest, size).await
    }

    fn mirrors_of(&self, registry: &str) -> impl Iterator<Item = &str> {
        self.opts.mirrors.get(registry).into_iter().flatten().map(String::as_str)
    }

    /// True if `host` is reached over plain HTTP.
    pub(super) fn plain_http(&self, host: &str) -> bool {
        is_loopback(host) || self.opts.insecure.iter().any(|h| h == host)
    }

    async fn manifest_from(&self, host: &str, name: &ImageName) -> Result<FetchedManifest, ImageError> {
        let h = self.host(host)?;
        let reference = oci_reference(name, host);
        debug!(%host, image = %name, "fetching manifest");
        // oci-client verifies a digest reference and the Docker-Content-Digest header itself; its
        // mismatch errors map to DigestMismatch. It reads the whole body before returning, so the
        // size cap below comes after the download (pull_manifest_raw has no limit to pass).
        let (body, _) = h
            .client
            .pull_manifest_raw(&reference, &h.auth, &ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| map_oci_error(e, host, &h.auth, Fetching::Manifest(name)))?;
        if body.len() as u64 > MAX_JSON {
            return Err(ImageError::TooLarge {
                what: format!("manifest of {name} from {host}"),
                limit: MAX_JSON,
            });
        }
        let hex = format!("{:x}", Sha256::digest(&body));
        if let Some(want) = name.digest() {
            if want.strip_prefix("sha256:") != Some(hex.as_str()) {
                return Err(ImageError::DigestMismatch { digest: want.to_owned(), actual: hex });
            }
        }
        let media_type = media_type(&body, &format!("manifest of {name} from {host}"))?;
        Ok(FetchedManifest { bytes: body.to_vec(), media_type, digest: format!("sha256:{hex}") })
    }

    async fn blob_from(
        &self,
        host: &str,
        name: &ImageName,
        digest: &str,
        size: u64,
    ) -> Result<(Option<u64>, BlobStream), ImageError> {
        let h = self.host(host)?;
        let reference = oci_reference(name, host);
        debug!(%host, image = %name, %digest, size, "fetching blob");
        let sized = h
            .client
            .pull_blob_stream(&reference, digest)
            .await
            .map_err(|e| map_oci_error(e, host, &h.auth, Fetching::Blob(name)))?;
        // Refuse a wrong length before downloading it (and so a mirror can fall through).
        if let Some(len) = sized.content_length.filter(|&len| len != size) {
            return Err(ImageError::SizeMismatch { digest: digest.to_owned(), expected: size, actual: len });
        }
        let body = BlobBody {
            inner: sized.stream,
            host: host.to_owned(),
            digest: digest.to_owned(),
            size,
            read: 0,
            done: false,
        };
        Ok((sized.content_length, Box::pin(body)))
    }

    /// The client for `host`, created on first use.
    fn host(&self, host: &str) -> Result<Host, ImageError> {
        if let Some(h) = self.hosts.lock().unwrap_or_else(PoisonError::into_inner).get(host) {
            return Ok(h.clone());
        }
        let auth = match lookup_credentials(&self.opts.auth_files, host)? {
            Some((user, password)) => RegistryAuth::Basic(user, password),
            None => RegistryAuth::Anonymous,
        };
        // oci-client picks the scheme by the exact host[:port] it contacts.
        let protocol = match self.plain_http(host) {
            true => ClientProtocol::HttpsExcept(vec![api_host(host).to_owned()]),
            false => ClientProtocol::Https,
        };
        debug!(%host, ?protocol, ?auth, "new registry client");
        let config = ClientConfig {
            protocol,
            // Picking a platform from an index is the caller's business.
            platform_resolver: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            user_agent: USER_AGENT,
            ..ClientConfig::default()
        };
        let client = Client::try_from(config)
            .map_err(|source| ImageError::Registry { registry: host.to_owned(), source })?;
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(hosts.entry(host.to_owned()).or_insert(Host { client, auth }).clone())
    }
}

/// The host oci-client sends `registry`'s API requests to.
pub(super) fn api_host(registry: &str) -> &str {
    match registry {
        DOCKER_HUB => "index.docker.io",
        other => other,
    }
}

/// `name` as oci-client wants it, pointed at `host` when that is a mirror.
fn oci_reference(name: &ImageName, host: &str) -> Reference {
    let (registry, repository) = (name.registry().to_owned(), name.repository().to_owned());
    let mut reference = match name.digest() {
        Some(digest) => Reference::with_digest(registry, repository, digest.to_owned()),
        None => Reference::with_tag(registry, repository, name.reference().to_owned()),
    };
    if host != name.registry() {
        // Sends `?ns=<registry>` along, as containerd does; mirrors that do not know it ignore it.
        reference.set_mirror_registry(host.to_owned());
    }
    reference
}

/// True for localhost, 127.0.0.0/8 and [::1], with or without a port.
pub(crate) fn is_loopback(registry: &str) -> bool {
    let Some((host, _)) = split_host_port(registry) else { return false };
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok_and(|a| a.is_loopback());
    }
    host.eq_ignore_ascii_case("localhost") || host.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

/// A blob body from oci-client, with errors mapped and a hard stop at the expected size.
struct BlobBody {
    inner: BoxStream<'static, io::Result<Bytes>>,
    host: String,
    digest: String,
    size: u64,
    read: u64,
    done: bool,
}

impl BlobBody {
    fn size_mismatch(&self) -> ImageError {
        ImageError::SizeMismatch { digest: self.digest.clone(), expected: self.size, actual: self.read }
    }
}

impl Stream for BlobBody {
    type Item = Result<Bytes, ImageError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let err = match futures_util::ready!(this.inner.poll_next_unpin(cx)) {
            Some(Ok(chunk)) => {
                this.read = this.read.saturating_add(chunk.len() as u64);
                if this.read <= this.size {
                    return Poll::Ready(Some(Ok(chunk)));
                }
                // Do not let a registry stream forever.
                this.size_mismatch()
            }
            Some(Err(e)) => match stream_error(e, &this.host) {
                // A short body fails oci-client's digest check; the size is the better diagnosis.
                ImageError::DigestMismatch { .. } if this.read != this.size => this.size_mismatch(),
                err => err,
            },
            None if this.read != this.size => this.size_mismatch(),
            None => {
                this.done = true;
                return Poll::Ready(None);
            }
        };
        this.done = true;
        Poll::Ready(Some(Err(err)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in
            ["localhost", "localhost:5000", "LocalHost", "127.0.0.1", "127.1.2.3:80", "[::1]", "[::1]:5000"]
        {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "localhost.example.com",
            "128.0.0.1",
            "10.0.0.1:5000",
            "[::2]:5000",
            "docker.io",
            "[::1",
            "::1",
            "",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn options_are_checked_and_scheme_picked() {
        let opts = |insecure: &[&str], mirrors: &[&str]| RegistryOptions {
            insecure: insecure.iter().map(|s| s.to_string()).collect(),
            mirrors: BTreeMap::from([(
                "index.docker.io".to_owned(),
                mirrors.iter().map(|s| s.to_string()).collect(),
            )]),
            auth_files: vec![PathBuf::from("/nonexistent/auth.json")],
        };
        let r = Registry::new(opts(&["reg.lan:5000"], &["mirror.lan"])).expect("valid");
        assert!(r.plain_http("reg.lan:5000"));
        assert!(!r.plain_http("reg.lan"), "insecure hosts match exactly");
        assert!(r.plain_http("127.0.0.1:1234"));
        assert!(!r.plain_http("docker.io"));
        assert_eq!(
            r.mirrors_of("docker.io").collect::<Vec<_>>(),
            ["mirror.lan"],
            "mirror keys are normalised"
        );
        for (insecure, mirrors) in
            [(&["http://reg.lan"][..], &[][..]), (&[], &["mirror.lan/path"]), (&["a b"], &[])]
        {
            let err = Registry::new(opts(insecure, mirrors)).expect_err("invalid host");
            assert!(matches!(err, ImageError::InvalidReference { .. }), "{err}");
        }
    }
}
