//! Which kind of document a registry sent for a manifest request.

use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::error::{json_err, ImageError};

pub(super) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(super) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(super) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(super) const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The Accept list of manifest requests.
pub(super) const ACCEPTED_MANIFESTS: [&str; 4] =
    [OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST];
/// Docker schema 1 (`...manifest.v1+json`, `...manifest.v1+prettyjws`): signed, layer-per-history
/// manifests no current tool produces.
const DOCKER_SCHEMA1_PREFIX: &str = "application/vnd.docker.distribution.manifest.v1";

/// Just enough of a manifest to tell what it is.
#[derive(Deserialize)]
struct Peek {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<i64>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<IgnoredAny>,
    layers: Option<IgnoredAny>,
}

/// The media type of the manifest document `body`: its own `mediaType`, else inferred from its shape.
/// `what` names it in errors.
pub(super) fn media_type(body: &[u8], what: &str) -> Result<String, ImageError> {
    let peek: Peek = serde_json::from_slice(body).map_err(json_err(what))?;
    let schema1 = peek.schema_version == Some(1)
        || peek.media_type.as_deref().is_some_and(|m| m.starts_with(DOCKER_SCHEMA1_PREFIX));
    if schema1 {
        return Err(ImageError::UnsupportedMediaType {
            what:
                "a registry manifest (Docker schema 1 is obsolete: push the image again with a current tool)",
            media_type: peek.media_type.unwrap_or_else(|| format!("{DOCKER_SCHEMA1_PREFIX}+json")),
        });
    }
    let inferred = match (peek.manifests.is_some(), peek.layers.is_some()) {
        (true, false) => Some(OCI_INDEX),
        (false, true) => Some(OCI_MANIFEST),
        _ => None,
    };
    match (peek.media_type, inferred) {
        (Some(m), _) if ACCEPTED_MANIFESTS.contains(&m.as_str()) => Ok(m),
        (Some(m), _) => Err(ImageError::UnsupportedMediaType { what: "a registry manifest", media_type: m }),
        (None, Some(m)) => Ok(m.to_owned()),
        (None, None) => Err(ImageError::UnsupportedMediaType {
            what:
                "a registry manifest without mediaType (it needs exactly one of \"manifests\" and \"layers\")",
            media_type: String::new(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        let ok = |doc: &str| media_type(doc.as_bytes(), "m").expect(doc);
        assert_eq!(
            ok(&format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","layers":[]}}"#)),
            DOCKER_MANIFEST
        );
        assert_eq!(
            ok(&format!(r#"{{"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[]}}"#)),
            DOCKER_MANIFEST_LIST
        );
        assert_eq!(ok(&format!(r#"{{"mediaType":"{OCI_INDEX}"}}"#)), OCI_INDEX);
        assert_eq!(ok(r#"{"schemaVersion":2,"manifests":[]}"#), OCI_INDEX);
        assert_eq!(ok(r#"{"schemaVersion":2,"config":{},"layers":[]}"#), OCI_MANIFEST);

        let schema1 = r#"{"schemaVersion":1,"name":"x","fsLayers":[],"signatures":[]}"#;
        let prettyjws = r#"{"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#;
        for doc in [schema1, prettyjws] {
            let err = media_type(doc.as_bytes(), "m").expect_err(doc).to_string();
            assert!(err.contains("schema 1"), "{err}");
        }
        for doc in [
            r#"{"mediaType":"application/vnd.oci.artifact.manifest.v1+json"}"#,
            r#"{"schemaVersion":2}"#,
            r#"{"manifests":[],"layers":[]}"#,
        ] {
            let err = media_type(doc.as_bytes(), "m").expect_err(doc);
            assert!(matches!(err, ImageError::UnsupportedMediaType { .. }), "{doc}: {err}");
        }
        for doc in ["", "[]", "{", r#"{"mediaType":7}"#, r#"{"layers":[],"layers":[]}"#] {
            let err = media_type(doc.as_bytes(), "m").expect_err(doc);
            assert!(matches!(err, ImageError::Json { .. }), "{doc}: {err}");
        }
    }
}
