//! A configuration that cannot be used: the one error type of every config section, so that
//! each section's `validate()` can name its field without importing the collector's config.
use std::path::PathBuf;

/// A configuration that cannot be used, with the file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// The error for a bad `field` (its full TOML path, e.g. `detect.volume.client_per_hour`).
pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}
