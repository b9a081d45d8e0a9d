//! Every error of the trainer service, and its gRPC status in one place.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request that can never succeed as sent.
    #[error("{0}")]
    InvalidArgument(String),
    /// Input files or data that are malformed (fails the job, naming file, row or field).
    #[error("{0}")]
    InvalidInput(String),
    /// Training went wrong numerically (a NaN/inf loss), naming the step.
    #[error("{0}")]
    Diverged(String),
    #[error(transparent)]
    Format(#[from] distill_formats::FormatError),
    #[error(transparent)]
    Store(#[from] distill_store::StoreError),
    #[error(transparent)]
    Shards(#[from] distill_shards::ShardError),
    #[error(transparent)]
    Model(#[from] distill_models::ModelError),
    #[error(transparent)]
    Objective(#[from] crate::objectives::ObjectiveError),
    #[error(transparent)]
    Jobs(#[from] distill_jobs::JobsError),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A location or teacher the operator did not allow.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(distill_models::ModelError::Candle(e))
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use distill_store::StoreError;
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) | Error::InvalidInput(_) | Error::Format(_) => {
                tonic::Status::invalid_argument(msg)
            }
            Error::Model(distill_models::ModelError::Invalid { .. }) => tonic::Status::invalid_argument(msg),
            Error::Objective(_) => tonic::Status::invalid_argument(msg),
            Error::Store(StoreError::InvalidUri { .. }) => tonic::Status::invalid_argument(msg),
            Error::Store(StoreError::NotFound { .. }) => tonic::Status::not_found(msg),
            Error::Jobs(e) => e.into(),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            Error::Diverged(_) | Error::Store(_) | Error::Shards(_) | Error::Model(_) | Error::Internal(_) => {
                tonic::Status::internal(msg)
            }
        }
    }
}
