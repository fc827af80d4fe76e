//! A CRI client that drives containerd's CRI plugin as kubelet does, for the Kubernetes
//! end-to-end test (run inside the test host):
//!
//! - `husk-cri-probe images OUTDIR PAUSE BUSYBOX` writes two image archives for `ctr images
//!   import`: `husk.test/pause:1` (`FROM scratch`, only `/pause`) and `husk.test/bb:1` (busybox,
//!   nginx-style log links to `/dev/stdout` and `/dev/stderr`, a setuid-root `/bin/suid-euid`).
//! - `husk-cri-probe run SOCKET HANDLER LONG-ROOT-HANDLER` runs each check as its own pod and
//!   prints `@@<CHECK> ok (<s> s)` or `@@<CHECK> FAIL (<s> s) <why>`, then `@@PROBE-DONE`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

const PAUSE_IMAGE: &str = "husk.test/pause:1";
const BB_IMAGE: &str = "husk.test/bb:1";
/// Handlers configured in the test's containerd config: containerd's defaults, and the same
/// with a state root of over 80 characters.
/// The runtime handlers the checks use: (most checks, checks on the long state root).
static HANDLERS: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

fn handler() -> &'static str {
    HANDLERS.get().map(|h| h.0.as_str()).unwrap_or("husk")
}

fn handler_long_root() -> &'static str {
    HANDLERS.get().map(|h| h.1.as_str()).unwrap_or("husk-long")
}
const WORK: &str = "/var/cri";
/// The private subnet of the test's CNI bridge (tests/cri.rs), as a prefix of its addresses.
const POD_SUBNET_PREFIX: &str = "10.213.7.";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = match args.get(1).map(String::as_str) {
        Some("images") if args.len() == 5 => {
            images(Path::new(&args[2]), Path::new(&args[3]), Path::new(&args[4]))
        }
        Some("run") if args.len() == 5 => {
            let _ = HANDLERS.set((args[3].clone(), args[4].clone()));
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(run(&args[2])))
        }
        Some("bench") if args.len() >= 5 => match args[3].parse::<usize>() {
            Ok(n) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(bench(&args[2], n, &args[4..]))),
            Err(_) => Err(anyhow!("bench: N must be a number")),
        },
        _ => Err(anyhow!(
            "usage: husk-cri-probe images OUTDIR PAUSE BUSYBOX | run SOCKET HANDLER LONG-ROOT-HANDLER \
             | bench SOCKET N HANDLER..."
        )),
    };
    if let Err(e) = r {
        println!("@@PROBE-ERROR {e:#}");
        std::process::exit(1);
    }
}

// ---- image archives ---------------------------------------------------------------------------

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

enum Entry<'a> {
    Dir(&'a str),
    File { path: &'a str, src: &'a Path, mode: u32 },
    Text(&'a str, &'a str),
    Link(&'a str, &'a str),
}

fn layer(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty())?;
            }
            Entry::File { path, src, mode } => {
                let data = std::fs::read(src).with_context(|| src.display().to_string())?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Text(path, text) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(text.len() as u64);
                b.append_data(&mut h, path, text.as_bytes())?;
            }
            Entry::Link(path, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, target)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// A docker-archive tar (what `ctr images import` reads) of one layer.
fn archive(out: &Path, tag: &str, layer: &[u8], config: serde_json::Value) -> Result<()> {
    let diff_id = format!("sha256:{}", hex(Sha256::digest(layer)));
    let mut config = config;
    config["architecture"] = "amd64".into();
    config["os"] = "linux".into();
    config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": [diff_id]});
    let config = serde_json::to_vec(&config)?;
    let config_name = format!("{}.json", hex(Sha256::digest(&config)));
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": config_name, "RepoTags": [tag], "Layers": ["layer/layer.tar"]}
    ]))?;
    let mut b = tar::Builder::new(std::fs::File::create(out)?);
    for (name, data) in
        [(config_name.as_str(), config.as_slice()), ("layer/layer.tar", layer), ("manifest.json", &manifest)]
    {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data)?;
    }
    b.into_inner()?.flush()?;
    Ok(())
}

