//! Which aggregator applies which partition, agreed through two JetStream key-value buckets.
//!
//! - `<stream>-aggregators`: the live aggregators. Each one puts its name every quarter of the
//!   lease; the bucket's entries expire a lease after they were written, so an aggregator that
//!   stopped renewing (killed, cut off from NATS) is gone a lease later.
//! - `<stream>-claims`: one key per claimed partition (`p<partition>`) whose value names the
//!   aggregator that applies it. A claim is only ever made by compare-and-set (created where
//!   there is none, or taken from an aggregator that is gone at the revision read) and dropped
//!   by its holder, so at most one aggregator holds a partition.
//!
//! [`plan`] decides, from what every aggregator reads alike, what one aggregator claims and
//! gives away: a fair share each (the partitions divided by the live aggregators, the first
//! names in order taking one more where they do not divide evenly). Claims stay where they are
//! otherwise: an aggregator restarted within the lease finds its own claims and goes on.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use async_nats::jetstream::{self, kv};
use tokio_stream::StreamExt as _;

/// A failed exchange with the buckets (retried at the next round).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct MembershipError {
    what: String,
    message: String,
}

pub(super) fn err(what: impl Into<String>, e: impl std::fmt::Display) -> MembershipError {
    MembershipError {
        what: what.into(),
        message: e.to_string(),
    }
}

/// How many times opening a bucket is tried (aggregators starting together make JetStream
/// requests time out while it creates the buckets' streams).
const OPEN_TRIES: u32 = 10;

/// An aggregators' bucket `name`: the last value of each key, on disk in `replicas` copies,
/// expiring `max_age` after it was written (never if zero).
pub(super) fn bucket_config(name: String, replicas: usize, max_age: Duration) -> kv::Config {
    kv::Config {
        bucket: name,
        history: 1,
        max_age,
        num_replicas: replicas,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

pub(super) async fn open_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, MembershipError> {
    let name = config.bucket.clone();
    let mut tries = 0;
    loop {
        tries += 1;
        // Bound to if it is there (most starts); created otherwise. (Creating or updating a
        // bucket that exists, or one another aggregator is creating, can wait for JetStream's
        // request timeout.)
        let r = match js.get_key_value(&name).await {
            Ok(s) => Ok(s),
            Err(_) => js
                .create_key_value(config.clone())
                .await
                .map_err(|e| e.to_string()),
        };
        match r {
            Ok(s) => return Ok(s),
            Err(e) if tries < OPEN_TRIES => {
                log::debug!("key-value bucket {name}: {e}; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(err(
                    format!("opening the key-value bucket {name} ({tries} tries)"),
                    e,
                ));
            }
        }
    }
}

/// How often an aggregator renews its membership, and how often it runs a round: a quarter of
/// the lease (100 ms at least).
pub fn quarter_lease(lease: Duration) -> Duration {
    (lease / 4).max(Duration::from_millis(100))
}

/// An aggregator's membership entry: `<instance> <host:port>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What tells its store from another's.
    pub instance: String,
    /// Where the other nodes reach its gRPC (absent in an entry without one).
    pub address: Option<String>,
}

impl Entry {
    pub fn parse(value: &[u8]) -> Entry {
        let v = String::from_utf8_lossy(value);
        match v.split_once(' ') {
            Some((i, a)) if !a.trim().is_empty() => Entry {
                instance: i.to_owned(),
                address: Some(a.trim().to_owned()),
            },
            _ => Entry {
                instance: v.trim().to_owned(),
                address: None,
            },
        }
    }
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.address {
            Some(a) => write!(f, "{} {a}", self.instance),
            None => f.write_str(&self.instance),
        }
    }
}

/// The live aggregators as any node reads them (read only: what a node that fans a call out
/// to the aggregators asks).
#[derive(Debug, Clone)]
pub struct Directory {
    nodes: kv::Store,
}

impl Directory {
    /// Binds `<stream>-aggregators` (an error until an aggregator has made it).
    pub async fn open(js: &jetstream::Context, stream: &str) -> Result<Directory, MembershipError> {
        let name = format!("{stream}-aggregators");
        let nodes = js
            .get_key_value(&name)
            .await
            .map_err(|e| err(format!("opening the key-value bucket {name}"), e))?;
        Ok(Directory { nodes })
    }

