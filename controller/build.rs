//! Generates the gRPC code of `manifests/proto/ignite.proto` (needs `protoc`, Debian package
//! `protobuf-compiler`, installed by scripts/install-deps.sh).

fn main() {
    let proto = "../manifests/proto/ignite.proto";
    println!("cargo:rerun-if-changed={proto}");
    // The descriptor set serves gRPC reflection (grpc/standard.rs).
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("ignite_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptors)
        .compile_protos(&[proto], &["../manifests/proto"])
        .unwrap_or_else(|e| panic!("compiling {proto} (is protoc installed? apt-get install protobuf-compiler): {e}"));
}
