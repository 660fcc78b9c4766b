//! Errors of the tokenizer service, by kind, mapped exhaustively onto gRPC codes.

use std::path::PathBuf;

/// What went wrong, coarse enough to pick a gRPC status from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller sent something we refuse (bad id, too long).
    InvalidArgument,
    /// The tokenizer files could not be loaded.
    Load,
    /// A bug or a failure the caller cannot fix.
    Internal,
}

/// Every error the tokenizer library and service produce.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// No usable tokenizer files in the model folder.
    #[error(
        "no tokenizer in {dir}: expected tokenizer.json, or vocab.json and merges.txt",
        dir = .0.display()
    )]
    NotFound(PathBuf),
    /// A tokenizer file exists but could not be parsed.
    #[error("cannot load tokenizer from {path}: {reason}", path = .path.display())]
    Parse {
        /// The file that failed.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// An id outside the vocabulary.
    #[error("token id {id} at position {position} is out of range (vocab size {vocab_size})")]
    IdOutOfRange {
        /// The first bad id.
        id: u32,
        /// Its index in the request.
        position: usize,
        /// Number of ids in the vocabulary.
        vocab_size: u32,
    },
    /// Text longer than the configured limit.
    #[error("text is {len} bytes; the limit is {limit} bytes")]
    TextTooLong {
        /// Length of the text in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// More ids than the configured limit.
    #[error("{len} ids; the limit is {limit} ids")]
    TooManyIds {
        /// Number of ids sent.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The `tokenizers` library failed on valid input.
    #[error("tokenizer failure: {0}")]
    Library(String),
}

impl TokenizerError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound(_) | Self::Parse { .. } => ErrorKind::Load,
            Self::IdOutOfRange { .. } | Self::TextTooLong { .. } | Self::TooManyIds { .. } => {
                ErrorKind::InvalidArgument
            }
            Self::Library(_) => ErrorKind::Internal,
        }
    }
}

impl From<TokenizerError> for tonic::Status {
    fn from(err: TokenizerError) -> Self {
        match err.kind() {
            ErrorKind::InvalidArgument => tonic::Status::invalid_argument(err.to_string()),
            ErrorKind::Load | ErrorKind::Internal => {
                // Internal detail is logged, not sent.
                tracing::error!(error = %err, "tokenizer internal error");
                tonic::Status::internal("internal tokenizer error")
            }
        }
    }
}
