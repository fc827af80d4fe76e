//! `husk run --rootfs DIR | --image oci:LAYOUT[:TAG] | [--image] IMAGE [-it] ... -- CMD...`: a
//! command in a fresh sandbox with no bundle to write. A registry image is pulled into husk's
//! image store when missing (`--pull`) and its store snapshot, unpacked once per image, is the
//! rootfs; a layout is unpacked for the run. The rootfs is shared read-only and overlaid in the
//! guest, so the run never changes it; the sandbox is removed afterwards; the exit code is the
//! command's. The spec starts from runc's default (oci-spec's) and takes the image's config.
//! The sandbox joins a CNI network (`--net`, husk's default one unless told otherwise, with
//! `-p` port mappings) through a network namespace husk-core makes for it, or with `--net none`
//! has loopback only.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use husk_core::bundle::Bundle;
use husk_core::cni::{NetRequest, Network, PortMapping};
use husk_core::stdio::StdioStrategy;
use husk_core::vm::ExtraShare;
use husk_core::{CreateOpts, RuntimeError};
use husk_image::ImageConfig;
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Mount, Spec};
use serde_json::json;

use super::images::Images;
use super::{ExitCode, Rt};
use crate::args::{PullPolicy, RootfsSource, SandboxRun};
use crate::error::CliError;
use crate::foreground;

pub const ROOTFS_TAG: &str = "rootfs";
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn invalid(msg: String) -> RuntimeError {
    RuntimeError::InvalidArgument(msg)
}

/// A `-v HOST:GUEST[:ro]` argument as an OCI bind mount.
fn volume(v: &str) -> Result<Mount, RuntimeError> {
    let bad = |why: &str| invalid(format!("--volume {v:?}: {why}"));
    let parts: Vec<&str> = v.split(':').collect();
    let (host, guest, ro) = match parts.as_slice() {
        [h, g] => (*h, *g, false),
        [h, g, "ro"] => (*h, *g, true),
        [h, g, "rw"] => (*h, *g, false),
        _ => return Err(bad("expected HOST:GUEST[:ro]")),
    };
    if !Path::new(host).is_absolute() || !Path::new(guest).is_absolute() {
        return Err(bad("both paths must be absolute"));
    }
    if guest.split('/').any(|c| c == "..") {
        return Err(bad("the guest path must not contain '..'"));
    }
    let host = Path::new(host).canonicalize().map_err(|e| bad(&e.to_string()))?;
    let mut opts = vec!["rbind", "rprivate"];
    if ro {
        opts.push("ro");
    }
    serde_json::from_value(json!({"destination": guest, "type": "bind", "source": host, "options": opts}))
        .map_err(|e| bad(&e.to_string()))
}

/// The spec of a sandbox run: runc's default, with the image's (or the flags') process.
fn run_spec(a: &SandboxRun, rootfs: &Path, img: &ImageConfig) -> Result<Spec, CliError> {
    let args: Vec<String> = if !a.command.is_empty() {
        a.command.clone()
    } else {
        img.entrypoint.iter().chain(&img.cmd).cloned().collect()
    };
    if args.is_empty() {
        return Err(invalid("no command given (and the image names none)".into()).into());
    }
    let mut env: Vec<String> = Vec::new();
    if !img.env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.into());
    }
    env.extend(img.env.iter().cloned());
    if a.tty {
        env.push("TERM=xterm".into());
    }
    for e in &a.env {
        if !e.contains('=') {
            return Err(invalid(format!("--env {e:?}: expected KEY=VALUE")).into());
        }
        env.push(e.clone());
    }
    let cwd = a.workdir.clone().or_else(|| Some(img.working_dir.clone()).filter(|w| !w.is_empty()));
    let cwd = cwd.unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(invalid(format!("working directory {cwd:?} is not absolute")).into());
    }
    let (uid, gid) = husk_image::resolve_user(rootfs, &img.user)?;
    // As runc does for a process without one (and Docker's runs get): the user's home, or `/`
    // for a rootfs without /etc/passwd. Read here, on the host, it saves the guest a passwd
    // lookup over virtio-fs; where it cannot be told here, the guest's runtime looks.
    if !env.iter().any(|e| e.strip_prefix("HOME=").is_some_and(|h| !h.is_empty())) {
        if let Some(home) = husk_image::home_dir(rootfs, uid) {
            env.retain(|e| e != "HOME=");
            env.push(format!("HOME={home}"));
        }
    }

    let mut spec = Spec::default();
    let internal = |e: oci_spec::OciSpecError| RuntimeError::Internal(format!("run spec: {e}"));
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_terminal(Some(a.tty));
    process.set_args(Some(args));
    process.set_env(Some(env));
    process.set_cwd(cwd.into());
    let user = oci_spec::runtime::UserBuilder::default().uid(uid).gid(gid).build().map_err(internal)?;
    process.set_user(user);
    spec.set_process(Some(process));
    let root =
        oci_spec::runtime::RootBuilder::default().path(rootfs).readonly(false).build().map_err(internal)?;
    spec.set_root(Some(root));
    spec.set_hostname(Some(a.hostname.clone().unwrap_or_else(|| "husk".into())));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    let tmp: Mount = serde_json::from_value(
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}),
    )
    .map_err(|e| RuntimeError::Internal(format!("run spec: {e}")))?;
    mounts.push(tmp);
    for v in &a.volume {
        mounts.push(volume(v)?);
    }
    spec.set_mounts(Some(mounts));
    set_network_namespace(&mut spec, None);
    Ok(spec)
}

