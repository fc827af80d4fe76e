//! The muxer's one timer: a timerfd in its epoll, armed for the earliest deadline it tracks
//! (connections and host handshakes that must finish in time). The muxer keeps the deadlines;
//! this only makes sure it is woken by the earliest.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// A zero timerfd value disarms it; a deadline already past fires after this instead.
const MIN_DELAY: Duration = Duration::from_millis(1);

#[derive(Debug)]
pub struct DeadlineTimer {
    fd: TimerFd,
    /// When it fires, if armed.
    armed: Option<Instant>,
}

impl DeadlineTimer {
    pub fn new() -> io::Result<Self> {
        Ok(Self { fd: TimerFd::new().map_err(io::Error::from)?, armed: None })
    }

    /// Makes sure the timer fires no later than `deadline`.
    pub fn arm_by(&mut self, deadline: Instant, now: Instant) {
        if self.armed.is_some_and(|at| at <= deadline) {
            return;
        }
        self.set(Some(deadline), now);
    }

    /// Arms the timer for `next`, or disarms it. Either way a pending expiry is cleared
    /// (timerfd_settime resets its count), so the epoll stops reporting it.
    pub fn set(&mut self, next: Option<Instant>, now: Instant) {
        let r = match next {
            Some(at) => self.fd.reset(at.saturating_duration_since(now).max(MIN_DELAY), None),
            None => self.fd.clear(),
        };
        match r {
            Ok(()) => self.armed = next,
            Err(e) => {
                // Deadlines then wait for the next arm; every map they guard is capped anyway.
                tracing::warn!("vsock: deadline timer: {e}");
                self.armed = None;
            }
        }
    }
}

impl AsRawFd for DeadlineTimer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    use super::*;

    fn fired(epoll: &Epoll, wait_ms: i32) -> bool {
        let mut ev = [EpollEvent::default(); 1];
        epoll.wait(wait_ms, &mut ev).unwrap() == 1
    }

    #[test]
    fn fires_by_the_earliest_deadline_and_clears() {
        let mut t = DeadlineTimer::new().unwrap();
        let epoll = Epoll::new().unwrap();
        epoll.ctl(ControlOperation::Add, t.as_raw_fd(), EpollEvent::new(EventSet::IN, 0)).unwrap();
        let now = Instant::now();
        t.arm_by(now + Duration::from_secs(60), now);
        // An earlier deadline takes over; a later one does not.
        t.arm_by(now + Duration::from_millis(20), now);
        t.arm_by(now + Duration::from_secs(30), now);
        assert!(fired(&epoll, 5_000));
        t.set(None, Instant::now());
        assert!(!fired(&epoll, 0), "cleared by disarming");
        // A deadline in the past still fires.
        t.set(Some(now), Instant::now());
        assert!(fired(&epoll, 5_000));
    }
}
