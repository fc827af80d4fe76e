//! husk's container images: from a reference the user typed to an unpacked rootfs and what to run in it.
//!
//! Today images come from OCI image layouts on disk (as written by `umoci` or
//! `skopeo copy ... oci:DIR:TAG`):
//!
//! 1. [`parse_reference`] splits `DIR[:TAG]`.
//! 2. [`unpack`] verifies the layout, picks the manifest for the tag (linux/amd64 from an index), checks
//!    every blob's size and sha256, applies the layers to an empty directory and returns the
//!    [`ImageConfig`].
//! 3. [`resolve_user`] turns the config's `User` into a uid and gid from the rootfs's /etc/passwd and
//!    /etc/group.
//!
//! Everything an image holds is untrusted: sizes are capped, digests checked, symlinks in the layout or the
//! rootfs are never followed, and layer entries cannot escape the rootfs. Each module says how.

mod blob;
mod config;
mod error;
mod layout;
mod platform;
mod pull;
mod reference;
pub mod registry;
pub mod store;
mod unpack;
mod users;

#[cfg(test)]
mod testutil;

pub use blob::MAX_JSON;
pub use config::ImageConfig;
pub use error::ImageError;
pub use platform::Platform;
pub use pull::{pull, PullEvent, PullOptions, PullProgress, Silent};
pub use reference::parse_reference;
pub use registry::{
    default_auth_files, husk_auth_file, lookup_credentials, remove_credentials, store_credentials,
    BlobStream, FetchedManifest, ImageName, Registry, RegistryOptions,
};
pub use store::{GcReport, ImageRecord, Snapshot, Store};
pub use unpack::{unpack, unpack_layers, unpack_with_limits, UnpackLimits, UnpackStats};
pub use users::{resolve_user, MAX_USER_DB};
