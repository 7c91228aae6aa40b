//! An idle clock for streams: how long a peer has made no progress, started only when it has
//! none ready, so time spent elsewhere (the other side's back-pressure) is never counted.
//!
//! Used for `listen.body_idle_timeout` both ways — an app's request body
//! ([`crate::proxy::OutboundBody`]) and an app that takes no part of its response
//! ([`crate::listener`]) — and for `upstream.body_idle_timeout` (Tango's response body,
//! [`crate::proxy::UpstreamBody`]).

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The clock. Call [`IdleClock::progressed`] whenever the peer made progress and
/// [`IdleClock::expired`] whenever it had none ready.
#[derive(Debug)]
pub struct IdleClock {
    idle: Duration,
    /// Made at the first wait, then reset for each later one.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer counts the current wait.
    armed: bool,
}

impl IdleClock {
    /// A clock that expires after `idle` without progress.
    pub fn new(idle: Duration) -> Self {
        Self {
            idle,
            timer: None,
            armed: false,
        }
    }

    /// The limit.
    pub fn limit(&self) -> Duration {
        self.idle
    }

    /// The peer made progress: the next wait starts counting when it starts.
    pub fn progressed(&mut self) {
        self.armed = false;
    }

    /// The peer has nothing ready: starts the clock if this wait has none yet, and says whether
    /// it ran out (registering `cx` to be woken when it does).
    pub fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let timer = match (&mut self.timer, self.armed) {
            (Some(timer), true) => timer,
            (Some(timer), false) => {
                timer.as_mut().reset(Instant::now() + self.idle);
                timer
            }
            (slot @ None, _) => slot.insert(Box::pin(tokio::time::sleep(self.idle))),
        };
        self.armed = true;
        timer.as_mut().poll(cx).is_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    #[tokio::test(start_paused = true)]
    async fn counts_only_waits_and_restarts_after_progress() {
        let mut clock = IdleClock::new(Duration::from_secs(10));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(!clock.expired(&mut cx));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!clock.expired(&mut cx));
        clock.progressed();
        tokio::time::advance(Duration::from_secs(5)).await;
        // A new wait: 5 s of it so far, not 14.
        assert!(!clock.expired(&mut cx));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!clock.expired(&mut cx));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(clock.expired(&mut cx));
    }
}
