//! Compiles the gRPC APIs in `proto/` with protox (a pure-Rust protobuf compiler), so building
//! Palisade needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/palisade/identity/v1/identity.proto",
        "proto/palisade/discovery/v1/discovery.proto",
        "proto/palisade/telemetry/v1/telemetry.proto",
        "proto/palisade/admin/v1/admin.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
