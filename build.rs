//! Compiles the gRPC APIs in `proto/` with protox (a pure-Rust protobuf compiler), so building
//! Palisade needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/palisade/identity/v1/identity.proto",
        "proto/palisade/discovery/v1/discovery.proto",
        "proto/palisade/telemetry/v1/telemetry.proto",
        "proto/palisade/admin/v1/admin.proto",
        "proto/grpc/health/v1/health.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    // Packed relative relocations (DT_RELR, glibc 2.36+, binutils 2.38+): the table the loader
    // reads at every start shrinks from about 2 MiB to a few KiB, and with it every process's
    // resident memory. Older linkers ignore the option with a warning.
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    Ok(())
}
