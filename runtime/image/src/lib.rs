//! husk's container images: from a name the user typed to an unpacked rootfs and what to run in it.
//!
//! Images come from registries, through the content store, or from OCI image layouts on disk:
//!
//! - [`registry`]: names with Docker's defaults ([`ImageName`]), credentials in the containers
//!   auth-file format, and [`Registry`], the OCI distribution client (on `oci-client`).
//! - [`pull`] resolves a name (through an index to the asked [`Platform`]) and streams the blobs the
//!   [`Store`] lacks into it, verified as they arrive; the store records the image by name.
//! - [`Store::snapshot`] unpacks an image once per layer chain and leases the snapshot to a sandbox;
//!   [`Store::gc`] removes what no image needs.
//! - For layouts (`umoci`, `skopeo copy ... oci:DIR:TAG`): [`parse_reference`] splits `DIR[:TAG]` and
//!   [`unpack`] verifies and unpacks the tagged image into a directory.
//! - [`resolve_user`] turns the config's `User` into a uid and gid from the rootfs's /etc/passwd and
//!   /etc/group.
//!
//! Everything an image or a registry holds is untrusted: sizes are capped, digests checked (blobs,
//! and layers' uncompressed diff IDs), symlinks in the layout or the rootfs are never followed, and
//! layer entries cannot escape the rootfs. Each module says how.

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
pub use users::{home_dir, resolve_user, MAX_USER_DB};
