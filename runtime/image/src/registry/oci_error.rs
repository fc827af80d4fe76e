//! Turning oci-client's errors into [`ImageError`]s a user can act on.

use std::io;

use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;

use super::name::ImageName;
use crate::error::ImageError;

/// What was being fetched when an error came back.
#[derive(Debug, Clone, Copy)]
pub(super) enum Fetching<'a> {
    Manifest(&'a ImageName),
    Blob(&'a ImageName),
}

impl Fetching<'_> {
    fn name(&self) -> &ImageName {
        match self {
            Fetching::Manifest(name) | Fetching::Blob(name) => name,
        }
    }
}

/// Maps an error from a request to `host`, made with `auth`.
pub(super) fn map_oci_error(
    e: OciDistributionError,
    host: &str,
    auth: &RegistryAuth,
    what: Fetching,
) -> ImageError {
    let not_found = || match what {
        Fetching::Manifest(name) => Some(ImageError::ImageNotFound { name: name.to_string() }),
        // A missing blob is a registry problem, not a missing image: keep the registry's words.
        Fetching::Blob(..) => None,
    };
    let auth_error = || {
        let repository = what.name().repository();
        let detail = match auth {
            RegistryAuth::Anonymous => format!(
                "needs credentials for {repository} (or has no such repository): run husk login {host}"
            ),
            _ => format!("refused the credentials for {repository}; check them with husk login {host}"),
        };
        ImageError::RegistryAuth { registry: host.to_owned(), detail }
    };
    let mapped = match &e {
        OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            Some(auth_error())
        }
        OciDistributionError::ServerError { code: 404, .. } => not_found(),
        OciDistributionError::ServerError { code: 401 | 403, .. } => Some(auth_error()),
        OciDistributionError::RegistryError { envelope, .. } => {
            let has = |codes: &[OciErrorCode]| envelope.errors.iter().any(|err| codes.contains(&err.code));
            if has(&[OciErrorCode::Unauthorized, OciErrorCode::Denied]) {
                Some(auth_error())
            } else if has(&[OciErrorCode::ManifestUnknown, OciErrorCode::NameUnknown, OciErrorCode::NotFound])
            {
                not_found()
            } else {
                None
            }
        }
        OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => actual
            .strip_prefix("sha256:")
            .map(|hex| ImageError::DigestMismatch { digest: expected.clone(), actual: hex.to_owned() }),
        _ => None,
    };
    mapped.unwrap_or_else(|| registry_error(host, e))
}

/// [`ImageError::RegistryUnreachable`] for connection failures and timeouts, else
/// [`ImageError::Registry`].
pub(super) fn registry_error(host: &str, source: OciDistributionError) -> ImageError {
    let registry = host.to_owned();
    match &source {
        OciDistributionError::RequestError(re) if re.is_connect() || re.is_timeout() => {
            ImageError::RegistryUnreachable { registry, source }
        }
        _ => ImageError::Registry { registry, source },
    }
}

/// Maps an error in the middle of a blob body from `host`.
pub(super) fn stream_error(e: io::Error, host: &str) -> ImageError {
    // oci-client reports a digest mismatch at the end of the body as an io::Error around a DigestError.
    if let Some(DigestError::VerificationError { expected, actual }) =
        e.get_ref().and_then(|inner| inner.downcast_ref::<DigestError>())
    {
        if let Some(hex) = actual.strip_prefix("sha256:") {
            return ImageError::DigestMismatch { digest: expected.clone(), actual: hex.to_owned() };
        }
    }
    registry_error(host, OciDistributionError::IoError(e))
}

#[cfg(test)]
mod tests {
    use oci_client::errors::{OciEnvelope, OciError};

    use super::*;

    #[test]
    fn status_codes_and_error_codes() {
        let name: ImageName = "reg.io/a/b:1".parse().expect("name");
        let manifest = Fetching::Manifest(&name);
        let blob = Fetching::Blob(&name);
        let server = |code| OciDistributionError::ServerError { code, url: "u".into(), message: "m".into() };
        let envelope = |code: OciErrorCode| OciDistributionError::RegistryError {
            envelope: OciEnvelope {
                errors: vec![OciError { code, message: String::new(), detail: serde_json::Value::Null }],
            },
            url: "u".into(),
        };
        let anon = RegistryAuth::Anonymous;
        let basic = RegistryAuth::Basic("u".into(), "p".into());
        let map = |e, auth: &RegistryAuth, what| map_oci_error(e, "reg.io", auth, what);

        assert!(matches!(map(server(404), &anon, manifest), ImageError::ImageNotFound { .. }));
        assert!(matches!(map(server(404), &anon, blob), ImageError::Registry { .. }));
        assert!(matches!(
            map(envelope(OciErrorCode::ManifestUnknown), &anon, manifest),
            ImageError::ImageNotFound { .. }
        ));
        assert!(matches!(
            map(envelope(OciErrorCode::NameUnknown), &anon, manifest),
            ImageError::ImageNotFound { .. }
        ));
        assert!(matches!(
            map(envelope(OciErrorCode::Toomanyrequests), &anon, manifest),
            ImageError::Registry { .. }
        ));
        assert!(matches!(map(server(500), &anon, manifest), ImageError::Registry { .. }));
        for e in
            [server(401), server(403), envelope(OciErrorCode::Denied), envelope(OciErrorCode::Unauthorized)]
        {
            match map(e, &basic, manifest) {
                ImageError::RegistryAuth { registry, detail } => {
                    assert_eq!(registry, "reg.io");
                    assert!(detail.contains("refused the credentials"), "{detail}");
                }
                other => panic!("{other}"),
            }
        }
        let err =
            map(OciDistributionError::UnauthorizedError { url: "u".into() }, &anon, manifest).to_string();
        assert!(err.contains("needs credentials") && err.contains("husk login reg.io"), "{err}");

        let mismatch =
            DigestError::VerificationError { expected: "sha256:aa".into(), actual: "sha256:bb".into() };
        match map(mismatch.into(), &anon, manifest) {
            ImageError::DigestMismatch { digest, actual } => {
                assert_eq!((digest.as_str(), actual.as_str()), ("sha256:aa", "bb"))
            }
            other => panic!("{other}"),
        }
        let in_stream = io::Error::other(DigestError::VerificationError {
            expected: "sha256:aa".into(),
            actual: "sha256:cc".into(),
        });
        assert!(matches!(stream_error(in_stream, "reg.io"), ImageError::DigestMismatch { .. }));
        assert!(matches!(stream_error(io::Error::other("reset"), "reg.io"), ImageError::Registry { .. }));
    }
}
