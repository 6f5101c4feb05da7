//! Integration tests of the collector: a real server (in-process on 127.0.0.1:0, or the built
//! binary) and real gRPC clients speaking the protocol. One test binary to keep linking cheap.
mod auth;
mod budget;
mod cli;
mod cluster;
mod common;
mod dashboard;
mod dedup;
mod detect;
mod faults;
mod feed;
mod fleet;
mod gateway;
mod hostile;
mod nats_operator;
mod ops;
mod otlp;
mod props;
mod services;
mod watch;
mod windows;
