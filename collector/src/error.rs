//! The errors of the gRPC services and their one mapping to a `tonic::Status`.
use std::sync::Arc;

use tonic::{Code, Status};

use crate::{model::ValidationError, store::StoreError};

/// Why an Ingest or Query call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// A field breaks the protocol (INVALID_ARGUMENT; the message names the field).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Bytes that are not a valid protobuf message (INVALID_ARGUMENT).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A Batch before the Hello, or a second Hello (FAILED_PRECONDITION).
    #[error("{0}")]
    OutOfOrder(&'static str),
    /// Above the agent's rate limit (RESOURCE_EXHAUSTED).
    #[error("agent {agent}: rate limit: {limit}")]
    RateLimited { agent: String, limit: String },
    /// More Ingest streams of one peer than allowed (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    TooManyStreams(String),
    /// A message above the size limit (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    TooLarge(String),
    /// No valid token or client certificate (UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// A valid credential that may not do this (PERMISSION_DENIED).
    #[error("{0}")]
    PermissionDenied(String),
    /// The asked-for key is not held (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// The collector is stopping (UNAVAILABLE: reconnect later).
    #[error("collector is shutting down")]
    ShuttingDown,
    /// The store failed to commit (UNAVAILABLE: the batch was not applied, send it again).
    #[error("store: {0}")]
    Store(Arc<StoreError>),
    /// An ingest node could not store a batch in JetStream (UNAVAILABLE: send it again).
    #[error("{0}")]
    Publish(Arc<crate::cluster::publish::PublishError>),
    /// The transport failed (the client went away, ...): passed through as it is.
    #[error("{}", .0.message())]
    Transport(Status),
}

impl ApiError {
    /// Classifies an error of the request stream: a message over the size limit, one the codec
    /// refused, or a transport failure.
    pub fn from_stream(status: Status) -> Self {
        match status.code() {
            // tonic reports a message over max_decoding_message_size as OUT_OF_RANGE; gRPC's
            // convention (and ours) is RESOURCE_EXHAUSTED.
            Code::OutOfRange => ApiError::TooLarge(status.message().to_owned()),
            Code::InvalidArgument => ApiError::Malformed(status.message().to_owned()),
            _ => ApiError::Transport(status),
        }
    }

    /// The `reason` label of `rejects_total` for refusals of what a client sent; `None` for
    /// the collector's own failures and transport errors.
    pub fn reject_reason(&self) -> Option<&'static str> {
        match self {
            ApiError::Invalid(_) | ApiError::Malformed(_) => Some("invalid_argument"),
            ApiError::OutOfOrder(_) => Some("failed_precondition"),
            ApiError::RateLimited { .. } => Some("rate_limited"),
            ApiError::TooLarge(_) => Some("too_large"),
            ApiError::TooManyStreams(_) => Some("too_many_streams"),
            ApiError::Unauthenticated(_) => Some("unauthenticated"),
            ApiError::PermissionDenied(_) => Some("permission_denied"),
            ApiError::NotFound(_)
            | ApiError::ShuttingDown
            | ApiError::Store(_)
            | ApiError::Publish(_)
            | ApiError::Transport(_) => None,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let msg = e.to_string();
        match e {
            ApiError::Invalid(_) => Status::invalid_argument(msg),
            ApiError::Malformed(_) => Status::invalid_argument(msg),
            ApiError::OutOfOrder(_) => Status::failed_precondition(msg),
            ApiError::RateLimited { .. } | ApiError::TooLarge(_) | ApiError::TooManyStreams(_) => {
                Status::resource_exhausted(msg)
            }
            ApiError::Unauthenticated(_) => Status::unauthenticated(msg),
            ApiError::PermissionDenied(_) => Status::permission_denied(msg),
            ApiError::NotFound(_) => Status::not_found(msg),
            ApiError::ShuttingDown | ApiError::Store(_) | ApiError::Publish(_) => {
                Status::unavailable(msg)
            }
            ApiError::Transport(status) => status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_stay_apart() {
        let code = |e: ApiError| Status::from(e).code();
        assert_eq!(
            code(ValidationError::new("seq", "0").into()),
            Code::InvalidArgument
        );
        assert_eq!(code(ApiError::OutOfOrder("x")), Code::FailedPrecondition);
        assert_eq!(code(ApiError::Unauthenticated("x")), Code::Unauthenticated);
        assert_eq!(code(ApiError::NotFound("x".into())), Code::NotFound);
        assert_eq!(
            code(ApiError::PermissionDenied("x".into())),
            Code::PermissionDenied
        );
        assert_eq!(
            code(ApiError::TooLarge("x".into())),
            Code::ResourceExhausted
        );
        assert_eq!(code(ApiError::ShuttingDown), Code::Unavailable);
        assert_eq!(
            code(ApiError::from_stream(Status::out_of_range("too large"))),
            Code::ResourceExhausted
        );
        assert_eq!(
            code(ApiError::from_stream(Status::cancelled("gone"))),
            Code::Cancelled
        );
        let m = Status::from(ApiError::Invalid(ValidationError::new(
            "deltas[3].remote_addr",
            "5 bytes, want 4 or 16",
        )));
        assert_eq!(m.message(), "deltas[3].remote_addr: 5 bytes, want 4 or 16");
    }
}
