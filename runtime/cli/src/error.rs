//! The CLI's errors: the core's, and the image library's (for `husk run --image`).

use husk_core::RuntimeError;
use husk_image::ImageError;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Core(#[from] RuntimeError),
    #[error("image: {0}")]
    Image(#[from] ImageError),
}
