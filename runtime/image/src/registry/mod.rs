//! Pulling from OCI distribution registries: image names as users type them ([`ImageName`]), credentials
//! in the containers auth file format ([`lookup_credentials`] and friends), and a client
//! ([`Registry`]) that fetches raw manifests and blob streams and checks logins.
//!
//! This module only talks to registries; choosing a platform from an index, verifying blobs against
//! their descriptors and storing them is the caller's job.

mod auth;
mod client;
mod login;
mod manifest;
mod name;
mod oci_error;

#[cfg(test)]
pub(crate) mod tests;

pub use auth::{
    default_auth_files, husk_auth_file, lookup_credentials, remove_credentials, store_credentials,
};
pub use client::{BlobStream, FetchedManifest, Registry, RegistryOptions};
pub(crate) use name::check_digest;
pub use name::ImageName;
