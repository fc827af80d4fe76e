//! The gRPC client of husk-agent, dialled through the VMM's hybrid vsock socket (or the agent's
//! host mode socket, which speaks the same handshake).

use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use husk_proto as pb;
use husk_proto::containers_client::ContainersClient;
use husk_proto::events_client::EventsClient;
use husk_proto::handshake;
use husk_proto::health_client::HealthClient;
use husk_proto::processes_client::ProcessesClient;
use husk_proto::sandbox_client::SandboxClient;
use husk_proto::{AGENT_PORT, STDIO_PORT};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use super::{Agent, AgentError, AgentResult, Events, Status};

/// How many events wait for a slow reader before the stream pauses.
const EVENT_BUFFER: usize = 64;

fn refused(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionRefused, what)
}

/// Reads one handshake reply byte by byte, so no payload after its newline is consumed.
async fn read_reply(s: &mut UnixStream) -> std::io::Result<handshake::Reply> {
    let mut line = handshake::LineReader::new();
    loop {
        let b = match s.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(refused("closed before answering".into()))
            }
            Err(e) => return Err(e),
        };
        match line.push_byte(b) {
            Ok(Some(l)) => {
                return handshake::Reply::parse_line(&l)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            }
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
    }
}

/// Connects to guest `port` through the hybrid vsock socket at `uds`.
pub async fn dial(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = crate::uds::connect(uds).await?;
    s.write_all(&handshake::Request::Connect(port).encode()).await?;
    match read_reply(&mut s).await? {
        handshake::Reply::Ok(_) => {
            crate::timeline::mark("vsock: agent port connected");
            Ok(s)
        }
        handshake::Reply::Err(why) => Err(refused(format!("port {port}: {why}"))),
    }
}

/// Refuses an agent whose API version is not this runtime's.
fn check_api(uds: &Path, h: &pb::HealthResponse) -> Result<(), AgentError> {
    if h.api_version == pb::API_VERSION {
        Ok(())
    } else {
        Err(AgentError::ApiVersion {
            path: uds.to_path_buf(),
            agent: h.api_version,
            agent_version: h.agent_version.clone(),
            runtime: pb::API_VERSION,
        })
    }
}

/// Pause between connection tries to an agent that should be up.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Pause between tries while a booting agent's announcement has not come (it may be lost: the
/// announcement is a hint, the health check is what counts).
const READY_FALLBACK: Duration = Duration::from_millis(500);

/// The pause before the next connection try: [`RETRY_PAUSE`], or with `ready` (a booting VM's
/// announcement listener) until the announcement comes or [`READY_FALLBACK`] passes. Gives the
/// listener back while the announcement is still to come.
async fn pause_before_retry(ready: Option<tokio::net::UnixListener>) -> Option<tokio::net::UnixListener> {
    let Some(l) = ready else {
        tokio::time::sleep(RETRY_PAUSE).await;
        return None;
    };
    tokio::select! {
        r = l.accept() => {
            match r {
                Ok(_) => crate::timeline::mark("agent: announced it serves"),
                Err(e) => tracing::debug!("ready listener: {e}"),
            }
            None
        }
        () = tokio::time::sleep(READY_FALLBACK) => Some(l),
    }
}

/// The agent's services over one HTTP/2 connection.
#[derive(Clone, Debug)]
pub struct GrpcAgent {
    uds: PathBuf,
    sandbox: SandboxClient<Channel>,
    containers: ContainersClient<Channel>,
    processes: ProcessesClient<Channel>,
    events: EventsClient<Channel>,
    health: HealthClient<Channel>,
    /// The guest's clock as its first health answer gave it, when timings are collected.
    guest_clock: Option<crate::timeline::GuestClock>,
    /// Longest a call through this handle may take (None: as long as it lasts). Per handle,
    /// not per connection, so bounded and long calls can share one connection.
    call_timeout: Option<Duration>,
}

