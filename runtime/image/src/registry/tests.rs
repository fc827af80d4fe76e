//! [`Registry`] against tiny fake registries: hand-written HTTP/1.1 on 127.0.0.1, one request per
//! connection.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use futures_util::TryStreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::error::ImageError;
use crate::testutil::TempDir;
use crate::MAX_JSON;

pub(crate) struct Req {
    pub(crate) path: String,
    pub(crate) auth: Option<String>,
}

pub(crate) struct Resp {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// No Content-Length: the body ends when the connection closes.
    close_delimited: bool,
}

impl Resp {
    pub(crate) fn new(status: u16, body: impl Into<Vec<u8>>) -> Resp {
        Resp { status, headers: Vec::new(), body: body.into(), close_delimited: false }
    }

    pub(crate) fn header(mut self, name: &'static str, value: impl Into<String>) -> Resp {
        self.headers.push((name, value.into()));
        self
    }
}

pub(crate) type Handler = Arc<dyn Fn(&Req) -> Resp + Send + Sync>;

/// A fake registry: its host:port and the paths it was asked for.
pub(crate) struct Fake {
    pub(crate) host: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    /// Starts a server; `make` gets its host:port (for Bearer realms) and returns the handler.
    pub(crate) async fn start(make: impl FnOnce(&str) -> Handler) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let handler = make(&host);
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve_one(sock, handler.clone(), log2.clone()));
            }
        });
        Fake { host, log }
    }

    pub(crate) fn requests(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }
}

async fn serve_one(mut sock: TcpStream, handler: Handler, log: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines.next().and_then(|l| l.split(' ').nth(1)).unwrap_or("").to_owned();
    let auth = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_owned());
    log.lock().expect("log").push(path.clone());
    let resp = handler(&Req { path, auth });
    let mut out = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", resp.status);
    if !resp.close_delimited {
        out.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
    }
    for (k, v) in &resp.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let _ = sock.write_all(out.as_bytes()).await;
    let _ = sock.write_all(&resp.body).await;
    let _ = sock.shutdown().await;
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

const MANIFEST: &[u8] =
    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
const INDEX_NO_MEDIA_TYPE: &[u8] = br#"{"schemaVersion":2,"manifests":[]}"#;
const OTHER: &[u8] = b"something else entirely";
const SCHEMA1: &[u8] = br#"{"schemaVersion":1,"name":"test/app","tag":"old","fsLayers":[],"signatures":[]}"#;

fn blob() -> Vec<u8> {
    b"blob bytes ".repeat(5000)
}

