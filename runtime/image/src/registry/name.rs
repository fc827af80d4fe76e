//! [`ImageName`]: a registry image reference as the user types it (`alpine`, `user/app:1`,
//! `reg:5000/x@sha256:...`), with Docker's defaults filled in.
//!
//! Parsing follows the distribution reference grammar (hand-written, no regex):
//! - the first `/`-separated component is a registry if it contains `.` or `:` or is `localhost`
//!   (Docker's rule); otherwise the registry is `docker.io`, and a one-component Docker Hub name gets
//!   `library/` in front;
//! - `index.docker.io` and `registry-1.docker.io` are spelled `docker.io`;
//! - path components are `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`, tags
//!   `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`, digests `sha256:` + 64 lowercase hex, and the name (registry
//!   and path as typed) is at most 255 characters.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use crate::error::ImageError;
use crate::reference::DEFAULT_TAG;

/// Docker Hub's canonical name.
pub(crate) const DOCKER_HUB: &str = "docker.io";
/// Longest name (registry/path) accepted, as in the distribution reference grammar.
const MAX_NAME: usize = 255;
const MAX_TAG: usize = 128;

/// A fully qualified registry image reference: registry, repository, and a tag and/or digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageName {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageName {
    /// The registry's host[:port], `docker.io` for Docker Hub.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path within the registry, e.g. `library/alpine`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// "tag or digest" to fetch: the digest if any, else the tag ("latest" when neither was given).
    pub fn reference(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or(DEFAULT_TAG)
    }

    /// Same repository, other tag/digest: the digest `digest` and no tag.
    ///
    /// `digest` is not validated here; the registry client refuses anything but `sha256:<64 hex>`.
    pub fn with_digest(&self, digest: &str) -> ImageName {
        ImageName {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest.to_owned()),
        }
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageName {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, ImageError> {
        let bad = |reason| ImageError::InvalidReference { reference: s.to_owned(), reason };
        if s.is_empty() {
            return Err(bad("empty image name"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => {
                check_digest(digest).map_err(bad)?;
                (rest, Some(digest.to_owned()))
            }
            None => (s, None),
        };
        // A tag follows the last ':' after the last '/' (a ':' before it belongs to a registry port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                check_tag(tag).map_err(bad)?;
                (&rest[..last_slash + i], Some(tag.to_owned()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(bad("empty repository name"));
        }
        if name.len() > MAX_NAME {
            return Err(bad("name is longer than 255 characters"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                check_registry(first).map_err(bad)?;
                (normalize_registry(first), path)
            }
            _ => (DOCKER_HUB, name),
        };
        check_path(path).map_err(bad)?;
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (tag, _) => tag,
        };
        Ok(ImageName { registry: registry.to_owned(), repository, tag, digest })
    }
}

/// Docker Hub's aliases spelled `docker.io`; everything else unchanged.
pub(crate) fn normalize_registry(registry: &str) -> &str {
    match registry {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB,
        other => other,
    }
}

/// Checks `sha256:` + 64 lowercase hex digits.
pub(crate) fn check_digest(digest: &str) -> Result<(), &'static str> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err("a digest is ALGORITHM:HEX, e.g. sha256:<64 hex digits>");
    };
    if algorithm != "sha256" {
        return Err("only sha256 digests are supported");
    }
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("a sha256 digest has exactly 64 lowercase hex digits");
    }
    Ok(())
}

fn check_tag(tag: &str) -> Result<(), &'static str> {
    let mut bytes = tag.bytes();
    match bytes.next() {
        None => return Err("empty tag"),
        Some(b) if b.is_ascii_alphanumeric() || b == b'_' => {}
        Some(_) => return Err("a tag must start with a letter, digit or '_'"),
    }
    if tag.len() > MAX_TAG {
        return Err("a tag is at most 128 characters");
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err("a tag may only contain letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

/// Checks `host[:port]`: a DNS name or IPv4 address, or `[IPv6]`, with an optional numeric port.
pub(crate) fn check_registry(registry: &str) -> Result<(), &'static str> {
    const BAD_HOST: &str = "invalid registry host";
    let (host, port) = split_host_port(registry).ok_or(BAD_HOST)?;
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err("invalid registry port");
        }
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().map(|_| ()).map_err(|_| BAD_HOST);
    }
    // domain-component: [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9], joined by '.'.
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !c.starts_with('-')
            && !c.ends_with('-')
    };
    if host.split('.').all(component_ok) {
        Ok(())
    } else {
        Err(BAD_HOST)
    }
}

