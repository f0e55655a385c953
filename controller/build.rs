//! Generates the gRPC code of `manifests/proto/ignite.proto` (needs `protoc`, Debian package
//! `protobuf-compiler`, installed by scripts/install-deps.sh).

fn main() {
    let proto = "../manifests/proto/ignite.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .compile_protos(&[proto], &["../manifests/proto"])
        .unwrap_or_else(|e| panic!("compiling {proto} (is protoc installed? apt-get install protobuf-compiler): {e}"));
}
