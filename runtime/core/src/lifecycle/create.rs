//! `create`: the container exists in its VM, its process stopped before the user program, and
//! the host hooks of create have run. A failure at any step undoes the steps before it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use husk_proto as pb;

use super::shape::{check_fits, vm_shape};
use super::{CreateOpts, Held, Runtime, OCI_VERSION};
use crate::agent::Agent;
use crate::bundle::{self, Bundle, HostHook};
use crate::error::RuntimeError;
use crate::hooks::{self, HookState};
use crate::pod::{self, Role};
use crate::relay::Target;
use crate::share::{self, SHARE_TAG};
use crate::state::{ContainerRecord, SandboxRecord};
use crate::stdio::{self, StdioStrategy};
use crate::vm::{Calls, PowerOff, VmProcess, Vms};
use crate::{mounts, procinfo};

/// Undo list for a create that fails halfway.
struct Partial<A> {
    vm: Option<(SandboxRecord, VmProcess)>,
    mounts: Vec<PathBuf>,
    share_dir: Option<PathBuf>,
    created_in: Option<A>,
}

impl<A> Default for Partial<A> {
    fn default() -> Self {
        Self { vm: None, mounts: Vec::new(), share_dir: None, created_in: None }
    }
}

impl<A: Agent> Partial<A> {
    async fn rollback<V: Vms<Agent = A>>(self, rt: &Runtime<V>, cid: &str) {
        if let Some(a) = &self.created_in {
            if let Err(e) = a.remove_container(cid, true).await {
                tracing::warn!("container {cid}: rolling back: {e}");
            }
        }
        mounts::unmount_all(&self.mounts);
        if let Some(d) = &self.share_dir {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some((rec, process)) = self.vm {
            rt.vms.power_off(&rec, process, PowerOff::Destroy).await;
            if let Err(e) = rt.release_sandbox(&rec.id).await {
                tracing::warn!("sandbox {}: {e}", rec.id);
            }
        }
    }
}

/// The pod's network namespace (a path in the spec: CNI's), wired to taps for the VM. A
/// namespace without a path is the VM's own, with loopback only.
async fn wire_network(bundle: &Bundle) -> Result<Option<crate::network::Wired>, RuntimeError> {
    let nss = bundle.spec.linux().as_ref().and_then(|l| l.namespaces().clone()).unwrap_or_default();
    let Some(path) = nss
        .iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        .and_then(|n| n.path().clone())
    else {
        return Ok(None);
    };
    // A pod peer's namespace (`/proc/<pid>/ns/net`) is its VM's already.
    if crate::namespaces::proc_ns_path(&path).is_some() {
        return Ok(None);
    }
    let wired = tokio::task::spawn_blocking(move || crate::network::wire(&path))
        .await
        .map_err(|e| RuntimeError::Internal(format!("wiring the network: {e}")))??;
    Ok(Some(wired))
}

pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

impl<V: Vms> Runtime<V> {
    /// Creates container `id` from `bundle`. With [`StdioStrategy::Held`] the caller gets the
    /// process's streams back.
    pub async fn create(
        &self,
        id: &str,
        bundle: &Bundle,
        opts: CreateOpts,
    ) -> Result<Option<Held>, RuntimeError> {
        opts.stdio.check(bundle.terminal())?;
        let role = pod::role(&bundle.annotations(), id)?;
        pod::check_namespaces(&bundle.spec, &role)?;
        let lock = self.state.reserve_container_async(id).await?;
        crate::timeline::mark("create: container reserved (lock taken)");
        let mut partial = Partial::default();
        match self.create_reserved(id, bundle, &role, opts, &mut partial).await {
            Ok(held) => {
                drop(lock);
                Ok(held)
            }
            Err(e) => {
                partial.rollback(self, id).await;
                let _ = self.state.remove_container(id);
                drop(lock);
                Err(e)
            }
        }
    }

