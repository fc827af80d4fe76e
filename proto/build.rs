//! Generates the tonic code from agent.proto with a vendored protoc (no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through PROTOC; build scripts run single-threaded.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=agent.proto");
    tonic_prost_build::configure().compile_protos(&["agent.proto"], &["."])?;
    Ok(())
}