    /// The live aggregators and their entries.
    pub async fn live(&self) -> Result<BTreeMap<String, Entry>, MembershipError> {
        let names = keys_of(&self.nodes, "the aggregators").await?;
        let mut out = BTreeMap::new();
        for k in names {
            let entry = self
                .nodes
                .entry(k.as_str())
                .await
                .map_err(|e| err(format!("reading the aggregator {k}"), e))?;
            if let Some(e) = entry
                && e.operation == kv::Operation::Put
            {
                out.insert(k, Entry::parse(&e.value));
            }
        }
        Ok(out)
    }
}

/// The keys of `store` (those with a value or a delete marker still in the stream), read from
/// the stream's subjects: no consumer is made (`kv::Store::keys` makes one per call, and a node
/// answering queries would make one per query).
pub(super) async fn keys_of(store: &kv::Store, what: &str) -> Result<Vec<String>, MembershipError> {
    let filter = format!("{}>", store.prefix);
    let mut subjects = store
        .stream
        .info_with_subjects(filter)
        .await
        .map_err(|e| err(format!("listing {what}"), e))?;
    let mut keys = Vec::new();
    while let Some(s) = subjects.next().await {
        let (subject, _) = s.map_err(|e| err(format!("listing {what}"), e))?;
        if let Some(k) = subject.strip_prefix(store.prefix.as_str()) {
            keys.push(k.to_owned());
        }
    }
    Ok(keys)
}

/// A partition's claim: who holds it, at which revision of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub node: String,
    pub revision: u64,
}

/// The two buckets, as one aggregator sees them.
#[derive(Debug, Clone)]
pub struct Membership {
    nodes: kv::Store,
    claims: kv::Store,
    me: String,
    /// The revision of this aggregator's membership entry, once written.
    revision: Option<u64>,
}

fn claim_key(partition: u32) -> String {
    format!("p{partition}")
}

impl Membership {
    /// Opens (creating if missing) the buckets of `stream`'s aggregators, with `replicas`
    /// copies and members expiring after `lease`, as aggregator `me`.
    pub async fn open(
        js: &jetstream::Context,
        stream: &str,
        replicas: usize,
        lease: Duration,
        me: &str,
    ) -> Result<Membership, MembershipError> {
        let nodes = open_bucket(
            js,
            bucket_config(format!("{stream}-aggregators"), replicas, lease),
        )
        .await?;
        let claims = open_bucket(
            js,
            bucket_config(format!("{stream}-claims"), replicas, Duration::ZERO),
        )
        .await?;
        Ok(Membership {
            nodes,
            claims,
            me: me.to_owned(),
            revision: None,
        })
    }

