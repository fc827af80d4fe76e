//! `husk`: the OCI runtime CLI (runc's commands and flags) and `husk run` sandboxes, as thin
//! commands over husk-core.

mod args;
mod commands;
mod error;
mod foreground;
mod progress;
mod runlog;

use std::io::Write as _;

use args::{Cli, Command, ImageCommand, RunMode};
use clap::Parser;
use commands::ExitCode;
use error::CliError;
use husk_core::RuntimeError;

fn main() {
    husk_core::timeline::process_started();
    // Internal: the detached relay behind a container's --pid-file.
    let mut argv = std::env::args();
    if argv.nth(1).as_deref() == Some("__relay") {
        husk_core::relay::child_main(&argv.next().unwrap_or_default());
    }
    let cli = Cli::parse();
    runlog::init(cli.log.as_deref(), cli.log_format, cli.debug);
    // Sandbox runs and image commands are for people: plain errors, not runc's log lines.
    let human = cli.log.is_none()
        && match &cli.command {
            Command::Run(r) => r.is_sandbox(),
            Command::Pull(_)
            | Command::Images(_)
            | Command::Rmi { .. }
            | Command::Image(_)
            | Command::Login { .. }
            | Command::Logout { .. }
            | Command::Snapshot(_) => true,
            _ => false,
        };
    let to_stderr = !runlog::logs_to_stderr(cli.log.as_deref());
    if matches!(&cli.command, Command::Run(r) if r.timings) {
        husk_core::timeline::enable();
    }
    let result = run(cli);
    husk_core::timeline::print_if_enabled();
    let code = match result {
        Ok(code) => code,
        Err(e) => {
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

fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RuntimeError::io("starting the tokio runtime"))?;
    rt.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    // Commands that need no state directory.
    match &cli.command {
        Command::Features => {
            let json = serde_json::to_string_pretty(&commands::features::features()).unwrap_or_default();
            let _ = writeln!(std::io::stdout().lock(), "{json}");
            return Ok(0);
        }
        Command::Spec { bundle, rootless } => return Ok(commands::spec::run(bundle, *rootless)?),
        _ => {}
    }
    // Image commands: the config, no container state.
    match &cli.command {
        Command::Pull(p) | Command::Image(ImageCommand::Pull(p)) => {
            let cfg = husk_core::config::Config::load()?;
            return commands::images::pull(&cfg, &p.name, &p.platform, p.quiet).await;
        }
        Command::Images(l) | Command::Image(ImageCommand::Ls(l)) => {
            return commands::images::list(&husk_core::config::Config::load()?, &l.format, l.quiet);
        }
        Command::Rmi { names } | Command::Image(ImageCommand::Rm { names }) => {
            return commands::images::remove(&husk_core::config::Config::load()?, names);
        }
        Command::Image(ImageCommand::Inspect { name }) => {
            return commands::images::inspect(&husk_core::config::Config::load()?, name);
        }
        Command::Image(ImageCommand::Prune) => {
            return commands::images::prune(&husk_core::config::Config::load()?);
        }
        Command::Login { username, password, password_stdin, registry } => {
            let cfg = husk_core::config::Config::load()?;
            return commands::login::login(
                &cfg,
                registry,
                username.clone(),
                password.clone(),
                *password_stdin,
            )
            .await;
        }
        Command::Logout { registry } => return commands::login::logout(registry),
        Command::Snapshot(c) => return commands::snapshot::run(c).await,
        _ => {}
    }
    let rt = commands::runtime(&cli.root, cli.no_snapshot)?;
    let code = match cli.command {
        Command::Create(a) => commands::create::run(&rt, a).await?,
        Command::Start { id } => commands::start::run(&rt, &id).await?,
        Command::Run(a) => match a.mode().map_err(RuntimeError::InvalidArgument)? {
            RunMode::Sandbox(s) => return commands::sandbox_run::run(&rt, s).await,
            RunMode::Oci(o) => commands::run::run(&rt, o).await?,
        },
        Command::State { id } => commands::state::run(&rt, &id).await?,
        Command::Kill { all, id, signal } => commands::kill::run(&rt, &id, &signal, all).await?,
        Command::Delete { force, id } => commands::delete::run(&rt, &id, force).await?,
        Command::Exec(a) => commands::exec::run(&rt, a).await?,
        Command::Ps { format, id, ps_args: _ } => commands::ps::run(&rt, &id, &format).await?,
        Command::Pause { id } => commands::pause::pause(&rt, &id).await?,
        Command::Resume { id } => commands::pause::resume(&rt, &id).await?,
        Command::Update(a) => commands::update::run(&rt, a).await?,
        Command::Events { interval, stats, id } => commands::events::run(&rt, &id, &interval, stats).await?,
        Command::List { format, quiet } => commands::list::run(&rt, &format, quiet).await?,
        Command::Features
        | Command::Spec { .. }
        | Command::Pull(_)
        | Command::Images(_)
        | Command::Rmi { .. }
        | Command::Image(_)
        | Command::Login { .. }
        | Command::Logout { .. }
        | Command::Snapshot(_) => 0,
    };
    Ok(code)
}
