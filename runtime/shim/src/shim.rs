//! The shim's own lifecycle, as containerd drives it: `start` (one shim per pod: a pod's
//! containers are grouped by their sandbox id), `delete` (cleanup after a shim that died), and
//! the server that serves the task API until the pod's last container is gone.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, Config, Error, Flags, StartOpts};
use husk_core::config::Config as HuskConfig;
use husk_core::state::StateDir;
use husk_core::vm::husk_vmm::HuskVmm;
use husk_core::{Runtime, RuntimeError};

use crate::events::{timestamp, Events};
use crate::pod::Pod;
use crate::service::Service;

/// Where the shims keep husk's state, one directory per containerd namespace.
const STATE_ROOT: &str = "/run/husk/containerd";

pub struct HuskShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    bundle: String,
    debug: bool,
}

impl std::fmt::Debug for HuskShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HuskShim")
            .field("namespace", &self.namespace)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The lifecycle over this namespace's state directory, with husk's config from `config`
/// (the runtime options' ConfigPath) or its usual places.
pub fn runtime(namespace: &str, config: Option<&Path>) -> Result<Runtime<HuskVmm>, RuntimeError> {
    husk_core::state::check_id(namespace)
        .map_err(|_| RuntimeError::InvalidArgument(format!("containerd namespace {namespace:?}")))?;
    let cfg = HuskConfig::load_from(config)?;
    let state = StateDir::new(Path::new(STATE_ROOT).join(namespace))?;
    Ok(Runtime::new(state, cfg.clone(), HuskVmm { cfg }))
}

/// The shim a container belongs to: its pod's (by the CRI annotations in its spec), else its own.
fn grouping(bundle: &Path, id: &str) -> String {
    let annotations = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<oci_spec::runtime::Spec>(&b).ok())
        .and_then(|s| s.annotations().clone())
        .unwrap_or_default();
    match husk_core::pod::role(&annotations, id) {
        Ok(role) => role.sandbox_id(id).to_string(),
        Err(_) => id.to_string(),
    }
}

fn other(e: impl std::fmt::Display) -> Error {
    Error::Other(e.to_string())
}

#[async_trait]
impl Shim for HuskShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        HuskShim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            debug: args.debug,
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let cwd = std::env::current_dir().map_err(other)?;
        let group = grouping(&cwd, &opts.id);
        let address = spawn(opts, &group, Vec::new()).await?;
        // containerd reads it back from the bundle to reconnect after a restart of its own.
        std::fs::write(cwd.join("address"), &address).map_err(other)?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, Error> {
        // The shim that served this container is gone (killed, say): what it held goes now.
        let rt = runtime(&self.namespace, None).map_err(other)?;
        if let Err(e) = rt.delete_abandoned(&self.id).await {
            eprintln!("husk shim: deleting {}: {e}", self.id);
        }
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().map_err(other)?
        } else {
            self.bundle.clone().into()
        };
        let rootfs = bundle.join("rootfs");
        let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
        Ok(api::DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(timestamp(SystemTime::now())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        crate::logging::init(self.debug);
        let events = Events::new(publisher, self.namespace.clone());
        let ns = self.namespace.clone();
        let make = Box::new(move |config: Option<&Path>| runtime(&ns, config));
        Service { pod: Arc::new(Pod::new(make, events, self.exit.clone())) }
    }
}
