//! Waiting without fixed sleeps: poll with a short, growing interval (so
//! readiness is noticed within ~100 ms) until a deadline, then fail with a
//! message that says what was awaited and what was last seen.

use std::future::Future;
use std::time::{Duration, Instant};

/// First poll interval; doubles up to [`Backoff::max`].
const FIRST_INTERVAL: Duration = Duration::from_millis(5);
/// Longest interval between two polls of a local condition.
pub const LOCAL_MAX_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[error("timed out after {waited:.1?} waiting for {what}{}", last_seen.as_ref().map(|s| format!(" (last seen: {s})")).unwrap_or_default())]
pub struct WaitTimeout {
    pub what: String,
    pub waited: Duration,
    pub last_seen: Option<String>,
}

/// What one poll found.
pub enum Poll<T> {
    Ready(T),
    /// Not yet; the string says what was seen, for the timeout message.
    Pending(String),
}

/// Exponential backoff with an upper bound and optional jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    jitter: bool,
}

impl Backoff {
    /// For conditions on this machine (a daemon becoming healthy).
    pub fn local() -> Backoff {
        Backoff {
            next: FIRST_INTERVAL,
            max: LOCAL_MAX_INTERVAL,
            jitter: false,
        }
    }

    /// For remote peers: starts at 100 ms, grows to `max`, with ±50 % jitter so
    /// a rack of nodes booting at once does not retry in lockstep.
    pub fn remote(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_millis(100),
            max,
            jitter: true,
        }
    }

    /// For a change a remote cluster refuses while it is briefly busy (etcd's
    /// strict reconfiguration check, its one-learner limit). The refusal
    /// ends at an instant we cannot observe, and every millisecond past it
    /// is the agent's own delay, so ask about as often as a local poll: a
    /// request per ≤ 100 ms from each of a handful of joiners costs etcd
    /// nothing. Jitter keeps joiners from colliding.
    pub fn contended() -> Backoff {
        Backoff {
            next: FIRST_INTERVAL,
            max: LOCAL_MAX_INTERVAL,
            jitter: true,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        if self.jitter {
            let factor = 0.5 + rand::random::<f64>();
            base.mul_f64(factor).min(self.max)
        } else {
            base
        }
    }
}

/// Polls `probe` until it is ready or `timeout` has passed.
pub async fn poll_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut backoff: Backoff,
    mut probe: F,
) -> Result<T, WaitTimeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Poll<T>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        let last_seen = match probe().await {
            Poll::Ready(value) => return Ok(value),
            Poll::Pending(seen) => seen,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitTimeout {
                what: what.to_string(),
                waited: now - start,
                last_seen: Some(last_seen),
            });
        }
        let delay = backoff.next_delay().min(deadline - now);
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_as_soon_as_ready() {
        let calls = AtomicU32::new(0);
        let value = poll_until(
            "thing",
            Duration::from_secs(5),
            Backoff::local(),
            || async {
                if calls.fetch_add(1, Ordering::SeqCst) >= 3 {
                    Poll::Ready(7)
                } else {
                    Poll::Pending("not yet".into())
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(value, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn timeout_names_what_and_last_seen() {
        let err = poll_until::<(), _, _>(
            "etcd health",
            Duration::from_millis(50),
            Backoff::local(),
            || async { Poll::Pending("connection refused".into()) },
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("etcd health") && text.contains("connection refused"),
            "{text}"
        );
    }

    #[test]
    fn local_backoff_is_capped_at_100ms() {
        let mut b = Backoff::local();
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], FIRST_INTERVAL);
        assert!(delays.iter().all(|d| *d <= LOCAL_MAX_INTERVAL));
        assert_eq!(*delays.last().unwrap(), LOCAL_MAX_INTERVAL);
    }
}
