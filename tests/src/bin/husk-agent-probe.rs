//! Drives a husk-agent (in a VM through the hybrid vsock socket, or in host mode) through the
//! container lifecycle and the bad requests it must refuse; prints `CHECK <name> ok|FAIL ...`.
//!
//! husk-agent-probe checks UDS SHARE ROOTFS [--read-only-share] [--destroy] [--vm]
//! husk-agent-probe bench UDS SHARE ROOTFS N
//! husk-agent-probe time LABEL N CMD...      (median wall time of a host command, for baselines)
//! husk-agent-probe pipe-baseline            (host pipe throughput of the bench's stdout workload)
//! husk-agent-probe spec CMD...              (print the config.json the probe uses)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use husk_core::agent::client::RawClients;
use husk_core::agent::{stream_name, GrpcAgent};
use husk_proto as pb;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tonic::Code;

struct Probe {
    client: RawClients,
    share: String,
    rootfs: String,
    failures: usize,
}

/// A started container (or exec) with the host ends of its streams.
struct Running {
    stdin: Option<UnixStream>,
    stdout: Option<UnixStream>,
    stderr: Option<UnixStream>,
}

struct Outcome {
    status: pb::ExitStatus,
    stdout: String,
    stderr: String,
}

#[derive(Default, Clone)]
struct Opts {
    readonly: bool,
    memory_limit: Option<i64>,
    terminal: bool,
    hostname: Option<&'static str>,
    /// Without a PID namespace: its init ignores even SIGKILL sent from inside it.
    no_pid_ns: bool,
}

fn process(args: &[&str], terminal: bool) -> Value {
    json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin:/sbin:/usr/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {
            "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
        },
        "noNewPrivileges": true
    })
}