/// Splits `host[:port]` / `[v6][:port]`; None when brackets are unbalanced.
pub(crate) fn split_host_port(registry: &str) -> Option<(&str, Option<&str>)> {
    if registry.starts_with('[') {
        let end = registry.find(']')?;
        let (host, rest) = registry.split_at(end + 1);
        return match rest {
            "" => Some((host, None)),
            _ => Some((host, Some(rest.strip_prefix(':')?))),
        };
    }
    Some(match registry.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (registry, None),
    })
}

fn check_path(path: &str) -> Result<(), &'static str> {
    for component in path.split('/') {
        if component.is_empty() {
            return Err("empty path component (leading, trailing or doubled '/')");
        }
        if !path_component_ok(component) {
            if path_component_ok(&component.to_ascii_lowercase()) {
                return Err("repository names must be lowercase");
            }
            return Err(
                "path components are lowercase letters and digits, separated by '.', '_', '__' or '-'s",
            );
        }
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`
fn path_component_ok(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = c.as_bytes();
    let mut i = 0;
    loop {
        // A run of [a-z0-9]+ ...
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // ... then one separator before the next run.
        let sep_start = i;
        while i < b.len() && matches!(b[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let ok = match &b[sep_start..i] {
            b"." | b"_" | b"__" => true,
            sep => sep.iter().all(|&s| s == b'-'),
        };
        if !ok {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(s: &str) -> ImageName {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_defaults() {
        for (input, registry, repository, tag, digest, display) in [
            (
                "alpine",
                "docker.io",
                "library/alpine",
                Some("latest"),
                None,
                "docker.io/library/alpine:latest",
            ),
            (
                "alpine:3.19",
                "docker.io",
                "library/alpine",
                Some("3.19"),
                None,
                "docker.io/library/alpine:3.19",
            ),
            ("user/app:1", "docker.io", "user/app", Some("1"), None, "docker.io/user/app:1"),
            (
                "docker.io/alpine",
                "docker.io",
                "library/alpine",
                Some("latest"),
                None,
                "docker.io/library/alpine:latest",
            ),
            (
                "index.docker.io/user/app",
                "docker.io",
                "user/app",
                Some("latest"),
                None,
                "docker.io/user/app:latest",
            ),
            (
                "registry-1.docker.io/busybox:1",
                "docker.io",
                "library/busybox",
                Some("1"),
                None,
                "docker.io/library/busybox:1",
            ),
            ("localhost/a", "localhost", "a", Some("latest"), None, "localhost/a:latest"),
            (
                "localhost:5000/a/b",
                "localhost:5000",
                "a/b",
                Some("latest"),
                None,
                "localhost:5000/a/b:latest",
            ),
            (
                "quay.io/org/sub/app:v1.2-rc_3",
                "quay.io",
                "org/sub/app",
                Some("v1.2-rc_3"),
                None,
                "quay.io/org/sub/app:v1.2-rc_3",
            ),
            ("[::1]:5000/x:t", "[::1]:5000", "x", Some("t"), None, "[::1]:5000/x:t"),
            ("[fe80::1]/x", "[fe80::1]", "x", Some("latest"), None, "[fe80::1]/x:latest"),
            ("Reg.Example.COM/a", "Reg.Example.COM", "a", Some("latest"), None, "Reg.Example.COM/a:latest"),
            // No slash: never a registry, even when it looks like one (Docker does the same).
            (
                "localhost:5000",
                "docker.io",
                "library/localhost",
                Some("5000"),
                None,
                "docker.io/library/localhost:5000",
            ),
            (
                "a__b.c-d---e",
                "docker.io",
                "library/a__b.c-d---e",
                Some("latest"),
                None,
                "docker.io/library/a__b.c-d---e:latest",
            ),
        ] {
            let n = parse(input);
            assert_eq!(
                (n.registry(), n.repository(), n.tag(), n.digest()),
                (registry, repository, tag, digest),
                "{input}"
            );
            assert_eq!(n.to_string(), display, "{input}");
            // Display is a fixpoint: it parses back to the same name.
            assert_eq!(parse(&n.to_string()), n, "{input}");
        }
    }

    #[test]
    fn digests() {
        let n = parse(&format!("127.0.0.1:5000/x@{D}"));
        assert_eq!(
            (n.registry(), n.repository(), n.tag(), n.digest()),
            ("127.0.0.1:5000", "x", None, Some(D))
        );
        assert_eq!(n.reference(), D);
        assert_eq!(n.to_string(), format!("127.0.0.1:5000/x@{D}"));

        // A tag is kept, but the digest is what is fetched.
        let n = parse(&format!("x:tag@{D}"));
        assert_eq!((n.tag(), n.digest(), n.reference()), (Some("tag"), Some(D), D));
        assert_eq!(n.to_string(), format!("docker.io/library/x:tag@{D}"));

        let n = parse("reg.io/a/b:v1");
        assert_eq!(n.reference(), "v1");
        let pinned = n.with_digest(D);
        assert_eq!(pinned.to_string(), format!("reg.io/a/b@{D}"));
        assert_eq!(pinned.reference(), D);
        assert_eq!(parse("a").reference(), "latest");
    }

    #[test]
    fn rejects_bad_names() {
        let long = format!("{}/x", "a".repeat(254));
        let long_tag = format!("x:{}", "t".repeat(129));
        for (input, reason) in [
            ("", "empty image name"),
            ("Alpine", "repository names must be lowercase"),
            ("user/App", "repository names must be lowercase"),
            ("a//b", "empty path component"),
            ("/a", "empty path component"),
            ("a/", "empty path component"),
            ("reg.io/", "empty path component"),
            ("a-", "path components"),
            ("-a", "path components"),
            ("a...b", "path components"),
            ("a___b", "path components"),
            ("a_.b", "path components"),
            ("a b", "path components"),
            ("a/ü", "path components"),
            (":tag", "empty repository name"),
            ("a:", "empty tag"),
            ("a:.x", "start with"),
            ("a:x/y", "invalid registry port"),
            ("a:t+g", "may only contain"),
            (long_tag.as_str(), "at most 128"),
            (long.as_str(), "longer than 255"),
            ("a@", "ALGORITHM:HEX"),
            ("a@sha256", "ALGORITHM:HEX"),
            ("a@sha512:abcd", "only sha256"),
            ("a@sha256:abc", "64 lowercase hex"),
            ("a@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef", "64 lowercase hex"),
            (
                "a@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef@x",
                "64 lowercase hex",
            ),
            ("-reg.io/a", "invalid registry host"),
            ("reg..io/a", "invalid registry host"),
            ("reg_x.io/a", "invalid registry host"),
            ("reg.io:/a", "invalid registry port"),
            ("reg.io:50x/a", "invalid registry port"),
            ("reg.io:123456/a", "invalid registry port"),
            ("[::1/a", "invalid registry host"),
            ("[::1]x/a", "invalid registry host"),
            ("[zz::1]:5000/a", "invalid registry host"),
        ] {
            match input.parse::<ImageName>() {
                Err(ImageError::InvalidReference { reference, reason: got }) => {
                    assert_eq!(reference, input);
                    assert!(got.contains(reason), "{input:?}: {got:?} does not mention {reason:?}");
                }
                other => panic!("{input:?}: expected InvalidReference, got {other:?}"),
            }
        }
    }

    #[test]
    fn path_components() {
        for ok in ["a", "a0", "a.b", "a_b", "a__b", "a-b", "a--b", "a-----b", "0", "a.b.c_d-e"] {
            assert!(path_component_ok(ok), "{ok}");
        }
        for bad in ["", ".", "a.", ".a", "a..b", "a._b", "a___b", "a-_b", "A", "a-", "_a"] {
            assert!(!path_component_ok(bad), "{bad}");
        }
    }
}
