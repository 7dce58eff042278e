//! The Workload API's errors, and the one place they become gRPC statuses.

use lanyard_attestors::workload::AttestError;
use lanyard_proto::NO_IDENTITY_ISSUED;
use tonic::Status;

/// Why a Workload API call (or an open stream) ends without what the caller asked for.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The `workload.spiffe.io: true` header is missing, repeated or wrong.
    #[error("security header missing from request")]
    SecurityHeader,
    /// No registration entry matches the caller, or every SVID it had expired.
    #[error("{NO_IDENTITY_ISSUED}")]
    NoIdentity,
    /// The process the connection belongs to exited, or its pid names another process.
    #[error("the calling process exited or was replaced during attestation")]
    CallerGone,
    /// The caller cannot be attested at all (a peer in a pid namespace the agent cannot
    /// see, or one now running as another user than it connected as).
    #[error("the caller cannot be attested: {0}")]
    NotAttestable(String),
    /// Attestation failed for a reason that may pass (the program changed while it was
    /// read, /proc could not be read, the caller's hashing budget is used up).
    #[error("could not attest the caller: {0}")]
    Attestation(String),
    /// The agent has not synced yet, or the caller's SVIDs are still being signed.
    #[error("SVIDs are not ready yet; retry")]
    NotReady,
    /// The agent is stopping.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// The caller's user holds as many streams as one user may.
    #[error(
        "uid {uid} already holds {limit} open Workload API streams, the most one user may; close some and retry"
    )]
    TooManyStreams { uid: u32, limit: usize },
    /// A part of the Workload API this agent does not serve.
    #[error("{0}")]
    Unimplemented(&'static str),
    /// A fault of the agent, not of the caller.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The error an attestation failure means for the caller.
    pub fn from_attest(error: &AttestError) -> Self {
        match error {
            AttestError::Replaced { .. } | AttestError::ProcessGone { .. } => ApiError::CallerGone,
            AttestError::InvalidPid { .. } | AttestError::CredentialsChanged { .. } => {
                ApiError::NotAttestable(error.to_string())
            }
            // Anything else may pass on a retry (and AttestError may grow variants).
            _ => ApiError::Attestation(error.to_string()),
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        let message = error.to_string();
        match error {
            ApiError::SecurityHeader => Status::invalid_argument(message),
            ApiError::NoIdentity | ApiError::CallerGone | ApiError::NotAttestable(_) => {
                Status::permission_denied(message)
            }
            ApiError::Attestation(_) | ApiError::NotReady | ApiError::ShuttingDown => {
                Status::unavailable(message)
            }
            ApiError::TooManyStreams { .. } => Status::resource_exhausted(message),
            ApiError::Unimplemented(_) => Status::unimplemented(message),
            ApiError::Internal(_) => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_error_has_its_status_and_sentence() {
        let cases = [
            (
                ApiError::SecurityHeader,
                Code::InvalidArgument,
                "security header missing from request",
            ),
            (
                ApiError::NoIdentity,
                Code::PermissionDenied,
                "no identity issued",
            ),
            (
                ApiError::CallerGone,
                Code::PermissionDenied,
                "the calling process exited or was replaced during attestation",
            ),
            (
                ApiError::TooManyStreams { uid: 7, limit: 2 },
                Code::ResourceExhausted,
                "uid 7 already holds 2 open Workload API streams, the most one user may; close some and retry",
            ),
            (
                ApiError::NotReady,
                Code::Unavailable,
                "SVIDs are not ready yet; retry",
            ),
            (
                ApiError::ShuttingDown,
                Code::Unavailable,
                "the agent is shutting down",
            ),
            (
                ApiError::Internal("x".into()),
                Code::Internal,
                "internal error: x",
            ),
        ];
        for (error, code, message) in cases {
            let status = Status::from(error);
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }

    #[test]
    fn attestation_failures_map_by_what_they_mean() {
        assert!(matches!(
            ApiError::from_attest(&AttestError::Replaced { pid: 1 }),
            ApiError::CallerGone
        ));
        assert!(matches!(
            ApiError::from_attest(&AttestError::InvalidPid { pid: 0 }),
            ApiError::NotAttestable(_)
        ));
        let busy = ApiError::from_attest(&AttestError::HashBudget {
            uid: 5,
            budget_mib: 1024,
        });
        assert_eq!(Status::from(busy).code(), Code::Unavailable);
    }
}
