//! QMP events: the `Event` type, filters, and the per-subscriber streams they are delivered on.
//!
//! Every subscriber has its own unbounded channel, so a slow subscriber never delays command replies or other
//! subscribers; an event QEMU sends before the reply of the command that caused it is already queued for a
//! subscriber that subscribed before sending the command.

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::open_enum::open_enum;
use crate::types::JobStatus;

open_enum! {
    /// The name of an event. Events this crate does not list arrive as `Unknown(name)` with their raw data.
    pub enum EventKind {
        JobStatusChange => "JOB_STATUS_CHANGE",
        BlockJobCompleted => "BLOCK_JOB_COMPLETED",
        BlockJobCancelled => "BLOCK_JOB_CANCELLED",
        BlockJobError => "BLOCK_JOB_ERROR",
        BlockJobReady => "BLOCK_JOB_READY",
        BlockJobPending => "BLOCK_JOB_PENDING",
        BlockExportDeleted => "BLOCK_EXPORT_DELETED",
        BlockImageCorrupted => "BLOCK_IMAGE_CORRUPTED",
        BlockIoError => "BLOCK_IO_ERROR",
        BlockWriteThreshold => "BLOCK_WRITE_THRESHOLD",
        DeviceDeleted => "DEVICE_DELETED",
        Shutdown => "SHUTDOWN",
        Powerdown => "POWERDOWN",
        Reset => "RESET",
        Stop => "STOP",
        Resume => "RESUME",
        Suspend => "SUSPEND",
        Wakeup => "WAKEUP",
        GuestPanicked => "GUEST_PANICKED",
    }
}

/// One event as QEMU sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name as sent, e.g. `JOB_STATUS_CHANGE`.
    pub name: String,
    /// The name as an open enum.
    pub kind: EventKind,
    /// The event's `data` member; `Value::Null` when QEMU sent none.
    pub data: Value,
    /// QEMU's `(seconds, microseconds)` timestamp, when present.
    pub timestamp: Option<(i64, i64)>,
}

impl Event {
    /// Builds an event from a decoded QMP message that has an `event` member.
    pub(crate) fn from_message(mut message: Map<String, Value>) -> Option<Event> {
        let Some(Value::String(name)) = message.remove("event") else {
            return None;
        };
        let data = message.remove("data").unwrap_or(Value::Null);
        let timestamp = message.get("timestamp").and_then(|t| {
            let seconds = t.get("seconds")?.as_i64()?;
            let micros = t.get("microseconds")?.as_i64()?;
            Some((seconds, micros))
        });
        Some(Event {
            kind: EventKind::from(name.as_str()),
            name,
            data,
            timestamp,
        })
    }

    /// The job (or export) this event is about: `data.id`, else `data.device` (block job events name their
    /// job `device`).
    pub fn job_id(&self) -> Option<&str> {
        self.data_str("id").or_else(|| self.data_str("device"))
    }

    /// The new status of a `JOB_STATUS_CHANGE` event.
    pub fn job_status(&self) -> Option<JobStatus> {
        if self.kind != EventKind::JobStatusChange {
            return None;
        }
        self.data_str("status").map(JobStatus::from)
    }

    /// A string member of `data`.
    pub fn data_str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }
}

/// Which events a subscriber wants: by name, by job, or both (an event must pass every condition given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    names: Option<Vec<String>>,
    job: Option<String>,
}

impl EventFilter {
    /// Every event.
    pub fn all() -> EventFilter {
        EventFilter::default()
    }

    /// Events with one of these names.
    pub fn names(names: &[&str]) -> EventFilter {
        EventFilter {
            names: Some(names.iter().map(|&n| n.to_owned()).collect()),
            job: None,
        }
    }

    /// Narrows the filter to events whose `data.id` or `data.device` is `id`.
    #[must_use]
    pub fn job(mut self, id: impl Into<String>) -> EventFilter {
        self.job = Some(id.into());
        self
    }

    /// Whether `event` passes the filter.
    pub fn matches(&self, event: &Event) -> bool {
        let name_ok = self
            .names
            .as_ref()
            .is_none_or(|names| names.contains(&event.name));
        let job_ok = self
            .job
            .as_deref()
            .is_none_or(|id| event.data_str("id") == Some(id) || event.data_str("device") == Some(id));
        name_ok && job_ok
    }
}

impl fmt::Display for EventFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.names {
            Some(names) => write!(f, "event {}", names.join(" or "))?,
            None => f.write_str("any event")?,
        }
        if let Some(job) = &self.job {
            write!(f, " for {job}")?;
        }
        Ok(())
    }
}

/// The events of one subscription, in the order QEMU sent them. Ends (`next` returns `None`) once the
/// connection has closed and everything queued before has been read.
#[derive(Debug)]
pub struct EventStream {
    filter: EventFilter,
    rx: mpsc::UnboundedReceiver<Event>,
}