/// The main fake: Basic auth on /v2/ and on the `test/private` repository, everything else anonymous.
fn registry_handler(_host: &str) -> Handler {
    let good = basic("user", "pass");
    Arc::new(move |req: &Req| {
        let authed = req.auth.as_deref() == Some(good.as_str());
        let challenge = |r: Resp| r.header("WWW-Authenticate", r#"Basic realm="x""#);
        let path = req.path.split('?').next().unwrap_or("");
        let manifest = |body: &[u8]| {
            Resp::new(200, body)
                .header("Docker-Content-Digest", digest(body))
                .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        };
        match path {
            "/v2/" if authed => Resp::new(200, "{}"),
            "/v2/" => challenge(Resp::new(401, "")),
            "/v2/test/app/manifests/v1" => manifest(MANIFEST),
            "/v2/test/app/manifests/index" => Resp::new(200, INDEX_NO_MEDIA_TYPE),
            "/v2/test/app/manifests/schema1" => Resp::new(200, SCHEMA1),
            "/v2/test/app/manifests/big" => Resp::new(200, vec![b' '; MAX_JSON as usize + 1]),
            // Says one digest, sends other bytes.
            "/v2/test/app/manifests/lying-header" => {
                Resp::new(200, MANIFEST).header("Docker-Content-Digest", digest(OTHER))
            }
            p if p == format!("/v2/test/app/manifests/{}", digest(MANIFEST)) => manifest(MANIFEST),
            // Asked for OTHER by digest, sends MANIFEST (no header to give it away).
            p if p == format!("/v2/test/app/manifests/{}", digest(OTHER)) => Resp::new(200, MANIFEST),
            p if p == format!("/v2/test/app/blobs/{}", digest(&blob())) => Resp::new(200, blob()),
            p if p == format!("/v2/test/app/blobs/{}", digest(OTHER)) => Resp::new(200, blob()),
            p if p == format!("/v2/test/stream/blobs/{}", digest(&blob())) => {
                Resp { close_delimited: true, ..Resp::new(200, blob()) }
            }
            "/v2/test/private/manifests/v1" if authed => manifest(MANIFEST),
            "/v2/test/private/manifests/v1" => challenge(Resp::new(401, "")),
            "/v2/test/gone/manifests/v1" => Resp::new(404, "not found"),
            _ => Resp::new(404, r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#),
        }
    })
}

/// A registry that only knows Bearer tokens from its own /token endpoint.
fn bearer_handler(host: &str) -> Handler {
    let realm = format!(r#"Bearer realm="http://{host}/token",service="fake""#);
    let good = basic("user", "pass");
    Arc::new(move |req: &Req| match req.path.split('?').next().unwrap_or("") {
        "/v2/" => Resp::new(401, "").header("WWW-Authenticate", realm.clone()),
        "/token" if req.auth.as_deref() == Some(good.as_str()) && req.path.contains("service=fake") => {
            Resp::new(200, r#"{"token":"t0k3n"}"#)
        }
        "/token" => Resp::new(401, "bad credentials"),
        _ => Resp::new(404, ""),
    })
}

fn not_found_handler(_host: &str) -> Handler {
    Arc::new(|_: &Req| Resp::new(404, ""))
}

/// A loopback port nothing listens on.
fn dead_host() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

fn options(auth_files: Vec<PathBuf>) -> RegistryOptions {
    // Never the real auth files.
    let auth_files =
        if auth_files.is_empty() { vec![PathBuf::from("/nonexistent/auth.json")] } else { auth_files };
    RegistryOptions { auth_files, ..RegistryOptions::default() }
}

fn name(s: &str) -> ImageName {
    s.parse().expect(s)
}

#[tokio::test]
async fn fetch_manifests() {
    let fake = Fake::start(registry_handler).await;
    let reg = Registry::new(options(vec![])).expect("registry");
    let h = &fake.host;

    let m = reg.fetch_manifest(&name(&format!("{h}/test/app:v1"))).await.expect("by tag");
    assert_eq!((m.bytes.as_slice(), m.digest.clone()), (MANIFEST, digest(MANIFEST)));
    assert_eq!(m.media_type, "application/vnd.oci.image.manifest.v1+json");

    let pinned = name(&format!("{h}/test/app:v1")).with_digest(&digest(MANIFEST));
    let m = reg.fetch_manifest(&pinned).await.expect("by digest");
    assert_eq!(m.digest, digest(MANIFEST));

    let m = reg.fetch_manifest(&name(&format!("{h}/test/app:index"))).await.expect("index");
    assert_eq!(
        (m.media_type.as_str(), m.digest),
        ("application/vnd.oci.image.index.v1+json", digest(INDEX_NO_MEDIA_TYPE))
    );

    // A registry that sends other bytes than the digest asked for, or than its own header says.
    let err =
        reg.fetch_manifest(&name(&format!("{h}/test/app@{}", digest(OTHER)))).await.expect_err("mismatch");
    match err {
        ImageError::DigestMismatch { digest: d, actual } => {
            assert_eq!(d, digest(OTHER));
            assert_eq!(format!("sha256:{actual}"), digest(MANIFEST));
        }
        other => panic!("{other}"),
    }
    let err = reg.fetch_manifest(&name(&format!("{h}/test/app:lying-header"))).await.expect_err("header");
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");

    let err = reg.fetch_manifest(&name(&format!("{h}/test/app:schema1"))).await.expect_err("schema 1");
    assert!(err.to_string().contains("schema 1"), "{err}");
    let err = reg.fetch_manifest(&name(&format!("{h}/test/app:big"))).await.expect_err("big");
    assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");

    for missing in ["test/missing:v1", "test/gone:v1"] {
        let err = reg.fetch_manifest(&name(&format!("{h}/{missing}"))).await.expect_err(missing);
        match err {
            ImageError::ImageNotFound { name } => assert_eq!(name, format!("{h}/{missing}")),
            other => panic!("{missing}: {other}"),
        }
    }
    let err = reg.fetch_manifest(&name(&format!("{h}/test/private:v1"))).await.expect_err("private");
    match &err {
        ImageError::RegistryAuth { registry, detail } => {
            assert_eq!(registry, h);
            assert!(detail.contains(&format!("husk login {h}")), "{detail}");
        }
        other => panic!("{other}"),
    }

    let err = reg.fetch_manifest(&name(&format!("{}/test/app:v1", dead_host()))).await.expect_err("dead");
    assert!(matches!(err, ImageError::RegistryUnreachable { .. }), "{err}");
    assert!(fake.requests().iter().all(|p| p.starts_with("/v2/")));
}

#[tokio::test]
async fn credentials_from_auth_files() {
    let fake = Fake::start(registry_handler).await;
    let tmp = TempDir::new();
    let file = tmp.0.join("auth.json");
    let private = name(&format!("{}/test/private:v1", fake.host));

    store_credentials(&file, &fake.host, "user", "pass").expect("store");
    let reg = Registry::new(options(vec![file.clone()])).expect("registry");
    let m = reg.fetch_manifest(&private).await.expect("with credentials");
    assert_eq!(m.digest, digest(MANIFEST));

    store_credentials(&file, &fake.host, "user", "wrong").expect("store");
    let reg = Registry::new(options(vec![file])).expect("registry");
    let err = reg.fetch_manifest(&private).await.expect_err("bad credentials");
    match err {
        ImageError::RegistryAuth { detail, .. } => {
            assert!(detail.contains("refused the credentials"), "{detail}")
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn fetch_blobs() {
    let fake = Fake::start(registry_handler).await;
    let reg = Registry::new(options(vec![])).expect("registry");
    let app = name(&format!("{}/test/app:v1", fake.host));
    let data = blob();
    let size = data.len() as u64;

    let (len, stream) = reg.fetch_blob(&app, &digest(&data), size).await.expect("blob");
    assert_eq!(len, Some(size));
    let got: Vec<u8> = stream.map_ok(|b| b.to_vec()).try_concat().await.expect("body");
    assert_eq!(got, data);

    // Same length, wrong content: the stream ends with the mismatch.
    let (_, stream) = reg.fetch_blob(&app, &digest(OTHER), size).await.expect("starts");
    let err = stream.try_for_each(|_| async { Ok(()) }).await.expect_err("mismatch");
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");

    // A Content-Length other than the expected size is refused before the body.
    let err = reg.fetch_blob(&app, &digest(OTHER), OTHER.len() as u64).await.err().expect("size");
    assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");

    // Without a Content-Length, the stream stops as soon as it passes the expected size.
    let stream_name = name(&format!("{}/test/stream:v1", fake.host));
    let (len, stream) = reg.fetch_blob(&stream_name, &digest(&data), size).await.expect("blob");
    assert_eq!(len, None);
    let got: Vec<u8> = stream.map_ok(|b| b.to_vec()).try_concat().await.expect("body");
    assert_eq!(got, data);
    let (_, stream) = reg.fetch_blob(&stream_name, &digest(&data), 100).await.expect("blob");
    let err = stream.try_for_each(|_| async { Ok(()) }).await.expect_err("too long");
    assert!(matches!(err, ImageError::SizeMismatch { expected: 100, .. }), "{err}");

    let err = reg.fetch_blob(&app, "sha256:../../etc", 1).await.err().expect("bad digest");
    assert!(matches!(err, ImageError::UnsupportedDigest(_)), "{err}");
}

#[tokio::test]
async fn mirrors_fall_through() {
    let main = Fake::start(registry_handler).await;
    let mirror = Fake::start(registry_handler).await;
    let empty = Fake::start(not_found_handler).await;
    let app = name(&format!("{}/test/app:v1", main.host));
    let mirrors = vec![dead_host(), empty.host.clone(), mirror.host.clone()];
    let opts = RegistryOptions { mirrors: BTreeMap::from([(main.host.clone(), mirrors)]), ..options(vec![]) };
    let reg = Registry::new(opts).expect("registry");

    let m = reg.fetch_manifest(&app).await.expect("via mirror");
    assert_eq!(m.digest, digest(MANIFEST));
    let (_, stream) =
        reg.fetch_blob(&app, &digest(&blob()), blob().len() as u64).await.expect("blob via mirror");
    stream.try_for_each(|_| async { Ok(()) }).await.expect("body");

    let ns = format!("/v2/test/app/manifests/v1?ns={}", main.host);
    assert!(empty.requests().contains(&ns), "{:?}", empty.requests());
    assert!(mirror.requests().contains(&ns), "{:?}", mirror.requests());
    assert!(main.requests().is_empty(), "{:?}", main.requests());

    // When every mirror fails, the registry itself answers (and its error is the one reported).
    let missing = name(&format!("{}/test/missing:v1", main.host));
    let err = reg.fetch_manifest(&missing).await.expect_err("missing");
    assert!(matches!(err, ImageError::ImageNotFound { .. }), "{err}");
    assert!(main.requests().iter().any(|p| p == "/v2/test/missing/manifests/v1"), "{:?}", main.requests());
}

#[tokio::test]
async fn login_checks_credentials() {
    let reg = Registry::new(options(vec![])).expect("registry");
    let basic_reg = Fake::start(registry_handler).await;
    let bearer_reg = Fake::start(bearer_handler).await;
    for fake in [&basic_reg, &bearer_reg] {
        reg.login(&fake.host, "user", "pass").await.expect("good credentials");
        let err = reg.login(&fake.host, "user", "nope").await.expect_err("bad credentials");
        match err {
            ImageError::RegistryAuth { registry, detail } => {
                assert_eq!(registry, fake.host);
                assert!(detail.contains("refused the credentials"), "{detail}");
            }
            other => panic!("{}: {other}", fake.host),
        }
    }
    assert!(bearer_reg.requests().iter().any(|p| p.starts_with("/token?service=fake&account=user")));
    let err = reg.login(&dead_host(), "user", "pass").await.expect_err("dead");
    assert!(matches!(err, ImageError::RegistryUnreachable { .. }), "{err}");
    let err = reg.login("not a host", "user", "pass").await.expect_err("invalid");
    assert!(matches!(err, ImageError::InvalidReference { .. }), "{err}");
}
