//! OCI hooks that run on the host, in the order the runtime spec gives them: `prestart` and
//! `createRuntime` during create, `poststart` after start, `poststop` after delete. Each gets
//! the container's state JSON on stdin and is killed at its `timeout`.
//!
//! `createContainer` and `startContainer` hooks name programs in the container's mount
//! namespace, which lives inside the sandbox VM: husk refuses a bundle that has them rather than
//! run them in the wrong world.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use oci_spec::runtime::{Hook, Hooks};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::RuntimeError;

/// How much of a failing hook's stderr its error keeps.
const STDERR_KEPT: usize = 4096;

/// The state a hook reads on stdin (the runtime spec's state object).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HookState<'a> {
    pub oci_version: &'a str,
    pub id: &'a str,
    pub status: &'a str,
    pub pid: i32,
    pub bundle: &'a Path,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: &'a std::collections::BTreeMap<String, String>,
}

/// Refuses hooks that would have to run inside the container's world.
pub fn check(hooks: Option<&Hooks>) -> Result<(), RuntimeError> {
    let Some(h) = hooks else { return Ok(()) };
    for (kind, list) in [("createContainer", h.create_container()), ("startContainer", h.start_container())] {
        if let Some(first) = list.as_ref().and_then(|l| l.first()) {
            return Err(RuntimeError::Hook {
                kind,
                path: first.path().clone(),
                reason: "runs in the container's namespaces, which are inside the sandbox VM; husk runs \
                         only host hooks (prestart, createRuntime, poststart, poststop)"
                    .into(),
            });
        }
    }
    Ok(())
}

/// Runs `hooks` one after another; the first failure stops the rest and is returned.
pub async fn run(kind: &'static str, hooks: &[Hook], state: &HookState<'_>) -> Result<(), RuntimeError> {
    if hooks.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_vec(state).map_err(|e| RuntimeError::Internal(format!("hook state: {e}")))?;
    for h in hooks {
        run_one(kind, h, &json).await?;
    }
    Ok(())
}

/// Runs `hooks` and logs failures: for hooks whose failure must not stop the lifecycle
/// (poststart, poststop).
pub async fn run_logged(kind: &'static str, hooks: &[Hook], state: &HookState<'_>) {
    if let Err(e) = run(kind, hooks, state).await {
        tracing::warn!("container {}: {e}", state.id);
    }
}

async fn run_one(kind: &'static str, h: &Hook, state_json: &[u8]) -> Result<(), RuntimeError> {
    let fail = |reason: String| RuntimeError::Hook { kind, path: h.path().clone(), reason };
    if !h.path().is_absolute() {
        return Err(fail("the path must be absolute".into()));
    }
    let mut cmd = tokio::process::Command::new(h.path());
    // args[0] is argv[0], as for execv.
    if let Some(args) = h.args().as_ref().filter(|a| !a.is_empty()) {
        cmd.arg0(&args[0]).args(&args[1..]);
    }
    cmd.env_clear();
    for e in h.env().iter().flatten() {
        match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                cmd.env(k, v);
            }
            _ => return Err(fail(format!("env entry {e:?} is not KEY=VALUE"))),
        }
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| fail(format!("cannot start: {e}")))?;
    let mut stdin = child.stdin.take();
    let mut stderr = child.stderr.take();
    let work = async {
        if let Some(mut s) = stdin.take() {
            // A hook that does not read its state is not an error.
            let _ = s.write_all(state_json).await;
        }
        let mut err = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(STDERR_KEPT as u64).read_to_end(&mut err).await;
        }
        let status = child.wait().await;
        (status, err)
    };
    let timeout = h.timeout().filter(|t| *t > 0).map(|t| Duration::from_secs(t as u64));
    let (status, err) = match timeout {
        Some(t) => match tokio::time::timeout(t, work).await {
            Ok(r) => r,
            // Dropping the future kills the hook (kill_on_drop).
            Err(_) => return Err(fail(format!("timed out after {}s", t.as_secs()))),
        },
        None => work.await,
    };
    let status = status.map_err(|e| fail(format!("waiting: {e}")))?;
    if status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&err);
    let err = err.trim();
    Err(fail(if err.is_empty() { format!("{status}") } else { format!("{status}: {err}") }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn hook(args: &[&str], timeout: Option<i64>) -> Hook {
        let mut v = serde_json::json!({"path": "/bin/sh", "args": args});
        if let Some(t) = timeout {
            v["timeout"] = t.into();
        }
        serde_json::from_value(v).expect("hook")
    }

    fn state<'a>(ann: &'a BTreeMap<String, String>) -> HookState<'a> {
        HookState {
            oci_version: "1.0.2",
            id: "c1",
            status: "creating",
            pid: 7,
            bundle: Path::new("/b"),
            annotations: ann,
        }
    }

    #[tokio::test]
    async fn hooks_run_in_order_with_the_state_on_stdin() {
        let dir = std::env::temp_dir().join(format!("husk-hooks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let log = dir.join("log");
        let l = log.display().to_string();
        let ann = BTreeMap::new();
        let hooks = [
            hook(&["sh", "-c", &format!("echo one >> {l}; cat >> {l}; echo >> {l}")], None),
            hook(&["sh", "-c", &format!("echo two \"$0\" \"$X\" >> {l}")], Some(5)),
        ];
        let mut h1 = hooks[1].clone();
        h1.set_env(Some(vec!["X=y".into()]));
        run("prestart", &[hooks[0].clone(), h1], &state(&ann)).await.expect("hooks");
        let text = std::fs::read_to_string(&log).expect("log");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "one");
        let st: serde_json::Value = serde_json::from_str(lines[1]).expect("state json");
        assert_eq!(
            (st["id"].as_str(), st["pid"].as_i64(), st["status"].as_str()),
            (Some("c1"), Some(7), Some("creating"))
        );
        assert_eq!(lines[2], "two sh y");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_failing_or_slow_hook_is_an_error_that_stops_the_rest() {
        let ann = BTreeMap::new();
        let e = run(
            "prestart",
            &[hook(&["sh", "-c", "echo nope >&2; exit 3"], None), hook(&["sh", "-c", "exit 9"], None)],
            &state(&ann),
        )
        .await
        .expect_err("fails")
        .to_string();
        assert!(e.contains("prestart hook /bin/sh") && e.contains("nope") && e.contains('3'), "{e}");
        let t = std::time::Instant::now();
        let e = run("createRuntime", &[hook(&["sh", "-c", "sleep 30"], Some(1))], &state(&ann))
            .await
            .expect_err("slow");
        assert!(e.to_string().contains("timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
        let rel: Hook = serde_json::from_value(serde_json::json!({"path": "sh"})).expect("hook");
        assert!(run("poststart", &[rel], &state(&ann)).await.is_err());
    }

    #[test]
    fn hooks_of_the_containers_world_are_refused() {
        let h: Hooks =
            serde_json::from_value(serde_json::json!({"createContainer": [{"path": "/bin/true"}]}))
                .expect("hooks");
        let e = check(Some(&h)).expect_err("refused").to_string();
        assert!(e.contains("createContainer hook /bin/true"), "{e}");
        let ok: Hooks =
            serde_json::from_value(serde_json::json!({"prestart": [{"path": "/bin/true"}]})).expect("hooks");
        assert!(check(Some(&ok)).is_ok());
    }
}