impl GrpcAgent {
    /// Connects to an agent known to serve (a running sandbox's, whose API was checked when
    /// its VM started, or one restored from a checked template): the guest accepting the
    /// connection is enough, no request is spent on a health check. Retries until `timeout`
    /// passes (the VMM resets connections to ports nobody listens on). With `rpc_timeout`
    /// every call fails after it instead of waiting for ever on a stalled guest; leave it out
    /// for calls that last as long as a process (waits, event streams).
    pub async fn connect(uds: &Path, timeout: Duration, rpc_timeout: Option<Duration>) -> AgentResult<Self> {
        let start = Instant::now();
        // A VMM restoring a snapshot binds its socket once its devices are back: dialling
        // before that only fails, and costs the CPU the restore needs.
        if !uds.exists() {
            crate::uds::wait_for(uds, timeout).await;
        }
        loop {
            // Bounded: a VMM that takes the connection but never answers its handshake must
            // not keep this loop from its deadline.
            let left = timeout.saturating_sub(start.elapsed()).max(Duration::from_secs(1));
            let last = match tokio::time::timeout(left, Self::try_connect(uds, rpc_timeout)).await {
                Ok(Ok(c)) => {
                    crate::timeline::mark("agent connected (one connection)");
                    return Ok(c);
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer to the connection".to_string(),
            };
            if start.elapsed() >= timeout {
                return Err(AgentError::NotReady { path: uds.to_path_buf(), waited: start.elapsed(), last });
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Connects to an agent that is booting (or not known yet), retrying until it answers a
    /// health check with this runtime's API version or `timeout` passes. With `ready` (the
    /// listener at `<uds>_<READY_PORT>`) the first try waits for the agent's announcement,
    /// and tries are [`READY_FALLBACK`] apart until it comes, instead of [`RETRY_PAUSE`]:
    /// every try reaches into the booting guest.
    pub async fn connect_when_ready(
        uds: &Path,
        timeout: Duration,
        rpc_timeout: Option<Duration>,
        mut ready: Option<tokio::net::UnixListener>,
    ) -> AgentResult<Self> {
        let start = Instant::now();
        if ready.is_some() {
            ready = pause_before_retry(ready).await;
        }
        loop {
            let last = match Self::try_connect(uds, rpc_timeout).await {
                // Bounded too: a guest that accepted the connection but hangs must not keep
                // this loop from its deadline.
                Ok(mut c) => match tokio::time::timeout(
                    timeout.saturating_sub(start.elapsed()).max(Duration::from_secs(1)),
                    c.health.check(pb::Empty {}),
                )
                .await
                {
                    // A mismatched agent will not change by waiting: refused at once.
                    Ok(Ok(r)) => {
                        let h = r.into_inner();
                        check_api(uds, &h)?;
                        if crate::timeline::enabled() {
                            let now = crate::timeline::now_ns();
                            crate::timeline::mark_at("agent connected (one connection + health check)", now);
                            c.guest_clock = Some(crate::timeline::GuestClock {
                                init_started_ns: h.init_started_ns,
                                agent_ready_ns: h.agent_ready_ns,
                                guest_now_ns: h.guest_now_ns,
                                host_reply_ns: now,
                            });
                        }
                        return Ok(c);
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer to the health check".to_string(),
                },
                Err(e) => e.to_string(),
            };
            if start.elapsed() >= timeout {
                return Err(AgentError::NotReady { path: uds.to_path_buf(), waited: start.elapsed(), last });
            }
            ready = pause_before_retry(ready).await;
        }
    }

    async fn try_connect(uds: &Path, rpc_timeout: Option<Duration>) -> AgentResult<Self> {
        let path = uds.to_path_buf();
        // The URI is a placeholder: every connection goes through the connector.
        let endpoint = Endpoint::from_static("http://husk-agent");
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { dial(&path, AGENT_PORT).await.map(TokioIo::new) }
            }))
            .await?;
        Ok(Self {
            uds: uds.to_path_buf(),
            sandbox: SandboxClient::new(channel.clone()),
            containers: ContainersClient::new(channel.clone()),
            processes: ProcessesClient::new(channel.clone()),
            events: EventsClient::new(channel.clone()),
            health: HealthClient::new(channel),
            guest_clock: None,
            call_timeout: rpc_timeout,
        })
    }

    /// This connection, with calls bounded by `t` (or not, with None).
    pub fn with_call_timeout(&self, t: Option<Duration>) -> Self {
        Self { call_timeout: t, ..self.clone() }
    }

    /// One request, bounded by this handle's call timeout; with timings on, its answer is a
    /// point of the timeline.
    async fn call<T>(
        &self,
        name: &'static str,
        request: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> AgentResult<tonic::Response<T>> {
        let r = match self.call_timeout {
            Some(t) => tokio::time::timeout(t, request)
                .await
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded(format!("no answer in {t:?}")))),
            None => request.await,
        };
        if crate::timeline::enabled() {
            crate::timeline::mark(&format!("agent: {name} answered"));
        }
        r.map_err(AgentError::rpc(name))
    }

    /// Readies a template VM's guest to be snapshotted (see the agent's `PrepareSnapshot`).
    pub async fn prepare_snapshot(&self) -> AgentResult<pb::PrepareSnapshotResponse> {
        let r = self.call("PrepareSnapshot", self.sandbox.clone().prepare_snapshot(pb::Empty {})).await?;
        Ok(r.into_inner())
    }

    /// The guest's clock as this connection's health answer gave it (timings on only).
    pub fn guest_clock(&self) -> Option<crate::timeline::GuestClock> {
        self.guest_clock
    }

    /// The raw tonic clients, for tools that test the agent's wire API itself (the runtime
    /// goes through [`Agent`]).
    pub fn raw(&self) -> RawClients {
        RawClients {
            sandbox: self.sandbox.clone(),
            containers: self.containers.clone(),
            processes: self.processes.clone(),
            events: self.events.clone(),
            health: self.health.clone(),
            agent: self.clone(),
        }
    }

    fn cref(id: &str) -> pb::ContainerRef {
        pb::ContainerRef { container_id: id.into() }
    }
}

/// See [`GrpcAgent::raw`].
#[derive(Clone, Debug)]
pub struct RawClients {
    pub sandbox: SandboxClient<Channel>,
    pub containers: ContainersClient<Channel>,
    pub processes: ProcessesClient<Channel>,
    pub events: EventsClient<Channel>,
    pub health: HealthClient<Channel>,
    agent: GrpcAgent,
}

impl RawClients {
    /// Opens a stdio stream, as an async stream.
    pub async fn open_stdio(&self, name: &str) -> AgentResult<UnixStream> {
        let s = self.agent.open_stdio(name).await?;
        let stdio_err = |source| AgentError::Stdio { name: name.into(), source };
        s.set_nonblocking(true).map_err(stdio_err)?;
        UnixStream::from_std(s).map_err(stdio_err)
    }
}

impl Agent for GrpcAgent {
    async fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> AgentResult<()> {
        self.call("CreateSandbox", self.sandbox.clone().create_sandbox(req)).await?;
        Ok(())
    }