    async fn create_reserved(
        &self,
        id: &str,
        bundle: &Bundle,
        role: &Role,
        opts: CreateOpts,
        partial: &mut Partial<V::Agent>,
    ) -> Result<Option<Held>, RuntimeError> {
        let sid = role.sandbox_id(id).to_string();
        let (slock, existing) = self.state.lock_sandbox_async(&sid).await?;
        crate::timeline::mark("create: sandbox lock taken");
        let (mut srec, agent) = match (role.starts_vm(), existing) {
            (true, Some(old)) if self.vms.alive(&old) => {
                return Err(RuntimeError::WrongState(format!("sandbox {sid} already exists")))
            }
            (true, old) => {
                if old.is_some() {
                    // A VM that died without a delete: clear what it left.
                    let shared = share::shared_dir(&self.state, &sid);
                    mounts::unmount_under(&shared)?;
                    let _ = std::fs::remove_dir_all(&shared);
                }
                let mut shape = vm_shape(&self.cfg, bundle, &opts)?;
                shape.network = wire_network(bundle).await?;
                let booted = match self.vms.boot(&self.state, &sid, &shape).await {
                    Ok(b) => b,
                    Err(e) => {
                        // The VM never came up: its taps, its CNI network and its directory go.
                        if let Some(w) = shape.network {
                            let _ = tokio::task::spawn_blocking(move || crate::network::unwire(&w)).await;
                        }
                        if let Err(r) = self.release_sandbox(&sid).await {
                            tracing::warn!("sandbox {sid}: {r}");
                        }
                        return Err(e);
                    }
                };
                self.state.write_sandbox(&booted.record)?;
                crate::timeline::mark("create: VM booted and recorded");
                partial.vm = Some((booted.record.clone(), booted.process));
                (booted.record, booted.agent)
            }
            (false, Some(rec)) => {
                let res = bundle.spec.linux().as_ref().and_then(|l| l.resources().as_ref());
                check_fits(id, res, &rec)?;
                let agent = self.vms.connect(&rec, Calls::Bounded).await?;
                (rec, agent)
            }
            (false, None) => {
                // lock_sandbox made the directory; a sandbox that never was leaves nothing.
                let _ = std::fs::remove_dir_all(self.state.sandbox_dir(&sid));
                return Err(RuntimeError::WrongState(format!("sandbox {sid} does not exist")));
            }
        };

        // Pod peers' host PIDs (what clients name in namespace paths) → guest PIDs.
        let peers: HashMap<i32, u32> = srec
            .containers
            .iter()
            .filter_map(|c| self.state.read_container(c).ok())
            .map(|c| (c.client_pid.unwrap_or(c.relay_pid), c.guest_pid))
            .collect();
        let shared = share::shared_dir(&self.state, &sid);
        partial.share_dir = Some(shared.join(id));
        let guest =
            bundle::to_guest(bundle, id, &shared, &peers, opts.rootfs_share.is_none(), role.starts_vm())?;
        partial.mounts = guest.host_mounts.clone();
        let rootfs = match &opts.rootfs_share {
            Some((tag, path)) => pb::Rootfs { share_tag: tag.clone(), path: path.clone() },
            None => pb::Rootfs { share_tag: SHARE_TAG.into(), path: guest.rootfs_rel.clone() },
        };

        let target = Target { vsock: srec.vsock.clone(), container_id: id.into(), exec_id: String::new() };
        let (stdio, relay, streams) =
            stdio::wire(&agent, &target, bundle.terminal(), opts.stdin, &opts.stdio).await?;
        crate::timeline::mark("create: stdio streams opened");
        // Nothing of husk's runs between this create and the start, so the agent does both.
        let start = opts.start
            && matches!(opts.stdio, StdioStrategy::Held { .. })
            && bundle.hooks(HostHook::Prestart).is_empty()
            && bundle.hooks(HostHook::CreateRuntime).is_empty();
        let req = pb::CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: guest.spec_json,
            rootfs: Some(rootfs),
            stdio: Some(stdio),
            start,
        };
        crate::fault::point("create-before-agent");
        let created = agent.create_container(req).await?;
        let (guest_pid, started) = (created.pid, start && created.started);
        partial.created_in = Some(agent.clone());
        crate::fault::point("create-after-agent");
        if role.starts_vm() {
            self.vms.first_container_created(&srec).await;
        }

        let (relay_pid, relay_start) = match &relay {
            Some(r) => (r.pid, r.start),
            None => {
                let me = std::process::id() as i32;
                (me, procinfo::start_time(me).unwrap_or(0))
            }
        };
        let rec = ContainerRecord {
            id: id.into(),
            sandbox_id: sid.clone(),
            bundle: bundle.dir.clone(),
            rootfs: bundle.rootfs.clone(),
            created: now_rfc3339(),
            annotations: bundle.annotations().into_iter().collect::<BTreeMap<_, _>>(),
            relay_pid,
            relay_start,
            guest_pid,
            client_pid: opts.clients_see_guest_pids.then_some(guest_pid as i32),
            host_mounts: guest.host_mounts,
            poststart: bundle.hooks(HostHook::Poststart),
            poststop: bundle.hooks(HostHook::Poststop),
            own_pid_namespace: bundle.own_pid_namespace(),
        };
        self.state.write_container(&rec)?;
        srec.containers.push(id.into());
        self.state.write_sandbox(&srec)?;
        crate::fault::point("create-recorded");
        // From here a failure must also take the container out of the sandbox record.
        let finish = async {
            if let StdioStrategy::Relay { pid_file: Some(p), .. } = &opts.stdio {
                crate::state::write_atomic(p, &relay_pid.to_string())?;
            }
            // runc's order: prestart, then createRuntime, with the state as it is being created.
            let state = HookState {
                oci_version: OCI_VERSION,
                id,
                status: "creating",
                pid: relay_pid,
                bundle: &bundle.dir,
                annotations: &rec.annotations,
            };
            hooks::run("prestart", &bundle.hooks(HostHook::Prestart), &state).await?;
            hooks::run("createRuntime", &bundle.hooks(HostHook::CreateRuntime), &state).await?;
            Ok::<_, RuntimeError>(())
        };
        if let Err(e) = finish.await {
            srec.containers.retain(|c| c != id);
            if let Err(w) = self.state.write_sandbox(&srec) {
                tracing::warn!("sandbox {sid}: {w}");
            }
            return Err(e);
        }
        if let Some(r) = relay {
            r.go()?;
        }
        drop(slock);
        let vm = partial.vm.take().map(|(_, p)| p).unwrap_or_default();
        *partial = Partial::default();
        crate::timeline::mark("create done");
        Ok(streams.map(|guest| Held { target, guest_pid, guest, vm, started }))
    }
}