/// What `runc spec` writes, trimmed to what a busybox rootfs needs.
fn spec(args: &[&str], o: &Opts) -> Value {
    let mut s = json!({
        "ociVersion": "1.0.2",
        "process": process(args, o.terminal),
        "root": {"path": "rootfs", "readonly": o.readonly},
        "hostname": o.hostname.unwrap_or("husk"),
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    });
    if o.no_pid_ns {
        s["linux"]["namespaces"] =
            json!([{"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]);
    }
    if let Some(limit) = o.memory_limit {
        s["linux"]["resources"] = json!({"memory": {"limit": limit, "swap": limit}});
    }
    s
}

async fn read_all(mut s: UnixStream) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = s.read_to_end(&mut v).await;
    v
}

impl Probe {
    fn rootfs(&self) -> pb::Rootfs {
        pb::Rootfs { share_tag: self.share.clone(), path: self.rootfs.clone() }
    }

    /// Opens the streams a process needs; returns the Stdio message and the host ends.
    async fn streams(&self, terminal: bool, rows: u32, cols: u32) -> Result<(pb::Stdio, Running)> {
        let (i, o) = (stream_name("in"), stream_name("out"));
        let stdin = step("open stdin stream", self.client.open_stdio(&i)).await??;
        let stdout = step("open stdout stream", self.client.open_stdio(&o)).await??;
        let mut stdio = pb::Stdio {
            stdin: i,
            stdout: o,
            stderr: String::new(),
            terminal,
            rows,
            cols,
            ..Default::default()
        };
        let stderr = if terminal {
            None
        } else {
            let e = stream_name("err");
            let s = step("open stderr stream", self.client.open_stdio(&e)).await??;
            stdio.stderr = e;
            Some(s)
        };
        Ok((stdio, Running { stdin: Some(stdin), stdout: Some(stdout), stderr }))
    }

    async fn create(&self, id: &str, spec: &Value, rows: u32, cols: u32) -> Result<Running> {
        let terminal = spec["process"]["terminal"].as_bool().unwrap_or(false);
        let (stdio, running) = self.streams(terminal, rows, cols).await?;
        let mut c = self.client.containers.clone();
        let create = c.create_container(pb::CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: spec.to_string().into_bytes(),
            rootfs: Some(self.rootfs()),
            stdio: Some(stdio),
            start: false,
        });
        step(&format!("create {id}"), create).await?.with_context(|| format!("create {id}"))?;
        Ok(running)
    }

    async fn start(&self, id: &str, spec: &Value) -> Result<Running> {
        let r = self.create(id, spec, 0, 0).await?;
        let mut c = self.client.containers.clone();
        let start = c.start_container(cref(id));
        step(&format!("start {id}"), start).await?.with_context(|| format!("start {id}"))?;
        Ok(r)
    }

    async fn finish(&self, id: &str, exec_id: &str, mut r: Running) -> Result<Outcome> {
        drop(r.stdin.take());
        // Drained while waiting, so a chatty process never blocks on a full stream.
        let stdout: JoinHandle<Vec<u8>> = tokio::spawn(async move {
            match r.stdout {
                Some(s) => read_all(s).await,
                None => Vec::new(),
            }
        });
        let stderr: JoinHandle<Vec<u8>> = tokio::spawn(async move {
            match r.stderr {
                Some(s) => read_all(s).await,
                None => Vec::new(),
            }
        });
        let mut pc = self.client.processes.clone();
        let wait = pc.wait_process(pb::ProcessRef { container_id: id.into(), exec_id: exec_id.into() });
        let status = step(&format!("wait {id}/{exec_id}"), wait).await??.into_inner();
        let stdout = String::from_utf8_lossy(&step(&format!("stdout EOF {id}/{exec_id}"), stdout).await??)
            .into_owned();
        let stderr = String::from_utf8_lossy(&step(&format!("stderr EOF {id}/{exec_id}"), stderr).await??)
            .into_owned();
        Ok(Outcome { status, stdout, stderr })
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let mut c = self.client.containers.clone();
        let remove = c.remove_container(pb::RemoveContainerRequest { container_id: id.into(), force: true });
        step(&format!("remove {id}"), remove).await?.with_context(|| format!("remove {id}"))?;
        Ok(())
    }

    /// Runs `args` to completion in a fresh container.
    async fn run(&self, id: &str, args: &[&str], o: &Opts) -> Result<Outcome> {
        let r = self.start(id, &spec(args, o)).await?;
        let out = self.finish(id, "", r).await?;
        self.remove(id).await?;
        Ok(out)
    }

    fn report(&mut self, name: &str, r: Result<()>) {
        match r {
            Ok(()) => println!("CHECK {name} ok"),
            Err(e) => {
                self.failures += 1;
                println!("CHECK {name} FAIL: {e:#}");
            }
        }
    }
}

/// How long one step of a check may take before the probe reports it as hung.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);

/// Awaits `f`, failing with the step's name if it hangs.
async fn step<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, f).await.map_err(|_| anyhow!("{what}: no answer in {STEP_TIMEOUT:?}"))
}

fn cref(id: &str) -> pb::ContainerRef {
    pb::ContainerRef { container_id: id.into() }
}

fn expect_exit(o: &Outcome, code: i32, signal: i32) -> Result<()> {
    if o.status.exit_code != code || o.status.signal != signal {
        bail!(
            "exit {:?}, wanted code {code} signal {signal}; stdout {:?} stderr {:?}",
            o.status,
            o.stdout,
            o.stderr
        );
    }
    Ok(())
}

fn expect_code<T: std::fmt::Debug>(r: std::result::Result<T, tonic::Status>, code: Code) -> Result<()> {
    match r {
        Err(s) if s.code() == code => {
            if s.message().is_empty() {
                bail!("{code:?} without a message");
            }
            println!("  refused as {code:?}: {}", s.message());
            Ok(())
        }
        Err(s) => bail!("wanted {code:?}, got {:?}: {}", s.code(), s.message()),
        Ok(v) => bail!("wanted {code:?}, got success {v:?}"),
    }
}