    async fn destroy_sandbox(&self) -> AgentResult<()> {
        self.call("DestroySandbox", self.sandbox.clone().destroy_sandbox(pb::Empty {})).await?;
        Ok(())
    }

    async fn create_container(
        &self,
        req: pb::CreateContainerRequest,
    ) -> AgentResult<pb::CreateContainerResponse> {
        let r = self.call("CreateContainer", self.containers.clone().create_container(req)).await?;
        Ok(r.into_inner())
    }

    async fn start_container(&self, id: &str) -> AgentResult<()> {
        self.call("StartContainer", self.containers.clone().start_container(Self::cref(id))).await?;
        Ok(())
    }

    async fn container_status(&self, id: &str) -> AgentResult<Option<Status>> {
        let l = self
            .call("ListContainers", self.containers.clone().list_containers(pb::Empty {}))
            .await?
            .into_inner();
        l.containers.iter().find(|c| c.container_id == id).map(|c| Status::from_wire(c.status)).transpose()
    }

    async fn remove_container(&self, id: &str, force: bool) -> AgentResult<()> {
        let req = pb::RemoveContainerRequest { container_id: id.into(), force };
        self.call("RemoveContainer", self.containers.clone().remove_container(req)).await?;
        Ok(())
    }

    async fn pause_container(&self, id: &str) -> AgentResult<()> {
        self.call("PauseContainer", self.containers.clone().pause_container(Self::cref(id))).await?;
        Ok(())
    }

