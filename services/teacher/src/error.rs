//! Every error of the teacher service, and its gRPC status in one place.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request that can never succeed as sent.
    #[error("{0}")]
    InvalidArgument(String),
    /// Input files that are malformed or inconsistent (fails the job, naming file and line).
    #[error("{0}")]
    InvalidInput(String),
    #[error(transparent)]
    Format(#[from] distill_formats::FormatError),
    #[error(transparent)]
    Store(#[from] distill_store::StoreError),
    #[error(transparent)]
    Shards(#[from] distill_shards::ShardError),
    #[error(transparent)]
    Jobs(#[from] distill_jobs::JobsError),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A location or endpoint the operator did not allow.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unimplemented(String),
    /// A teacher that cannot answer (an LLM endpoint refusing every request as sent).
    #[error("{0}")]
    Teacher(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use distill_store::StoreError;
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) | Error::InvalidInput(_) | Error::Format(_) => {
                tonic::Status::invalid_argument(msg)
            }
            Error::Store(StoreError::InvalidUri { .. }) => tonic::Status::invalid_argument(msg),
            Error::Store(StoreError::NotFound { .. }) => tonic::Status::not_found(msg),
            Error::Jobs(e) => e.into(),
            Error::Shards(distill_shards::ShardError::AlreadyCommitted { .. }) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            Error::Unimplemented(_) => tonic::Status::unimplemented(msg),
            Error::Teacher(_) => tonic::Status::unavailable(msg),
            Error::Store(_) | Error::Shards(_) | Error::Internal(_) => tonic::Status::internal(msg),
        }
    }
}
