//! Leader election on a `coordination.k8s.io/v1` Lease, so only one replica
//! reconciles (two would fight over pods and assignments).
//!
//! Candidates read the Lease every `retry` and take it when it is free, is
//! already theirs, or has not been renewed for its `leaseDurationSeconds` as
//! measured on the candidate's own clock (like client-go: no trust in other
//! machines' clocks, only in "the record did not change for that long"). The
//! leader renews every `renew_interval` with the resourceVersion it last
//! wrote, so a write by anyone else makes its next renewal conflict. When it
//! cannot renew within `renew_deadline` (shorter than the lease, so it stops
//! before anyone may take over) or sees another holder, it steps down by
//! exiting the process: a fresh process is the clean way to drop every watch,
//! queue and in-flight reconcile at once.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::Api;

#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_interval: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

impl LeaderConfig {
    /// 15 s lease, renewed every 2 s, given up after 10 s without a renewal.
    pub fn new(name: String, namespace: String, identity: String) -> Self {
        LeaderConfig {
            name,
            namespace,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// What a candidate last saw of the Lease, and since when (its own clock).
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
    since: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: create it.
    Create,
    /// Free, ours, or expired: take it over.
    Take,
    /// Someone else holds it.
    Wait { holder: String },
}

/// What a candidate should do about the Lease it just read. Updates `seen`.
pub fn decide(
    lease: Option<&Lease>,
    identity: &str,
    default_duration: Duration,
    seen: &mut Option<Seen>,
    now: Instant,
) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_none() {
            Decision::Create
        } else {
            Decision::Take
        };
    };
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let observed = Seen {
        holder: holder.clone(),
        renew_time: spec.renew_time.clone(),
        transitions: spec.lease_transitions,
        since: now,
    };
    let since = match seen {
        Some(s)
            if s.holder == observed.holder
                && s.renew_time == observed.renew_time
                && s.transitions == observed.transitions =>
        {
            s.since
        }
        _ => {
            *seen = Some(observed);
            now
        }
    };
    let duration = spec
        .lease_duration_seconds
        .filter(|s| *s > 0)
        .map_or(default_duration, |s| Duration::from_secs(s as u64));
    match holder {
        None => Decision::Take,
        Some(h) if h == identity => Decision::Take,
        Some(_) if now.duration_since(since) >= duration => Decision::Take,
        Some(h) => Decision::Wait { holder: h },
    }
}

/// The Lease as its holder writes it.
fn held(mut lease: Lease, cfg: &LeaderConfig, now: Timestamp) -> Lease {
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder_changes = spec.holder_identity.as_deref() != Some(cfg.identity.as_str());
    if holder_changes {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(cfg.identity.clone());
    spec.lease_duration_seconds = Some(cfg.lease_duration.as_secs() as i32);
    spec.renew_time = Some(MicroTime(now));
    lease
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// The Lease this replica holds.
pub struct Leadership {
    api: Api<Lease>,
    cfg: LeaderConfig,
    /// The Lease as last written by us (its resourceVersion is the one the
    /// next renewal must match).
    lease: Lease,
    renewed: Instant,
}

/// Waits until this replica holds the Lease. API errors are logged and
/// retried: a candidate has nothing better to do.
pub async fn acquire(api: Api<Lease>, cfg: LeaderConfig) -> Leadership {
    let mut seen = None;
    let mut last_holder = None;
    loop {
        match try_acquire(&api, &cfg, &mut seen).await {
            Ok(Ok(lease)) => {
                tracing::info!(lease = %cfg.name, namespace = %cfg.namespace, identity = %cfg.identity, "acquired the leader Lease");
                return Leadership {
                    api,
                    cfg,
                    lease,
                    renewed: Instant::now(),
                };
            }
            Ok(Err(holder)) => {
                if last_holder.as_ref() != Some(&holder) {
                    tracing::info!(%holder, "standing by: another replica leads");
                    last_holder = Some(holder);
                }
            }
            Err(e) if is_conflict(&e) => {
                tracing::debug!("lost a race for the Lease; retrying");
            }
            Err(e) => tracing::warn!(error = %e, "cannot read or write the leader Lease; retrying"),
        }
        tokio::time::sleep(cfg.retry).await;
    }
}

/// `Ok(Ok(lease))` when acquired, `Ok(Err(holder))` when someone else holds it.
async fn try_acquire(
    api: &Api<Lease>,
    cfg: &LeaderConfig,
    seen: &mut Option<Seen>,
) -> Result<Result<Lease, String>, kube::Error> {
    let current = api.get_opt(&cfg.name).await?;
    match decide(
        current.as_ref(),
        &cfg.identity,
        cfg.lease_duration,
        seen,
        Instant::now(),
    ) {
        Decision::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: None,
            };
            let lease = held(lease, cfg, Timestamp::now());
            Ok(Ok(api.create(&PostParams::default(), &lease).await?))
        }
        Decision::Take => {
            // `current` carries its resourceVersion: if anyone wrote the Lease
            // since we read it, this replace conflicts and we try again.
            let lease = held(current.unwrap_or_default(), cfg, Timestamp::now());
            Ok(Ok(api
                .replace(&cfg.name, &PostParams::default(), &lease)
                .await?))
        }
        Decision::Wait { holder } => Ok(Err(holder)),
    }
}

