//! The shim's tracing logs go to the `log` FIFO containerd opens in the shim's working
//! directory (the bundle), as the runc shim's do; to stderr when there is none.

use std::fs::OpenOptions;
use std::sync::Mutex;

pub fn init(debug: bool) {
    let level = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::new(level);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false);
    let result = match OpenOptions::new().write(true).open("log") {
        Ok(f) => builder.with_writer(Mutex::new(f)).try_init(),
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
    if let Err(e) = result {
        eprintln!("husk shim: logging: {e}");
    }
}
