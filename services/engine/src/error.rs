//! Errors of the engine, by kind, mapped exhaustively onto gRPC codes.

/// What went wrong, coarse enough to pick a gRPC status from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is invalid; the message names the field.
    InvalidArgument,
    /// The admission queue is full; retry later.
    ResourceExhausted,
    /// The engine is draining or still loading.
    Unavailable,
    /// The model files are missing or malformed.
    Load,
    /// A bug or a failure the caller cannot fix.
    Internal,
}

/// Every error the engine library and service produce.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// `config.json` is missing, unreadable or describes an unsupported model.
    #[error("model config: {0}")]
    Config(String),
    /// The weights file cannot be read or is not a valid safetensors file.
    #[error("weights file {path}: {reason}")]
    WeightsFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the model needs is not in the file.
    #[error("missing tensor {0:?} in the weights file")]
    MissingTensor(String),
    /// The file has a tensor GPT-2 does not have.
    #[error("unexpected tensor {0:?} in the weights file")]
    UnexpectedTensor(String),
    /// A tensor has the wrong shape.
    #[error("tensor {name:?} has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// Tensor name as in the file.
        name: String,
        /// What the config implies.
        expected: Vec<usize>,
        /// What the file says.
        got: Vec<usize>,
    },
    /// A tensor is stored in a type the engine does not read.
    #[error("tensor {name:?} is stored as {dtype}; expected F32, F16 or BF16")]
    TensorDtype {
        /// Tensor name as in the file.
        name: String,
        /// Its storage type.
        dtype: String,
    },
    /// A tensor cannot be held in the weight format asked for (`--weights`).
    #[error("tensor {name:?}: {reason}")]
    WeightFormat {
        /// Tensor name as in the file.
        name: String,
        /// Why.
        reason: String,
    },
    /// The request is invalid.
    #[error("invalid {field}: {message}")]
    InvalidRequest {
        /// The offending field, as named in the contract.
        field: &'static str,
        /// What is wrong and what the limit is.
        message: String,
    },
    /// The admission queue is full.
    #[error("the engine queue is full ({limit} waiting requests); retry later")]
    QueueFull {
        /// The configured queue limit.
        limit: usize,
    },
    /// The engine is shutting down (or still loading).
    #[error("the engine is {0}")]
    Unavailable(&'static str),
    /// Something that should not happen.
    #[error("internal engine error: {0}")]
    Internal(String),
}

impl EngineError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Config(_)
            | Self::WeightsFile { .. }
            | Self::MissingTensor(_)
            | Self::UnexpectedTensor(_)
            | Self::TensorShape { .. }
            | Self::TensorDtype { .. }
            | Self::WeightFormat { .. } => ErrorKind::Load,
            Self::InvalidRequest { .. } => ErrorKind::InvalidArgument,
            Self::QueueFull { .. } => ErrorKind::ResourceExhausted,
            Self::Unavailable(_) => ErrorKind::Unavailable,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }

    /// Shorthand for [`EngineError::InvalidRequest`].
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidRequest { field, message: message.into() }
    }
}

impl From<EngineError> for tonic::Status {
    fn from(err: EngineError) -> Self {
        match err.kind() {
            ErrorKind::InvalidArgument => tonic::Status::invalid_argument(err.to_string()),
            ErrorKind::ResourceExhausted => tonic::Status::resource_exhausted(err.to_string()),
            ErrorKind::Unavailable => tonic::Status::unavailable(err.to_string()),
            ErrorKind::Load | ErrorKind::Internal => {
                // Internal detail is logged, not sent.
                tracing::error!(error = %err, "engine internal error");
                tonic::Status::internal("internal engine error")
            }
        }
    }
}
