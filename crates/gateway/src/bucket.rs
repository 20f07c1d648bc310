//! A token bucket: what a connection may do per second, after a burst.

use std::time::Duration;

use tokio::time::Instant;

/// `capacity` tokens at most, refilled at `per_second`.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    capacity: f64,
    per_second: f64,
    refilled: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(capacity: u32, per_second: f64) -> Self {
        Self {
            tokens: f64::from(capacity),
            capacity: f64::from(capacity),
            per_second,
            refilled: Instant::now(),
        }
    }

    /// Whether the bucket has refilled to its capacity.
    pub fn is_full(&self) -> bool {
        let elapsed = self.refilled.elapsed().as_secs_f64();
        self.tokens + elapsed * self.per_second >= self.capacity
    }

    /// Takes `n` tokens if there are that many; else says how long until there would
    /// be (and takes none). More than the capacity can never be taken.
    pub fn take(&mut self, n: u32) -> Result<(), Duration> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        let wanted = f64::from(n);
        if self.tokens >= wanted {
            self.tokens -= wanted;
            Ok(())
        } else if wanted > self.capacity {
            Err(Duration::MAX)
        } else {
            Err(Duration::from_secs_f64(
                (wanted - self.tokens) / self.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate() {
        let mut bucket = Bucket::new(3, 2.0);
        for _ in 0..3 {
            assert!(bucket.take(1).is_ok());
        }
        let wait = bucket.take(1).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(bucket.take(1).is_ok());
        assert!(bucket.take(4).unwrap_err() == Duration::MAX);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(bucket.take(3).is_ok(), "refilled to the capacity, no more");
        assert!(bucket.take(1).is_err());
    }
}