/// The spec's `network` namespace entry: with the path of the namespace CNI filled (which husk
/// wires to the VM), or without one (the VM's own, loopback only). Never absent: that would
/// ask for the host's network.
fn set_network_namespace(spec: &mut Spec, netns: Option<&Path>) {
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut nss: Vec<LinuxNamespace> = linux.namespaces().clone().unwrap_or_default();
    nss.retain(|n| n.typ() != LinuxNamespaceType::Network);
    let mut net = LinuxNamespace::default();
    net.set_typ(LinuxNamespaceType::Network);
    net.set_path(netns.map(Path::to_path_buf));
    nss.push(net);
    linux.set_namespaces(Some(nss));
    spec.set_linux(Some(linux));
}

/// `--net` and `-p` as the core's request: None for `--net none`.
fn net_request(a: &SandboxRun) -> Result<Option<NetRequest>, RuntimeError> {
    let network = match a.net.as_deref() {
        None | Some("default") => Some(Network::Default),
        Some("none") => None,
        Some(name) => {
            husk_core::cni::conf::check_name(name)?;
            Some(Network::Named(name.to_string()))
        }
    };
    let port_mappings = a.publish.iter().map(|p| p.parse::<PortMapping>()).collect::<Result<Vec<_>, _>>()?;
    match network {
        None if !port_mappings.is_empty() => {
            Err(invalid("--publish needs a network: it cannot be used with --net none".into()))
        }
        None => Ok(None),
        Some(network) => {
            husk_core::cni::ports::check_unique(&port_mappings)?;
            Ok(Some(NetRequest { network, port_mappings }))
        }
    }
}

