//! A client for husk-agent, dialled through the VMM's hybrid vsock socket (or the agent's host
//! mode socket, which speaks the same handshake).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use husk_proto::containers_client::ContainersClient;
use husk_proto::events_client::EventsClient;
use husk_proto::health_client::HealthClient;
use husk_proto::processes_client::ProcessesClient;
use husk_proto::sandbox_client::SandboxClient;
use husk_proto::{AGENT_PORT, STDIO_PORT};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("dialling {path} port {port}: {source}")]
    Dial {
        path: PathBuf,
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent did not answer on {path} within {waited:?}: {last}")]
    NotReady { path: PathBuf, waited: Duration, last: String },
    #[error("stdio stream {name}: {reason}")]
    Stdio { name: String, reason: String },
    #[error(
        "the agent at {path} speaks API version {agent} (husk-agent {agent_version}), this runtime \
         {runtime}: the guest initramfs does not match this husk (rebuild or reinstall both)"
    )]
    ApiVersion { path: PathBuf, agent: u32, agent_version: String, runtime: u32 },
    #[error("gRPC channel: {0}")]
    Channel(#[from] tonic::transport::Error),
    #[error(transparent)]
    Rpc(#[from] tonic::Status),
}

/// Longest handshake answer read (`OK <port>\n` or `ERR <reason>\n`).
const MAX_ANSWER: usize = 512;

/// Connects to guest `port` through the hybrid vsock socket at `uds`: `CONNECT <port>\n`, then
/// one answer line (`OK ...`).
pub async fn dial(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = crate::uds::connect(uds).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    let line = read_line(&mut s).await?;
    if line.starts_with("OK") {
        Ok(s)
    } else {
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, format!("port {port}: {line:?}")))
    }
}

/// Reads one `\n`-terminated line byte by byte, so no payload after it is consumed.
async fn read_line(s: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = match s.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "closed before answering",
                ))
            }
            Err(e) => return Err(e),
        };
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() == MAX_ANSWER {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "handshake answer too long"));
        }
        line.push(b);
    }
}

/// Refuses an agent whose API version is not this runtime's.
fn check_api(uds: &Path, h: &husk_proto::HealthResponse) -> Result<(), ClientError> {
    if h.api_version == husk_proto::API_VERSION {
        Ok(())
    } else {
        Err(ClientError::ApiVersion {
            path: uds.to_path_buf(),
            agent: h.api_version,
            agent_version: h.agent_version.clone(),
            runtime: husk_proto::API_VERSION,
        })
    }
}

/// The agent's services over one HTTP/2 connection.
#[derive(Clone)]
pub struct AgentClient {
    uds: PathBuf,
    pub sandbox: SandboxClient<Channel>,
    pub containers: ContainersClient<Channel>,
    pub processes: ProcessesClient<Channel>,
    pub events: EventsClient<Channel>,
    pub health: HealthClient<Channel>,
}

impl AgentClient {
    /// Connects, retrying until the agent answers a health check or `timeout` passes (the
    /// guest may still be booting: the VMM resets connections to ports nobody listens on).
    pub async fn connect(uds: &Path, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_with(uds, timeout, None).await
    }

    /// As [`connect`](Self::connect), with every call on the client failing after `rpc_timeout`
    /// instead of waiting for ever on a stalled guest. Not for calls that last as long as a
    /// process (WaitProcess, event streams).
    pub async fn connect_with(
        uds: &Path,
        timeout: Duration,
        rpc_timeout: Option<Duration>,
    ) -> Result<Self, ClientError> {
        let start = Instant::now();
        loop {
            let last = match Self::try_connect(uds, rpc_timeout).await {
                // Bounded too: a guest that accepted the connection but hangs must not keep
                // this loop from its deadline.
                Ok(mut c) => match tokio::time::timeout(
                    timeout.saturating_sub(start.elapsed()).max(Duration::from_secs(1)),
                    c.health.check(husk_proto::Empty {}),
                )
                .await
                {
                    // A mismatched agent will not change by waiting: refused at once.
                    Ok(Ok(r)) => return check_api(uds, &r.into_inner()).map(|()| c),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer to the health check".to_string(),
                },
                Err(e) => e.to_string(),
            };
            if start.elapsed() >= timeout {
                return Err(ClientError::NotReady { path: uds.to_path_buf(), waited: start.elapsed(), last });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn try_connect(uds: &Path, rpc_timeout: Option<Duration>) -> Result<Self, ClientError> {
        let path = uds.to_path_buf();
        // The URI is a placeholder: every connection goes through the connector.
        let mut endpoint = Endpoint::from_static("http://husk-agent");
        if let Some(t) = rpc_timeout {
            endpoint = endpoint.timeout(t);
        }
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
        })
    }

    /// Opens a stdio stream named `name` for a later create or exec request.
    pub async fn open_stdio(&self, name: &str) -> Result<UnixStream, ClientError> {
        let mut s = dial(&self.uds, STDIO_PORT).await.map_err(|source| ClientError::Dial {
            path: self.uds.clone(),
            port: STDIO_PORT,
            source,
        })?;
        s.write_all(format!("STDIO {name}\n").as_bytes())
            .await
            .map_err(|e| ClientError::Stdio { name: name.into(), reason: e.to_string() })?;
        let answer = read_line(&mut s)
            .await
            .map_err(|e| ClientError::Stdio { name: name.into(), reason: e.to_string() })?;
        if answer == "OK" {
            Ok(s)
        } else {
            Err(ClientError::Stdio { name: name.into(), reason: answer })
        }
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
        let ok = husk_proto::HealthResponse {
            agent_version: "0.1.0".into(),
            api_version: husk_proto::API_VERSION,
        };
        assert!(check_api(Path::new("/s"), &ok).is_ok());
        let old = husk_proto::HealthResponse {
            agent_version: "0.0.9".into(),
            api_version: husk_proto::API_VERSION + 1,
        };
        let e = check_api(Path::new("/s"), &old).expect_err("mismatch").to_string();
        assert!(e.contains("API version") && e.contains("0.0.9"), "{e}");
    }
}
