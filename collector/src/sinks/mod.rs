//! Where the collector's results go besides its gRPC services: the webhook subscribes to the
//! [`AlertHub`](crate::alerts::AlertHub), the OTLP exporter reads the aggregates and alert
//! counts; neither feeds back into detection.
pub mod otlp;
pub mod webhook;