fn images(out: &Path, pause: &Path, busybox: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let pause_layer = layer(&[Entry::File { path: "pause", src: pause, mode: 0o755 }])?;
    archive(
        &out.join("pause.tar"),
        PAUSE_IMAGE,
        &pause_layer,
        serde_json::json!({"config": {"Entrypoint": ["/pause"]}}),
    )?;

    let applets = std::process::Command::new(busybox).arg("--list").output()?;
    let applets = String::from_utf8_lossy(&applets.stdout).into_owned();
    let mut e = vec![
        Entry::Dir("bin"),
        Entry::Dir("etc"),
        Entry::Dir("tmp"),
        Entry::Dir("var"),
        Entry::Dir("var/log"),
        Entry::Dir("var/log/app"),
        Entry::File { path: "bin/busybox", src: busybox, mode: 0o755 },
        // setuid root: shows whether a setuid binary elevates.
        Entry::File { path: "bin/suid-euid", src: pause, mode: 0o4755 },
        Entry::Text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n"),
        Entry::Text("etc/group", "root:x:0:\nuser:x:1000:\n"),
        // As nginx's official image does with its logs.
        Entry::Link("var/log/app/access.log", "/dev/stdout"),
        Entry::Link("var/log/app/error.log", "/dev/stderr"),
    ];
    let links: Vec<String> =
        applets.lines().filter(|a| !a.is_empty() && *a != "busybox").map(|a| format!("bin/{a}")).collect();
    e.extend(links.iter().map(|l| Entry::Link(l, "busybox")));
    let bb_layer = layer(&e)?;
    archive(
        &out.join("bb.tar"),
        BB_IMAGE,
        &bb_layer,
        serde_json::json!({"config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]}}),
    )?;
    println!("@@IMAGES-WRITTEN");
    Ok(())
}

// ---- the CRI client ---------------------------------------------------------------------------

type Rt = RuntimeServiceClient<Channel>;

async fn connect(socket: &str) -> Result<Rt> {
    let path = socket.to_string();
    let ch = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(RuntimeServiceClient::new(ch).max_decoding_message_size(32 << 20))
}

fn sandbox_config(name: &str) -> cri::PodSandboxConfig {
    let uid = format!("uid-{name}-{}", std::process::id());
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.clone(),
            namespace: "husk-test".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: format!("/var/log/pods/husk-test_{name}_{uid}"),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                // The pod's own network namespace, which CNI (a bridge on the test's private
                // subnet) fills; the node's is refused by husk.
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Pod {
    id: String,
    config: cri::PodSandboxConfig,
}

async fn run_pod(rt: &mut Rt, name: &str, handler: &str) -> Result<Pod> {
    run_pod_with(rt, sandbox_config(name), handler).await
}

async fn run_pod_with(rt: &mut Rt, config: cri::PodSandboxConfig, handler: &str) -> Result<Pod> {
    let r = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .map_err(|s| anyhow!("RunPodSandbox: {}", s.message()))?;
    Ok(Pod { id: r.into_inner().pod_sandbox_id, config })
}

async fn remove_pod(rt: &mut Rt, pod: &Pod) -> Result<()> {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.id.clone() })
        .await
        .map_err(|s| anyhow!("StopPodSandbox: {}", s.message()))?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.id.clone() })
        .await
        .map_err(|s| anyhow!("RemovePodSandbox: {}", s.message()))?;
    Ok(())
}

#[derive(Default)]
struct Ctr {
    name: &'static str,
    cmd: Vec<String>,
    readonly: bool,
    mounts: Vec<cri::Mount>,
    seccomp: Option<String>,
    run_as: Option<i64>,
    no_new_privs: bool,
    memory_limit: i64,
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

async fn start_container(rt: &mut Rt, pod: &Pod, c: Ctr) -> Result<String> {
    let sc = cri::LinuxContainerSecurityContext {
        readonly_rootfs: c.readonly,
        no_new_privs: c.no_new_privs,
        run_as_user: c.run_as.map(|value| cri::Int64Value { value }),
        seccomp: Some(match &c.seccomp {
            Some(p) => cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Localhost as i32,
                localhost_ref: p.clone(),
            },
            None => cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Unconfined as i32,
                localhost_ref: String::new(),
            },
        }),
        namespace_options: pod
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone()),
        ..Default::default()
    };
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: c.name.into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: BB_IMAGE.into(), ..Default::default() }),
        command: c.cmd,
        log_path: format!("{}/0.log", c.name),
        mounts: c.mounts,
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(sc),
            resources: (c.memory_limit > 0).then(|| cri::LinuxContainerResources {
                memory_limit_in_bytes: c.memory_limit,
                ..Default::default()
            }),
        }),
        ..Default::default()
    };
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        })
        .await
        .map_err(|s| anyhow!("CreateContainer {}: {}", c.name, s.message()))?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest { container_id: id.clone() })
        .await
        .map_err(|s| anyhow!("StartContainer {}: {}", c.name, s.message()))?;
    Ok(id)
}

fn log_path(pod: &Pod, name: &str) -> PathBuf {
    Path::new(&pod.config.log_directory).join(format!("{name}/0.log"))
}

/// Waits until the container's CRI log file has every needle (on the given stream).
async fn wait_log(pod: &Pod, name: &str, needles: &[&str]) -> Result<String> {
    let path = log_path(pod, name);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if needles.iter().all(|n| text.contains(n)) {
            return Ok(text);
        }
        if Instant::now() > deadline {
            bail!("{} lacks {needles:?}: {text:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn exec_sync(rt: &mut Rt, id: &str, cmd: Vec<String>, timeout: i64) -> Result<cri::ExecSyncResponse> {
    rt.exec_sync(cri::ExecSyncRequest { container_id: id.into(), cmd, timeout })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| anyhow!("ExecSync: {:?}: {}", s.code(), s.message()))
}

fn stdout(r: &cri::ExecSyncResponse) -> String {
    String::from_utf8_lossy(&r.stdout).into_owned()
}

type Channels = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A streaming URL opened as `v4.channel.k8s.io` websocket, with `input` sent on channel 0.
async fn open_channels(url: &str, input: &[u8]) -> Result<Channels> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let mut req = url.replacen("http://", "ws://", 1).into_client_request()?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", "v4.channel.k8s.io".parse()?);
    let (mut ws, _) = tokio::time::timeout(Duration::from_secs(60), tokio_tungstenite::connect_async(req))
        .await
        .context("websocket connect timed out")??;
    let mut frame = vec![0u8];
    frame.extend_from_slice(input);
    ws.send(Message::Binary(frame.into())).await?;
    Ok(ws)
}

/// CRI Exec over the streaming URL, as a websocket client speaking `v4.channel.k8s.io`: sends
/// `input`, returns (output, status JSON from the error channel).
async fn exec_stream(rt: &mut Rt, id: &str, cmd: &[&str], input: &str) -> Result<(String, String)> {
    use tokio_tungstenite::tungstenite::Message;
    let url = rt
        .exec(cri::ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty: true,
            stdin: true,
            stdout: true,
            stderr: false,
        })
        .await
        .map_err(|s| anyhow!("Exec: {}", s.message()))?
        .into_inner()
        .url;
    let mut ws = open_channels(&url, input.as_bytes()).await?;
    let (mut out, mut status) = (String::new(), String::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Ok(Some(msg)) =
        tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), ws.next()).await
    {
        let data = match msg? {
            Message::Binary(b) => b.to_vec(),
            Message::Close(_) => break,
            _ => continue,
        };
        match data.split_first() {
            Some((1, rest)) => out.push_str(&String::from_utf8_lossy(rest)),
            Some((3, rest)) => status.push_str(&String::from_utf8_lossy(rest)),
            _ => {}
        }
    }
    Ok((out, status))
}

