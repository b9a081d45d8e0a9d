//! Job leases: which replica runs a job when several share one store. A lease is a series of
//! numbered terms, `_leases/<job>/<term>` objects beside the job records, each written with
//! put-if-absent (the one conditional write that local files, S3 and memory stores all do):
//! claiming or renewing a lease writes the next term, so of two replicas writing term N+1 exactly
//! one succeeds, and a holder whose renewal fails has lost the job to the other. A term names its
//! replica and when it expires; an expired term (its holder died or stalled) may be followed by
//! anyone's. Term numbers only grow: they fence an attempt from the attempts after it.

use crate::table::now_ms;
use bytes::Bytes;
use distill_store::{Location, StoreError};
use std::time::Duration;

/// Who this process is among the replicas sharing a store.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Stable across restarts of the same replica (default: the host name; a pod's name in
    /// Kubernetes): a restarted replica takes its leases back at once instead of waiting them out.
    pub id: String,
    /// This process (changes at every start).
    pub incarnation: String,
    /// How long a term lasts unless renewed; renewed every third of it.
    pub ttl: Duration,
}

impl Replica {
    pub fn new(id: Option<String>, ttl: Duration) -> Replica {
        let id = id.filter(|s| !s.trim().is_empty()).unwrap_or_else(host_name);
        Replica { id, incarnation: uuid_like(), ttl }
    }
}

/// The host's name (`HOSTNAME`, else the kernel's), or `localhost`.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// One term of a lease, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    pub number: u64,
    pub replica: String,
    pub incarnation: String,
    pub expires_at_ms: i64,
}

impl Term {
    fn encode(&self) -> Bytes {
        Bytes::from(format!("{}\n{}\n{}\n", self.replica, self.incarnation, self.expires_at_ms))
    }

    fn decode(number: u64, bytes: &[u8]) -> Option<Term> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.lines();
        let (replica, incarnation) = (lines.next()?.to_string(), lines.next()?.to_string());
        let expires_at_ms = lines.next()?.parse().ok()?;
        Some(Term { number, replica, incarnation, expires_at_ms })
    }
}

/// The leases of one store's jobs, held as `replica`.
pub struct Leases {
    dir: Location,
    pub replica: Replica,
}

fn term_name(job: &str, number: u64) -> String {
    format!("{job}/{number:020}")
}

impl Leases {
    /// Leases under `dir` (the job records' directory, `_leases/` below it).
    pub fn new(dir: &Location, replica: Replica) -> Leases {
        Leases { dir: dir.child("_leases"), replica }
    }

    /// Fails unless the store refuses a second put-if-absent of one object: a store that
    /// silently overwrites (an S3-compatible server ignoring `If-None-Match`) cannot be shared.
    pub async fn check_store(&self) -> Result<(), StoreError> {
        let probe = format!("_probe-{}", self.replica.incarnation);
        self.dir.put_if_absent(&probe, Bytes::from_static(b"1")).await?;
        let second = self.dir.put_if_absent(&probe, Bytes::from_static(b"2")).await;
        self.dir.delete(&probe).await?;
        match second {
            Err(StoreError::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e),
            Ok(()) => Err(StoreError::Io {
                uri: self.dir.uri_of(&probe),
                source: "the store overwrote an object written with put-if-absent (If-None-Match: *), so \
                         replicas cannot share it safely; run one replica and start it with --single-replica"
                    .into(),
            }),
        }
    }

