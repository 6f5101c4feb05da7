//! Cluster mode on NATS JetStream: the parts of it built so far (see the README, "Cluster mode").
//!
//! - [`partition`]: which partition a delta belongs to, and a batch split into its partitions'
//!   parts (`outflow.v1.PartBatch`);
//! - [`publish`]: an ingest node's publisher: every part of a batch into a replicated stream,
//!   with a message id that makes publishing it again a duplicate, done only once JetStream
//!   acknowledged every part;
//! - [`ingest`]: an ingest node's agent streams, each publishing its batches in order;
//! - [`membership`]: the live aggregators and their claims on the partitions (JetStream
//!   key-value buckets), and the plan that shares the partitions out fairly;
//! - [`renewal`]: an aggregator's membership, renewed on a task of its own whatever its
//!   rounds are doing;
//! - [`peer_ratios`]: the sustained detector's peers' ratios, shared among the aggregators so
//!   that each judges against the whole fleet's;
//! - [`aggregator`]: an aggregator's round: claims, gives up, rebuilds its store, and runs a
//!   consumer per partition it holds;
//! - [`align`]: an aggregator's consumers kept in step by batch time (judgement periods);
//! - [`holdings`]: the partitions an aggregator holds, and which are still being replayed;
//! - [`consume`]: a partition's durable consumer, applying its parts exactly once to the
//!   aggregator's store;
//! - [`second_stage`]: cohorts judged over every partition, from summaries each aggregator
//!   publishes at its judgements;
//! - [`delivered`]: which alert changes the webhook receiver already accepted, so that a
//!   replay does not send them again;
//! - [`aggregator_query`]: what one aggregator holds, asked by the node that answers for the
//!   cluster;
//! - [`fleet_query`]: Query and Alerts for the whole cluster, on any node: fanned out to the
//!   live aggregators and merged exactly;
//! - [`nats`]: how a node connects to NATS (credentials, TLS);
//! - [`permissions`]: the NATS subjects a node of each role needs, for its user's permissions;
//! - [`config`]: `[cluster]`, the node's role.
pub mod aggregator;
pub mod aggregator_query;
pub mod align;
pub mod config;
pub mod consume;
pub mod delivered;
pub mod fleet_query;
pub mod holdings;
pub mod ingest;
pub mod membership;
pub mod nats;
pub mod partition;
pub mod peer_ratios;
pub mod permissions;
pub mod publish;
pub mod renewal;
pub mod second_stage;
