//! Registry credentials in the containers auth file format, shared with podman, skopeo and docker:
//! `{"auths": {"REGISTRY": {"auth": base64("user:password")}}}`.
//!
//! Keys may be spelled `reg`, `https://reg`, `http://reg` or `reg/v1/` (docker writes Docker Hub as
//! `https://index.docker.io/v1/`); all name the same registry. Credential helpers (`credsStore`,
//! `credHelpers`) and identity tokens are not supported: such entries are skipped.

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde_json::{json, Map, Value};
use tracing::debug;

use super::name::normalize_registry;
use crate::error::{io_err, json_err, ImageError};

/// Largest auth file read.
pub(crate) const MAX_AUTH_FILE: u64 = 1 << 20;

/// Standard base64 that does not insist on padding (some tools drop it).
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The auth files read for pulls, in lookup order: `$REGISTRY_AUTH_FILE` alone if set, else
/// [`husk_auth_file`], `$XDG_RUNTIME_DIR/containers/auth.json` (podman's) and `$HOME/.docker/config.json`.
pub fn default_auth_files() -> Vec<PathBuf> {
    default_auth_files_in(&real_env)
}

/// Where `husk login` writes: `$REGISTRY_AUTH_FILE` if set, else `$XDG_CONFIG_HOME/husk/auth.json`, else
/// `$HOME/.config/husk/auth.json`.
pub fn husk_auth_file() -> PathBuf {
    husk_auth_file_in(&real_env)
}

/// A non-empty environment variable as a path; HOME falls back to the passwd entry.
fn real_env(name: &str) -> Option<PathBuf> {
    let value = std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    match name {
        "HOME" => value.or_else(std::env::home_dir).filter(|p| !p.as_os_str().is_empty()),
        _ => value,
    }
}

type Env<'a> = &'a dyn Fn(&str) -> Option<PathBuf>;

fn default_auth_files_in(env: Env) -> Vec<PathBuf> {
    if let Some(file) = env("REGISTRY_AUTH_FILE") {
        return vec![file];
    }
    let mut files = vec![husk_auth_file_in(env)];
    // XDG paths must be absolute; relative ones are ignored (XDG base directory spec).
    if let Some(dir) = env("XDG_RUNTIME_DIR").filter(|d| d.is_absolute()) {
        files.push(dir.join("containers/auth.json"));
    }
    if let Some(home) = env("HOME") {
        files.push(home.join(".docker/config.json"));
    }
    files
}

fn husk_auth_file_in(env: Env) -> PathBuf {
    if let Some(file) = env("REGISTRY_AUTH_FILE") {
        return file;
    }
    let config = env("XDG_CONFIG_HOME")
        .filter(|d| d.is_absolute())
        .or_else(|| env("HOME").map(|h| h.join(".config")))
        // No HOME and no passwd entry: only root runs husk like that.
        .unwrap_or_else(|| PathBuf::from("/root/.config"));
    config.join("husk/auth.json")
}

/// The user and password for `registry` from the first of `files` that has an entry for it.
///
/// Missing files are skipped; an unreadable, oversized or malformed file, or an entry that does not
/// decode to `user:password`, is an error naming the file.
pub fn lookup_credentials(files: &[PathBuf], registry: &str) -> Result<Option<(String, String)>, ImageError> {
    for file in files {
        let Some(doc) = read_auth_file(file)? else { continue };
        let Some(auths) = auths(&doc, file)? else { continue };
        // The exact key first, then its other spellings (in the map's order).
        let wanted = normalize_registry(registry);
        let exact = auths.get_key_value(registry);
        let others = auths.iter().filter(|(k, _)| *k != registry);
        for (key, entry) in exact.into_iter().chain(others).filter(|(k, _)| key_registry(k) == wanted) {
            if let Some(creds) = decode_entry(file, key, entry)? {
                debug!(file = %file.display(), key = %key, "registry credentials found");
                return Ok(Some(creds));
            }
        }
    }
    Ok(None)
}

/// Stores `user:password` for `registry` in `file` (Docker Hub as `docker.io`), replacing any entry for
/// it (under any spelling) and keeping everything else. Parent directories are created 0700; the file is replaced atomically
/// and is 0600.
pub fn store_credentials(file: &Path, registry: &str, user: &str, password: &str) -> Result<(), ImageError> {
    let bad = |reason| ImageError::InvalidCredentials { registry: registry.to_owned(), reason };
    if user.is_empty() {
        return Err(bad("empty user name"));
    }
    // The entry is "user:password", split at the first ':'.
    if user.contains(':') {
        return Err(bad("a user name cannot contain ':'"));
    }
    let mut doc = read_auth_file(file)?.unwrap_or_else(|| json!({}));
    let top = doc.as_object_mut().ok_or_else(|| not_object(file))?;
    let auths = top.entry("auths").or_insert_with(|| json!({}));
    let auths = auths.as_object_mut().ok_or_else(|| auths_not_object(file))?;
    remove_entries(auths, registry);
    let auth = B64.encode(format!("{user}:{password}"));
    auths.insert(normalize_registry(registry).to_owned(), json!({ "auth": auth }));
    write_atomically(file, &doc)
}

