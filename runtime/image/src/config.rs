//! The image config: what the image says to run.

use std::path::Path;

use oci_spec::image::{Arch, Descriptor, ImageConfiguration, MediaType, Os};
use tracing::warn;

use crate::blob::read_json_blob;
use crate::error::{json_err, ImageError};

const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// What the image says to run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    /// `User` as the image gives it; [`crate::resolve_user`] turns it into a uid and gid.
    pub user: String,
}

/// Whether a media type is an image config's (OCI or Docker schema 2).
pub(crate) fn is_config(media_type: &MediaType) -> bool {
    match media_type {
        MediaType::ImageConfig => true,
        MediaType::Other(s) => s == DOCKER_CONFIG,
        _ => false,
    }
}

/// Reads and verifies the image config blob `desc` and extracts what the image says to run.
pub(crate) fn read_config(layout: &Path, desc: &Descriptor) -> Result<ImageConfig, ImageError> {
    if !is_config(desc.media_type()) {
        return Err(ImageError::UnsupportedMediaType {
            what: "an image config",
            media_type: desc.media_type().to_string(),
        });
    }
    let (bytes, what) = read_json_blob(layout, desc, "image config")?;
    let image: ImageConfiguration = serde_json::from_slice(&bytes).map_err(json_err(&what))?;
    if *image.os() != Os::Linux || *image.architecture() != Arch::Amd64 {
        warn!(os = %image.os(), arch = %image.architecture(), "image is not built for linux/amd64");
    }
    let Some(config) = image.config() else { return Ok(ImageConfig::default()) };
    Ok(ImageConfig {
        env: config.env().clone().unwrap_or_default(),
        entrypoint: config.entrypoint().clone().unwrap_or_default(),
        cmd: config.cmd().clone().unwrap_or_default(),
        working_dir: config.working_dir().clone().unwrap_or_default(),
        user: config.user().clone().unwrap_or_default(),
    })
}
