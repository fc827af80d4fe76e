//! The parts of husk-agent that need no guest: the checks on what requests carry and the
//! conversion of the host's OCI spec into the one the guest runs. The `husk-agent` binary
//! uses them from here; the library exists so that fuzz targets (`agent/fuzz`) can call the
//! same code on arbitrary input.

pub mod cgroup;
pub mod confine;
pub mod error;
pub mod network;
pub mod propagation;
pub mod spec;
pub mod validate;
