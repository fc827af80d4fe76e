//! One CNI plugin call: the executable from the bin dirs, the `CNI_*` environment, the config
//! on stdin, and its answer on stdout, with a time limit and bounded output.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{CniError, Command};

/// How long one plugin call may take before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Most a plugin may write on stdout (a result or an error object).
pub const DEFAULT_OUTPUT_LIMIT: usize = 1 << 20;
/// How much of a plugin's stderr is kept for an error message.
const STDERR_LIMIT: usize = 4096;
/// For plugins that run iptables or ip: a caller without PATH still gets them found.
const FALLBACK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The CNI plugins of a host: where they are and how each call is bounded.
#[derive(Debug, Clone)]
pub struct Plugins {
    pub bin_dirs: Vec<PathBuf>,
    pub timeout: Duration,
    pub output_limit: usize,
}

/// What a call is about (the `CNI_*` variables besides the command).
#[derive(Debug, Clone)]
pub struct CallEnv<'a> {
    pub container_id: &'a str,
    /// None on a DEL whose namespace is gone (the spec makes it optional there).
    pub netns: Option<&'a Path>,
    pub ifname: &'a str,
}

impl Plugins {
    pub fn new(bin_dirs: Vec<PathBuf>) -> Self {
        Self { bin_dirs, timeout: DEFAULT_TIMEOUT, output_limit: DEFAULT_OUTPUT_LIMIT }
    }

    fn cni_path(&self) -> String {
        self.bin_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":")
    }

    /// The executable of plugin `kind`: the first bin dir that has it.
    pub fn find(&self, kind: &str) -> Result<PathBuf, CniError> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(kind))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::PluginNotFound { plugin: kind.into(), dirs: self.cni_path() })
    }

    /// Runs plugin `kind` with `stdin`; its result (ADD) or `Value::Null` (DEL, which prints
    /// nothing). A failure is the plugin's error object when it printed one.
    pub async fn call(
        &self,
        kind: &str,
        command: Command,
        env: &CallEnv<'_>,
        stdin: &[u8],
    ) -> Result<Value, CniError> {
        let exe = self.find(kind)?;
        let plugin = kind.to_string();
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.env("CNI_COMMAND", command.as_str())
            .env("CNI_CONTAINERID", env.container_id)
            .env("CNI_IFNAME", env.ifname)
            .env("CNI_PATH", self.cni_path())
            .env_remove("CNI_ARGS")
            .env_remove("CNI_NETNS");
        if let Some(ns) = env.netns {
            cmd.env("CNI_NETNS", ns);
        }
        if std::env::var_os("PATH").is_none() {
            cmd.env("PATH", FALLBACK_PATH);
        }
        // A group of its own: a terminal's Ctrl-C does not cut it off halfway, and a timeout
        // kills whatever it started too.
        cmd.process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| CniError::Exec {
            plugin: plugin.clone(),
            command,
            path: exe.clone(),
            source,
        })?;
        let pid = child.id();
        let (mut input, output, errors) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let limit = self.output_limit;
        let run = async {
            let write = async {
                if let Some(w) = input.as_mut() {
                    // A plugin that exits without reading its config is judged by its exit.
                    let _ = w.write_all(stdin).await;
                }
                drop(input.take());
            };
            let (_, out, err) =
                tokio::join!(write, read_bounded(output, limit), read_bounded(errors, STDERR_LIMIT));
            let status = child.wait().await;
            (status, out, err)
        };
        let (status, out, err) = match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r,
            Err(_) => {
                if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                    let _ =
                        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
                }
                let _ = child.kill().await;
                return Err(CniError::Timeout { plugin, command, secs: self.timeout.as_secs() });
            }
        };
        let status =
            status.map_err(|source| CniError::Exec { plugin: plugin.clone(), command, path: exe, source })?;
        let (out, overflow) = out;
        if overflow {
            return Err(CniError::OutputTooLarge { plugin, command, limit });
        }
        let stderr = String::from_utf8_lossy(&err.0).trim().to_string();
        if !stderr.is_empty() {
            tracing::debug!("CNI plugin {plugin} ({command}) stderr: {stderr}");
        }
        if !status.success() {
            return Err(plugin_error(plugin, command, &out, status.to_string(), stderr));
        }
        match command {
            Command::Del => Ok(Value::Null),
            Command::Add => {
                let v: Value = serde_json::from_slice(&out).map_err(|e| CniError::BadResult {
                    plugin: plugin.clone(),
                    command,
                    reason: e.to_string(),
                })?;
                if !v.is_object() {
                    return Err(CniError::BadResult { plugin, command, reason: "not a JSON object".into() });
                }
                Ok(v)
            }
        }
    }
}

/// The plugin's error object (`code`, `msg`, `details`) if it printed one, else its status.
fn plugin_error(plugin: String, command: Command, out: &[u8], status: String, stderr: String) -> CniError {
    #[derive(serde::Deserialize)]
    struct ErrorObject {
        code: u64,
        #[serde(default)]
        msg: String,
        #[serde(default)]
        details: String,
    }
    match serde_json::from_slice::<ErrorObject>(out) {
        Ok(e) => CniError::Plugin { plugin, command, code: e.code, msg: e.msg, details: e.details },
        Err(_) => CniError::Failed { plugin, command, status, stderr },
    }
}

/// Reads `r` to its end, keeping at most `limit` bytes; whether there was more. Reading goes on
/// past the limit so the writer never blocks on a full pipe.
async fn read_bounded(r: Option<impl AsyncRead + Unpin>, limit: usize) -> (Vec<u8>, bool) {
    let Some(mut r) = r else { return (Vec::new(), false) };
    let (mut kept, mut over) = (Vec::new(), false);
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return (kept, over),
            Ok(n) => {
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                over |= n > room;
            }
        }
    }
}
