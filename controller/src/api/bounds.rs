//! Bounds on manifest input, checked before anything is deserialized: a manifest comes from whoever
//! can push to the fleet repository or reach the API, so its size and the work it can cause are capped.
//!
//! YAML aliases replay the node they name, so a text of linear size can make a parser walk a number
//! of nodes quadratic in it (a "wide" billion laughs: one large anchor, aliased many times). Every
//! document is therefore walked once with a node budget ([`MAX_NODES`]) that counts replayed nodes
//! too, and refused when it runs out, before it is deserialized or looked at again.

use std::cell::Cell;
use std::fmt;

use serde::de::{DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use serde::Deserializer;

/// The largest manifest file accepted, in bytes: room for a VM whose `copyFiles` carry their
/// content inline (8 MiB, base64), while a fleet file of hundreds of VMs is well under it.
pub const MAX_MANIFEST_BYTES: usize = 12 << 20;

/// The most bytes of scalar text one document may hold with its aliases expanded: an alias of a
/// long string copies it, so without this a few kilobytes of aliases make gigabytes of strings.
pub const MAX_EXPANDED_BYTES: usize = 2 * MAX_MANIFEST_BYTES;

/// The most YAML nodes one document may have with its aliases expanded (a VM manifest has a few
/// hundred at most).
pub const MAX_NODES: usize = 100_000;

/// Walks `doc` (one YAML document) and fails as soon as it has more than [`MAX_NODES`] nodes, aliases
/// expanded. The error is serde_yaml's, with its location when it has one.
pub fn check_nodes(doc: &str) -> Result<(), serde_yaml::Error> {
    let used = Used { nodes: Cell::new(0), bytes: Cell::new(0) };
    Budget(&used).deserialize(serde_yaml::Deserializer::from_str(doc))
}

/// What a document has used of its budget so far.
struct Used {
    nodes: Cell<usize>,
    bytes: Cell<usize>,
}

/// A visitor that counts every node it sees against [`MAX_NODES`], and scalar text against
/// [`MAX_EXPANDED_BYTES`].
#[derive(Clone, Copy)]
struct Budget<'a>(&'a Used);

impl Budget<'_> {
    fn charge<E: serde::de::Error>(self) -> Result<(), E> {
        let n = self.0.nodes.get() + 1;
        self.0.nodes.set(n);
        if n > MAX_NODES {
            return Err(E::custom(format_args!(
                "more than {MAX_NODES} YAML nodes once aliases are expanded: refused (a manifest has a few hundred)"
            )));
        }
        Ok(())
    }

    fn charge_text<E: serde::de::Error>(self, len: usize) -> Result<(), E> {
        let bytes = self.0.bytes.get().saturating_add(len);
        self.0.bytes.set(bytes);
        if bytes > MAX_EXPANDED_BYTES {
            return Err(E::custom(format_args!(
                "more than {MAX_EXPANDED_BYTES} bytes of text once aliases are expanded: refused"
            )));
        }
        self.charge()
    }
}

impl<'de> DeserializeSeed<'de> for Budget<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

macro_rules! scalars {
    ($($name:ident: $ty:ty),*) => {
        $(fn $name<E: serde::de::Error>(self, _: $ty) -> Result<(), E> { self.charge() })*
    };
}

impl<'de> Visitor<'de> for Budget<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    scalars!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128, visit_u128: u128,
             visit_f64: f64);

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<(), E> {
        self.charge_text(text.len())
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<(), E> {
        self.charge_text(bytes.len())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.charge()
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.charge()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.charge()?;
        self.deserialize(deserializer)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.charge()?;
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.charge()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.charge()?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }

    /// A tagged node (`!tag value`).
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        self.charge()?;
        let ((), variant) = data.variant_seed(self)?;
        variant.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_documents_pass_and_tags_and_anchors_are_walked() {
        check_nodes("a: &x [1, 2.5, true, null, ~, \"s\"]\nb: *x\nc: !tag {k: v}\n").unwrap();
    }

    #[test]
    fn the_budget_counts_the_nodes_aliases_replay() {
        // 1 000 scalars, aliased 200 times: 200 000 nodes from a text of a few kilobytes.
        let mut doc = format!("a: &x [{}]\nb: [", vec!["1"; 1000].join(","));
        doc.push_str(&vec!["*x"; 200].join(","));
        doc.push_str("]\n");
        let e = check_nodes(&doc).unwrap_err().to_string();
        assert!(e.contains("more than 100000 YAML nodes"), "{e}");
        // The same anchor aliased 50 times stays within the budget.
        let mut doc = format!("a: &x [{}]\nb: [", vec!["1"; 1000].join(","));
        doc.push_str(&vec!["*x"; 50].join(","));
        doc.push_str("]\n");
        check_nodes(&doc).unwrap();
    }

    #[test]
    fn the_budget_counts_the_text_aliases_copy() {
        // One 1 MiB string aliased 100 times: 100 MiB of strings from a text of 1 MiB.
        let doc = format!("a: &x {}\nb: [{}]\n", "y".repeat(1 << 20), vec!["*x"; 100].join(","));
        let e = check_nodes(&doc).unwrap_err().to_string();
        assert!(e.contains("bytes of text once aliases are expanded"), "{e}");
        // Aliased a few times, it passes.
        let doc = format!("a: &x {}\nb: [*x, *x]\n", "y".repeat(1 << 20));
        check_nodes(&doc).unwrap();
    }
}
