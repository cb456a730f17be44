// Compiles proto/ with protox (pure Rust): no system protoc needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["../../proto/monitor.proto", "../../proto/raft.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["../../proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