async fn checks(mut p: Probe, read_only_share: bool, destroy: bool, vm: bool) -> Result<usize> {
    let mut events = p.client.events.clone().subscribe(pb::Empty {}).await?.into_inner();
    let details = p.client.sandbox.clone().guest_details(pb::Empty {}).await?.into_inner();
    println!("guest: {details:?}");

    // First, so that every later check runs its helpers from the rearranged page cache.
    let r = p.client.sandbox.clone().prepare_snapshot(pb::Empty {}).await;
    p.report(
        "prepare-snapshot",
        match r {
            // The static agent is several MiB: whole 2 MiB pieces of it, all joined.
            Ok(a) if vm => {
                let a = a.into_inner();
                println!("prepare-snapshot: {a:?}");
                if a.joined_chunks == 0 || a.failed_chunks != 0 {
                    Err(anyhow!("joined {} chunks, {} not", a.joined_chunks, a.failed_chunks))
                } else {
                    Ok(())
                }
            }
            Ok(a) => Err(anyhow!("host mode prepared a snapshot: {:?}", a.into_inner())),
            Err(s) if !vm && s.code() == tonic::Code::FailedPrecondition => Ok(()),
            Err(s) => Err(anyhow!("{s}")),
        },
    );

    let r = p.run("echo", &["sh", "-c", "echo hello; echo oops >&2"], &Opts::default()).await;
    p.report(
        "echo",
        r.and_then(|o| {
            expect_exit(&o, 0, 0)?;
            if o.stdout != "hello\n" || o.stderr != "oops\n" {
                bail!("stdout {:?} stderr {:?}", o.stdout, o.stderr);
            }
            Ok(())
        }),
    );

    let r = p.run("exit3", &["sh", "-c", "exit 3"], &Opts::default()).await;
    p.report("exit-code-3", r.and_then(|o| expect_exit(&o, 3, 0)));

    // A PID namespace's init cannot be SIGKILLed from inside, so this one runs without one.
    let opts = Opts { no_pid_ns: true, ..Opts::default() };
    let r = p.run("kill9", &["sh", "-c", "kill -9 $$"], &opts).await;
    p.report("killed-by-signal-9", r.and_then(|o| expect_exit(&o, 0, 9)));

    let r = p.run("pidns", &["sh", "-c", "echo $$"], &Opts::default()).await;
    p.report(
        "pid-namespace-pid-1",
        r.and_then(|o| {
            expect_exit(&o, 0, 0)?;
            if o.stdout.trim() != "1" {
                bail!("$$ is {:?}", o.stdout);
            }
            Ok(())
        }),
    );

    let opts = Opts { hostname: Some("husk-ctr"), ..Opts::default() };
    let r = p.run("hostname", &["hostname"], &opts).await;
    p.report(
        "hostname",
        r.and_then(|o| {
            if o.stdout.trim() != "husk-ctr" {
                bail!("hostname {:?}", o.stdout);
            }
            Ok(())
        }),
    );

    let opts = Opts { readonly: true, ..Opts::default() };
    let r = p.run("ro", &["sh", "-c", "touch /probe-file"], &opts).await;
    p.report(
        "readonly-rootfs-refuses-writes",
        r.and_then(|o| {
            if o.status.exit_code == 0 || !o.stderr.contains("Read-only") {
                bail!("touch: {:?} stderr {:?}", o.status, o.stderr);
            }
            Ok(())
        }),
    );

    let r = p
        .run(
            "rw",
            &["sh", "-c", "echo w > /probe-file && cat /probe-file && rm /probe-file"],
            &Opts::default(),
        )
        .await;
    let name = if read_only_share { "writable-rootfs-overlay-on-ro-share" } else { "writable-rootfs" };
    p.report(
        name,
        r.and_then(|o| {
            expect_exit(&o, 0, 0)?;
            if o.stdout != "w\n" {
                bail!("stdout {:?}", o.stdout);
            }
            Ok(())
        }),
    );

    // stdin: EOF by closing the host end, and by CloseStdin.
    let r = async {
        let mut r = p.start("cat1", &spec(&["cat"], &Opts::default())).await?;
        let mut stdin = r.stdin.take().context("stdin")?;
        stdin.write_all(b"ping\n").await?;
        stdin.shutdown().await?;
        let o = p.finish("cat1", "", r).await?;
        p.remove("cat1").await?;
        expect_exit(&o, 0, 0)?;
        if o.stdout != "ping\n" {
            bail!("cat echoed {:?}", o.stdout);
        }
        anyhow::Ok(())
    }
    .await;
    p.report("stdin-closed-eof", r);

    let r = async {
        let mut r = p.start("cat2", &spec(&["cat"], &Opts::default())).await?;
        let mut stdin = r.stdin.take().context("stdin")?;
        stdin.write_all(b"pong\n").await?;
        // CloseStdin drops input not read yet, so wait until cat has echoed it.
        let mut echoed = [0u8; 5];
        let out = r.stdout.as_mut().context("stdout")?;
        out.read_exact(&mut echoed).await?;
        if &echoed != b"pong\n" {
            bail!("cat echoed {echoed:?}");
        }
        p.client
            .processes
            .clone()
            .close_stdin(pb::ProcessRef { container_id: "cat2".into(), exec_id: String::new() })
            .await?;
        let o = p.finish("cat2", "", r).await?;
        p.remove("cat2").await?;
        drop(stdin);
        expect_exit(&o, 0, 0)?;
        if !o.stdout.is_empty() {
            bail!("cat wrote more: {:?}", o.stdout);
        }
        anyhow::Ok(())
    }
    .await;
    p.report("close-stdin-rpc-eof", r);

    // OOM: a 16 MiB limit and a 64 MiB buffer.
    let opts = Opts { memory_limit: Some(16 << 20), ..Opts::default() };
    // The container stays until the event has come, so its stats can explain a missing one.
    let r = async {
        let dd = ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"];
        let running = p.start("oom", &spec(&dd, &opts)).await?;
        let o = p.finish("oom", "", running).await?;
        expect_exit(&o, 0, 9)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let seen = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(ev) = tokio::time::timeout(left, events.message()).await else { break None };
            match ev?.and_then(|e| e.kind) {
                Some(pb::event::Kind::Oom(oom)) if oom.container_id == "oom" => break Some(oom),
                Some(_) => continue,
                None => bail!("the event stream ended"),
            }
        };
        let stats = p.client.containers.clone().container_stats(cref("oom")).await?.into_inner();
        p.remove("oom").await?;
        match seen {
            Some(oom) => {
                println!("  oom event: {oom:?}");
                anyhow::Ok(())
            }
            None => bail!("no OOM event in 30 s; the cgroup counts {} OOM kills", stats.oom_kills),
        }
    }
    .await;
    p.report("oom-kill-event", r);

    // A long-running container: exec, ps, stats, pause/resume, signal.
    let r = async {
        let init = p.start("svc", &spec(&["sleep", "1000"], &Opts::default())).await?;
        let (stdio, er) = p.streams(false, 0, 0).await?;
        let exec = pb::ExecProcessRequest {
            container_id: "svc".into(),
            exec_id: "e1".into(),
            oci_process_json: process(&["sh", "-c", "echo exec-ok; exit 5"], false).to_string().into_bytes(),
            stdio: Some(stdio),
        };
        p.client.processes.clone().exec_process(exec).await.context("exec")?;
        let o = p.finish("svc", "e1", er).await?;
        expect_exit(&o, 5, 0)?;
        if o.stdout != "exec-ok\n" {
            bail!("exec stdout {:?}", o.stdout);
        }
        let ps = p.client.containers.clone().list_processes(cref("svc")).await?.into_inner().processes;
        if !ps.iter().any(|pi| pi.command.contains("sleep 1000")) {
            bail!("ps does not show sleep: {ps:?}");
        }
        let stats = p.client.containers.clone().container_stats(cref("svc")).await?.into_inner();
        if stats.pids_current == 0 || stats.memory_usage_bytes == 0 {
            bail!("stats {stats:?}");
        }
        p.client.containers.clone().pause_container(cref("svc")).await.context("pause")?;
        let status = |p: &Probe| {
            let mut c = p.client.containers.clone();
            async move {
                let list = c.list_containers(pb::Empty {}).await?.into_inner().containers;
                anyhow::Ok(list.into_iter().find(|c| c.container_id == "svc").map(|c| c.status()))
            }
        };
        if status(&p).await? != Some(pb::ContainerStatus::Paused) {
            bail!("not paused after pause");
        }
        p.client.containers.clone().resume_container(cref("svc")).await.context("resume")?;
        if status(&p).await? != Some(pb::ContainerStatus::Running) {
            bail!("not running after resume");
        }
        p.client
            .processes
            .clone()
            .signal_process(pb::SignalProcessRequest {
                container_id: "svc".into(),
                exec_id: String::new(),
                signal: 9,
                all: false,
            })
            .await?;
        let o = p.finish("svc", "", init).await?;
        expect_exit(&o, 0, 9)?;
        // Exec into the now stopped container must be refused.
        let (stdio, _r) = p.streams(false, 0, 0).await?;
        let exec = pb::ExecProcessRequest {
            container_id: "svc".into(),
            exec_id: "e2".into(),
            oci_process_json: process(&["true"], false).to_string().into_bytes(),
            stdio: Some(stdio),
        };
        expect_code(p.client.processes.clone().exec_process(exec).await, Code::FailedPrecondition)
            .context("exec into stopped")?;
        p.remove("svc").await?;
        anyhow::Ok(())
    }
    .await;
    p.report("exec-ps-stats-pause-resume-signal", r);

    // A terminal: size at start, resize, size again.
    let r = async {
        let opts = Opts { terminal: true, ..Opts::default() };
        let mut r =
            p.create("tty", &spec(&["sh", "-c", "stty size; read x; stty size"], &opts), 24, 80).await?;
        p.client.containers.clone().start_container(cref("tty")).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        p.client
            .processes
            .clone()
            .resize_tty(pb::ResizeTtyRequest {
                container_id: "tty".into(),
                exec_id: String::new(),
                rows: 50,
                cols: 132,
            })
            .await?;
        let mut stdin = r.stdin.take().context("stdin")?;
        stdin.write_all(b"\n").await?;
        let o = p.finish("tty", "", r).await?;
        p.remove("tty").await?;
        expect_exit(&o, 0, 0)?;
        if !o.stdout.contains("24 80") || !o.stdout.contains("50 132") {
            bail!("tty output {:?}", o.stdout);
        }
        drop(stdin);
        anyhow::Ok(())
    }
    .await;
    p.report("tty-with-resize", r);

    let r = bad_requests(&p).await;
    p.report("bad-requests-refused", r);

    let r = async {
        p.client.health.clone().check(pb::Empty {}).await?;
        let left = p.client.containers.clone().list_containers(pb::Empty {}).await?.into_inner().containers;
        if !left.is_empty() {
            bail!("containers left: {left:?}");
        }
        anyhow::Ok(())
    }
    .await;
    p.report("still-serving-nothing-left", r);

    if destroy {
        let r = p.client.sandbox.clone().destroy_sandbox(pb::Empty {}).await;
        p.report("destroy-sandbox", r.map(|_| ()).map_err(Into::into));
    }
    Ok(p.failures)
}

