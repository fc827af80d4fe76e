//! `husk login` and `husk logout`: credentials in the containers auth-file format, at
//! `$REGISTRY_AUTH_FILE` or husk's own file, checked against the registry before they are stored.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use husk_core::config::Config;
use husk_core::RuntimeError;

use super::images::Images;
use super::{out, ExitCode};
use crate::error::CliError;

fn invalid(msg: &str) -> CliError {
    RuntimeError::InvalidArgument(msg.to_string()).into()
}

fn read_line(prompt: &str) -> Result<String, CliError> {
    if !prompt.is_empty() {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(RuntimeError::io("reading stdin"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

pub async fn login(
    cfg: &Config,
    registry: &str,
    username: Option<String>,
    password: Option<String>,
    password_stdin: bool,
) -> Result<ExitCode, CliError> {
    let interactive = std::io::stdin().is_terminal();
    let username = match username {
        Some(u) => u,
        None if interactive && !password_stdin => read_line("Username: ")?,
        None => return Err(invalid("give --username")),
    };
    let password = match password {
        Some(p) => p,
        None if password_stdin => read_line("")?,
        None if interactive => {
            // No echo: the terminal shows nothing while the password is typed.
            let stdin = std::io::stdin();
            let old = nix::sys::termios::tcgetattr(&stdin).map_err(|e| invalid(&format!("terminal: {e}")))?;
            let mut quiet = old.clone();
            quiet.local_flags.remove(nix::sys::termios::LocalFlags::ECHO);
            let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &quiet);
            let line = read_line("Password: ");
            let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &old);
            eprintln!();
            line?
        }
        None => return Err(invalid("give --password or --password-stdin")),
    };
    if username.is_empty() || password.is_empty() {
        return Err(invalid("the username and password must not be empty"));
    }
    let images = Images::open(cfg)?;
    images.registry.login(registry, &username, &password).await?;
    let file = husk_image::husk_auth_file();
    husk_image::store_credentials(&file, registry, &username, &password)?;
    out!("Login Succeeded (credentials in {})", file.display());
    Ok(0)
}

pub fn logout(registry: &str) -> Result<ExitCode, CliError> {
    let file = husk_image::husk_auth_file();
    if husk_image::remove_credentials(&file, registry)? {
        out!("Removed login credentials for {registry}");
        Ok(0)
    } else {
        Err(invalid(&format!("not logged in to {registry} (in {})", file.display())))
    }
}