impl Leadership {
    /// Renews the Lease until leadership is lost; returns why.
    pub async fn hold(&mut self) -> String {
        let mut tick = tokio::time::interval(self.cfg.renew_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            // Every call is bounded by the deadline: a renewal hanging on a
            // dead connection must not outlive our claim to the Lease.
            let left = self
                .cfg
                .renew_deadline
                .saturating_sub(self.renewed.elapsed());
            if left.is_zero() {
                return format!(
                    "the Lease was not renewed within {:?}",
                    self.cfg.renew_deadline
                );
            }
            match tokio::time::timeout(left, self.renew()).await {
                Err(_) => {
                    return format!(
                        "the Lease was not renewed within {:?}",
                        self.cfg.renew_deadline
                    )
                }
                Ok(Ok(())) => {}
                Ok(Err(Some(lost))) => return lost,
                Ok(Err(None)) => {}
            }
        }
    }

    /// One renewal. `Err(Some(why))` when leadership is lost, `Err(None)`
    /// when this attempt failed but the next may succeed.
    async fn renew(&mut self) -> Result<(), Option<String>> {
        let lease = held(self.lease.clone(), &self.cfg, Timestamp::now());
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(l) => {
                self.lease = l;
                self.renewed = Instant::now();
                Ok(())
            }
            Err(e) if is_conflict(&e) => match self.api.get_opt(&self.cfg.name).await {
                Ok(Some(l)) => {
                    let holder = l.spec.as_ref().and_then(|s| s.holder_identity.clone());
                    if holder.as_deref() == Some(self.cfg.identity.as_str()) {
                        // Still ours (someone touched another field): go on from it.
                        self.lease = l;
                        Err(None)
                    } else {
                        Err(Some(format!(
                            "the Lease is now held by {}",
                            holder.unwrap_or_else(|| "nobody".to_string())
                        )))
                    }
                }
                Ok(None) => Err(Some("the Lease was deleted".to_string())),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the leader Lease");
                    Err(None)
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the leader Lease; retrying");
                Err(None)
            }
        }
    }

    /// Gives the Lease up, so a successor need not wait for it to expire.
    pub async fn release(mut self) {
        let mut lease = self.lease.clone();
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            // A free Lease that the next candidate sees as free at once.
            spec.lease_duration_seconds = Some(1);
        }
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(l) => {
                self.lease = l;
                tracing::info!("released the leader Lease");
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not release the leader Lease; it expires on its own")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renew_second: i64) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(Timestamp::from_second(renew_second).unwrap())),
                ..LeaseSpec::default()
            }),
        }
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn creates_a_missing_lease() {
        let mut seen = None;
        assert_eq!(
            decide(None, "me", D, &mut seen, Instant::now()),
            Decision::Create
        );
    }

    #[test]
    fn takes_a_free_or_own_lease_at_once() {
        let mut seen = None;
        let t = Instant::now();
        assert_eq!(
            decide(Some(&lease(None, 1)), "me", D, &mut seen, t),
            Decision::Take
        );
        assert_eq!(
            decide(Some(&lease(Some(""), 1)), "me", D, &mut seen, t),
            Decision::Take
        );
        assert_eq!(
            decide(Some(&lease(Some("me"), 1)), "me", D, &mut seen, t),
            Decision::Take
        );
    }

    #[test]
    fn waits_for_a_renewed_lease_and_takes_an_expired_one() {
        let mut seen = None;
        let t0 = Instant::now();
        let l = lease(Some("other"), 100);
        let wait = Decision::Wait {
            holder: "other".to_string(),
        };
        assert_eq!(decide(Some(&l), "me", D, &mut seen, t0), wait);
        assert_eq!(
            decide(Some(&l), "me", D, &mut seen, t0 + Duration::from_secs(14)),
            wait
        );
        // Renewed: the clock starts again.
        let renewed = lease(Some("other"), 114);
        assert_eq!(
            decide(
                Some(&renewed),
                "me",
                D,
                &mut seen,
                t0 + Duration::from_secs(14)
            ),
            wait
        );
        assert_eq!(
            decide(
                Some(&renewed),
                "me",
                D,
                &mut seen,
                t0 + Duration::from_secs(28)
            ),
            wait
        );
        // Not renewed for a whole lease duration on our clock: take it.
        assert_eq!(
            decide(
                Some(&renewed),
                "me",
                D,
                &mut seen,
                t0 + Duration::from_secs(29)
            ),
            Decision::Take
        );
    }

    #[test]
    fn a_holder_writes_identity_renewal_and_transitions() {
        let cfg = LeaderConfig::new("l".into(), "ns".into(), "me".into());
        let t = Timestamp::from_second(1_000).unwrap();
        let l = held(lease(Some("other"), 1), &cfg, t);
        let s = l.spec.unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("me"));
        assert_eq!(s.lease_transitions, Some(1));
        assert_eq!(s.acquire_time, Some(MicroTime(t)));
        assert_eq!(s.renew_time, Some(MicroTime(t)));
        assert_eq!(s.lease_duration_seconds, Some(15));
        // Renewing our own Lease is not a transition.
        let again = held(
            Lease {
                metadata: ObjectMeta::default(),
                spec: Some(s),
            },
            &cfg,
            Timestamp::from_second(1_002).unwrap(),
        );
        let s = again.spec.unwrap();
        assert_eq!(s.lease_transitions, Some(1));
        assert_eq!(s.acquire_time, Some(MicroTime(t)));
    }
}