/// A guest process whose command line starts with `needle`, counted through /proc from an exec.
async fn count_procs(rt: &mut Rt, id: &str, needle: &str) -> Result<usize> {
    let script = format!(
        "n=0; for c in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $c 2>/dev/null | grep -q '^{needle}' && n=$((n+1)); done; echo $n"
    );
    let r = exec_sync(rt, id, sh(&script), 60).await?;
    stdout(&r).trim().parse().map_err(|_| anyhow!("counting processes: {:?}", stdout(&r)))
}

/// When the previous check ended: checks run one after another, so each report says how long
/// its check took (what makes a slow test host slower shows up by name).
static CHECK_STARTED: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);

fn report(check: &str, r: Result<()>) {
    let now = Instant::now();
    let started = CHECK_STARTED.lock().unwrap_or_else(|p| p.into_inner()).replace(now);
    let took = started.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
    match r {
        Ok(()) => println!("@@{check} ok ({took:.1} s)"),
        Err(e) => println!("@@{check} FAIL ({took:.1} s) {e:#}"),
    }
}

async fn run(socket: &str) -> Result<()> {
    let mut rt = connect(socket).await?;
    let v = rt.version(cri::VersionRequest::default()).await?.into_inner();
    println!("@@CRI-VERSION {} {}", v.runtime_name, v.runtime_version);
    std::fs::create_dir_all(format!("{WORK}/vol-rw"))?;
    for d in ["vol-shared", "vol-slave"] {
        std::fs::create_dir_all(format!("{WORK}/{d}"))?;
        std::fs::write(format!("{WORK}/{d}/f"), format!("{d}-data\n"))?;
    }
    std::fs::write(
        format!("{WORK}/deny-chmod.json"),
        r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["chmod","fchmod","fchmodat"],"action":"SCMP_ACT_ERRNO"}]}"#,
    )?;

    *CHECK_STARTED.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    report("PAUSE-POD", pause_pod(&mut rt).await);
    report("READONLY", readonly(&mut rt).await);
    report("NGINX-LOGS", nginx(&mut rt).await);
    report("SECCOMP", seccomp(&mut rt).await);
    report("SETUID", setuid(&mut rt).await);
    report("PROPAGATION", propagation(&mut rt).await);
    report("PID-MODES", pid_modes(&mut rt).await);
    report("VM-SIZE", vm_size(&mut rt).await);
    report("POD-NET", pod_network(&mut rt).await);
    report("PORTS", ports(&mut rt).await);
    if handler() == "husk-shim" {
        report("SHIM-PER-POD", shim_per_pod(&mut rt).await);
        report("SHIM-KILLED", shim_killed(&mut rt).await);
        report("SHIM-OPTIONS", shim_options(&mut rt).await);
    }
    println!("@@PROBE-DONE");
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches("kB").trim().to_string())
            })
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// For each handler, N times: a pod ready (RunPodSandbox, then CreateContainer and
/// StartContainer of a `sleep`) and an ExecSync round trip; medians as `BENCH` lines, and the
/// host memory of a running pod's shim and VMM.
async fn bench(socket: &str, n: usize, handlers: &[String]) -> Result<()> {
    let mut rt = connect(socket).await?;
    for h in handlers {
        let (mut ready, mut exec) = (Vec::new(), Vec::new());
        for i in 0..n {
            let t = std::time::Instant::now();
            let pod = run_pod(&mut rt, &format!("bench-{i}"), h).await?;
            let r = async {
                let c = Ctr { name: "s", cmd: sh("exec sleep 300"), ..Default::default() };
                let id = start_container(&mut rt, &pod, c).await?;
                ready.push(t.elapsed().as_secs_f64() * 1000.0);
                let t = std::time::Instant::now();
                let out = exec_sync(&mut rt, &id, vec!["true".into()], 60).await?;
                if out.exit_code != 0 {
                    bail!("ExecSync true: exit {}", out.exit_code);
                }
                exec.push(t.elapsed().as_secs_f64() * 1000.0);
                if i == 0 {
                    let shim = host_pids("containerd-shim").iter().map(|p| rss_kib(*p)).max().unwrap_or(0);
                    let vmm: u64 = host_pids("husk-vmm").iter().map(|p| rss_kib(*p)).sum();
                    println!("BENCH {h}-shim-rss-kib {shim}");
                    println!("BENCH {h}-vmm-rss-kib {vmm}");
                }
                Ok(())
            }
            .await;
            remove_pod(&mut rt, &pod).await?;
            r?;
        }
        println!("BENCH {h}-pod-ready-ms {:.1}", median(ready));
        println!("BENCH {h}-execsync-ms {:.1}", median(exec));
    }
    Ok(())
}

/// PIDs of the processes on this host whose program name starts with `needle`.
fn host_pids(needle: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok().map(|pid| (pid, e.path())))
        .filter(|(_, path)| {
            let Ok(c) = std::fs::read(path.join("cmdline")) else { return false };
            let first = c.split(|b| *b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(first).rsplit('/').next().is_some_and(|n| n.starts_with(needle))
        })
        .map(|(pid, _)| pid)
        .collect()
}

fn host_processes(needle: &str) -> usize {
    host_pids(needle).len()
}

