//! husk's sandbox core, under every front end (the OCI CLI and `husk run` today, the shim
//! next): sandbox VMs ([`vm`]), the container lifecycle ([`lifecycle`]), spec translation
//! ([`bundle`], [`namespaces`]), host hooks ([`hooks`]), the state store ([`state`]),
//! configuration ([`config`]), stdio strategies ([`stdio`], [`relay`]) and the agent client
//! behind a trait ([`agent`]).

pub mod agent;
pub mod bundle;
pub mod cni;
pub mod config;
pub mod error;
pub mod fault;
pub mod hooks;
pub mod lifecycle;
pub mod mounts;
pub mod namespaces;
pub mod netns;
pub mod network;
pub mod pod;
pub mod procinfo;
pub mod relay;
pub mod share;
pub mod signals;
pub mod state;
pub mod stdio;
pub mod timeline;
pub mod uds;
pub mod vm;

pub use error::RuntimeError;
pub use lifecycle::{CreateOpts, ExecOpts, Held, Runtime};