impl EventStream {
    /// The next event; `None` once the connection is closed and the queue drained. Waits as long as it takes:
    /// use `next_timeout` unless something else bounds the wait.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event, waiting at most `timeout`. Fails with `Closed` when the stream has ended.
    pub async fn next_timeout(&mut self, timeout: Duration) -> crate::Result<Event> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(event)) => Ok(event),
            Ok(None) => Err(Error::Closed {
                detail: format!("no more events: waiting for {}", self.filter),
            }),
            Err(_) => Err(Error::Timeout {
                what: self.filter.to_string(),
                after: timeout,
            }),
        }
    }

    /// An event that has already arrived, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// The filter this stream was subscribed with.
    pub fn filter(&self) -> &EventFilter {
        &self.filter
    }
}

/// The subscribers of one connection. Lives inside the connection's state lock.
#[derive(Debug, Default)]
pub(crate) struct Subscribers {
    list: Vec<(EventFilter, mpsc::UnboundedSender<Event>)>,
}

impl Subscribers {
    /// Registers a subscriber; it sees every event published from now on that passes `filter`.
    pub(crate) fn add(&mut self, filter: EventFilter) -> EventStream {
        let (tx, rx) = mpsc::unbounded_channel();
        self.list.push((filter.clone(), tx));
        EventStream { filter, rx }
    }

    /// A stream that has already ended, for subscriptions on a closed connection.
    pub(crate) fn ended(filter: EventFilter) -> EventStream {
        let (_, rx) = mpsc::unbounded_channel();
        EventStream { filter, rx }
    }

    /// Queues `event` for every subscriber that wants it, forgetting subscribers that went away.
    pub(crate) fn publish(&mut self, event: &Event) {
        self.list.retain(|(filter, tx)| {
            if tx.is_closed() {
                return false;
            }
            if filter.matches(event) {
                return tx.send(event.clone()).is_ok();
            }
            true
        });
    }

    /// Drops every sender: streams end once drained.
    pub(crate) fn clear(&mut self) {
        self.list.clear();
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(value: Value) -> Event {
        let Value::Object(map) = value else {
            panic!("not an object")
        };
        Event::from_message(map).unwrap()
    }

    #[test]
    fn parses_known_and_unknown_events() {
        let e = event(
            json!({"event": "JOB_STATUS_CHANGE", "data": {"id": "j1", "status": "pending"},
            "timestamp": {"seconds": 10, "microseconds": 5}}),
        );
        assert_eq!(e.kind, EventKind::JobStatusChange);
        assert_eq!(e.job_id(), Some("j1"));
        assert_eq!(e.job_status(), Some(JobStatus::Pending));
        assert_eq!(e.timestamp, Some((10, 5)));

        let e = event(json!({"event": "X_FUTURE_THING", "data": [1]}));
        assert_eq!(e.kind, EventKind::Unknown("X_FUTURE_THING".into()));
        assert_eq!(e.job_id(), None);
        assert_eq!(e.timestamp, None);

        let e = event(json!({"event": "BLOCK_JOB_COMPLETED", "data": {"device": "b1", "len": 1}}));
        assert_eq!(e.job_id(), Some("b1"));
        assert_eq!(e.job_status(), None);
    }

    #[test]
    fn filters_combine_names_and_job() {
        let status = event(json!({"event": "JOB_STATUS_CHANGE", "data": {"id": "j1", "status": "running"}}));
        let completed = event(json!({"event": "BLOCK_JOB_COMPLETED", "data": {"device": "j1"}}));
        let other = event(json!({"event": "JOB_STATUS_CHANGE", "data": {"id": "j2", "status": "running"}}));
        let stop = event(json!({"event": "STOP"}));

        assert!(
            [&status, &completed, &other, &stop]
                .iter()
                .all(|e| EventFilter::all().matches(e))
        );
        let by_name = EventFilter::names(&["JOB_STATUS_CHANGE"]);
        assert!(by_name.matches(&status) && by_name.matches(&other));
        assert!(!by_name.matches(&completed) && !by_name.matches(&stop));
        let by_job = EventFilter::all().job("j1");
        assert!(by_job.matches(&status) && by_job.matches(&completed));
        assert!(!by_job.matches(&other) && !by_job.matches(&stop));
        let both = by_name.job("j1");
        assert!(both.matches(&status));
        assert!(!both.matches(&completed) && !both.matches(&other));
        assert_eq!(both.to_string(), "event JOB_STATUS_CHANGE for j1");
    }

    #[tokio::test]
    async fn subscribers_get_matching_events_until_cleared() {
        let mut subs = Subscribers::default();
        let mut stops = subs.add(EventFilter::names(&["STOP"]));
        let dropped = subs.add(EventFilter::all());
        drop(dropped);
        subs.publish(&event(json!({"event": "RESUME"})));
        subs.publish(&event(json!({"event": "STOP"})));
        assert_eq!(subs.list.len(), 1);
        subs.clear();
        assert_eq!(stops.next().await.unwrap().kind, EventKind::Stop);
        assert!(stops.next().await.is_none());
        assert!(
            stops
                .next_timeout(Duration::from_secs(1))
                .await
                .unwrap_err()
                .is_closed()
        );
    }
}
