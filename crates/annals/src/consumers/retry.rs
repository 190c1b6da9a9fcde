//! Retry with exponential backoff and jitter, shared by every consumer.

use std::{
    hash::{Hash, Hasher},
    time::Duration,
};

/// How often and how patiently a failing message is retried before it is
/// parked in a dead-letter stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Deliveries (first try included) before the message is parked.
    /// `1` parks on the first failure.
    pub max_attempts: u32,
    /// Wait before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound of any wait.
    pub max_backoff: Duration,
    /// Each further attempt waits this many times longer.
    pub multiplier: u32,
    /// Fraction (0.0–1.0) of each wait that is randomised away, so many
    /// messages failing together do not retry in lockstep.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            multiplier: 2,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// At most `n` attempts (at least one), default backoff.
    pub fn attempts(n: u32) -> Self {
        RetryPolicy { max_attempts: n.max(1), ..RetryPolicy::default() }
    }

    /// Sets the initial and maximum backoff.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Sets the jitter fraction (clamped to 0.0–1.0).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_nan() { 0.0 } else { jitter.clamp(0.0, 1.0) };
        self
    }

    /// Whether a message that failed `failed_attempts` times gets another try.
    pub fn should_retry(&self, failed_attempts: u32) -> bool {
        failed_attempts < self.max_attempts
    }

    /// The wait after the `failed_attempts`-th failure (1-based).
    ///
    /// The jitter is derived from `seed` (e.g. the event position) and the
    /// attempt rather than from a random generator: it spreads different
    /// messages apart just as well and keeps tests reproducible.
    pub fn delay(&self, failed_attempts: u32, seed: u64) -> Duration {
        let exponent = failed_attempts.saturating_sub(1).min(32);
        let factor = self.multiplier.max(1).saturating_pow(exponent);
        let base = self.initial_backoff.saturating_mul(factor).min(self.max_backoff);
        // Also a NaN set through the public field.
        if self.jitter.is_nan() || self.jitter <= 0.0 {
            return base;
        }
        let mut hasher = std::hash::DefaultHasher::new();
        (seed, failed_attempts).hash(&mut hasher);
        // 53 bits fit an f64 mantissa exactly: a uniform fraction in [0, 1).
        let fraction = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
        // `mul_f64` panics when the product does not fit (a base near
        // `Duration::MAX` whose float rounds up); keep the base then.
        Duration::try_from_secs_f64(base.as_secs_f64() * (1.0 - self.jitter.min(1.0) * fraction))
            .map_or(base, |d| d.min(base))
    }
}

/// Why a handler failed one event.
///
/// Converts from any error with `?`. A [`HandlerError::permanent`] failure
/// is parked at once instead of being retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    /// What went wrong (stored with a parked message).
    pub reason: String,
    /// Whether retrying cannot help (e.g. the payload does not decode).
    pub permanent: bool,
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn new(reason: impl Into<String>) -> Self {
        HandlerError { reason: reason.into(), permanent: false }
    }

    /// A failure no retry can fix: the message is parked immediately.
    pub fn permanent(reason: impl Into<String>) -> Self {
        HandlerError { reason: reason.into(), permanent: true }
    }

    /// The failure of a handler that panicked (caught with
    /// `catch_unwind`): retried like any failure, since a panic can be
    /// transient (a poisoned lock), then parked.
    pub(crate) fn panicked(payload: Box<dyn std::any::Any + Send>) -> Self {
        HandlerError::new(format!("handler panicked: {}", panic_message(&*payload)))
    }
}

/// What a caught panic said.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError::new(error.to_string())
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_is_capped_and_jitter_only_shortens() {
        let p =
            RetryPolicy::attempts(10).backoff(Duration::from_millis(100), Duration::from_secs(1)).jitter(0.0);
        assert_eq!(p.delay(1, 7), Duration::from_millis(100));
        assert_eq!(p.delay(2, 7), Duration::from_millis(200));
        assert_eq!(p.delay(3, 7), Duration::from_millis(400));
        assert_eq!(p.delay(9, 7), Duration::from_secs(1));
        let j = p.jitter(0.5);
        for seed in 0..100 {
            let d = j.delay(2, seed);
            assert!(d <= Duration::from_millis(200) && d >= Duration::from_millis(100), "{d:?}");
        }
        assert_eq!(j.delay(2, 42), j.delay(2, 42));
        assert!(p.should_retry(9) && !p.should_retry(10));
    }

    #[test]
    fn odd_fields_set_directly_give_a_delay_not_a_panic() {
        // The fields are public: `jitter()` clamps, a struct literal does not.
        let nan = RetryPolicy { jitter: f64::NAN, ..RetryPolicy::default() };
        assert_eq!(nan.delay(1, 7), Duration::from_millis(100));
        let huge = RetryPolicy {
            initial_backoff: Duration::MAX,
            max_backoff: Duration::MAX,
            jitter: 1e-300,
            ..RetryPolicy::default()
        };
        assert!(huge.delay(3, 7) > Duration::from_secs(1 << 60));
    }
}