async fn bad_requests(p: &Probe) -> Result<()> {
    let mut c = p.client.containers.clone();
    let mut pr = p.client.processes.clone();
    let good = spec(&["sleep", "100"], &Opts::default());
    let create = |id: &str, spec: Vec<u8>, rootfs: pb::Rootfs| pb::CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: spec,
        rootfs: Some(rootfs),
        stdio: None,
        start: false,
    };
    expect_code(c.start_container(cref("nope")).await, Code::NotFound).context("start unknown")?;
    // More host entropy than the agent takes: refused before anything changes.
    let flood = pb::CreateSandboxRequest { entropy: vec![7; 257], ..Default::default() };
    expect_code(p.client.sandbox.clone().create_sandbox(flood).await, Code::InvalidArgument)
        .context("257 bytes of entropy")?;
    expect_code(
        pr.wait_process(pb::ProcessRef { container_id: "nope".into(), exec_id: String::new() }).await,
        Code::NotFound,
    )
    .context("wait unknown")?;
    expect_code(
        c.create_container(create("../x", good.to_string().into(), p.rootfs())).await,
        Code::InvalidArgument,
    )
    .context("bad id")?;
    expect_code(
        c.create_container(create("bad1", b"{not json".to_vec(), p.rootfs())).await,
        Code::InvalidArgument,
    )
    .context("malformed spec")?;
    let escape = pb::Rootfs { share_tag: p.share.clone(), path: "../..".into() };
    expect_code(
        c.create_container(create("bad2", good.to_string().into(), escape)).await,
        Code::InvalidArgument,
    )
    .context("rootfs escape")?;
    let unknown_share = pb::Rootfs { share_tag: "nosuchshare".into(), path: String::new() };
    expect_code(
        c.create_container(create("bad3", good.to_string().into(), unknown_share)).await,
        Code::NotFound,
    )
    .context("unknown share")?;
    let mut bind = good.clone();
    bind["mounts"]
        .as_array_mut()
        .context("mounts")?
        .push(json!({"destination": "/host-etc", "type": "bind", "source": "/etc", "options": ["rbind"]}));
    expect_code(
        c.create_container(create("bad4", bind.to_string().into(), p.rootfs())).await,
        Code::InvalidArgument,
    )
    .context("bind mount escape")?;
    let negative = spec(&["true"], &Opts { memory_limit: Some(-5), ..Opts::default() });
    expect_code(
        c.create_container(create("bad5", negative.to_string().into(), p.rootfs())).await,
        Code::InvalidArgument,
    )
    .context("negative memory limit")?;
    let mut stdio_req = create("bad6", good.to_string().into(), p.rootfs());
    stdio_req.stdio = Some(pb::Stdio { stdout: "never-opened".into(), ..Default::default() });
    expect_code(c.create_container(stdio_req).await, Code::NotFound).context("unknown stdio stream")?;
    // Duplicate id, then the calls that need a running container or a real signal.
    c.create_container(create("dup", good.to_string().into(), p.rootfs())).await.context("create dup")?;
    expect_code(
        c.create_container(create("dup", good.to_string().into(), p.rootfs())).await,
        Code::AlreadyExists,
    )
    .context("duplicate id")?;
    expect_code(
        pr.signal_process(pb::SignalProcessRequest {
            container_id: "dup".into(),
            exec_id: String::new(),
            signal: 999,
            all: false,
        })
        .await,
        Code::InvalidArgument,
    )
    .context("signal 999")?;
    expect_code(
        pr.resize_tty(pb::ResizeTtyRequest {
            container_id: "dup".into(),
            exec_id: String::new(),
            rows: 70000,
            cols: 1,
        })
        .await,
        Code::FailedPrecondition,
    )
    .context("resize without a tty")?;
    let huge = pb::UpdateContainerRequest {
        container_id: "dup".into(),
        resources_json: br#"{"pids": {"limit": -7}}"#.to_vec(),
    };
    expect_code(c.update_container(huge).await, Code::InvalidArgument).context("negative pids limit")?;
    expect_code(
        c.start_container(cref("dup")).await.and(c.start_container(cref("dup")).await),
        Code::FailedPrecondition,
    )
    .context("start twice")?;
    expect_code(
        c.remove_container(pb::RemoveContainerRequest { container_id: "dup".into(), force: false }).await,
        Code::FailedPrecondition,
    )
    .context("remove running without force")?;
    p.remove("dup").await?;
    // Created and started in one request: it runs to its end without a StartContainer, and a
    // start after it is refused.
    let exits7 = spec(&["sh", "-c", "exit 7"], &Opts::default());
    let mut both = create("both", exits7.to_string().into(), p.rootfs());
    both.start = true;
    let made = c.create_container(both).await.context("create and start")?.into_inner();
    if !made.started {
        bail!("a create asked to start did not say it started");
    }
    let whole = pb::ProcessRef { container_id: "both".into(), exec_id: String::new() };
    let exit = pr.wait_process(whole).await.context("wait for the started create")?.into_inner();
    if exit.exit_code != 7 {
        bail!("the started create's process exited {exit:?}, wanted code 7");
    }
    expect_code(c.start_container(cref("both")).await, Code::FailedPrecondition)
        .context("start after a create that started")?;
    p.remove("both").await?;
    Ok(())
}

