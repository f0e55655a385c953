//! Events: what happened to which object, with strictly increasing sequence numbers (also across
//! restarts) and bounded retention.

use serde::{Deserialize, Serialize};

use super::{decode, encode, Store, StoreError, EVENTS};

/// How many events are kept by default.
pub const DEFAULT_EVENT_RETENTION: usize = 10_000;

/// The longest event message kept: messages carry errors and console tails, which a guest or a
/// registry can make as long as it likes; with the retention this bounds the log's size (~40 MiB).
pub const MAX_EVENT_MESSAGE_BYTES: usize = 4 << 10;
/// The longest object name or reason kept.
const MAX_EVENT_FIELD_BYTES: usize = 256;

/// `text` cut to at most `max` bytes on a character boundary, saying how much was cut.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &text[..end], text.len() - end)
}

/// Whether an event is routine or needs attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A normal transition.
    Normal,
    /// Something failed or is wrong.
    Warning,
}

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// The object: a VM name, or `source/<name>`.
    pub object: String,
    /// Normal or Warning.
    pub kind: EventKind,
    /// CamelCase reason (`Created`, `Started`, `ImagePullFailed`...).
    pub reason: String,
    /// Human-readable details.
    pub message: String,
    /// When, RFC 3339.
    pub time: String,
}

impl Store {
    /// Appends an event and returns its sequence number.
    pub fn append_event(&self, event: &Event) -> Result<u64, StoreError> {
        // generate_id is monotonic across restarts (sled reserves id ranges durably).
        let seq = self.db.generate_id()? + 1;
        let event = Event {
            object: bounded(&event.object, MAX_EVENT_FIELD_BYTES),
            reason: bounded(&event.reason, MAX_EVENT_FIELD_BYTES),
            message: bounded(&event.message, MAX_EVENT_MESSAGE_BYTES),
            ..event.clone()
        };
        self.events.insert(seq.to_be_bytes(), encode(&event))?;
        if seq % 64 == 0 {
            self.trim_events()?;
        }
        Ok(seq)
    }

    fn trim_events(&self) -> Result<(), StoreError> {
        let excess = self.events.len().saturating_sub(self.event_retention);
        for key in self.events.iter().keys().take(excess) {
            self.events.remove(key?)?;
        }
        Ok(())
    }

    /// Up to `limit` events after sequence number `after`, oldest first.
    pub fn events_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, Event)>, StoreError> {
        let start = after.saturating_add(1).to_be_bytes();
        self.events
            .range(start..)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                let seq = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    tree: EVENTS,
                    key: format!("{k:?}"),
                    detail: "event keys are 8-byte sequence numbers".into(),
                })?);
                Ok((seq, decode(EVENTS, &k, &v)?))
            })
            .collect()
    }

    /// The newest event's sequence number (0 when there is none).
    pub fn last_event_seq(&self) -> Result<u64, StoreError> {
        Ok(self.events.last()?.map(|(k, _)| k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0)).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: usize) -> Event {
        Event {
            object: "web".into(),
            kind: EventKind::Normal,
            reason: "Tick".into(),
            message: i.to_string(),
            time: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn events_are_bounded_in_size_not_only_in_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let huge = Event { message: "é".repeat(1 << 20), reason: "R".repeat(10_000), ..event(0) };
        store.append_event(&huge).unwrap();
        let (_, kept) = store.events_since(0, 1).unwrap().remove(0);
        assert!(kept.message.len() <= MAX_EVENT_MESSAGE_BYTES + 64, "{} bytes kept", kept.message.len());
        assert!(kept.message.ends_with("more bytes)") && kept.message.starts_with("éé"), "cut on a character");
        assert!(kept.reason.len() <= 256 + 64);
        assert_eq!(kept.object, "web", "short fields are kept whole");
    }

    #[test]
    fn sequence_numbers_increase_across_restarts_and_retention_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let mut last = 0;
        for round in 0..2 {
            let store = Store::open(dir.path()).unwrap().with_event_retention(100);
            for i in 0..150 {
                let seq = store.append_event(&event(round * 1000 + i)).unwrap();
                assert!(seq > last, "{seq} after {last}");
                last = seq;
            }
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap().with_event_retention(100);
        assert_eq!(store.last_event_seq().unwrap(), last);
        let all = store.events_since(0, usize::MAX).unwrap();
        assert!(all.len() <= 100 + 64, "retention bounds the log: {}", all.len());
        assert_eq!(all.last().unwrap().1.message, "1149");
        let tail = store.events_since(last - 3, 10).unwrap();
        assert_eq!(tail.len(), 3);
        assert!(tail.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
