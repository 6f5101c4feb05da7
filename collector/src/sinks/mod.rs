//! Where alerts go besides the `outflow.v1.Alerts` service: each sink subscribes to the
//! [`AlertHub`](crate::alerts::AlertHub) and never feeds back into detection.
pub mod webhook;