fn new_id() -> String {
    let mut b = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    format!("run-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

pub async fn run(rt: &Rt, a: SandboxRun) -> Result<ExitCode, CliError> {
    if a.tty && !foreground::stdin_is_tty() {
        return Err(invalid("the input device is not a TTY (drop -t)".into()).into());
    }
    let net = net_request(&a)?;
    rt.cfg.preflight()?;
    let id = new_id();
    let work = rt.state.run_dir(&id);
    std::fs::create_dir_all(&work).map_err(RuntimeError::io(format!("creating {}", work.display())))?;
    let result = run_in(rt, &a, &id, &work, net.as_ref()).await;
    // Whatever the run set up that no container took down with it (a CNI network before the
    // create, a create that failed halfway) goes now; after a clean run there is nothing.
    if let Err(e) = rt.remove_orphan_sandbox(&id).await {
        tracing::warn!("sandbox {id}: {e}");
    }
    let _ = std::fs::remove_dir_all(&work);
    husk_core::timeline::mark("teardown done");
    result
}

async fn run_in(
    rt: &Rt,
    a: &SandboxRun,
    id: &str,
    work: &Path,
    net: Option<&NetRequest>,
) -> Result<ExitCode, CliError> {
    // Held until the run ends: keeps the image's snapshot from garbage collection.
    let mut _snapshot = None;
    let (rootfs, img): (PathBuf, ImageConfig) = match &a.rootfs {
        RootfsSource::Dir(r) => {
            (r.canonicalize().map_err(RuntimeError::bundle_file("rootfs", r))?, ImageConfig::default())
        }
        RootfsSource::Image(name) => {
            let images = Images::open(&rt.cfg)?;
            let platform = a.platform.as_deref().unwrap_or("linux/amd64");
            let record = match (a.pull, images.store.find(name)?) {
                (PullPolicy::Always, _) | (PullPolicy::Missing, None) => {
                    images.pull(name, platform, false).await?
                }
                (_, Some(r)) => r,
                (PullPolicy::Never, None) => {
                    return Err(husk_image::ImageError::NoSuchImage { query: name.clone() }.into())
                }
            };
            let snapshot = images.store.snapshot(&record, &images.limits)?;
            tracing::debug!(
                "image {}: snapshot {} ({})",
                record.name,
                snapshot.path.display(),
                if snapshot.unpacked { "unpacked now" } else { "unpacked before" }
            );
            let cfg = images.store.config(&record)?;
            let path = snapshot.path.clone();
            _snapshot = Some(snapshot);
            (path, cfg)
        }
        RootfsSource::Layout(i) => {
            let (layout, tag) = husk_image::parse_reference(i)?;
            let dest = work.join("rootfs");
            std::fs::create_dir_all(&dest)
                .map_err(RuntimeError::io(format!("creating {}", dest.display())))?;
            let cfg = husk_image::unpack(&layout, &tag, &dest)?;
            (dest, cfg)
        }
    };
    let mut spec = run_spec(a, &rootfs, &img)?;
    husk_core::timeline::mark("run: rootfs and spec ready");
    // Ctrl-C while the network is set up or the VM boots: finish, then remove everything and
    // exit 130.
    let interrupted = Arc::new(AtomicBool::new(false));
    let watch = {
        let flag = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::SeqCst);
            }
        })
    };
    if let Some(req) = net {
        let attached = husk_core::cni::attach(&rt.state, &rt.cfg, id, req).await?;
        tracing::debug!(
            "sandbox {id}: on network {} as {:?}",
            attached.network,
            attached.result.addresses_of(husk_core::cni::sandbox::IFNAME)
        );
        set_network_namespace(&mut spec, Some(&attached.netns));
        if interrupted.load(Ordering::SeqCst) {
            watch.abort();
            return Ok(130);
        }
    }
    let bundle = Bundle::from_spec(work.to_path_buf(), spec)?;
    let mut opts = CreateOpts::new(StdioStrategy::Held {
        size: if a.tty { foreground::own_terminal_size() } else { None },
    });
    opts.extra_shares = vec![ExtraShare { tag: ROOTFS_TAG.into(), path: rootfs.clone(), read_only: true }];
    opts.rootfs_share = Some((ROOTFS_TAG.into(), String::new()));
    opts.memory_mib = a.memory;
    opts.vcpus = a.cpus;
    // Without -i the process reads /dev/null, as under `docker run`.
    opts.stdin = a.interactive;
    opts.start = true;
    let created = rt.create(id, &bundle, opts).await;
    watch.abort();
    let Some(held) = created? else {
        return Err(RuntimeError::Internal("a held create returned no streams".into()).into());
    };
    if interrupted.load(Ordering::SeqCst) {
        rt.delete(id, true, held.vm).await?;
        return Ok(130);
    }
    let started = if held.started { rt.started(id).await } else { rt.start(id).await };
    if let Err(e) = started {
        rt.delete(id, true, held.vm).await?;
        return Err(e.into());
    }
    let (outcome, vm) = foreground::relay(rt, held, a.tty).await?;
    foreground::delete_after(rt, id, outcome, vm).await?;
    husk_core::timeline::mark("delete done");
    Ok(outcome.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes() {
        let v = volume("/tmp:/data:ro").expect("valid");
        assert_eq!(v.destination(), Path::new("/data"));
        assert!(v.options().as_ref().is_some_and(|o| o.iter().any(|x| x == "ro")));
        for bad in ["/tmp", "tmp:/data", "/tmp:data", "/tmp:/a/../b", "/tmp:/d:rx", "/does-not-exist:/d"] {
            assert!(volume(bad).is_err(), "{bad}");
        }
    }

    /// A `husk run --rootfs /` with these `-e` values and no command.
    fn run_with_env(env: &[&str]) -> SandboxRun {
        SandboxRun {
            rootfs: RootfsSource::Dir("/".into()),
            interactive: false,
            tty: false,
            memory: None,
            cpus: None,
            env: env.iter().map(|e| e.to_string()).collect(),
            volume: vec![],
            workdir: None,
            hostname: None,
            net: None,
            publish: vec![],
            pull: PullPolicy::Missing,
            platform: None,
            command: vec![],
        }
    }

    #[test]
    fn the_run_spec_is_runcs_default_with_the_images_process() {
        let a = run_with_env(&["A=b"]);
        let img = ImageConfig { cmd: vec!["sh".into()], working_dir: "/w".into(), ..Default::default() };
        let d = std::env::temp_dir();
        let s = run_spec(&a, &d, &img).expect("spec");
        let p = s.process().as_ref().expect("process");
        assert_eq!(p.args().as_deref(), Some(&["sh".to_string()][..]));
        assert_eq!(p.cwd(), Path::new("/w"));
        assert!(p
            .env()
            .as_ref()
            .is_some_and(|e| e.contains(&"A=b".to_string()) && e[0].starts_with("PATH=")));
        assert_eq!(p.no_new_privileges(), Some(true));
        let nss = |s: &Spec| s.linux().as_ref().and_then(|l| l.namespaces().clone()).unwrap_or_default();
        let net = |s: &Spec| -> Vec<Option<PathBuf>> {
            nss(s)
                .iter()
                .filter(|n| n.typ() == LinuxNamespaceType::Network)
                .map(|n| n.path().clone())
                .collect()
        };
        // A network namespace of its own (none would be the host's), without a path: loopback.
        assert_eq!(net(&s), vec![None]);
        assert!(nss(&s).iter().any(|n| n.typ() == LinuxNamespaceType::Pid));
        let mut with = s.clone();
        set_network_namespace(&mut with, Some(Path::new("/run/husk/netns/run-1")));
        assert_eq!(net(&with), vec![Some(PathBuf::from("/run/husk/netns/run-1"))]);
        assert_eq!(nss(&with).len(), nss(&s).len());
        assert!(s.mounts().iter().flatten().any(|m| m.destination() == Path::new("/tmp")));

        // HOME as runc sets it: `/` without an /etc/passwd, the entry's with one; one given stays.
        let home = |rootfs: &Path, env: &[&str]| {
            let s = run_spec(&run_with_env(env), rootfs, &img).expect("spec");
            let env = s.process().as_ref().and_then(|p| p.env().clone()).unwrap_or_default();
            env.into_iter().filter(|e| e.starts_with("HOME=")).collect::<Vec<_>>()
        };
        let r = d.join(format!("husk-home-{}", std::process::id()));
        std::fs::create_dir_all(r.join("etc")).expect("mkdir");
        assert_eq!(home(&r, &[]), ["HOME=/"]);
        assert_eq!(home(&r, &["HOME="]), ["HOME=/"], "an empty one counts as none");
        std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
        assert_eq!(home(&r, &[]), ["HOME=/root"]);
        assert_eq!(home(&r, &["HOME=/mine"]), ["HOME=/mine"]);
        std::fs::write(r.join("etc/passwd"), "nobody:x:65534:65534::/nonexistent:/bin/sh\n").expect("passwd");
        assert!(home(&r, &[]).is_empty(), "no entry for root: the guest looks");
        let _ = std::fs::remove_dir_all(&r);
        assert!(run_spec(&SandboxRun { command: vec![], ..a }, &d, &ImageConfig::default()).is_err());
    }

    #[test]
    fn net_and_publish_flags() {
        let run = |net: Option<&str>, publish: &[&str]| {
            net_request(&SandboxRun {
                rootfs: RootfsSource::Dir("/".into()),
                interactive: false,
                tty: false,
                memory: None,
                cpus: None,
                env: vec![],
                volume: vec![],
                workdir: None,
                hostname: None,
                net: net.map(str::to_string),
                publish: publish.iter().map(|p| p.to_string()).collect(),
                pull: PullPolicy::Missing,
                platform: None,
                command: vec!["true".into()],
            })
        };
        let r = run(None, &[]).expect("default").expect("a network");
        assert_eq!((r.network, r.port_mappings.len()), (Network::Default, 0));
        assert_eq!(run(Some("default"), &[]).expect("default").map(|r| r.network), Some(Network::Default));
        assert_eq!(run(Some("none"), &[]).expect("none"), None);
        let r = run(Some("lab-1"), &["8080:80", "127.0.0.1:5353:53/udp"]).expect("named").expect("a network");
        assert_eq!(r.network, Network::Named("lab-1".into()));
        assert_eq!(
            r.port_mappings.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            ["8080:80/tcp", "127.0.0.1:5353:53/udp"]
        );
        let e = run(Some("none"), &["80:80"]).expect_err("-p needs a network").to_string();
        assert!(e.contains("--net none"), "{e}");
        for (net, publish) in [
            (Some(""), &[][..]),
            (Some("../x"), &[]),
            (None, &["80"]),
            (None, &["0:80"]),
            (None, &["80:80/sctp"]),
            (None, &["80:80", "80:81"]),
        ] {
            assert!(run(net, publish).is_err(), "{net:?} {publish:?}");
        }
    }
}