/// A pod whose PID namespace mode is `mode`.
fn pid_mode_config(name: &str, mode: cri::NamespaceMode) -> cri::PodSandboxConfig {
    let mut c = sandbox_config(name);
    if let Some(ns) =
        c.linux.as_mut().and_then(|l| l.security_context.as_mut()).and_then(|s| s.namespace_options.as_mut())
    {
        ns.pid = mode as i32;
    }
    c
}

/// PID namespace modes: POD (the pod's containers see each other's processes), CONTAINER (each
/// sees its own); NODE is refused with a clear error (a VM cannot share the host's).
async fn pid_modes(rt: &mut Rt) -> Result<()> {
    for (mode, name, expect) in
        [(cri::NamespaceMode::Pod, "pid-pod", 1), (cri::NamespaceMode::Container, "pid-ctr", 0)]
    {
        let pod = run_pod_with(rt, pid_mode_config(name, mode), handler()).await?;
        let r = async {
            start_container(rt, &pod, Ctr { name: "a", cmd: sh("exec sleep 301"), ..Default::default() })
                .await?;
            let b =
                start_container(rt, &pod, Ctr { name: "b", cmd: sh("exec sleep 302"), ..Default::default() })
                    .await?;
            let seen = count_procs(rt, &b, "sleep 301").await?;
            if seen != expect {
                bail!("PID mode {mode:?}: container b sees {seen} of a's processes, not {expect}");
            }
            Ok(())
        }
        .await;
        remove_pod(rt, &pod).await?;
        r?;
    }
    match run_pod_with(rt, pid_mode_config("pid-node", cri::NamespaceMode::Node), handler()).await {
        Ok(p) => {
            remove_pod(rt, &p).await?;
            bail!("a pod with the host's PID namespace started")
        }
        Err(e) if format!("{e:#}").contains("hostPID") => {}
        Err(e) => bail!("hostPID refused without saying why: {e:#}"),
    }
    let mut host_net = sandbox_config("net-node");
    host_net.hostname.clear();
    if let Some(ns) = host_net
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.network = cri::NamespaceMode::Node as i32;
    }
    match run_pod_with(rt, host_net, handler()).await {
        Ok(p) => {
            remove_pod(rt, &p).await?;
            bail!("a pod with the host's network started")
        }
        Err(e) if format!("{e:#}").contains("hostNetwork") => Ok(()),
        Err(e) => bail!("hostNetwork refused without saying why: {e:#}"),
    }
}

/// The node's address on the test's CNI bridge (its gateway), where the probe serves HTTP.
const NODE_ADDR: &str = "10.213.7.1";
const NODE_PORT: u16 = 8089;
/// Bytes each way in the pod network check.
const BLOB: usize = 4 << 20;

fn blob() -> Vec<u8> {
    (0..BLOB).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

/// A one-file HTTP server on the node's bridge address: GET of anything returns the blob.
fn serve_blob() -> Result<()> {
    let l = std::net::TcpListener::bind((NODE_ADDR, NODE_PORT)).context("binding the node's HTTP server")?;
    std::thread::spawn(move || {
        let body = blob();
        for c in l.incoming().flatten() {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut c = c;
                let mut req = [0u8; 1024];
                let _ = std::io::Read::read(&mut c, &mut req);
                let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                let _ = c.write_all(head.as_bytes()).and_then(|_| c.write_all(&body));
            });
        }
    });
    Ok(())
}

/// `GET /path` from `ip:80` with a plain socket; the body.
fn http_get(ip: &str, path: &str) -> Result<Vec<u8>> {
    http_get_port(ip, 80, path)
}

fn http_get_port(ip: &str, port: u16, path: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut s =
        std::net::TcpStream::connect_timeout(&format!("{ip}:{port}").parse()?, Duration::from_secs(30))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    let at = all.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("no HTTP header end"))?;
    Ok(all.split_off(at + 4))
}

async fn pod_ip(rt: &mut Rt, pod: &Pod) -> Result<String> {
    let st = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: pod.id.clone(), verbose: false })
        .await?
        .into_inner();
    st.status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .filter(|ip| !ip.is_empty())
        .ok_or_else(|| anyhow!("the pod has no IP"))
}