/// Median of `n` timed runs of `f`.
async fn median<F, Fut>(n: usize, mut f: F) -> Result<Duration>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i).await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[n / 2])
}

async fn bench(p: Probe, n: usize) -> Result<()> {
    let d = p.client.sandbox.clone().guest_details(pb::Empty {}).await?.into_inner();
    // One value a line: callers prefix each line with where it was measured.
    println!(
        "BENCH agent-ready-after-init-ms {:.2}",
        d.agent_ready_ns.saturating_sub(d.init_started_ns) as f64 / 1e6
    );
    println!("BENCH init-started-ms {:.1}", d.init_started_ns as f64 / 1e6);
    println!("BENCH agent-rss-kib {}", d.agent_rss_bytes / 1024);
    let t = median(n, |i| {
        let p = &p;
        async move {
            let id = format!("true{i}");
            let t = Instant::now();
            let o = p.run(&id, &["true"], &Opts::default()).await?;
            eprintln!("  {id}: {:?}", t.elapsed());
            expect_exit(&o, 0, 0)
        }
    })
    .await?;
    println!("BENCH create-start-wait-true-ms {:.1}", t.as_secs_f64() * 1e3);
    const MIB: usize = DD_MIB;
    let mut best = 0f64;
    for i in 0..3 {
        let id = format!("dd{i}");
        let r = p.start(&id, &spec(&["sh", "-c", &dd_command()], &Opts::default())).await?;
        let t = Instant::now();
        let o = p.finish(&id, "", r).await?;
        let secs = t.elapsed().as_secs_f64();
        p.remove(&id).await?;
        if o.stdout.len() != MIB << 20 {
            bail!("stdout carried {} bytes, wanted {}", o.stdout.len(), MIB << 20);
        }
        best = best.max(MIB as f64 / secs);
    }
    println!("BENCH stdout-stream-mib-s {best:.1}");
    let d = p.client.sandbox.clone().guest_details(pb::Empty {}).await?.into_inner();
    println!("BENCH agent-rss-after-kib {}", d.agent_rss_bytes / 1024);
    let _ = p.client.sandbox.clone().destroy_sandbox(pb::Empty {}).await;
    Ok(())
}

