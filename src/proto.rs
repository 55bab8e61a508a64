//! Code generated from `proto/stoker/v1/stoker.proto`.

#![allow(
    missing_docs,
    reason = "generated code; the .proto file documents every item"
)]
#![allow(clippy::all, reason = "generated code")]

/// The `stoker.v1` package.
pub mod v1 {
    tonic::include_proto!("stoker.v1");
}

/// Encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("stoker_descriptor");