/// Removes `registry`'s entries (under any spelling) from `file`; true if there was one.
pub fn remove_credentials(file: &Path, registry: &str) -> Result<bool, ImageError> {
    let Some(mut doc) = read_auth_file(file)? else { return Ok(false) };
    let top = doc.as_object_mut().ok_or_else(|| not_object(file))?;
    let Some(auths) = top.get_mut("auths") else { return Ok(false) };
    let auths = auths.as_object_mut().ok_or_else(|| auths_not_object(file))?;
    if !remove_entries(auths, registry) {
        return Ok(false);
    }
    write_atomically(file, &doc)?;
    Ok(true)
}

/// The registry an auths key names: scheme, trailing `/`, `/v1` or `/v2` dropped, Docker Hub aliases
/// folded.
fn key_registry(key: &str) -> &str {
    let k = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let k = k.strip_suffix('/').unwrap_or(k);
    let k = k.strip_suffix("/v1").or_else(|| k.strip_suffix("/v2")).unwrap_or(k);
    normalize_registry(k)
}

fn remove_entries(auths: &mut Map<String, Value>, registry: &str) -> bool {
    let wanted = normalize_registry(registry);
    let before = auths.len();
    auths.retain(|k, _| key_registry(k) != wanted);
    auths.len() != before
}

fn not_object(file: &Path) -> ImageError {
    ImageError::AuthFile { path: file.to_owned(), reason: "the top level is not a JSON object".to_owned() }
}

fn auths_not_object(file: &Path) -> ImageError {
    ImageError::AuthFile { path: file.to_owned(), reason: "\"auths\" is not a JSON object".to_owned() }
}

/// The `auths` map of a parsed auth file, if it has one.
fn auths<'a>(doc: &'a Value, file: &Path) -> Result<Option<&'a Map<String, Value>>, ImageError> {
    let top = doc.as_object().ok_or_else(|| not_object(file))?;
    match top.get("auths") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(auths)) => Ok(Some(auths)),
        Some(_) => Err(auths_not_object(file)),
    }
}

/// `(user, password)` from one auths entry; None for entries that hold no usable secret (docker writes
/// empty entries when a credential helper keeps the secret).
fn decode_entry(file: &Path, key: &str, entry: &Value) -> Result<Option<(String, String)>, ImageError> {
    let bad = |reason: &str| ImageError::AuthFile {
        path: file.to_owned(),
        reason: format!("entry {key:?}: {reason}"),
    };
    let entry = entry.as_object().ok_or_else(|| bad("not a JSON object"))?;
    let field = |name: &str| -> Result<Option<&str>, ImageError> {
        match entry.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(bad(&format!("{name:?} is not a string"))),
        }
    };
    if let Some(auth) = field("auth")? {
        let decoded = B64.decode(auth.trim()).map_err(|_| bad("\"auth\" is not base64"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad("\"auth\" is not UTF-8"))?;
        return match decoded.split_once(':') {
            Some((user, password)) if !user.is_empty() => Ok(Some((user.to_owned(), password.to_owned()))),
            _ => Err(bad("\"auth\" does not decode to user:password")),
        };
    }
    // Older docker versions wrote the fields separately.
    if let (Some(user), Some(password)) = (field("username")?, field("password")?) {
        return Ok(Some((user.to_owned(), password.to_owned())));
    }
    debug!(file = %file.display(), key = %key, "auth entry without user:password (credential helper or identity token?); skipped");
    Ok(None)
}

/// Reads and parses an auth file; None if it does not exist.
fn read_auth_file(file: &Path) -> Result<Option<Value>, ImageError> {
    // Nonblocking so a FIFO planted at the path cannot hang us; it is refused below anyway.
    let handle = match OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(file)(e)),
    };
    if !handle.metadata().map_err(io_err(file))?.is_file() {
        return Err(ImageError::AuthFile { path: file.to_owned(), reason: "not a regular file".to_owned() });
    }
    let mut buf = Vec::new();
    handle.take(MAX_AUTH_FILE + 1).read_to_end(&mut buf).map_err(io_err(file))?;
    let what = || format!("registry auth file {}", file.display());
    if buf.len() as u64 > MAX_AUTH_FILE {
        return Err(ImageError::TooLarge { what: what(), limit: MAX_AUTH_FILE });
    }
    // An empty file (e.g. just touched) holds no credentials.
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Ok(Some(json!({})));
    }
    serde_json::from_slice(&buf).map(Some).map_err(json_err(&what()))
}

