//! gRPC front: each service method checks nothing itself and forwards to [`Agent`], mapping its
//! errors to statuses.

use std::pin::Pin;
use std::sync::Arc;

use husk_proto as pb;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::agent::Agent;

type Reply<T> = Result<Response<T>, Status>;

#[derive(Clone)]
pub struct Service(pub Arc<Agent>);

fn ok<T>(v: T) -> Reply<T> {
    Ok(Response::new(v))
}

#[tonic::async_trait]
impl pb::sandbox_server::Sandbox for Service {
    async fn create_sandbox(&self, r: Request<pb::CreateSandboxRequest>) -> Reply<pb::Empty> {
        tracing::debug!("rpc create_sandbox");
        self.0.create_sandbox(r.into_inner()).await?;
        ok(pb::Empty {})
    }
    async fn destroy_sandbox(&self, _: Request<pb::Empty>) -> Reply<pb::Empty> {
        tracing::debug!("rpc destroy_sandbox");
        self.0.destroy_sandbox().await?;
        ok(pb::Empty {})
    }
    async fn guest_details(&self, _: Request<pb::Empty>) -> Reply<pb::GuestDetailsResponse> {
        tracing::debug!("rpc guest_details");
        ok(self.0.guest_details())
    }
    async fn set_time(&self, r: Request<pb::SetTimeRequest>) -> Reply<pb::Empty> {
        tracing::debug!("rpc set_time");
        self.0.set_time(r.into_inner().unix_time_ns)?;
        ok(pb::Empty {})
    }
    async fn prepare_snapshot(&self, _: Request<pb::Empty>) -> Reply<pb::PrepareSnapshotResponse> {
        tracing::debug!("rpc prepare_snapshot");
        ok(self.0.prepare_snapshot().await?)
    }
}

#[tonic::async_trait]
impl pb::containers_server::Containers for Service {
    async fn create_container(
        &self,
        r: Request<pb::CreateContainerRequest>,
    ) -> Reply<pb::CreateContainerResponse> {
        let req = r.into_inner();
        let started = req.start;
        let pid = self.0.create_container(req).await?;
        ok(pb::CreateContainerResponse { pid, started })
    }
    async fn start_container(&self, r: Request<pb::ContainerRef>) -> Reply<pb::Empty> {
        tracing::debug!("rpc start_container");
        self.0.start_container(&r.into_inner().container_id).await?;
        ok(pb::Empty {})
    }
    async fn remove_container(&self, r: Request<pb::RemoveContainerRequest>) -> Reply<pb::Empty> {
        tracing::debug!("rpc remove_container");
        let r = r.into_inner();
        self.0.remove_container(&r.container_id, r.force).await?;
        ok(pb::Empty {})
    }
    async fn pause_container(&self, r: Request<pb::ContainerRef>) -> Reply<pb::Empty> {
        tracing::debug!("rpc pause_container");
        self.0.pause(&r.into_inner().container_id, true)?;
        ok(pb::Empty {})
    }
    async fn resume_container(&self, r: Request<pb::ContainerRef>) -> Reply<pb::Empty> {
        tracing::debug!("rpc resume_container");
        self.0.pause(&r.into_inner().container_id, false)?;
        ok(pb::Empty {})
    }
    async fn update_container(&self, r: Request<pb::UpdateContainerRequest>) -> Reply<pb::Empty> {
        tracing::debug!("rpc update_container");
        let r = r.into_inner();
        self.0.update(&r.container_id, &r.resources_json)?;
        ok(pb::Empty {})
    }
    async fn container_stats(&self, r: Request<pb::ContainerRef>) -> Reply<pb::ContainerStatsResponse> {
        tracing::debug!("rpc container_stats");
        ok(self.0.stats(&r.into_inner().container_id)?)
    }
    async fn list_processes(&self, r: Request<pb::ContainerRef>) -> Reply<pb::ListProcessesResponse> {
        tracing::debug!("rpc list_processes");
        ok(pb::ListProcessesResponse { processes: self.0.processes(&r.into_inner().container_id)? })
    }
    async fn list_containers(&self, _: Request<pb::Empty>) -> Reply<pb::ListContainersResponse> {
        tracing::debug!("rpc list_containers");
        ok(pb::ListContainersResponse { containers: self.0.list() })
    }
}

#[tonic::async_trait]
impl pb::processes_server::Processes for Service {
    async fn exec_process(&self, r: Request<pb::ExecProcessRequest>) -> Reply<pb::ExecProcessResponse> {
        tracing::debug!("rpc exec_process");
        let pid = self.0.exec(r.into_inner()).await?;
        ok(pb::ExecProcessResponse { pid })
    }
    async fn signal_process(&self, r: Request<pb::SignalProcessRequest>) -> Reply<pb::Empty> {
        tracing::debug!("rpc signal_process");
        self.0.signal(&r.into_inner())?;
        ok(pb::Empty {})
    }
    async fn wait_process(&self, r: Request<pb::ProcessRef>) -> Reply<pb::ExitStatus> {
        tracing::debug!("rpc wait_process");
        let r = r.into_inner();
        ok(self.0.wait(&r.container_id, &r.exec_id).await?.into())
    }
    async fn resize_tty(&self, r: Request<pb::ResizeTtyRequest>) -> Reply<pb::Empty> {
        tracing::debug!("rpc resize_tty");
        self.0.resize(&r.into_inner())?;
        ok(pb::Empty {})
    }
    async fn close_stdin(&self, r: Request<pb::ProcessRef>) -> Reply<pb::Empty> {
        tracing::debug!("rpc close_stdin");
        let r = r.into_inner();
        self.0.close_stdin(&r.container_id, &r.exec_id)?;
        ok(pb::Empty {})
    }
}

#[tonic::async_trait]
impl pb::events_server::Events for Service {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn subscribe(&self, _: Request<pb::Empty>) -> Reply<Self::SubscribeStream> {
        tracing::debug!("rpc subscribe");
        let stream = BroadcastStream::new(self.0.events.subscribe()).map(|e| match e {
            Ok(ev) => Ok(ev),
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                Err(Status::resource_exhausted(format!("subscriber fell behind; {n} events dropped")))
            }
        });
        ok(Box::pin(stream))
    }
}

#[tonic::async_trait]
impl pb::health_server::Health for Service {
    async fn check(&self, _: Request<pb::Empty>) -> Reply<pb::HealthResponse> {
        tracing::debug!("rpc check");
        ok(pb::HealthResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            api_version: pb::API_VERSION,
            init_started_ns: self.0.init_started_ns.load(std::sync::atomic::Ordering::Relaxed),
            agent_ready_ns: self.0.ready_ns.load(std::sync::atomic::Ordering::Relaxed),
            guest_now_ns: crate::init::boottime_ns(),
        })
    }
}
