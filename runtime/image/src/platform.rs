//! Platforms (`os/arch[/variant]`) and picking one image out of an index (manifest list).

use std::fmt;
use std::str::FromStr;

use oci_spec::image::Descriptor;

use crate::error::ImageError;

/// The platform a pull asks for; linux/amd64 unless told otherwise (husk's guests are x86-64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Self { os: "linux".into(), arch: "amd64".into(), variant: None }
    }
}

impl FromStr for Platform {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, ImageError> {
        let bad = |reason| ImageError::InvalidPlatform { platform: s.to_owned(), reason };
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty() && p.len() <= 32 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if !parts.iter().all(|p| ok(p)) {
            return Err(bad("expected OS/ARCH[/VARIANT] of letters and digits"));
        }
        match parts.as_slice() {
            [os, arch] => Ok(Self { os: os.to_string(), arch: arch.to_string(), variant: None }),
            [os, arch, v] => {
                Ok(Self { os: os.to_string(), arch: arch.to_string(), variant: Some(v.to_string()) })
            }
            _ => Err(bad("expected OS/ARCH[/VARIANT]")),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// Whether an index entry is for this platform (any variant when none was asked for).
    pub fn matches(&self, desc: &Descriptor) -> bool {
        let Some(p) = desc.platform() else { return false };
        p.os().to_string() == self.os
            && p.architecture().to_string() == self.arch
            && (self.variant.is_none() || p.variant().as_deref() == self.variant.as_deref())
    }

    /// The first of `entries` for this platform.
    pub fn select<'a>(&self, entries: &'a [Descriptor]) -> Option<&'a Descriptor> {
        entries.iter().find(|d| self.matches(d))
    }

    /// The platform an image config names.
    pub fn of_config(os: &str, arch: &str, variant: Option<&str>) -> Self {
        Self { os: os.to_owned(), arch: arch.to_owned(), variant: variant.map(str::to_owned) }
    }

    /// Whether an image of platform `other` runs where this one was asked (variant ignored).
    pub fn same_os_arch(&self, other: &Platform) -> bool {
        self.os == other.os && self.arch == other.arch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_match() {
        let p: Platform = "linux/arm64/v8".parse().expect("parse");
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(Platform::default().to_string(), "linux/amd64");
        for bad in ["", "linux", "linux/", "a/b/c/d", "linux/amd 64", "linux/../x"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
        let entry = |arch: &str, variant: Option<&str>| -> Descriptor {
            let mut v = serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "size": 1, "digest": format!("sha256:{}", "0".repeat(64)),
                "platform": {"os": "linux", "architecture": arch},
            });
            if let Some(var) = variant {
                v["platform"]["variant"] = var.into();
            }
            serde_json::from_value(v).expect("descriptor")
        };
        let entries = [entry("arm", Some("v7")), entry("arm64", Some("v8")), entry("amd64", None)];
        assert_eq!(
            Platform::default().select(&entries).map(|d| d.platform().clone()),
            Some(entries[2].platform().clone())
        );
        let arm64: Platform = "linux/arm64".parse().expect("parse");
        assert!(arm64.select(&entries).is_some_and(|d| d.platform() == entries[1].platform()));
        let v6: Platform = "linux/arm/v6".parse().expect("parse");
        assert!(v6.select(&entries).is_none());
    }
}
