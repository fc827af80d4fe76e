//! `containerd-shim-husk-v2`: containerd's runtime `io.containerd.husk.v2`. One shim process
//! and one VM per pod: the pod's sandbox container starts the shim, its other containers are
//! sent to the same shim; every task call goes to husk-core.

mod errors;
mod events;
mod io;
mod logging;
mod metrics;
mod options;
mod pod;
mod service;
mod shim;

/// containerd's runtime type for husk.
pub const RUNTIME_ID: &str = "io.containerd.husk.v2";

#[tokio::main]
async fn main() {
    let config = containerd_shim::Config {
        // husk logs through tracing, to the log FIFO containerd gives the shim.
        no_setup_logger: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<shim::HuskShim>(RUNTIME_ID, Some(config)).await;
}