/// Pod networking from CNI, in the VM: the node reaches a pod's server at the pod's CNI
/// address, the pod reaches the node, two pods reach each other, 4 MiB each way arrive intact,
/// and the request's DNS config is the container's resolv.conf.
async fn pod_network(rt: &mut Rt) -> Result<()> {
    serve_blob()?;
    let mut config = sandbox_config("net-a");
    config.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.213.7.53".into()],
        searches: vec!["husk.test".into()],
        options: vec!["ndots:2".into()],
    });
    let a = run_pod_with(rt, config, handler()).await?;
    let b = run_pod(rt, "net-b", handler()).await;
    let r = async {
        let b = b.as_ref().map_err(|e| anyhow!("{e:#}"))?;
        let script = format!(
            "mkdir -p /tmp/www && echo hello-from-pod > /tmp/www/index.html && \
             head -c {BLOB} /dev/urandom > /tmp/www/blob && exec httpd -f -p 80 -h /tmp/www"
        );
        let srv =
            start_container(rt, &a, Ctr { name: "srv", cmd: sh(&script), ..Default::default() }).await?;
        let cli =
            start_container(rt, b, Ctr { name: "cli", cmd: sh("exec sleep 300"), ..Default::default() })
                .await?;
        let (ip_a, ip_b) = (pod_ip(rt, &a).await?, pod_ip(rt, b).await?);
        if ip_a == ip_b {
            bail!("both pods have {ip_a}");
        }
        // The node → pod A, at its CNI address (the server may still be starting).
        let mut page = Vec::new();
        for _ in 0..150 {
            match http_get(&ip_a, "/") {
                Ok(p) => {
                    page = p;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        if !String::from_utf8_lossy(&page).contains("hello-from-pod") {
            let last = http_get(&ip_a, "/").err().map(|e| format!("{e:#}")).unwrap_or_default();
            let inside = exec_sync(rt, &srv, sh("ip addr; ip route; netstat -ltn; ps"), 60).await?;
            let arp = std::fs::read_to_string("/proc/net/arp").unwrap_or_default();
            bail!(
                "the node did not reach pod A's server at {ip_a} ({last}); in the pod: {} {}; node ARP: {arp}",
                stdout(&inside),
                String::from_utf8_lossy(&inside.stderr)
            );
        }
        let want = exec_sync(rt, &srv, sh("sha256sum /tmp/www/blob"), 120).await?;
        let got = http_get(&ip_a, "/blob")?;
        let got_sum = hex(Sha256::digest(&got));
        if !stdout(&want).starts_with(&got_sum) || got.len() != BLOB {
            bail!("pod → node: {} bytes, sha256 {got_sum}, the pod has {}", got.len(), stdout(&want).trim());
        }
        // Pod B → the node, and pod B → pod A.
        let out = exec_sync(
            rt,
            &cli,
            sh(&format!("wget -q -O - http://{NODE_ADDR}:{NODE_PORT}/blob | sha256sum")),
            120,
        )
        .await?;
        if !stdout(&out).starts_with(&hex(Sha256::digest(blob()))) {
            bail!(
                "node → pod B: sha256 {} (exit {}, {})",
                stdout(&out).trim(),
                out.exit_code,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = exec_sync(rt, &cli, sh(&format!("wget -q -O - http://{ip_a}/")), 60).await?;
        if !stdout(&out).contains("hello-from-pod") {
            bail!(
                "pod B ({ip_b}) did not reach pod A ({ip_a}): exit {} {}",
                out.exit_code,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The guest's interface has the pod's address; the DNS config is the container's.
        let out = exec_sync(rt, &srv, sh("ip -o addr show eth0; cat /etc/resolv.conf"), 60).await?;
        let text = stdout(&out);
        if !text.contains(&format!("inet {ip_a}/")) {
            bail!("the guest's eth0 does not have the pod's address {ip_a}: {text}");
        }
        if !text.contains("nameserver 10.213.7.53") || !text.contains("search husk.test") {
            bail!("the request's DNS config is not the container's resolv.conf: {text}");
        }
        Ok(())
    }
    .await;
    remove_pod(rt, &a).await?;
    if let Ok(b) = &b {
        remove_pod(rt, b).await?;
    }
    r
}

/// The node's port for the pod's `hostPort` (CNI portmap).
const HOST_PORT: u16 = 8090;

/// CRI PortForward over the streaming URL's websocket protocol (`v4.channel.k8s.io`, one
/// port: data on channel 0, errors on channel 1, each opened by the port in two bytes): sends
/// `request`, returns (data, error text) once the server closes.
async fn port_forward(rt: &mut Rt, pod: &Pod, port: u16, request: &[u8]) -> Result<(Vec<u8>, String)> {
    use tokio_tungstenite::tungstenite::Message;
    let url = rt
        .port_forward(cri::PortForwardRequest { pod_sandbox_id: pod.id.clone(), port: vec![port.into()] })
        .await
        .map_err(|s| anyhow!("PortForward: {}", s.message()))?
        .into_inner()
        .url;
    let mut ws = open_channels(&format!("{url}?port={port}"), request).await?;
    let (mut data, mut err) = (Vec::new(), String::new());
    // Each channel's first frame is its port, not payload.
    let mut opened = [false; 2];
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(Some(msg)) =
        tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), ws.next()).await
    {
        let bytes = match msg {
            Ok(Message::Binary(b)) => b.to_vec(),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let Some((&ch, rest)) = bytes.split_first() else { continue };
        let Some(seen) = opened.get_mut(usize::from(ch)) else { continue };
        let rest = if *seen {
            rest
        } else {
            *seen = true;
            rest.get(2..).unwrap_or_default()
        };
        match ch {
            0 => data.extend_from_slice(rest),
            _ => err.push_str(&String::from_utf8_lossy(rest)),
        }
    }
    Ok((data, err))
}

/// A pod's ports: a `hostPort` through CNI's portmap reaches its server from the node, and
/// CRI PortForward (containerd dials `localhost:<port>` in the pod's network namespace, where
/// husk carries the loopback into the VM) reaches a server on the pod's loopback only, and
/// gives an error, not a hang, for a port nobody listens on.
async fn ports(rt: &mut Rt) -> Result<()> {
    let mut config = sandbox_config("ports");
    config.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 80,
        host_port: HOST_PORT.into(),
        host_ip: String::new(),
    }];
    let pod = run_pod_with(rt, config, handler()).await?;
    let r = async {
        let script = "mkdir -p /tmp/www /tmp/lo && echo hello-from-pod > /tmp/www/index.html && \
                      echo hello-from-loopback > /tmp/lo/index.html && \
                      httpd -p 127.0.0.1:8081 -h /tmp/lo && exec httpd -f -p 80 -h /tmp/www";
        let srv =
            start_container(rt, &pod, Ctr { name: "srv", cmd: sh(script), ..Default::default() }).await?;
        let mut page = Vec::new();
        for _ in 0..150 {
            match http_get_port(NODE_ADDR, HOST_PORT, "/") {
                Ok(p) => {
                    page = p;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        if !String::from_utf8_lossy(&page).contains("hello-from-pod") {
            let last =
                http_get_port(NODE_ADDR, HOST_PORT, "/").err().map(|e| format!("{e:#}")).unwrap_or_default();
            let inside = exec_sync(rt, &srv, sh("netstat -ltn"), 60).await?;
            bail!(
                "hostPort {HOST_PORT} on the node did not reach the pod ({last}); listening: {}",
                stdout(&inside)
            );
        }
        let get = b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n";
        let (data, err) = port_forward(rt, &pod, 80, get).await?;
        if !String::from_utf8_lossy(&data).contains("hello-from-pod") {
            bail!("PortForward to port 80: {:?}, error channel: {err:?}", String::from_utf8_lossy(&data));
        }
        let (data, err) = port_forward(rt, &pod, 8081, get).await?;
        if !String::from_utf8_lossy(&data).contains("hello-from-loopback") {
            bail!(
                "PortForward to the pod's loopback-only port 8081: {:?}, error channel: {err:?}",
                String::from_utf8_lossy(&data)
            );
        }
        let started = Instant::now();
        let (data, err) = port_forward(rt, &pod, 9, get).await?;
        if !data.is_empty() || started.elapsed() > Duration::from_secs(45) {
            bail!(
                "PortForward to a closed port: {} bytes after {:?}, error channel: {err:?}",
                data.len(),
                started.elapsed()
            );
        }
        Ok(())
    }
    .await;
    remove_pod(rt, &pod).await?;
    r
}

/// The guest's memory in KiB, as a container of the VM sees it.
async fn guest_mem_kib(rt: &mut Rt, id: &str) -> Result<u64> {
    let out = exec_sync(rt, id, sh("sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo"), 60).await?;
    stdout(&out).trim().parse().map_err(|_| anyhow!("MemTotal: {:?}", stdout(&out)))
}

/// The pod's VM is sized from what the pod declares: its resources (containerd's sandbox
/// annotations) or husk's annotation; a container bigger than the VM is refused by name.
async fn vm_size(rt: &mut Rt) -> Result<()> {
    const MIB: i64 = 1 << 20;
    let mut config = sandbox_config("sized");
    if let Some(l) = config.linux.as_mut() {
        l.resources =
            Some(cri::LinuxContainerResources { memory_limit_in_bytes: 600 * MIB, ..Default::default() });
    }
    let pod = run_pod_with(rt, config, handler()).await?;
    let r = async {
        let id = start_container(
            rt,
            &pod,
            Ctr { name: "m", cmd: sh("exec sleep 300"), memory_limit: 500 * MIB, ..Default::default() },
        )
        .await?;
        let kib = guest_mem_kib(rt, &id).await?;
        if kib < 600 << 10 {
            bail!("a pod declaring 600 MiB got a VM of {kib} KiB");
        }
        let big =
            Ctr { name: "big", cmd: sh("exec sleep 300"), memory_limit: 2048 * MIB, ..Default::default() };
        match start_container(rt, &pod, big).await {
            Ok(_) => bail!("a container asking for 2 GiB started in a VM of {kib} KiB"),
            Err(e) if format!("{e:#}").contains("more than its VM can give") => Ok(()),
            Err(e) => bail!("a container bigger than its VM failed without saying why: {e:#}"),
        }
    }
    .await;
    remove_pod(rt, &pod).await?;
    r?;
    let mut config = sandbox_config("annotated");
    config.annotations.insert("io.husk.vm.memory-mib".into(), "400".into());
    let pod = run_pod_with(rt, config, handler()).await?;
    let r = async {
        let id =
            start_container(rt, &pod, Ctr { name: "a", cmd: sh("exec sleep 300"), ..Default::default() })
                .await?;
        let kib = guest_mem_kib(rt, &id).await?;
        if !(300 << 10..=400 << 10).contains(&kib) {
            bail!("a pod annotated with 400 MiB got a VM of {kib} KiB");
        }
        Ok(())
    }
    .await;
    remove_pod(rt, &pod).await?;
    r
}

/// husk's config file named by the runtime options (ConfigPath) shapes the pod's VM; a
/// missing one is a clear error.
async fn shim_options(rt: &mut Rt) -> Result<()> {
    let pod = run_pod(rt, "options", "husk-shim-cfg").await?;
    let r = async {
        let id =
            start_container(rt, &pod, Ctr { name: "m", cmd: sh("exec sleep 300"), ..Default::default() })
                .await?;
        let kib = guest_mem_kib(rt, &id).await?;
        if kib < 400 << 10 {
            bail!("the VM has {kib} KiB: ConfigPath's memory_mib 512 was not applied");
        }
        Ok(())
    }
    .await;
    remove_pod(rt, &pod).await?;
    r?;
    match run_pod(rt, "bad-options", "husk-shim-badcfg").await {
        Ok(p) => {
            remove_pod(rt, &p).await?;
            bail!("a pod started with a missing ConfigPath")
        }
        Err(e) if format!("{e:#}").contains("/nonexistent/husk.json") => {}
        Err(e) => bail!("the error does not name the missing config: {e:#}"),
    }
    match run_pod(rt, "no-kernel", "husk-shim-nokernel").await {
        Ok(p) => {
            remove_pod(rt, &p).await?;
            bail!("a pod started without a guest kernel")
        }
        Err(e) if format!("{e:#}").contains("/nonexistent/vmlinux") => {}
        Err(e) => bail!("the error does not name the missing kernel: {e:#}"),
    }
    none_left().await
}

/// Waits until no shim and no VMM is left.
async fn none_left() -> Result<()> {
    for _ in 0..150 {
        if (host_processes("containerd-shim-husk-v2"), host_processes("husk-vmm")) == (0, 0) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    bail!("a shim or VMM outlived its pod")
}

/// A shim killed with SIGKILL under a running pod: containerd sees the container exit, and the
/// pod's removal (with containerd's `delete` of the dead shim) leaves nothing.
async fn shim_killed(rt: &mut Rt) -> Result<()> {
    let pod = run_pod(rt, "shim-killed", handler()).await?;
    let r = async {
        let id =
            start_container(rt, &pod, Ctr { name: "k", cmd: sh("exec sleep 300"), ..Default::default() })
                .await?;
        let shims = host_pids("containerd-shim-husk-v2");
        if shims.len() != 1 {
            bail!("{} shims for one pod", shims.len());
        }
        for p in shims {
            // SAFETY: kill(2) with a PID read from /proc; no memory is involved.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        for _ in 0..300 {
            let st = rt
                .container_status(cri::ContainerStatusRequest { container_id: id.clone(), verbose: false })
                .await?
                .into_inner()
                .status
                .ok_or_else(|| anyhow!("no status"))?;
            if st.state == cri::ContainerState::ContainerExited as i32 {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        bail!("the container still runs after its shim was killed")
    }
    .await;
    remove_pod(rt, &pod).await?;
    r?;
    none_left().await
}

/// One shim and one VM for a pod of two containers; none once it is gone. Stats, update,
/// container status with its exit code.
async fn shim_per_pod(rt: &mut Rt) -> Result<()> {
    let pod = run_pod(rt, "two-containers", handler()).await?;
    let r = async {
        let a = start_container(rt, &pod, Ctr { name: "a", cmd: sh("exec sleep 300"), ..Default::default() })
            .await?;
        let b =
            start_container(rt, &pod, Ctr { name: "b", cmd: sh("echo b-out; exit 3"), ..Default::default() })
                .await?;
        let (shims, vmms) = (host_processes("containerd-shim-husk-v2"), host_processes("husk-vmm"));
        if (shims, vmms) != (1, 1) {
            bail!("{shims} shims and {vmms} VMMs for one pod");
        }
        wait_log(&pod, "b", &["b-out"]).await?;
        let mut code = None;
        for _ in 0..100 {
            let st = rt
                .container_status(cri::ContainerStatusRequest { container_id: b.clone(), verbose: false })
                .await?
                .into_inner()
                .status
                .ok_or_else(|| anyhow!("no status"))?;
            if st.state == cri::ContainerState::ContainerExited as i32 {
                if st.finished_at == 0 || st.started_at == 0 {
                    bail!("exited without timestamps: {st:?}");
                }
                code = Some(st.exit_code);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        if code != Some(3) {
            bail!("container b: exit code {code:?}, not 3");
        }
        let stats = rt
            .container_stats(cri::ContainerStatsRequest { container_id: a.clone() })
            .await?
            .into_inner()
            .stats
            .ok_or_else(|| anyhow!("no stats"))?;
        let mem = stats.memory.and_then(|m| m.working_set_bytes).map(|v| v.value).unwrap_or(0);
        let cpu = stats.cpu.and_then(|c| c.usage_core_nano_seconds).map(|v| v.value).unwrap_or(0);
        if mem == 0 || cpu == 0 {
            bail!("stats without numbers: memory {mem}, cpu {cpu}");
        }
        rt.update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: a.clone(),
            linux: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 96 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow!("UpdateContainerResources: {}", s.message()))?;
        Ok(())
    }
    .await;
    remove_pod(rt, &pod).await?;
    r?;
    none_left().await
}

/// The `FROM scratch` pause image alone, in a pod on the long state root.
async fn pause_pod(rt: &mut Rt) -> Result<()> {
    let pod = run_pod(rt, "pause-only", handler_long_root()).await?;
    let st = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: pod.id.clone(), verbose: false })
        .await?
        .into_inner();
    let state = st.status.as_ref().map(|s| s.state).unwrap_or(-1);
    let ip = st.status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default();
    remove_pod(rt, &pod).await?;
    if state != cri::PodSandboxState::SandboxReady as i32 {
        bail!("pod state {state}, not ready");
    }
    // CNI's bridge and host-local gave the pod's namespace its address.
    if !ip.starts_with(POD_SUBNET_PREFIX) {
        bail!("pod IP {ip:?} is not from the test's CNI subnet {POD_SUBNET_PREFIX}0/24");
    }
    Ok(())
}

async fn readonly(rt: &mut Rt) -> Result<()> {
    let pod = run_pod(rt, "readonly", handler()).await?;
    let mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: format!("{WORK}/vol-rw"),
        ..Default::default()
    }];
    let script = "touch /x 2>/dev/null && echo root-writable || echo root-read-only; \
                  echo v > /data/w && echo volume-writable; exec sleep 300";
    let r = async {
        start_container(
            rt,
            &pod,
            Ctr { name: "ro", cmd: sh(script), readonly: true, mounts, ..Default::default() },
        )
        .await?;
        let log = wait_log(&pod, "ro", &["volume-writable"]).await?;
        if !log.contains("root-read-only") {
            bail!("the read-only rootfs took a write: {log}");
        }
        if !Path::new(&format!("{WORK}/vol-rw/w")).is_file() {
            bail!("the volume write did not reach the host");
        }
        Ok(())
    }
    .await;
    remove_pod(rt, &pod).await?;
    r
}

/// Logs through `/dev/stdout` and `/dev/stderr` links; ExecSync with a timeout; Exec with a
/// tty and stdin over the streaming URL.
async fn nginx(rt: &mut Rt) -> Result<()> {
    let pod = run_pod(rt, "nginx", handler()).await?;
    let script = "echo access-line >> /var/log/app/access.log; echo error-line >> /var/log/app/error.log; \
                  echo fd1=$(readlink /proc/self/fd/1); exec sleep 300";
    let r = async {
        let id =
            start_container(rt, &pod, Ctr { name: "web", cmd: sh(script), ..Default::default() }).await?;
        let log = wait_log(&pod, "web", &["stdout F access-line", "stderr F error-line", "fd1="]).await?;
        if !log.contains("fd1=pipe:") {
            bail!("stdout is not a pipe: {log}");
        }
        println!("@@NGINX-STDIO ok");

        // ExecSync with a timeout returns at the timeout, and the process is gone after.
        let t0 = Instant::now();
        let r = exec_sync(rt, &id, vec!["sleep".into(), "301".into()], 3).await;
        let took = t0.elapsed();
        if r.is_ok() || took > Duration::from_secs(60) {
            bail!("ExecSync with a 3 s timeout: {:?} after {took:?}", r.map(|x| x.exit_code));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = count_procs(rt, &id, "sleep 301").await?;
            if n == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("the timed-out exec still runs ({n} processes)");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        println!("@@EXECSYNC-TIMEOUT ok");

        let (out, status) = exec_stream(rt, &id, &["sh"], "tty; echo ws-$((6*7)); exit 3\n").await?;
        if !out.contains("/dev/pts/") || !out.contains("ws-42") {
            bail!("exec over the streaming URL: output {out:?}, status {status:?}");
        }
        if !status.contains("NonZeroExitCode") || !status.contains("\"3\"") {
            bail!("exec over the streaming URL: status {status:?}");
        }
        println!("@@EXEC-TTY ok");
        Ok(())
    }
    .await;
    remove_pod(rt, &pod).await?;
    r
}

/// A profile that denies chmod, enforced in the container's process and in an exec.
async fn seccomp(rt: &mut Rt) -> Result<()> {
    let pod = run_pod(rt, "seccomp", handler_long_root()).await?;
    let script =
        "touch /tmp/a; chmod 600 /tmp/a && echo init-chmod-allowed || echo init-chmod-denied; exec sleep 300";
    let r = async {
        let id = start_container(
            rt,
            &pod,
            Ctr { name: "sc", cmd: sh(script), seccomp: Some(format!("{WORK}/deny-chmod.json")), ..Default::default() },
        )
        .await?;
        let log = wait_log(&pod, "sc", &["chmod-"]).await?;
        if !log.contains("init-chmod-denied") {
            bail!("the container's process could chmod: {log}");
        }
        let r = exec_sync(
            rt,
            &id,
            sh("grep Seccomp: /proc/self/status; touch /tmp/b; chmod 600 /tmp/b && echo exec-chmod-allowed || echo exec-chmod-denied"),
            60,
        )
        .await?;
        let out = stdout(&r);
        if !out.contains("exec-chmod-denied") || !out.contains("Seccomp:\t2") {
            bail!("an exec escaped the profile: {out:?}");
        }
        Ok(())
    }
    .await;
    remove_pod(rt, &pod).await?;
    r
}

/// A setuid-root binary run by uid 1000 under a seccomp profile: elevates under
/// allowPrivilegeEscalation true, not under false (no_new_privs).
async fn setuid(rt: &mut Rt) -> Result<()> {
    let mut results = HashMap::new();
    for (name, nnp) in [("suid-allowed", false), ("suid-denied", true)] {
        let pod = run_pod(rt, name, handler_long_root()).await?;
        let r = async {
            let id = start_container(
                rt,
                &pod,
                // With a seccomp profile too: a non-root user whose no_new_privs is unset
                // must still get its profile loaded.
                Ctr {
                    name: "s",
                    cmd: sh("/bin/suid-euid euid; exec sleep 300"),
                    run_as: Some(1000),
                    no_new_privs: nnp,
                    seccomp: Some(format!("{WORK}/deny-chmod.json")),
                    ..Default::default()
                },
            )
            .await?;
            let log = wait_log(&pod, "s", &["euid="]).await?;
            let ex = exec_sync(rt, &id, vec!["/bin/suid-euid".into(), "euid".into()], 60).await?;
            Ok::<_, anyhow::Error>((log, stdout(&ex)))
        }
        .await;
        remove_pod(rt, &pod).await?;
        results.insert(name, r?);
    }
    let (log, ex) = &results["suid-allowed"];
    if !log.contains("euid=0") || !ex.contains("euid=0") {
        bail!("setuid did not elevate with privilege escalation allowed: {log:?} / {ex:?}");
    }
    let (log, ex) = &results["suid-denied"];
    if !log.contains("euid=1000") || !ex.contains("euid=1000") {
        bail!("setuid elevated under no_new_privs: {log:?} / {ex:?}");
    }
    Ok(())
}

/// Bidirectional (`rshared`) and host-to-container (`rslave`) volumes.
async fn propagation(rt: &mut Rt) -> Result<()> {
    let pod = run_pod(rt, "propagation", handler()).await?;
    let mounts = vec![
        cri::Mount {
            container_path: "/shared".into(),
            host_path: format!("{WORK}/vol-shared"),
            propagation: cri::MountPropagation::PropagationBidirectional as i32,
            ..Default::default()
        },
        cri::Mount {
            container_path: "/slave".into(),
            host_path: format!("{WORK}/vol-slave"),
            propagation: cri::MountPropagation::PropagationHostToContainer as i32,
            ..Default::default()
        },
    ];
    let script = "cat /shared/f /slave/f; sed 's/^/mountinfo: /' /proc/self/mountinfo; exec sleep 300";
    let r = async {
        start_container(rt, &pod, Ctr { name: "p", cmd: sh(script), mounts, ..Default::default() }).await?;
        let log = wait_log(&pod, "p", &["vol-shared-data", "vol-slave-data", "mountinfo: "]).await?;
        let shared =
            log.lines().find(|l| l.contains("mountinfo: ") && l.contains(" /shared ")).unwrap_or_default();
        if !shared.contains("shared:") {
            bail!("/shared is not a shared mount in the container: {shared:?} in {log}");
        }
        Ok(())
    }
    .await;
    remove_pod(rt, &pod).await?;
    r
}
