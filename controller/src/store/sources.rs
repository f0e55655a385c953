//! What the controller knows about each desired-state source.

use serde::{Deserialize, Serialize};

use super::{decode, encode, Store, StoreError, SOURCES};

/// The state of one source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceState {
    /// The source's name.
    pub name: String,
    /// Where it reads from (credentials stripped).
    pub url: String,
    /// The last revision applied.
    #[serde(default)]
    pub revision: Option<String>,
    /// When it was last synced, RFC 3339.
    #[serde(default)]
    pub last_sync: Option<String>,
    /// Why the last sync was not applied.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Polling is suspended.
    #[serde(default)]
    pub suspended: bool,
}

impl Store {
    /// Records the state of a source. Durable on return.
    pub fn put_source_state(&self, state: &SourceState) -> Result<(), StoreError> {
        self.sources.insert(state.name.as_bytes(), encode(state))?;
        self.flush()
    }

    /// The state of source `name`.
    pub fn get_source_state(&self, name: &str) -> Result<Option<SourceState>, StoreError> {
        match self.sources.get(name.as_bytes())? {
            Some(v) => decode(SOURCES, name.as_bytes(), &v).map(Some),
            None => Ok(None),
        }
    }

    /// Forgets the state of every source not named in `configured` (a daemon started without a
    /// source it had before must not keep reporting that source's last error), and returns the
    /// names forgotten. The VMs those sources declared are left as they are.
    pub fn retain_source_states(&self, configured: &[&str]) -> Result<Vec<String>, StoreError> {
        let mut forgotten = Vec::new();
        for state in self.list_source_states()? {
            if !configured.contains(&state.name.as_str()) {
                self.sources.remove(state.name.as_bytes())?;
                forgotten.push(state.name);
            }
        }
        self.flush()?;
        Ok(forgotten)
    }

    /// Every source's state, by name.
    pub fn list_source_states(&self) -> Result<Vec<SourceState>, StoreError> {
        self.sources.iter().map(|kv| kv.map_err(StoreError::from).and_then(|(k, v)| decode(SOURCES, &k, &v))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_states_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let state = SourceState {
            name: "fleet".into(),
            url: "file:///r".into(),
            revision: Some("abc".into()),
            ..Default::default()
        };
        store.put_source_state(&state).unwrap();
        assert_eq!(store.get_source_state("fleet").unwrap(), Some(state.clone()));
        assert_eq!(store.list_source_states().unwrap(), std::slice::from_ref(&state));
        assert_eq!(store.get_source_state("other").unwrap(), None);
        store.put_source_state(&SourceState { name: "old".into(), ..Default::default() }).unwrap();
        assert_eq!(store.retain_source_states(&["fleet"]).unwrap(), ["old"]);
        assert_eq!(store.list_source_states().unwrap(), [state]);
    }
}