    /// This aggregator's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Says this aggregator is alive (for another lease). Its entry holds `instance` (what
    /// tells this aggregator's store from another's) and where the other nodes reach it
    /// (`advertise`, see [`Entry`]): an entry of the same name with another instance is
    /// another live aggregator under this name, and is not overwritten.
    pub async fn renew(&mut self, instance: &str, advertise: &str) -> Result<(), MembershipError> {
        let value = bytes::Bytes::from(
            Entry {
                instance: instance.to_owned(),
                address: Some(advertise.to_owned()),
            }
            .to_string(),
        );
        if let Some(rev) = self.revision {
            match self.nodes.update(&self.me, value.clone(), rev).await {
                Ok(r) => {
                    self.revision = Some(r);
                    return Ok(());
                }
                // Expired meanwhile, or written by another: read it.
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    self.revision = None;
                }
                Err(e) => return Err(err("renewing the membership", e)),
            }
        }
        let entry = self
            .nodes
            .entry(self.me.as_str())
            .await
            .map_err(|e| err("reading the membership", e))?;
        let r = match entry {
            Some(e)
                if e.operation == kv::Operation::Put
                    && Entry::parse(&e.value).instance != instance =>
            {
                return Err(err(
                    format!("cluster.node_name {:?}", self.me),
                    format!(
                        "in use by another live aggregator (instance {}, this one is {instance}): give each aggregator a name of its own",
                        Entry::parse(&e.value).instance
                    ),
                ));
            }
            // This aggregator's own entry (from before a restart): renewed.
            Some(e) if e.operation == kv::Operation::Put => self
                .nodes
                .update(&self.me, value, e.revision)
                .await
                .map_err(|e| err("renewing the membership", e))?,
            _ => self
                .nodes
                .create(&self.me, value)
                .await
                .map_err(|e| err("joining the membership", e))?,
        };
        self.revision = Some(r);
        Ok(())
    }

    /// The live aggregators (their names, as [`Directory::live`] lists them).
    pub async fn live(&self) -> Result<BTreeSet<String>, MembershipError> {
        let nodes = Directory {
            nodes: self.nodes.clone(),
        };
        Ok(nodes.live().await?.into_keys().collect())
    }

    /// Every partition's claim (partitions at or above `partitions` are ignored).
    pub async fn claims(&self, partitions: u32) -> Result<BTreeMap<u32, Claim>, MembershipError> {
        let names = keys_of(&self.claims, "the claims").await?;
        let mut out = BTreeMap::new();
        for k in names {
            let Some(p) = k
                .strip_prefix('p')
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|p| *p < partitions)
            else {
                continue;
            };
            let entry = self
                .claims
                .entry(k.as_str())
                .await
                .map_err(|e| err(format!("reading the claim {k}"), e))?;
            if let Some(e) = entry
                && e.operation == kv::Operation::Put
            {
                out.insert(
                    p,
                    Claim {
                        node: String::from_utf8_lossy(&e.value).into_owned(),
                        revision: e.revision,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Claims `partition`: where there is no claim (`held` None), or taking the claim `held`
    /// of an aggregator that is gone. False if another aggregator changed it first.
    pub async fn claim(
        &self,
        partition: u32,
        held: Option<&Claim>,
    ) -> Result<bool, MembershipError> {
        let key = claim_key(partition);
        let value = bytes::Bytes::from(self.me.clone());
        let r = match held {
            None => self
                .claims
                .create(&key, value)
                .await
                .map(drop)
                .map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                }),
            Some(c) => self
                .claims
                .update(&key, value, c.revision)
                .await
                .map(drop)
                .map_err(|e| {
                    (
                        e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                }),
        };
        match r {
            Ok(()) => Ok(true),
            Err((true, _)) => Ok(false),
            Err((false, e)) => Err(err(format!("claiming partition {partition}"), e)),
        }
    }

    /// Gives `partition` up (its claim, at `revision`, is this aggregator's).
    pub async fn release(&self, partition: u32, revision: u64) -> Result<(), MembershipError> {
        self.claims
            .delete_expect_revision(claim_key(partition), Some(revision))
            .await
            .map_err(|e| err(format!("giving partition {partition} up"), e))
    }
}

/// What one aggregator does in a round: the partitions it tries to claim, and the ones it
/// gives up.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub claim: Vec<u32>,
    pub release: Vec<u32>,
}

/// How many partitions each live aggregator holds in the end: `partitions` divided by their
/// number, the first names in order holding one more where it does not divide evenly.
pub fn fair_shares(live: &BTreeSet<String>, partitions: u32) -> BTreeMap<&str, u32> {
    let n = u32::try_from(live.len()).unwrap_or(u32::MAX).max(1);
    let (q, r) = (partitions / n, partitions % n);
    live.iter()
        .zip(0u32..)
        .map(|(name, i)| (name.as_str(), q + u32::from(i < r)))
        .collect()
}

/// What aggregator `me` (among `live`) does about `claims`: gives up what it holds beyond its
/// fair share (the highest-numbered first), claims free partitions (no claim, or one of an
/// aggregator that is gone) up to it, starting at a place that depends on its name so that
/// aggregators claiming at once mostly want different ones.
pub fn plan(
    me: &str,
    partitions: u32,
    live: &BTreeSet<String>,
    claims: &BTreeMap<u32, Claim>,
) -> Plan {
    let mut live = live.clone();
    live.insert(me.to_owned());
    let share = fair_shares(&live, partitions).get(me).copied().unwrap_or(0) as usize;
    let mine: Vec<u32> = claims
        .iter()
        .filter(|(_, c)| c.node == me)
        .map(|(p, _)| *p)
        .collect();
    let mut out = Plan::default();
    if mine.len() > share {
        out.release = mine[share..].to_vec();
        out.release.reverse();
        return out;
    }
    let free: Vec<u32> = (0..partitions)
        .filter(|p| claims.get(p).is_none_or(|c| !live.contains(&c.node)))
        .collect();
    if free.is_empty() {
        return out;
    }
    let start = (super::partition::fnv1a(me.as_bytes()) % free.len() as u64) as usize;
    out.claim = free
        .iter()
        .cycle()
        .skip(start)
        .take(free.len().min(share - mine.len()))
        .copied()
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_names_the_instance_and_the_address() {
        let e = Entry {
            instance: "0123abcd".into(),
            address: Some("agg-1:50051".into()),
        };
        assert_eq!(e.to_string(), "0123abcd agg-1:50051");
        assert_eq!(Entry::parse(e.to_string().as_bytes()), e);
        // An entry written without an address (an older aggregator).
        let old = Entry::parse(b"0123abcd");
        assert_eq!((old.instance.as_str(), old.address), ("0123abcd", None));
    }

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Runs every aggregator's plan in turn (claims granted as planned) until nothing changes.
    fn settle(live: &BTreeSet<String>, partitions: u32, claims: &mut BTreeMap<u32, Claim>) {
        for _ in 0..20 {
            let mut changed = false;
            for me in live {
                let p = plan(me, partitions, live, claims);
                for r in p.release {
                    claims.remove(&r);
                    changed = true;
                }
                for c in p.claim {
                    claims.insert(
                        c,
                        Claim {
                            node: me.clone(),
                            revision: 1,
                        },
                    );
                    changed = true;
                }
            }
            if !changed {
                return;
            }
        }
        panic!("claims never settle: {claims:?}");
    }

    fn held(claims: &BTreeMap<u32, Claim>) -> BTreeMap<String, usize> {
        let mut n = BTreeMap::new();
        for c in claims.values() {
            *n.entry(c.node.clone()).or_default() += 1;
        }
        n
    }

    #[test]
    fn shares_are_fair_and_claims_follow_the_live_aggregators() {
        let three = names(&["a", "b", "c"]);
        assert_eq!(
            fair_shares(&three, 8).into_iter().collect::<Vec<_>>(),
            [("a", 3), ("b", 3), ("c", 2)]
        );
        let mut claims = BTreeMap::new();
        let two = names(&["a", "b"]);
        settle(&two, 8, &mut claims);
        assert_eq!(
            held(&claims),
            BTreeMap::from([("a".into(), 4), ("b".into(), 4)])
        );
        // A third joins: a and b each give one up, c claims both.
        settle(&three, 8, &mut claims);
        assert_eq!(
            held(&claims),
            BTreeMap::from([("a".into(), 3), ("b".into(), 3), ("c".into(), 2)])
        );
        let before = claims.clone();
        // b is gone: its three are free, a and c take them (a's share 4, c's 4).
        let ac = names(&["a", "c"]);
        settle(&ac, 8, &mut claims);
        assert_eq!(
            held(&claims),
            BTreeMap::from([("a".into(), 4), ("c".into(), 4)])
        );
        // What a and c held stays where it was.
        for (p, c) in &before {
            if c.node != "b" {
                assert_eq!(claims[p].node, c.node, "partition {p}");
            }
        }
        // Alone: everything.
        let a = names(&["a"]);
        settle(&a, 8, &mut claims);
        assert_eq!(held(&claims), BTreeMap::from([("a".into(), 8)]));
    }

    #[test]
    fn a_plan_gives_up_only_beyond_the_share_and_claims_only_free_partitions() {
        let live = names(&["a", "b"]);
        let c = |n: &str| Claim {
            node: n.into(),
            revision: 3,
        };
        // a holds all 5 (its share is 3): gives up 4 and 3, the highest first.
        let claims: BTreeMap<u32, Claim> = (0..5).map(|p| (p, c("a"))).collect();
        assert_eq!(
            plan("a", 5, &live, &claims),
            Plan {
                claim: vec![],
                release: vec![4, 3]
            }
        );
        // b holds nothing, everything claimed by a live a: nothing to claim yet.
        assert_eq!(plan("b", 5, &live, &claims), Plan::default());
        // Claimed by an aggregator that is gone: free.
        let claims: BTreeMap<u32, Claim> = (0..4).map(|p| (p, c("gone"))).collect();
        let mut p = plan("a", 4, &live, &claims);
        p.claim.sort_unstable();
        assert_eq!(p.claim.len(), 2);
        assert!(p.release.is_empty());
    }
}
