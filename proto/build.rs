//! Generates the tonic code from agent.proto with a vendored protoc (no system protoc needed).
//! Only with the `grpc` feature: its build-dependencies are optional, so the codegen is gated
//! on `cfg(feature = "grpc")` (what Cargo also exports as `CARGO_FEATURE_GRPC`), and a
//! handshake-only build (husk-vmm) never runs protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=agent.proto");
    #[cfg(feature = "grpc")]
    {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // prost-build finds protoc through PROTOC; build scripts run single-threaded.
        std::env::set_var("PROTOC", protoc);
        tonic_prost_build::configure().compile_protos(&["agent.proto"], &["."])?;
    }
    Ok(())
}