    async fn resume_container(&self, id: &str) -> AgentResult<()> {
        self.call("ResumeContainer", self.containers.clone().resume_container(Self::cref(id))).await?;
        Ok(())
    }

    async fn update_container(&self, id: &str, resources_json: Vec<u8>) -> AgentResult<()> {
        let req = pb::UpdateContainerRequest { container_id: id.into(), resources_json };
        self.call("UpdateContainer", self.containers.clone().update_container(req)).await?;
        Ok(())
    }

    async fn list_processes(&self, id: &str) -> AgentResult<Vec<pb::ProcessInfo>> {
        let r = self.call("ListProcesses", self.containers.clone().list_processes(Self::cref(id))).await?;
        Ok(r.into_inner().processes)
    }

    async fn container_stats(&self, id: &str) -> AgentResult<pb::ContainerStatsResponse> {
        let r = self.call("ContainerStats", self.containers.clone().container_stats(Self::cref(id))).await?;
        Ok(r.into_inner())
    }

    async fn exec_process(&self, req: pb::ExecProcessRequest) -> AgentResult<u32> {
        let r = self.call("ExecProcess", self.processes.clone().exec_process(req)).await?;
        Ok(r.into_inner().pid)
    }

    async fn signal_process(&self, req: pb::SignalProcessRequest) -> AgentResult<()> {
        self.call("SignalProcess", self.processes.clone().signal_process(req)).await?;
        Ok(())
    }

    async fn wait_process(&self, p: pb::ProcessRef) -> AgentResult<pb::ExitStatus> {
        let r = self.call("WaitProcess", self.processes.clone().wait_process(p)).await?;
        Ok(r.into_inner())
    }

    async fn resize_tty(&self, req: pb::ResizeTtyRequest) -> AgentResult<()> {
        self.call("ResizeTty", self.processes.clone().resize_tty(req)).await?;
        Ok(())
    }

    async fn close_stdin(&self, p: pb::ProcessRef) -> AgentResult<()> {
        self.call("CloseStdin", self.processes.clone().close_stdin(p)).await?;
        Ok(())
    }

    async fn subscribe(&self) -> AgentResult<Events> {
        let mut stream =
            self.call("Subscribe", self.events.clone().subscribe(pb::Empty {})).await?.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(EVENT_BUFFER);
        tokio::spawn(async move {
            loop {
                let item = match stream.message().await {
                    Ok(Some(ev)) => Ok(ev),
                    Ok(None) => return,
                    Err(status) => Err(AgentError::Rpc { call: "Subscribe", status }),
                };
                let last = item.is_err();
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn open_stdio(&self, name: &str) -> AgentResult<StdUnixStream> {
        let stdio_err = |source| AgentError::Stdio { name: name.into(), source };
        let mut s = dial(&self.uds, STDIO_PORT).await.map_err(|source| AgentError::Dial {
            path: self.uds.clone(),
            port: STDIO_PORT,
            source,
        })?;
        s.write_all(&handshake::Request::Stdio(name.into()).encode()).await.map_err(stdio_err)?;
        match read_reply(&mut s).await.map_err(stdio_err)? {
            handshake::Reply::Ok(_) => {}
            handshake::Reply::Err(why) => return Err(stdio_err(refused(why))),
        }
        let s = s.into_std().map_err(stdio_err)?;
        s.set_nonblocking(false).map_err(stdio_err)?;
        Ok(s)
    }
}

/// A stream name unique within this process.
pub fn stream_name(purpose: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{purpose}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatched_agent_is_refused_plainly() {
        let ok = pb::HealthResponse {
            agent_version: "0.1.0".into(),
            api_version: pb::API_VERSION,
            ..Default::default()
        };
        assert!(check_api(Path::new("/s"), &ok).is_ok());
        let old = pb::HealthResponse {
            agent_version: "0.0.9".into(),
            api_version: pb::API_VERSION + 1,
            ..Default::default()
        };
        let e = check_api(Path::new("/s"), &old).expect_err("mismatch").to_string();
        assert!(e.contains("API version") && e.contains("0.0.9"), "{e}");
    }
}
