//! Rust bindings of the distill gRPC contract (`proto/distill/v1`).

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("distill.v1");

    /// Encoded `FileDescriptorSet` of the contract, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/distill_descriptor.bin"));
}

pub use v1::*;

impl v1::JobState {
    /// A job in this state will not change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}
