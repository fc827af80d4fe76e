//! `husk`: the OCI runtime CLI (runc's commands and flags) and `husk run` sandboxes.

use std::io::Write as _;

use clap::Parser;
use husk_runtime::cli::{Cli, Command};
use husk_runtime::commands;
use husk_runtime::error::RuntimeError;
use husk_runtime::ops::Runtime;
use husk_runtime::{quick, relay, runlog};

fn main() {
    // Internal: the detached relay behind a container's --pid-file.
    let mut args = std::env::args();
    if args.nth(1).as_deref() == Some("__relay") {
        relay::child_main(&args.next().unwrap_or_default());
    }
    let cli = Cli::parse();
    runlog::init(cli.log.as_deref(), cli.log_format, cli.debug);
    // `husk run --rootfs|--image` is for people: plain errors, not runc's log lines.
    let human = cli.log.is_none()
        && matches!(&cli.command, Command::Run(r) if r.rootfs.is_some() || r.image.is_some());
    let code = match run(cli) {
        Ok(code) => code,
        Err((e, to_stderr)) => {
            if human {
                eprintln!("husk: {e}");
            } else {
                tracing::error!("{e}");
                if to_stderr {
                    eprintln!("husk: {e}");
                }
            }
            // runc's convention for "the runtime failed" vs. the process's own codes.
            if human {
                125
            } else {
                1
            }
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32, (RuntimeError, bool)> {
    let to_stderr = !runlog::logs_to_stderr(cli.log.as_deref());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (RuntimeError::Internal(format!("tokio: {e}")), to_stderr))?;
    rt.block_on(dispatch(cli)).map_err(|e| (e, to_stderr))
}

async fn dispatch(cli: Cli) -> Result<i32, RuntimeError> {
    // Commands that need no state directory.
    match &cli.command {
        Command::Features => {
            let json = serde_json::to_string_pretty(&commands::features()).unwrap_or_default();
            let _ = writeln!(std::io::stdout().lock(), "{json}");
            return Ok(0);
        }
        Command::Spec { bundle, rootless } => return commands::spec(bundle, *rootless),
        _ => {}
    }
    let rt = Runtime::new(&cli.root)?;
    match cli.command {
        Command::Create(a) => commands::create(&rt, a).await,
        Command::Start { id } => rt.start(&id).await.map(|_| 0),
        Command::Run(a) if a.rootfs.is_some() || a.image.is_some() => quick::run(&rt, a).await,
        Command::Run(a) => commands::run_oci(&rt, a).await,
        Command::State { id } => commands::state(&rt, &id).await,
        Command::Kill { all, id, signal } => commands::kill(&rt, &id, &signal, all).await,
        Command::Delete { force, id } => rt.delete(&id, force).await.map(|_| 0),
        Command::Exec(a) => commands::exec(&rt, a).await,
        Command::Ps { format, id, ps_args: _ } => commands::ps(&rt, &id, &format).await,
        Command::Pause { id } => rt.pause(&id, true).await.map(|_| 0),
        Command::Resume { id } => rt.pause(&id, false).await.map(|_| 0),
        Command::Update(a) => {
            let resources = commands::update_resources(&a)?;
            rt.update(&a.id, resources).await.map(|_| 0)
        }
        Command::Events { interval, stats, id } => commands::events(&rt, &id, &interval, stats).await,
        Command::List { format, quiet } => commands::list(&rt, &format, quiet).await,
        Command::Features | Command::Spec { .. } => Ok(0),
    }
}