    /// The newest term of `job`'s lease, if any.
    pub async fn latest(&self, job: &str) -> Result<Option<Term>, StoreError> {
        let names = self.dir.list(job).await?;
        let Some(last) = names.iter().filter_map(|n| n.rsplit('/').next()?.parse::<u64>().ok()).max() else {
            return Ok(None);
        };
        match self.dir.get(&term_name(job, last)).await {
            Ok(bytes) => Ok(Term::decode(last, &bytes)),
            // Released between the listing and the read.
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Takes `job`'s lease when nobody holds it (no term, an expired one, or one of this replica's
    /// earlier incarnations): the new term's number, or `None` when another replica holds it or
    /// won the race for it.
    pub async fn claim(&self, job: &str) -> Result<Option<u64>, StoreError> {
        let next = match self.latest(job).await? {
            None => 1,
            Some(t) if t.replica == self.replica.id || t.expires_at_ms <= now_ms() => t.number + 1,
            Some(_) => return Ok(None),
        };
        self.write(job, next).await
    }

    /// Extends a held lease by writing the term after `term`: the new number, or `None` when that
    /// term exists already (another replica took the job over: stop writing for it).
    pub async fn renew(&self, job: &str, term: u64) -> Result<Option<u64>, StoreError> {
        let next = self.write(job, term + 1).await?;
        if next.is_some() {
            // Older terms are history; the newest is what counts.
            let _ = self.dir.delete(&term_name(job, term)).await;
        }
        Ok(next)
    }

    /// Ends `job`'s lease (the job is over): every term removed.
    pub async fn release(&self, job: &str) -> Result<(), StoreError> {
        for name in self.dir.list(job).await? {
            self.dir.delete(&name).await?;
        }
        Ok(())
    }

    async fn write(&self, job: &str, number: u64) -> Result<Option<u64>, StoreError> {
        let term = Term {
            number,
            replica: self.replica.id.clone(),
            incarnation: self.replica.incarnation.clone(),
            expires_at_ms: now_ms() + self.replica.ttl.as_millis() as i64,
        };
        match self.dir.put_if_absent(&term_name(job, number), term.encode()).await {
            Ok(()) => Ok(Some(number)),
            Err(StoreError::AlreadyExists { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(store: &Location, id: &str, ttl_ms: u64) -> Leases {
        Leases::new(store, Replica::new(Some(id.into()), Duration::from_millis(ttl_ms)))
    }

    #[tokio::test]
    async fn one_replica_holds_a_lease_until_it_expires() {
        let store = Location::parse("memory://lease-test/jobs").unwrap();
        let (a, b) = (leases(&store, "a", 300), leases(&store, "b", 300));
        a.check_store().await.unwrap();
        let t1 = a.claim("j").await.unwrap().expect("a claims a free lease");
        assert_eq!(b.claim("j").await.unwrap(), None, "b may not take a held lease");
        let t2 = a.renew("j", t1).await.unwrap().expect("a renews");
        tokio::time::sleep(Duration::from_millis(350)).await;
        let t3 = b.claim("j").await.unwrap().expect("b takes an expired lease");
        assert_eq!(t3, t2 + 1);
        assert_eq!(a.renew("j", t2).await.unwrap(), None, "a learns it lost the job");
        assert_eq!(a.latest("j").await.unwrap().unwrap().replica, "b");
        b.release("j").await.unwrap();
        assert_eq!(a.latest("j").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_restarted_replica_takes_its_lease_back_at_once() {
        let store = Location::parse("memory://lease-restart/jobs").unwrap();
        let before = leases(&store, "a", 60_000);
        let t = before.claim("j").await.unwrap().unwrap();
        let after = leases(&store, "a", 60_000);
        assert_eq!(after.claim("j").await.unwrap(), Some(t + 1));
        assert_eq!(before.renew("j", t).await.unwrap(), None, "the old incarnation lost it");
    }

    #[tokio::test]
    async fn of_two_claimants_exactly_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = Location::parse(dir.path().to_str().unwrap()).unwrap();
        let claims = (0..8).map(|i| {
            let l = leases(&store, &format!("r{i}"), 60_000);
            async move { l.claim("j").await.unwrap() }
        });
        let won: Vec<_> = futures::future::join_all(claims).await.into_iter().flatten().collect();
        assert_eq!(won, [1]);
    }
}
