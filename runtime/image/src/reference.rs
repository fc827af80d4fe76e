//! Image references: which image the user asked for.
//!
//! Today a reference names an OCI image layout on disk, `DIR[:TAG]`. Registry references
//! (`registry/repo:tag`, `...@sha256:...`) will parse here too, into their own form.

use std::path::PathBuf;

use crate::error::ImageError;

/// The tag a reference without one means.
pub(crate) const DEFAULT_TAG: &str = "latest";

/// Parses "DIR:TAG" (TAG optional, default "latest"; split at the LAST ':' only if what follows has no '/').
pub fn parse_reference(s: &str) -> Result<(PathBuf, String), ImageError> {
    let bad = |reason| ImageError::InvalidReference { reference: s.to_owned(), reason };
    let (dir, tag) = match s.rsplit_once(':') {
        Some((dir, tag)) if !tag.contains('/') => (dir, tag),
        _ => (s, DEFAULT_TAG),
    };
    if dir.is_empty() {
        return Err(bad("empty layout directory"));
    }
    if tag.is_empty() {
        return Err(bad("empty tag"));
    }
    Ok((PathBuf::from(dir), tag.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reference_cases() {
        let ok = |s: &str| parse_reference(s).expect(s);
        assert_eq!(ok("dir"), (PathBuf::from("dir"), "latest".to_owned()));
        assert_eq!(ok("dir:v1"), (PathBuf::from("dir"), "v1".to_owned()));
        assert_eq!(ok("/a/b:c:d"), (PathBuf::from("/a/b:c"), "d".to_owned()));
        assert_eq!(ok("/a:b/c"), (PathBuf::from("/a:b/c"), "latest".to_owned()));
        assert_eq!(ok("./x:1.0"), (PathBuf::from("./x"), "1.0".to_owned()));
        for bad in ["", ":tag", "dir:"] {
            let err = parse_reference(bad).expect_err(bad);
            assert!(matches!(err, ImageError::InvalidReference { .. }), "{bad}: {err}");
        }
    }
}
