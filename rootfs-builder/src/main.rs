//! `husk-rootfs-builder`: writes a guest initramfs from a spec file and/or `--init`/`--file` flags.

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use husk_rootfs_builder::spec::{base_entries, build_from_spec, parse_spec, Entry};

#[derive(Parser)]
#[command(version, about = "Build a husk guest initramfs (uncompressed newc cpio)")]
struct Args {
    /// Where to write the archive.
    #[arg(short, long)]
    output: PathBuf,
    /// Binary to install as /init (the guest's PID 1).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Extra file as ARCHIVE_PATH=HOST_PATH; may repeat.
    #[arg(long = "file", value_name = "ARCHIVE=HOST")]
    files: Vec<String>,
    /// A spec file (see the crate docs for its format); host paths are relative to it.
    #[arg(long)]
    spec: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut entries = base_entries();
    if let Some(init) = &args.init {
        entries.push(Entry::File { path: "init".into(), host: init.clone(), mode: Some(0o755) });
    }
    for f in &args.files {
        let (path, host) =
            f.split_once('=').with_context(|| format!("--file {f:?}: expected ARCHIVE_PATH=HOST_PATH"))?;
        entries.push(Entry::File {
            path: path.trim_start_matches('/').into(),
            host: host.into(),
            mode: None,
        });
    }
    if let Some(spec) = &args.spec {
        let text = std::fs::read_to_string(spec).with_context(|| format!("reading {}", spec.display()))?;
        let base = spec.parent().map(PathBuf::from).unwrap_or_default();
        entries.extend(parse_spec(&text, &base)?);
    }
    let out = File::create(&args.output).with_context(|| format!("creating {}", args.output.display()))?;
    build_from_spec(&entries, BufWriter::new(out))?;
    Ok(())
}