/// The stdout workload of the bench: 256 MiB from dd.
const DD_MIB: usize = 256;

fn dd_command() -> String {
    format!("dd if=/dev/zero bs=1M count={DD_MIB} 2>/dev/null")
}

/// Writes one byte in each 4 KiB page of `mib` MiB of fresh anonymous memory, then frees it;
/// returns how long that took. The bench's settle step: in the nested test host, memory that a
/// cold VM freed is many times slower to write the first time it is reused (see
/// bench/runtime.sh), so a touch of more than one VM's worth after every run makes that cost
/// land here, untimed, instead of on whichever timed run allocates next.
fn touch_memory(mib: usize) -> Result<Duration> {
    let len = mib.checked_mul(1 << 20).context("size")?;
    let t = Instant::now();
    // SAFETY: a new private anonymous mapping at an address the kernel picks; it touches no
    // existing memory and is unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mmap {mib} MiB: {}", std::io::Error::last_os_error());
    }
    let base = p.cast::<u8>();
    for off in (0..len).step_by(4096) {
        // SAFETY: `off` < `len`, inside the mapping made above; volatile so the write stays.
        unsafe { base.add(off).write_volatile(1) };
    }
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(p, len) };
    Ok(t.elapsed())
}

async fn host_baselines(args: &[String]) -> Result<()> {
    match args[1].as_str() {
        "touch-memory" => {
            let mib = args.get(2).context("MiB")?.parse::<usize>()?;
            let label = args.get(3).map_or("-", String::as_str);
            println!("SETTLE {label} {:.1}", touch_memory(mib)?.as_secs_f64() * 1e3);
        }
        "time" => {
            let (label, n) = (args.get(2).context("label")?, args.get(3).context("N")?.parse::<usize>()?);
            let cmd = args.get(4..).filter(|c| !c.is_empty()).context("command")?;
            let t = median(n, |_| async {
                let st = tokio::process::Command::new(&cmd[0]).args(&cmd[1..]).status().await?;
                if !st.success() {
                    bail!("{cmd:?}: {st}");
                }
                Ok(())
            })
            .await?;
            println!("BENCH {label} {:.1}", t.as_secs_f64() * 1e3);
        }
        _ => {
            let mut best = 0f64;
            for _ in 0..3 {
                let mut child = tokio::process::Command::new("sh")
                    .args(["-c", &dd_command()])
                    .stdout(std::process::Stdio::piped())
                    .spawn()?;
                let mut out = child.stdout.take().context("stdout")?;
                let t = Instant::now();
                let mut buf = vec![0u8; 1 << 16];
                let mut total = 0usize;
                loop {
                    let n = out.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    total += n;
                }
                child.wait().await?;
                if total != DD_MIB << 20 {
                    bail!("pipe carried {total} bytes");
                }
                best = best.max(DD_MIB as f64 / t.elapsed().as_secs_f64());
            }
            println!("BENCH host-pipe-mib-s {best:.1}");
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("spec") {
        // The same config.json the probe sends, for running the workload under runc or crun.
        let argv: Vec<&str> = args[2..].iter().map(String::as_str).collect();
        println!("{}", spec(&argv, &Opts::default()));
        return Ok(());
    }
    if matches!(args.get(1).map(String::as_str), Some("time" | "touch-memory" | "pipe-baseline")) {
        return host_baselines(&args).await;
    }
    let usage =
        "usage: husk-agent-probe checks|bench UDS SHARE ROOTFS [--read-only-share] [--destroy] [--vm] [N]";
    if args.len() < 5 {
        bail!(usage);
    }
    let uds = PathBuf::from(&args[2]);
    let client = GrpcAgent::connect_when_ready(&uds, Duration::from_secs(300), None, None).await?.raw();
    let read_only_share = args.iter().any(|a| a == "--read-only-share");
    let share = pb::Share { tag: args[3].clone(), read_only: read_only_share };
    let unix_time_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as i64;
    client
        .sandbox
        .clone()
        .create_sandbox(pb::CreateSandboxRequest {
            hostname: "husk-sandbox".into(),
            shares: vec![share],
            unix_time_ns,
            ..Default::default()
        })
        .await
        .context("create sandbox")?;
    let p = Probe { client, share: args[3].clone(), rootfs: args[4].clone(), failures: 0 };
    match args[1].as_str() {
        "checks" => {
            let flag = |f: &str| args.iter().any(|a| a == f);
            let failures = checks(p, read_only_share, flag("--destroy"), flag("--vm")).await?;
            println!("PROBE-FAILURES {failures}");
            if failures > 0 {
                std::process::exit(1);
            }
        }
        "bench" => {
            let n = args.get(5).and_then(|n| n.parse().ok()).unwrap_or(10);
            bench(p, n).await?;
        }
        _ => bail!(usage),
    }
    Ok(())
}