/// Writes `doc` to `file` through a 0600 temporary file in the same directory and a rename.
fn write_atomically(file: &Path, doc: &Value) -> Result<(), ImageError> {
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir))?;
    let mut name = OsString::from(".");
    name.push(file.file_name().unwrap_or_else(|| "auth.json".as_ref()));
    name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(name);
    let mut bytes = serde_json::to_vec_pretty(doc).map_err(json_err("registry auth file"))?;
    bytes.push(b'\n');
    let result = (|| {
        let mut out = create_new_0600(&tmp)?;
        out.write_all(&bytes)?;
        out.sync_all()?;
        fs::rename(&tmp, file)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(file)(e));
    }
    // Make the rename durable; failing to is not worth failing the login for.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn create_new_0600(path: &Path) -> io::Result<File> {
    let open = || OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
    match open() {
        // Left over from a run that died with our pid.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(path)?;
            open()
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::testutil::TempDir;

    fn b64(s: &str) -> String {
        B64.encode(s)
    }

    fn write(path: &Path, v: &Value) {
        fs::write(path, serde_json::to_vec(v).expect("json")).expect("write");
    }

    #[test]
    fn lookup_order_and_key_spellings() {
        let tmp = TempDir::new();
        let a = tmp.0.join("a.json");
        let b = tmp.0.join("b.json");
        let missing = tmp.0.join("missing.json");
        write(
            &a,
            &json!({"auths": {"quay.io": {"auth": b64("qa:1")}, "https://reg.io:5000": {"auth": b64("ra:2")}}}),
        );
        write(
            &b,
            &json!({
                "auths": {
                    "quay.io": {"auth": b64("qb:3")},
                    "https://index.docker.io/v1/": {"auth": b64("dh:pa:ss")},
                    "http://plain.io/v2/": {"username": "u", "password": "p"},
                    "helper.io": {},
                    "token.io": {"identitytoken": "xyz"},
                },
                "credsStore": "desktop",
            }),
        );
        let files = [missing, a, b];
        let get = |r: &str| lookup_credentials(&files, r).expect(r);
        let pair = |u: &str, p: &str| Some((u.to_owned(), p.to_owned()));
        assert_eq!(get("quay.io"), pair("qa", "1"), "first file wins");
        assert_eq!(get("reg.io:5000"), pair("ra", "2"));
        assert_eq!(get("docker.io"), pair("dh", "pa:ss"), "password keeps its ':'");
        assert_eq!(get("index.docker.io"), pair("dh", "pa:ss"));
        assert_eq!(get("plain.io"), pair("u", "p"));
        assert_eq!(get("helper.io"), None);
        assert_eq!(get("token.io"), None);
        assert_eq!(get("reg.io"), None, "port is part of the registry");
        assert_eq!(get("other.io"), None);

        // The exact key beats other spellings in the same file.
        write(
            &files[1],
            &json!({"auths": {"https://x.io": {"auth": b64("s:1")}, "x.io": {"auth": b64("e:2")}}}),
        );
        assert_eq!(get("x.io"), pair("e", "2"));
    }

    #[test]
    fn malformed_files_are_errors_naming_the_file() {
        let tmp = TempDir::new();
        let f = tmp.0.join("auth.json");
        let files = [f.clone()];
        for (content, want) in [
            (b"{not json".to_vec(), "invalid JSON in registry auth file"),
            (b"[]".to_vec(), "top level is not a JSON object"),
            (br#"{"auths": []}"#.to_vec(), "\"auths\" is not a JSON object"),
            (br#"{"auths": {"r.io": "x"}}"#.to_vec(), "entry \"r.io\": not a JSON object"),
            (br#"{"auths": {"r.io": {"auth": "!!"}}}"#.to_vec(), "not base64"),
            (br#"{"auths": {"r.io": {"auth": 7}}}"#.to_vec(), "not a string"),
            (
                format!(r#"{{"auths": {{"r.io": {{"auth": "{}"}}}}}}"#, b64("nocolon")).into_bytes(),
                "user:password",
            ),
            (vec![b' '; MAX_AUTH_FILE as usize + 1], "larger than"),
        ] {
            fs::write(&f, &content).expect("write");
            let err = lookup_credentials(&files, "r.io").expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} does not mention {want:?}");
            assert!(err.contains(&f.display().to_string()), "{err:?} does not name the file");
        }
        // Empty files hold nothing, and entries for other registries are not looked at.
        fs::write(&f, b"").expect("write");
        assert_eq!(lookup_credentials(&files, "r.io").expect("empty"), None);
        fs::write(&f, br#"{"auths": {"other.io": {"auth": "!!"}}}"#).expect("write");
        assert_eq!(lookup_credentials(&files, "r.io").expect("other"), None);
        // A directory is not an auth file.
        let err = lookup_credentials(std::slice::from_ref(&tmp.0), "r.io").expect_err("dir");
        assert!(matches!(err, ImageError::AuthFile { .. }), "{err}");
    }

    #[test]
    fn store_and_remove() {
        let tmp = TempDir::new();
        let file = tmp.0.join("new/dir/auth.json");
        store_credentials(&file, "docker.io", "me", "s3:cret").expect("store");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&tmp.0.join("new/dir")), 0o700);
        assert_eq!(mode(&tmp.0.join("new")), 0o700);
        let files = [file.clone()];
        assert_eq!(
            lookup_credentials(&files, "docker.io").expect("get"),
            Some(("me".into(), "s3:cret".into()))
        );

        // Other entries, other spellings' removal and unknown keys.
        write(
            &file,
            &json!({"auths": {"https://index.docker.io/v1/": {"auth": b64("old:1")}, "q.io": {"auth": b64("q:2")}}, "credHelpers": {"x": "y"}}),
        );
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod");
        store_credentials(&file, "docker.io", "new", "3").expect("store");
        assert_eq!(mode(&file), 0o600, "rewritten 0600");
        let doc: Value = serde_json::from_slice(&fs::read(&file).expect("read")).expect("json");
        assert_eq!(
            doc,
            json!({"auths": {"docker.io": {"auth": b64("new:3")}, "q.io": {"auth": b64("q:2")}}, "credHelpers": {"x": "y"}})
        );
        let leftovers: Vec<_> = fs::read_dir(file.parent().expect("parent")).expect("ls").collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");

        assert!(remove_credentials(&file, "index.docker.io").expect("remove"));
        assert!(!remove_credentials(&file, "docker.io").expect("remove again"));
        assert!(!remove_credentials(&tmp.0.join("none.json"), "docker.io").expect("no file"));
        assert_eq!(lookup_credentials(&files, "docker.io").expect("get"), None);
        assert_eq!(lookup_credentials(&files, "q.io").expect("get"), Some(("q".into(), "2".into())));

        for (user, want) in [("", "empty user name"), ("a:b", "cannot contain ':'")] {
            let err = store_credentials(&file, "q.io", user, "p").expect_err(user).to_string();
            assert!(err.contains(want), "{err}");
        }
        fs::write(&file, b"[1]").expect("write");
        let err = store_credentials(&file, "q.io", "u", "p").expect_err("not an object");
        assert!(matches!(err, ImageError::AuthFile { .. }), "{err}");
    }

    #[test]
    fn default_paths() {
        let env_of = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, PathBuf> =
                pairs.iter().map(|(k, v)| (k.to_string(), PathBuf::from(v))).collect();
            move |name: &str| map.get(name).cloned()
        };
        let env = env_of(&[("HOME", "/home/u"), ("XDG_RUNTIME_DIR", "/run/user/1")]);
        assert_eq!(husk_auth_file_in(&env), PathBuf::from("/home/u/.config/husk/auth.json"));
        assert_eq!(
            default_auth_files_in(&env),
            [
                "/home/u/.config/husk/auth.json",
                "/run/user/1/containers/auth.json",
                "/home/u/.docker/config.json"
            ]
            .map(PathBuf::from)
        );
        let env =
            env_of(&[("HOME", "/home/u"), ("XDG_CONFIG_HOME", "/cfg"), ("XDG_RUNTIME_DIR", "relative")]);
        assert_eq!(husk_auth_file_in(&env), PathBuf::from("/cfg/husk/auth.json"));
        assert_eq!(
            default_auth_files_in(&env),
            ["/cfg/husk/auth.json", "/home/u/.docker/config.json"].map(PathBuf::from)
        );
        let env = env_of(&[
            ("HOME", "/home/u"),
            ("XDG_CONFIG_HOME", "/cfg"),
            ("REGISTRY_AUTH_FILE", "/etc/a.json"),
        ]);
        assert_eq!(husk_auth_file_in(&env), PathBuf::from("/etc/a.json"));
        assert_eq!(default_auth_files_in(&env), vec![PathBuf::from("/etc/a.json")]);
        assert_eq!(husk_auth_file_in(&env_of(&[])), PathBuf::from("/root/.config/husk/auth.json"));
    }

    #[test]
    fn key_spellings() {
        for (key, registry) in [
            ("reg.io", "reg.io"),
            ("https://reg.io", "reg.io"),
            ("http://reg.io:5000/", "reg.io:5000"),
            ("reg.io/v1/", "reg.io"),
            ("https://index.docker.io/v1/", "docker.io"),
            ("registry-1.docker.io", "docker.io"),
            ("quay.io/org", "quay.io/org"),
        ] {
            assert_eq!(key_registry(key), registry, "{key}");
        }
    }
}
