//! HTTP/1.1 traffic like an inference service's, for the attribution tests: a server that
//! streams each response as chunks (like tokens) on keep-alive connections, and a load of many
//! client hosts with ids, whose requests gateways may pool onto shared upstream connections.
//!
//! - [`wire`]: the bytes. The server's response to `GET|POST /v1/stream?bytes=N&chunk=C&req=NONCE`
//!   is exactly [`wire::response_bytes`]`(N, C)` bytes long, whoever asks, so the ground truth
//!   of every request is known on both ends; PROXY v1/v2 headers.
//! - [`serve`]: one connection of `outflow-testpeer http-serve`, and the JSON lines it prints.
//! - [`load`]: `outflow-testpeer http-load`: the plan (from a seed) and its run.
//! - [`harness`]: the server and the load driven from a test, and the [`Ledger`] joining them.

pub mod chat;
pub mod harness;
pub mod load;
pub mod serve;
pub mod wire;

pub use harness::{ClientKey, ConnLedger, HttpServer, HttpServerOptions, Ledger, run_load};
pub use load::{LoadClient, LoadSpec, RequestResult};
pub use serve::{ServeOptions, ServedConn, ServedRequest, ServerEvent};
pub use wire::{ProxyHeader, ProxyVersion};
