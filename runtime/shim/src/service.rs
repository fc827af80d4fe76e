//! The task API (v2) as containerd calls it: each call converts its wire types and calls the
//! pod; errors become ttrpc statuses with the codes containerd acts on.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::{self, Status as TaskStatus};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{Task, TtrpcContext, TtrpcResult};
use husk_core::agent::Status;
use husk_core::vm::husk_vmm::HuskVmm;
use husk_core::vm::Vms;

use crate::errors::{status, to_ttrpc};
use crate::events::timestamp;
use crate::io::Stdio;
use crate::pod::Pod;

#[derive(Debug)]
pub struct Service<V: Vms = HuskVmm> {
    pub pod: Arc<Pod<V>>,
}

impl<V: Vms> Clone for Service<V> {
    fn clone(&self) -> Self {
        Self { pod: self.pod.clone() }
    }
}

fn task_status(s: Status) -> TaskStatus {
    match s {
        Status::Created => TaskStatus::CREATED,
        Status::Running => TaskStatus::RUNNING,
        Status::Paused => TaskStatus::PAUSED,
        Status::Stopped => TaskStatus::STOPPED,
    }
}

#[async_trait]
impl<V: Vms> Task for Service<V> {
    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let s = self.pod.state(&req.id, &req.exec_id).await.map_err(to_ttrpc)?;
        Ok(api::StateResponse {
            id: req.id,
            exec_id: req.exec_id,
            bundle: s.bundle.display().to_string(),
            pid: s.pid,
            status: task_status(s.status).into(),
            stdin: s.stdio.stdin,
            stdout: s.stdio.stdout,
            stderr: s.stdio.stderr,
            terminal: s.stdio.terminal,
            exit_status: s.exit.map(|e| e.code).unwrap_or(0),
            exited_at: s.exit.map(|e| timestamp(e.at)).into(),
            ..Default::default()
        })
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(status(Code::UNIMPLEMENTED, "husk cannot restore a checkpoint"));
        }
        let stdio =
            Stdio { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal };
        let opts =
            crate::options::parse(req.options.as_ref()).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        let pid = self
            .pod
            .create(&req.id, Path::new(&req.bundle), &req.rootfs, stdio, &opts)
            .await
            .map_err(to_ttrpc)?;
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let pid = self.pod.start(&req.id, &req.exec_id).await.map_err(to_ttrpc)?;
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let (pid, exit) = self.pod.delete(&req.id, &req.exec_id).await.map_err(to_ttrpc)?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.code,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let procs = self.pod.rt().await.map_err(to_ttrpc)?.processes(&req.id).await.map_err(to_ttrpc)?;
        Ok(api::PidsResponse {
            processes: procs.iter().map(|p| ProcessInfo { pid: p.pid, ..Default::default() }).collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.pod.rt().await.map_err(to_ttrpc)?.pause(&req.id).await.map_err(to_ttrpc)?;
        self.pod.events.paused(&req.id).await;
        Ok(api::Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.pod.rt().await.map_err(to_ttrpc)?.resume(&req.id).await.map_err(to_ttrpc)?;
        self.pod.events.resumed(&req.id).await;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(status(Code::UNIMPLEMENTED, "husk does not checkpoint containers (the VM snapshot work will)"))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.pod.kill(&req.id, &req.exec_id, req.signal, req.all).await.map_err(to_ttrpc)?;
        Ok(api::Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let spec = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec).map_err(|e| {
            status(Code::INVALID_ARGUMENT, format!("exec {}: process spec: {e}", req.exec_id))
        })?;
        let stdio =
            Stdio { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal };
        self.pod.exec(&req.id, &req.exec_id, spec, stdio).await.map_err(to_ttrpc)?;
        Ok(api::Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        self.pod.resize(&req.id, &req.exec_id, req.height, req.width).await.map_err(to_ttrpc)?;
        Ok(api::Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        if req.stdin {
            self.pod.close_stdin(&req.id, &req.exec_id).await.map_err(to_ttrpc)?;
        }
        Ok(api::Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let value = req.resources.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&value)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("update {}: resources: {e}", req.id)))?;
        self.pod.rt().await.map_err(to_ttrpc)?.update(&req.id, value).await.map_err(to_ttrpc)?;
        Ok(api::Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let exit = self.pod.wait(&req.id, &req.exec_id).await.map_err(to_ttrpc)?;
        Ok(api::WaitResponse {
            exit_status: exit.code,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let s = self.pod.rt().await.map_err(to_ttrpc)?.stats(&req.id).await.map_err(to_ttrpc)?;
        let any = crate::metrics::to_any(&s).map_err(|e| status(Code::INTERNAL, e))?;
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pod.init_pid(&req.id).unwrap_or(0),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // One shim serves the whole pod: it goes with the pod's last container.
        if self.pod.is_empty() {
            self.pod.exit.signal();
        }
        Ok(api::Empty::new())
    }
}
